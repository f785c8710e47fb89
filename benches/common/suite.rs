//! Helpers added for the issue #7 benchmark suite (`drain_satellite`, `rss_backlog`,
//! `first_publish`, `spool_churn`, `idle_cpu`): pre-filling a spool through the library,
//! allocated disk size, a subscriber that only waits for the first message, and a ferry
//! config writer.

use super::sample_reading;
use ferry::spool::{Intake, Spool};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes allocated on disk for the files under `dir` (`st_blocks` x 512): what the filesystem
/// really gives up, sparse holes excluded. [`super::dir_bytes`] is the apparent size.
pub fn dir_allocated_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_allocated_bytes(&e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Commits readings `from..from + n` of `stream` ([`sample_reading`]) in groups of `group`, as
/// the spool writer would (one sled batch + flush per group). Returns how long it took.
pub fn prefill(spool: &Spool, stream: &str, from: u64, n: u64, group: u64) -> Duration {
    let t = Instant::now();
    let mut i = from;
    let end = from + n;
    while i < end {
        let stop = (i + group).min(end);
        let intakes: Vec<Intake> = (i..stop)
            .map(|j| Intake::reading(sample_reading(stream, j)))
            .collect();
        spool.commit(&intakes).expect("commit");
        i = stop;
    }
    t.elapsed()
}

/// Writes `dir/ferry.yaml`: device `bench`, spool in `dir/spool`, the broker at
/// 127.0.0.1:`port`, plus `extra_uplink` lines (indented under `uplink:`), `extra_spool` lines
/// (under `spool:`) and the `collectors` YAML (a list, or `[]`).
pub fn write_config(
    dir: &Path,
    port: u16,
    extra_spool: &[&str],
    extra_uplink: &[&str],
    collectors: &str,
) -> PathBuf {
    let path = dir.join("ferry.yaml");
    let indent = |lines: &[&str]| -> String { lines.iter().map(|l| format!("  {l}\n")).collect() };
    std::fs::write(
        &path,
        format!(
            "device_id: bench\nlog_level: info\nspool:\n  dir: spool\n{}uplink:\n  host: 127.0.0.1\n  \
             port: {port}\n  topic_prefix: ferry\n{}collectors: {collectors}\n",
            indent(extra_spool),
            indent(extra_uplink),
        ),
    )
    .expect("write the config");
    path
}

/// Loads a config the bench wrote; a rejection is a bug in the bench.
pub fn load(path: &Path) -> ferry::config::Config {
    ferry::config::load(path).unwrap_or_else(|e| panic!("bench config rejected: {e}"))
}

/// A subscriber on its own thread that reports when the first message on its filter arrived
/// (and how large it was).
pub struct FirstMessage {
    result: mpsc::Receiver<Result<(Instant, usize), String>>,
}

impl FirstMessage {
    /// Connects and subscribes; returns once the broker granted the subscription.
    pub fn start(port: u16, filter: &str, timeout: Duration) -> FirstMessage {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (result_tx, result) = mpsc::channel();
        let filter = filter.to_string();
        std::thread::spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(first(port, filter, timeout, ready_tx)));
            let _ = result_tx.send(r);
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => FirstMessage { result },
            Err(_) => match result.try_recv() {
                Ok(Err(e)) => panic!("subscriber failed: {e}"),
                _ => panic!("subscriber did not get its SUBACK in 10 s"),
            },
        }
    }

    /// When the first message arrived and its payload size; an error after the timeout.
    pub fn wait(self) -> Result<(Instant, usize), String> {
        self.result
            .recv()
            .unwrap_or_else(|_| Err("subscriber thread ended without a result".into()))
    }
}

async fn first(
    port: u16,
    filter: String,
    timeout: Duration,
    ready: mpsc::Sender<()>,
) -> Result<(Instant, usize), String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!(
        "bench-first-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut el) = AsyncClient::new(o, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err(format!("no message within {timeout:?}")),
            Ok(Err(e)) => return Err(format!("subscriber connection failed: {e}")),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Incoming(Packet::SubAck(_)) => {
                let _ = ready.send(());
            }
            Event::Incoming(Packet::Publish(p)) => {
                let now = Instant::now();
                let _ = client.try_disconnect();
                return Ok((now, p.payload.len()));
            }
            _ => {}
        }
    }
}

/// "met" or "MISSED".
pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Bytes as MB (10^6) with one decimal.
pub fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// kB from `/proc/<pid>/status` as MiB with one decimal (as the `rss` bench prints them).
pub fn kb_as_mib(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}
