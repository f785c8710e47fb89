//! The uplink: drains the spool to an MQTT broker at QoS 1 and deletes a record only after the
//! broker's PUBACK for the message that carried it.
//!
//! Invariants:
//! - **The spool is the only source of truth.** rumqttc's in-memory queue is not a delivery
//!   guarantee (it discards pending publishes on reconnect), so nothing is deleted because
//!   `publish()` returned `Ok`, only because of the PUBACK bound to it ([`inflight`]).
//! - **One connection epoch = one fresh `AsyncClient` + `EventLoop`.** The event loop is
//!   polled by its own task that forwards events over a bounded channel (`poll()` is not known
//!   to be cancel-safe, so it never sits in a `select!`). When `poll()` fails, the epoch ends:
//!   both are dropped, the in-flight map with them, and after a backoff the next epoch resends
//!   everything unacknowledged from the spool (duplicates allowed, loss not).
//! - **This task alone publishes** and owns the in-flight bookkeeping.
//! - **Window:** at most `window` data messages are unacknowledged at once; rumqttc's own
//!   in-flight limit is set well above it so its packet ids rarely collide.
//! - **Reconnect backoff** lives here (exponential, full jitter, capped, reset after a
//!   connection stayed up for `reset_after`). rumqttc has none of its own.

pub mod budget;
pub mod inflight;
pub mod options;
mod prepare;
mod settings;

use crate::backoff::Backoff;
use crate::clock::{ClockSource, now_ms};
use crate::command_link::{AckRequest, CommandDelivery, CommandLink};
use crate::heartbeat::{Heartbeat, TICK};
use crate::spool::{DrainState, Pick, Spool};
use crate::wire::payload::Origin;
use budget::{Budget, BudgetStats};
use inflight::{Bind, Inflight, Tag};
use options::Topics;
use prepare::PrepareJob;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
pub use settings::{
    AuthSettings, BackoffSettings, BudgetSettings, StreamSettings, TlsSettings, UplinkSettings,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Events from the polling task waiting for the uplink task. Small: the uplink handles each
/// event in microseconds, and a full channel only pauses polling (back-pressure on the socket).
const EVENT_CAPACITY: usize = 64;
/// Requests queued in rumqttc's channel: the window plus status, subscribe, command acks,
/// disconnect and slack. The window gate keeps it from filling; `try_publish` failing means
/// a bug, and ends the epoch.
const REQUEST_SLACK: usize = 40;
/// Acknowledged chunks deleted together (see [`PendingDeletes`]).
const DELETE_BATCH: usize = 256;
/// An acknowledged chunk waits at most this long for its deletion.
const DELETE_LINGER: Duration = Duration::from_millis(200);
/// How long to wait for the DISCONNECT to be written at shutdown.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// Counters and state readable while the agent runs.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub messages_published: AtomicU64,
    pub records_published: AtomicU64,
    /// Records published again (after a reconnect, their first PUBACK never came).
    pub records_resent: AtomicU64,
    pub records_acked: AtomicU64,
    /// Delay before the next connection attempt, while disconnected.
    pub backoff_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub budget: Arc<BudgetStats>,
}

/// Acknowledged chunks not deleted yet. Deleting is lazy by contract (a lost deletion only
/// causes a resend), so PUBACKs are collected and deleted in one batch every
/// [`DELETE_BATCH`] chunks or [`DELETE_LINGER`], and at the end of every epoch.
#[derive(Default)]
struct PendingDeletes {
    by_stream: HashMap<u32, Vec<u64>>,
    chunks: usize,
    since: Option<Instant>,
}

impl PendingDeletes {
    fn add(&mut self, sent: Sent) {
        self.chunks += sent.chunk_ids.len();
        self.by_stream
            .entry(sent.stream_id)
            .or_default()
            .extend(sent.chunk_ids);
        self.since.get_or_insert_with(Instant::now);
    }

    fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + DELETE_LINGER)
    }
}

