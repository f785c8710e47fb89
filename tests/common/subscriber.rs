//! An MQTT test client (rumqttc, MQTT 3.1.1, plain TCP) that records everything it receives.
//!
//! It connects to the broker's plain listener with a unique client id and `clean_session =
//! false`, so with broker persistence on, the broker keeps its subscription and queues QoS 1
//! messages for it while it is away (also across broker restarts). It subscribes at QoS 1 after
//! every ConnAck and reconnects on its own 100 ms after any error.
//!
//! ferry's messages (see the design notes):
//! - data on `<prefix>/<device>/data/<stream>`:
//!   `{"v":1,"device":..,"boot":..,"stream":..,"records":[{"seq":1,"ts":..,"fields":{..}}, ..]}`
//!   (binary wire formats, docs/WIRE.md, are decoded with `ferry::wire::decode` into this shape)
//! - status, retained, on `<prefix>/<device>/status`: `{"state":"online"|"offline", ..}`
//!
//! Duplicates are allowed by ferry's contract (same stream + seq), loss is not: tests check
//! [`Subscriber::unique_seqs`] against what the spool accepted (`common::drain`) and may bound
//! [`Subscriber::duplicates`]. Dedupe by (stream, seq) is only safe if every copy of a seq
//! carries the same record, so the subscriber compares each copy, as decoded, with the first
//! one as it arrives; every accessor of a stream's seqs or records panics once two copies of a
//! seq differ, so any test that sees duplicates checks them. The one field left out is `boot`
//! (decoded binary records repeat their message's boot id): it names the sending process, and
//! a restarted agent resends what its predecessor left under its own.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Big enough for any batch ferry may send (its own limit is far lower).
const MAX_PACKET_BYTES: usize = 10 * 1024 * 1024;
/// Pause before polling again after a connection error; rumqttc reconnects on that poll.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// How long `start` and `reconnect` wait for the subscription to be acknowledged.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One received PUBLISH.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// The payload parsed as JSON, if it is JSON.
    pub json: Option<Value>,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    connacks: usize,
    subacks: usize,
    session_present: bool,
    last_error: Option<String>,
    /// The first copy of every data record, by (topic, seq), as decoded.
    first_copies: HashMap<(String, u64), Value>,
    /// Later copies compared with their first copy.
    duplicates_compared: u64,
    /// Copies that differ from their first copy: (topic, seq, first, later).
    conflicts: Vec<(String, u64, Value, Value)>,
}

