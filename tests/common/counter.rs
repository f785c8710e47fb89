//! A counting subscriber for large drains (benchmarks): on a thread of its own, it parses each
//! message's `records` array and counts distinct seqs and duplicates, keeping nothing else, so
//! a million records cost a bit per seq instead of a copy of every message (what
//! [`super::subscriber::Subscriber`] keeps). Seqs start at 1: a seq 0, or one above the
//! expected count, fails the count.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;

/// What the subscriber saw.
#[derive(Debug, Clone)]
pub struct Count {
    pub distinct: u64,
    pub duplicates: u64,
    pub messages: u64,
    pub payload_bytes: u64,
    pub first: Option<Instant>,
    /// When the last missing seq arrived (all of them, if `distinct` is the expected count).
    pub done: Option<Instant>,
}

#[derive(Deserialize)]
struct Message {
    records: Vec<SeqOnly>,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The count of a drain that must have seen every seq in `1..=n`; panics with `what`, how
/// many arrived within `within`, and `log()` otherwise.
pub fn complete(
    count: Result<Count, String>,
    n: u64,
    what: &str,
    within: Duration,
    log: impl Fn() -> String,
) -> Count {
    match count {
        Ok(c) if c.distinct == n => c,
        Ok(c) => panic!(
            "{what}: only {} of {n} records arrived within {within:?} ({} messages)\n{}",
            c.distinct,
            c.messages,
            log()
        ),
        Err(e) => panic!("{what}: subscriber failed: {e}\n{}", log()),
    }
}

/// A subscriber on its own thread that parses each message's `records` array and stops once
/// every seq in `1..=expected` arrived (or `timeout` passed).
pub struct Counter {
    result: mpsc::Receiver<Result<Count, String>>,
}

impl Counter {
    /// Connects and subscribes; returns once the broker granted the subscription.
    pub fn start(port: u16, filter: &str, expected: u64, timeout: Duration) -> Counter {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (result_tx, result) = mpsc::channel();
        let filter = filter.to_string();
        std::thread::spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(count(port, filter, expected, timeout, ready_tx)));
            let _ = result_tx.send(r);
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Counter { result },
            Err(_) => match result.try_recv() {
                Ok(Err(e)) => panic!("subscriber failed: {e}"),
                _ => panic!("subscriber did not get its SUBACK in 10 s"),
            },
        }
    }

    /// Waits for the result; gives up early once `alive` says the sender is gone.
    pub fn wait_while(self, mut alive: impl FnMut() -> bool) -> Result<Count, String> {
        loop {
            match self.result.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) if !alive() => {
                    // Let the last messages in flight arrive before giving up.
                    return self
                        .result
                        .recv_timeout(Duration::from_secs(1))
                        .unwrap_or_else(|_| {
                            Err("the sender exited before the drain finished".into())
                        });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("subscriber thread ended without a result".into());
                }
            }
        }
    }
}

async fn count(
    port: u16,
    filter: String,
    expected: u64,
    timeout: Duration,
    ready: mpsc::Sender<()>,
) -> Result<Count, String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!(
        "bench-counter-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut el) = AsyncClient::new(o, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = vec![false; expected as usize + 1];
    let mut c = Count {
        distinct: 0,
        duplicates: 0,
        messages: 0,
        payload_bytes: 0,
        first: None,
        done: None,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut subscribed = false;
    while c.distinct < expected {
        let ev = match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) if subscribed => return Ok(c),
            Err(_) => return Err("no SUBACK before the deadline".into()),
            Ok(Err(e)) => return Err(format!("subscriber connection failed: {e}")),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                subscribed = true;
                let _ = ready.send(());
            }
            Event::Incoming(Packet::Publish(p)) => {
                let now = Instant::now();
                c.first.get_or_insert(now);
                c.messages += 1;
                c.payload_bytes += p.payload.len() as u64;
                let m: Message = serde_json::from_slice(&p.payload)
                    .map_err(|e| format!("message is not ferry's JSON: {e}"))?;
                for r in m.records {
                    // Seqs start at 1: a seq 0 is a bug, not one of the expected records.
                    if r.seq == 0 {
                        return Err("seq 0 received; seqs start at 1".into());
                    }
                    match seen.get_mut(r.seq as usize) {
                        Some(s) if !*s => {
                            *s = true;
                            c.distinct += 1;
                        }
                        Some(_) => c.duplicates += 1,
                        None => return Err(format!("unexpected seq {}", r.seq)),
                    }
                }
                if c.distinct == expected {
                    c.done = Some(now);
                }
            }
            _ => {}
        }
    }
    Ok(c)
}