/// A published data message whose PUBACK is awaited.
#[derive(Debug, Clone)]
struct Sent {
    stream_id: u32,
    chunk_ids: Vec<u64>,
    records: u64,
    /// Payload size.
    bytes: usize,
}

enum EpochEnd {
    Shutdown,
    /// The settings changed: reconnect at once with the new ones.
    Reconfigured,
    Failed {
        error: String,
        serious: bool,
        was_connected: bool,
    },
}

fn failed(error: impl Into<String>, was_connected: bool) -> EpochEnd {
    EpochEnd::Failed {
        error: error.into(),
        serious: false,
        was_connected,
    }
}

/// What one epoch works with: the settings as they were when it started.
struct EpochCtx {
    s: UplinkSettings,
    topics: Topics,
    commands_topic: String,
    origin: Origin,
    streams: Arc<StreamSettings>,
    epoch: u64,
}

pub struct Uplink {
    settings: watch::Receiver<UplinkSettings>,
    spool: Spool,
    boot: String,
    shutdown: CancellationToken,
    stats: Arc<UplinkStats>,
    commands: Option<CommandLink>,
    flush: Arc<Notify>,
    heartbeat: Heartbeat,
    /// Highest chunk id published oldest-first per stream, across epochs: a chunk at or below
    /// it is a resend. (Chunks sent ahead by live-first streams are not tracked: their resends
    /// are not counted.)
    sent_high: HashMap<u32, u64>,
    clock: Arc<dyn ClockSource>,
    /// Opened when `run` starts.
    budget: Option<Budget>,
}

impl Uplink {
    pub fn new(
        settings: watch::Receiver<UplinkSettings>,
        spool: Spool,
        boot: String,
        shutdown: CancellationToken,
    ) -> Uplink {
        Uplink {
            settings,
            spool,
            boot,
            shutdown,
            stats: Arc::new(UplinkStats::default()),
            commands: None,
            flush: Arc::new(Notify::new()),
            heartbeat: Heartbeat::new("uplink"),
            sent_high: HashMap::new(),
            clock: Arc::new(crate::clock::SystemClock::new(
                crate::clock::DEFAULT_SYNC_MARKER.into(),
                false,
            )),
            budget: None,
        }
    }

    /// The clock the byte budget's periods follow.
    pub fn with_clock(mut self, clock: Arc<dyn ClockSource>) -> Uplink {
        self.clock = clock;
        self
    }

    /// The heartbeat this task keeps fresh while it is not stuck.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Subscribes to the command topic and hands command publishes to `link`.
    pub fn with_commands(mut self, link: CommandLink) -> Uplink {
        self.commands = Some(link);
        self
    }

    pub fn stats(&self) -> Arc<UplinkStats> {
        self.stats.clone()
    }

    /// Notify to send lingering batches now.
    pub fn flush_handle(&self) -> Arc<Notify> {
        self.flush.clone()
    }