impl State {
    /// Compares each record of a data message with the first copy of its seq.
    fn compare_copies(&mut self, topic: &str, json: &Value) {
        if !topic.contains("/data/") {
            return;
        }
        let Some(records) = json.get("records").and_then(Value::as_array) else {
            return;
        };
        for r in records {
            let Some(seq) = r.get("seq").and_then(Value::as_u64) else {
                continue;
            };
            // A decoded binary record repeats its message's boot id, which names the process
            // that sent it (a restarted agent resends under its own); the record is the rest.
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("boot");
            }
            match self.first_copies.get(&(topic.to_owned(), seq)) {
                None => {
                    self.first_copies.insert((topic.to_owned(), seq), r);
                }
                Some(first) => {
                    self.duplicates_compared += 1;
                    if *first != r {
                        self.conflicts
                            .push((topic.to_owned(), seq, first.clone(), r));
                    }
                }
            }
        }
    }

    /// Panics if two copies of a seq carried different records.
    fn assert_copies_identical(&self) {
        if let Some((topic, seq, first, later)) = self.conflicts.first() {
            panic!(
                "{} duplicate copies differ from their first copy; the first on {topic}, seq {seq}:\n  first: {first}\n  later: {later}",
                self.conflicts.len()
            );
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of `state`; waiters re-check their condition on each bump.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the messages from the Drop/debug output.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

pub struct Subscriber {
    port: u16,
    filter: String,
    client_id: String,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects to 127.0.0.1:`port`, subscribes to `filter` at QoS 1 and returns once the
    /// broker has acknowledged the subscription. Panics after 10 s.
    pub async fn start(port: u16, filter: &str) -> Subscriber {
        Self::start_with_id(port, filter, &unique_client_id()).await
    }

    /// Like [`Subscriber::start`] with a chosen client id (e.g. to resume a session).
    pub async fn start_with_id(port: u16, filter: &str, client_id: &str) -> Subscriber {
        let (changed, _) = watch::channel(0);
        let mut sub = Subscriber {
            port,
            filter: filter.to_owned(),
            client_id: client_id.to_owned(),
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed,
            }),
            task: None,
        };
        sub.reconnect().await;
        sub
    }

    /// Drops the connection without an MQTT DISCONNECT, keeping what was received. The broker
    /// keeps the session and (QoS 1) queues messages for it until [`Subscriber::reconnect`].
    pub async fn disconnect(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Resolves once the task, and with it the event loop and its socket, is dropped.
            let _ = task.await;
        }
    }

    /// Connects again with the same client id (a no-op if connected) and waits for a new SubAck.
    pub async fn reconnect(&mut self) {
        if self.task.is_some() {
            return;
        }
        let subacks_before = self.subacks();
        let mut options = MqttOptions::new(&self.client_id, "127.0.0.1", self.port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, eventloop) = AsyncClient::new(options, 16);
        self.task = Some(tokio::spawn(run(
            eventloop,
            client,
            self.filter.clone(),
            Arc::clone(&self.shared),
        )));
        if !self
            .wait_until(SUBSCRIBE_TIMEOUT, |s| s.subacks() > subacks_before)
            .await
        {
            panic!(
                "subscriber {} got no SubAck for {:?} from 127.0.0.1:{} within {SUBSCRIBE_TIMEOUT:?}; last error: {:?}",
                self.client_id,
                self.filter,
                self.port,
                self.last_error()
            );
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Every PUBLISH received so far, in arrival order.
    pub fn messages(&self) -> Vec<Message> {
        self.shared.lock().messages.clone()
    }

    /// Messages whose topic is exactly `topic`.
    pub fn messages_on(&self, topic: &str) -> Vec<Message> {
        self.shared
            .lock()
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }

    /// The records of every data message of `stream`, flattened, in arrival order, as sent.
    /// Panics if a data message is not ferry's JSON.
    pub fn records(&self, stream: &str) -> Vec<Value> {
        let state = self.shared.lock();
        state.assert_copies_identical();
        data_messages(&state.messages, stream)
            .flat_map(|(_, records)| records.iter().cloned())
            .collect()
    }

    /// The `seq` of every record of `stream`, in arrival order (duplicates included). Panics
    /// if two copies of a seq differ (see the module docs).
    pub fn seqs(&self, stream: &str) -> Vec<u64> {
        let state = self.shared.lock();
        state.assert_copies_identical();
        data_messages(&state.messages, stream)
            .flat_map(|(topic, records)| records.iter().map(move |r| seq_of(topic, r)))
            .collect()
    }

    pub fn unique_seqs(&self, stream: &str) -> BTreeSet<u64> {
        self.seqs(stream).into_iter().collect()
    }

    /// How many records of `stream` arrived more than once.
    pub fn duplicates(&self, stream: &str) -> usize {
        let seqs = self.seqs(stream);
        seqs.len() - seqs.iter().collect::<BTreeSet<_>>().len()
    }

    /// Payloads of the status messages (topics ending in `/status`), in arrival order. Empty
    /// payloads (cleared retained messages) are skipped. Panics on a non-JSON payload.
    pub fn statuses(&self) -> Vec<Value> {
        self.shared
            .lock()
            .messages
            .iter()
            .filter(|m| m.topic.ends_with("/status") && !m.payload.is_empty())
            .map(|m| {
                m.json
                    .clone()
                    .unwrap_or_else(|| panic!("status on {} is not JSON: {:?}", m.topic, m.text()))
            })
            .collect()
    }

    /// Later copies of a data record compared with the first copy of their seq (all were
    /// identical unless [`Subscriber::seqs`] panics).
    pub fn duplicates_compared(&self) -> u64 {
        self.shared.lock().duplicates_compared
    }

    /// Copies of a seq that differ from its first copy: (topic, seq, first, later).
    pub fn conflicting_copies(&self) -> Vec<(String, u64, Value, Value)> {
        self.shared.lock().conflicts.clone()
    }

    /// ConnAcks received so far (1 after start, +1 per reconnect).
    pub fn connacks(&self) -> usize {
        self.shared.lock().connacks
    }

    /// SubAcks received so far.
    pub fn subacks(&self) -> usize {
        self.shared.lock().subacks
    }

    /// `session_present` of the last ConnAck: true if the broker still had our session.
    pub fn session_present(&self) -> bool {
        self.shared.lock().session_present
    }

    /// The last connection error, for diagnostics.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    /// Waits until `cond` holds, re-checking after every received packet or connection event.
    /// Returns whether it holds (false after `timeout`).
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Subscriber) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut changed = self.shared.changed.subscribe();
        loop {
            // Mark the current version seen *before* checking, so no change is missed.
            changed.borrow_and_update();
            if cond(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // Timed out (or, impossibly, the sender is gone): one last look.
                _ => return cond(self),
            }
        }
    }

    /// Waits until a record of `stream` with `seq` has arrived.
    pub async fn wait_for_seq(&self, stream: &str, seq: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.has_seq(stream, seq)).await
    }

    /// Waits until every seq in `from..=to` of `stream` has arrived.
    pub async fn wait_for_seqs(&self, stream: &str, from: u64, to: u64, timeout: Duration) -> bool {
        let want = (to + 1).saturating_sub(from) as usize;
        self.wait_until(timeout, |s| {
            s.unique_seqs(stream).range(from..=to).count() == want
        })
        .await
    }

    fn has_seq(&self, stream: &str, seq: u64) -> bool {
        let state = self.shared.lock();
        state.assert_copies_identical();
        data_messages(&state.messages, stream)
            .any(|(topic, records)| records.iter().any(|r| seq_of(topic, r) == seq))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Panics, listing the first 20 missing seqs, unless every seq in `from..=to` is in `seqs`.
pub fn assert_contiguous(seqs: &BTreeSet<u64>, from: u64, to: u64) {
    let missing: Vec<u64> = (from..=to).filter(|s| !seqs.contains(s)).collect();
    if !missing.is_empty() {
        panic!(
            "{} of the seqs {from}..={to} are missing; the first {}: {:?} (received {} seqs, range {:?}..={:?})",
            missing.len(),
            missing.len().min(20),
            &missing[..missing.len().min(20)],
            seqs.len(),
            seqs.first(),
            seqs.last()
        );
    }
}

fn unique_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "test-sub-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls the event loop forever, recording what arrives; the owner aborts the task.
async fn run(mut eventloop: EventLoop, client: AsyncClient, filter: String, shared: Arc<Shared>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // Subscribe again after every connect: without persistence the broker forgot us.
                let subscribed = client.try_subscribe(&filter, QoS::AtLeastOnce);
                shared.update(|s| {
                    s.connacks += 1;
                    s.session_present = ack.session_present;
                    if let Err(e) = subscribed {
                        s.last_error = Some(format!("subscribe: {e}"));
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => shared.update(|s| {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    s.last_error = Some(format!("subscription refused: {ack:?}"));
                } else {
                    s.subacks += 1;
                }
            }),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let message = Message {
                    json: parse_payload(&p.topic, &p.payload),
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                };
                shared.update(|s| {
                    if let Some(json) = &message.json {
                        s.compare_copies(&message.topic, json);
                    }
                    s.messages.push(message);
                });
            }
            Ok(_) => {}
            Err(e) => {
                shared.update(|s| s.last_error = Some(e.to_string()));
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
}

/// The data messages of `stream` as (topic, records). Panics on a malformed one.
fn data_messages<'a>(
    messages: &'a [Message],
    stream: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Vec<Value>)> + 'a {
    messages
        .iter()
        .filter(move |m| {
            m.topic
                .strip_suffix(stream)
                .is_some_and(|rest| rest.ends_with("/data/"))
        })
        .map(|m| {
            let records = m
                .json
                .as_ref()
                .and_then(|j| j.get("records"))
                .and_then(Value::as_array)
                .unwrap_or_else(|| {
                    panic!(
                        "data message on {} has no \"records\" array: {:?}",
                        m.topic,
                        m.text()
                    )
                });
            (m.topic.as_str(), records)
        })
}

/// A data message in any of ferry's wire formats as the JSON message (`{"v":1,..,"records"}`)
/// it stands for; any other payload parsed as JSON.
fn parse_payload(topic: &str, payload: &[u8]) -> Option<Value> {
    if topic.contains("/data/")
        && let Ok(m) = ferry::wire::decode(payload)
    {
        let records: Vec<Value> = m
            .records
            .iter()
            .map(|r| ferry::wire::record_json(&m, r))
            .collect();
        return Some(serde_json::json!({
            "v": 1, "device": m.device, "boot": m.boot, "stream": m.stream, "records": records,
        }));
    }
    serde_json::from_slice(payload).ok()
}

fn seq_of(topic: &str, record: &Value) -> u64 {
    record
        .get("seq")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("record on {topic} has no unsigned \"seq\": {record}"))
}