    /// Connects, drains, reconnects with backoff, until the shutdown token is cancelled.
    pub async fn run(mut self) {
        let first = self.settings.borrow().clone();
        match self.spool.open_tree("budget") {
            Ok(tree) => {
                self.budget = Some(Budget::open(
                    tree,
                    first.budget,
                    self.clock.clone(),
                    self.stats.budget.clone(),
                ));
            }
            Err(e) if first.budget != Default::default() => {
                error!(error = %e, "Cannot open the byte budget's counts; sending without a budget.");
            }
            Err(_) => {}
        }
        let mut backoff = Backoff::new(first.backoff.initial, first.backoff.max);
        let mut last_error = String::new();
        let mut epoch = 0u64;
        let mut link = self.commands.take();
        loop {
            epoch += 1;
            let s = self.settings.borrow_and_update().clone();
            let topics = Topics::new(&s.topic_prefix, &s.device_id);
            let ctx = EpochCtx {
                commands_topic: topics.commands(),
                topics,
                origin: Origin {
                    device: s.device_id.clone(),
                    boot: self.boot.clone(),
                },
                streams: Arc::new(s.streams.clone()),
                s,
                epoch,
            };
            if let Some(b) = self.budget.as_mut() {
                b.set_limits(ctx.s.budget);
            }
            let broker = format!("{}:{}", ctx.s.host, ctx.s.port);
            let started = Instant::now();
            let end = self.epoch(&ctx, link.as_mut()).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            let (error, serious, was_connected) = match end {
                EpochEnd::Shutdown => break,
                EpochEnd::Reconfigured => {
                    let s = self.settings.borrow().clone();
                    backoff = Backoff::new(s.backoff.initial, s.backoff.max);
                    continue;
                }
                EpochEnd::Failed {
                    error,
                    serious,
                    was_connected,
                } => (error, serious, was_connected),
            };
            if was_connected && started.elapsed() >= ctx.s.backoff.reset_after {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            let retry_in_ms = delay.as_millis() as u64;
            self.stats.backoff_ms.store(retry_in_ms, Ordering::Relaxed);
            *self
                .stats
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
            let attempt = backoff.attempts();
            if error != last_error || attempt.is_multiple_of(10) {
                if serious {
                    error!(%broker, retry_in_ms, attempt, error = %error, "Cannot connect to the broker; data stays in the spool.");
                } else if was_connected {
                    warn!(%broker, retry_in_ms, error = %error, "Connection lost; unacknowledged data will be resent.");
                } else {
                    warn!(%broker, retry_in_ms, attempt, error = %error, "Cannot connect to the broker; data stays in the spool.");
                }
            } else {
                debug!(%broker, retry_in_ms, attempt, error = %error, "Still cannot connect.");
            }
            last_error = error;
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.heartbeat.sleep(delay) => {}
                r = self.settings.changed() => if r.is_ok() { backoff.reset(); },
            }
        }
        info!("Uplink stopped.");
    }

    async fn epoch(&mut self, ctx: &EpochCtx, link: Option<&mut CommandLink>) -> EpochEnd {
        let mut deletes = PendingDeletes::default();
        let end = self.epoch_inner(ctx, link, &mut deletes).await;
        // Acknowledged chunks are deleted before the next epoch reads the spool again.
        if let Err(e) = self.delete_acked(&mut deletes).await {
            warn!(error = %e, "Cannot delete acknowledged records; they will be sent again.");
        }
        end
    }

    async fn epoch_inner(
        &mut self,
        ctx: &EpochCtx,
        mut link: Option<&mut CommandLink>,
        deletes: &mut PendingDeletes,
    ) -> EpochEnd {
        let s = &ctx.s;
        let (opts, net) = match options::build(s, &ctx.topics, &self.boot) {
            Ok(o) => o,
            Err(e) => {
                return EpochEnd::Failed {
                    error: e.to_string(),
                    serious: true,
                    was_connected: false,
                };
            }
        };
        let (client, mut eventloop) = AsyncClient::new(opts, s.window + REQUEST_SLACK);
        eventloop.set_network_options(net);
        let (ev_tx, mut events) = mpsc::channel(EVENT_CAPACITY);
        let poller = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let stop = ev.is_err();
                if ev_tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        let _poller = AbortOnDrop(poller);

        // CONNECT / CONNACK.
        let deadline = Instant::now() + options::connect_deadline(s);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => self.heartbeat.touch(),
                _ = self.shutdown.cancelled() => return EpochEnd::Shutdown,
                _ = tokio::time::sleep_until(deadline) => return failed("timed out waiting for the broker's CONNACK", false),
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return describe(&e, false),
                    None => return failed("event loop stopped", false),
                },
            }
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.backoff_ms.store(0, Ordering::Relaxed);
        info!(broker = %format!("{}:{}", s.host, s.port), client_id = %s.client_id, tls = s.tls.is_some(), "Connected to the broker.");

        // Subscribe before any publish, so its packet id cannot collide with one (rumqtt #1057).
        let commands_topic = &ctx.commands_topic;
        if link.is_some()
            && let Err(e) = client.try_subscribe(commands_topic.clone(), QoS::AtLeastOnce)
        {
            return failed(format!("cannot queue the command subscription: {e}"), true);
        }
        let mut inflight: Inflight<Sent> = Inflight::new();
        if let Err(e) = client.try_publish(
            ctx.topics.status(),
            QoS::AtLeastOnce,
            true,
            options::status_payload("online", &self.boot),
        ) {
            return failed(format!("cannot queue the status message: {e}"), true);
        }
        inflight.queued(Tag::Control);

        let mut drain = DrainState::default();
        let mut committed = self.spool.subscribe();
        // rumqttc notices a dead link only when a ping finds the previous one unanswered (up to
        // 2-3x keepalive). It pings every keepalive, so on a live link something arrives at
        // least that often: silence for 1.5x keepalive means the link is gone.
        let silence_limit = (!s.keepalive.is_zero()).then(|| s.keepalive * 3 / 2);
        let mut last_rx = Instant::now();
        let mut linger_until: Option<Instant> = None;
        let mut draining: Option<Instant> = None;
        let mut flush_now = false;
        let mut reconfigured = false;
        let far = || Instant::now() + Duration::from_secs(3600);
        loop {
            if draining.is_none() {
                match self
                    .fill(
                        ctx,
                        &client,
                        &mut inflight,
                        &mut drain,
                        &mut flush_now,
                        deletes,
                    )
                    .await
                {
                    Ok(next) => linger_until = next,
                    Err(end) => return end,
                }
            } else if inflight.data_len() == 0 {
                break;
            }
            tokio::select! {
                _ = tick.tick() => {
                    self.heartbeat.touch();
                    if let Some(limit) = silence_limit
                        && last_rx.elapsed() > limit
                    {
                        return failed(format!("nothing received from the broker for {} s (1.5x keepalive): the link is dead", last_rx.elapsed().as_secs()), true);
                    }
                }
                _ = self.shutdown.cancelled(), if draining.is_none() => {
                    debug!(in_flight = inflight.data_len(), "Shutdown: waiting for outstanding PUBACKs.");
                    draining = Some(Instant::now() + s.shutdown_grace);
                }
                r = self.settings.changed(), if draining.is_none() => {
                    if r.is_ok() {
                        info!("Uplink settings changed; reconnecting with the new ones.");
                        reconfigured = true;
                        draining = Some(Instant::now() + s.shutdown_grace);
                    }
                }
                _ = tokio::time::sleep_until(draining.unwrap_or_else(far)), if draining.is_some() => {
                    warn!(in_flight = inflight.data_len(), "Grace period over; unacknowledged data stays in the spool and is resent.");
                    break;
                }
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => {
                        if matches!(ev, Event::Incoming(_)) {
                            last_rx = Instant::now();
                        }
                        if let Err(end) = self.on_event(ctx, ev, &mut inflight, &client, link.as_deref_mut(), deletes).await {
                            return end;
                        }
                        if deletes.chunks >= DELETE_BATCH
                            && let Err(e) = self.delete_acked(deletes).await
                        {
                            return EpochEnd::Failed { error: e, serious: true, was_connected: true };
                        }
                    }
                    Some(Err(e)) => return describe(&e, true),
                    None => return failed("event loop stopped", true),
                },
                ack = recv_ack(link.as_deref_mut()) => {
                    if let Some(ack) = ack
                        && ack.epoch == ctx.epoch
                        && let Err(e) = client.try_ack(&ack.publish)
                    {
                        return failed(format!("cannot queue a command acknowledgement: {e}"), true);
                    }
                }
                _ = self.flush.notified() => flush_now = true,
                r = committed.changed() => {
                    if r.is_err() {
                        return EpochEnd::Shutdown;
                    }
                }
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(far)), if linger_until.is_some() => {}
                _ = tokio::time::sleep_until(deletes.due().unwrap_or_else(far)), if deletes.due().is_some() => {
                    if let Err(e) = self.delete_acked(deletes).await {
                        return EpochEnd::Failed { error: e, serious: true, was_connected: true };
                    }
                }
            }
        }

        // Goodbye: retained offline status, then DISCONNECT (the last will is not sent then).
        if !reconfigured {
            let _ = client.try_publish(
                ctx.topics.status(),
                QoS::AtLeastOnce,
                true,
                options::status_payload("offline", &self.boot),
            );
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
            while let Some(Ok(ev)) = events.recv().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        info!("Disconnected from the broker.");
        if reconfigured {
            EpochEnd::Reconfigured
        } else {
            EpochEnd::Shutdown
        }
    }

    /// Publishes batches until the window is full or nothing is ready. Returns when a
    /// lingering batch becomes due, if one is waiting. Reading and encoding run on the blocking
    /// pool, several batches per trip, while rumqttc's own task keeps the socket busy.
    async fn fill(
        &mut self,
        ctx: &EpochCtx,
        client: &AsyncClient,
        inflight: &mut Inflight<Sent>,
        drain: &mut DrainState,
        flush_now: &mut bool,
        deletes: &mut PendingDeletes,
    ) -> Result<Option<Instant>, EpochEnd> {
        let s = &ctx.s;
        loop {
            let free = s.window.saturating_sub(inflight.data_len());
            if free == 0 {
                return Ok(None);
            }
            let job = PrepareJob {
                spool: self.spool.clone(),
                drain: drain.clone(),
                streams: ctx.streams.clone(),
                wire_left: self.budget.as_mut().and_then(Budget::remaining),
                limits: s.batch,
                max_packet_bytes: s.max_packet_bytes,
                topics: ctx.topics.clone(),
                origin: ctx.origin.clone(),
                ignore_linger: *flush_now,
                count: free,
                sent_high: self.sent_high.clone(),
                byte_budget: s
                    .inflight_bytes
                    .map(|cap| cap.saturating_sub(inflight.data().map(|d| d.bytes).sum())),
                must_send_one: inflight.data_len() == 0,
            };
            let prepared = tokio::task::spawn_blocking(move || job.run())
                .await
                .map_err(|e| failed(format!("spool read panicked: {e}"), true))?
                .map_err(|e| EpochEnd::Failed {
                    error: format!("cannot read the spool: {e}"),
                    serious: true,
                    was_connected: true,
                })?;
            *drain = prepared.drain;
            if let (Some(packet), Some(b)) = (prepared.over_budget, self.budget.as_mut()) {
                b.exhaust(packet);
            }
            let got = prepared.messages.len();
            for m in prepared.messages {
                if m.oversize {
                    error!(
                        bytes = m.payload.len(),
                        records = m.sent.records,
                        "A stored chunk is larger than uplink.max_packet_bytes allows; it cannot be sent and is dropped."
                    );
                    deletes.add(m.sent);
                    continue;
                }
                client
                    .try_publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                    .map_err(|e| failed(format!("cannot queue a publish: {e}"), true))?;
                self.stats
                    .messages_published
                    .fetch_add(1, Ordering::Relaxed);
                self.stats
                    .records_published
                    .fetch_add(m.sent.records, Ordering::Relaxed);
                self.stats
                    .records_resent
                    .fetch_add(m.resent, Ordering::Relaxed);
                if let Some(b) = self.budget.as_mut() {
                    b.charge(m.wire_bytes);
                }
                if m.pick == Pick::Backlog
                    && let Some(last) = m.sent.chunk_ids.last()
                {
                    let high = self.sent_high.entry(m.sent.stream_id).or_default();
                    *high = (*high).max(*last);
                }
                inflight.queued(Tag::Data(m.sent));
            }
            if prepared.exhausted {
                *flush_now = false;
            }
            if got < free {
                let now = now_ms();
                return Ok(prepared
                    .linger_due_ms
                    .map(|due| Instant::now() + Duration::from_millis(due.saturating_sub(now))));
            }
        }
    }

    async fn on_event(
        &self,
        ctx: &EpochCtx,
        ev: Event,
        inflight: &mut Inflight<Sent>,
        client: &AsyncClient,
        link: Option<&mut CommandLink>,
        deletes: &mut PendingDeletes,
    ) -> Result<(), EpochEnd> {
        let commands_topic = ctx.commands_topic.as_str();
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => match inflight.on_outgoing(pkid) {
                Bind::Unexpected => {
                    return Err(failed(
                        format!(
                            "packet id {pkid} was published with nothing awaiting it; restarting the connection to keep acknowledgements exact"
                        ),
                        true,
                    ));
                }
                Bind::Retransmission => debug!(pkid, "Publish retransmitted."),
                Bind::Bound | Bind::Untracked => {}
            },
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                debug!(pkid, "Packet id collision; rumqttc waits for its ack.")
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Tag::Data(sent)) = inflight.on_puback(ack.pkid) {
                    self.stats
                        .records_acked
                        .fetch_add(sent.records, Ordering::Relaxed);
                    deletes.add(sent);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    error!(topic = %commands_topic, "The broker refused the command subscription (check its ACL); commands will not arrive.");
                } else {
                    info!(topic = %commands_topic, "Subscribed to commands.");
                }
            }
            Event::Incoming(Packet::Publish(p)) => match link {
                Some(link) if p.topic == commands_topic => {
                    let delivery = CommandDelivery {
                        epoch: ctx.epoch,
                        publish: p,
                    };
                    if let Err(e) = link.deliveries.try_send(delivery) {
                        warn!(error = %e, "Command queue full; the command is not acknowledged and will be redelivered after a reconnect.");
                    }
                }
                _ => {
                    debug!(topic = %p.topic, "Unexpected publish acknowledged and ignored.");
                    let _ = client.try_ack(&p);
                }
            },
            _ => {}
        }
        Ok(())
    }

    /// Deletes the chunks acknowledged so far, in one sled batch.
    async fn delete_acked(&self, deletes: &mut PendingDeletes) -> Result<(), String> {
        if deletes.chunks == 0 {
            return Ok(());
        }
        let acked: Vec<(u32, Vec<u64>)> = deletes.by_stream.drain().collect();
        deletes.chunks = 0;
        deletes.since = None;
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.ack_many(&acked))
            .await
            .map_err(|e| format!("spool delete panicked: {e}"))?
            .map_err(|e| format!("cannot delete acknowledged records: {e}"))?;
        Ok(())
    }
}

/// The next ack request; never resolves without a command service (or once it is gone).
async fn recv_ack(link: Option<&mut CommandLink>) -> Option<AckRequest> {
    match link {
        Some(l) => match l.acks.recv().await {
            Some(ack) => Some(ack),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection error as an operator should read it, with a hint where the cause is usually
/// configuration.
fn describe(e: &ConnectionError, was_connected: bool) -> EpochEnd {
    if let ConnectionError::ConnectionRefused(code) = e {
        let why = match code {
            ConnectReturnCode::BadUserNamePassword => {
                "bad user name or password (check uplink.auth)"
            }
            ConnectReturnCode::NotAuthorized => {
                "not authorized (check uplink.auth, the client certificate and the broker's ACL)"
            }
            ConnectReturnCode::BadClientId => "client id rejected (check uplink.client_id)",
            ConnectReturnCode::ServiceUnavailable => "service unavailable",
            ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 is not accepted",
            ConnectReturnCode::Success => "refused with a success code",
        };
        return EpochEnd::Failed {
            error: format!("the broker refused the connection: {why}"),
            serious: true,
            was_connected,
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let debug = format!("{e:?}");
    let hint = if debug.contains("UnknownIssuer") || debug.contains("BadSignature") {
        Some("the broker's certificate is not signed by uplink.tls.ca_file")
    } else if debug.contains("NotValidForName") {
        Some("the broker's certificate does not name uplink.host")
    } else if debug.contains("CertificateRequired") {
        Some("the broker requires a client certificate: set uplink.tls.cert_file and key_file")
    } else if debug.contains("Expired") {
        Some("a certificate has expired (or the clock is wrong)")
    } else {
        None
    };
    match hint {
        Some(h) => EpochEnd::Failed {
            error: format!("TLS handshake failed: {h} ({text})"),
            serious: true,
            was_connected,
        },
        None => failed(text, was_connected),
    }
}
