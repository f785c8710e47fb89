//! `ferry consume`: the receiving side. Subscribes to a fleet's data and status topics, decodes
//! every wire format, drops duplicates by (device, stream, seq), reports gaps and losses, and
//! prints one line per record (JSON lines or InfluxDB line protocol) on stdout.
//!
//! Layout:
//! - `session.rs`: MQTT options, subscriptions (`$share/GROUP/...`), one connection epoch.
//! - `batch.rs`: one batch from payloads to lines and state, in the order that makes acks safe.
//! - `seen.rs`: the dedupe state of one stream (a range minus holes).
//! - `gaps.rs`: holes reported as losses (covered by `ferry.loss`) or gaps (timed out).
//! - `store.rs`: the state on disk, one locked file per device, shared by consumers.
//! - `output.rs`: the line formats.
//!
//! Contract (docs/CONSUMING.md has the long form):
//! - A message is acknowledged only after its lines are flushed to stdout and the state that
//!   covers them is in place, so a crash never loses a record: the broker redelivers whatever
//!   was not acknowledged, and the state drops what was already output.
//! - Exactly once per (device, stream, seq) on the union of every consumer sharing a state
//!   directory, except for a crash inside the one-rename window of `batch.rs`, which can repeat
//!   that batch's lines after the restart (documented; a sink that keys on the record drops it).
//! - Imports only `wire`, the leaf types (`record`, `backoff`) and the agent's TLS loaders.

pub mod batch;
pub mod gaps;
pub mod output;
pub mod seen;
pub mod session;
pub mod store;

use crate::backoff::Backoff;
use batch::{BatchError, Counters, Processor};
use session::{Epoch, Incoming, SessionError, SessionSettings};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use output::Format;

/// Most messages handled (and fsynced) as one batch.
const BATCH_MAX: usize = 256;
/// How often overdue holes are looked for.
const GAP_CHECK: Duration = Duration::from_secs(1);
/// How often the counters are logged.
const STATS_EVERY: Duration = Duration::from_secs(10);
/// A connection that stayed up this long resets the reconnect backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// Everything `ferry consume` is told on its command line.
#[derive(Debug, Clone)]
pub struct ConsumeSettings {
    pub session: SessionSettings,
    pub state_dir: PathBuf,
    pub format: Format,
    pub gap_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the broker refused the subscription to {0:?} (check its ACL)")]
    Refused(Vec<String>),
}

/// How an epoch ended.
enum EpochEnd {
    Shutdown,
    Lost { error: String, lasted: Duration },
}

/// Runs [`run`] on its own runtime until SIGTERM or SIGINT (what `ferry consume` does).
pub fn run_until_signal(settings: ConsumeSettings) -> Result<Counters, ConsumeError> {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    on_signal.cancel();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "Cannot watch SIGTERM/SIGINT."),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferry-consume")
        .enable_all()
        .build()
        .map_err(ConsumeError::Runtime)?;
    runtime.block_on(run(settings, shutdown))
}

/// Runs until `shutdown` is cancelled (Ok with the counters) or a fatal error (state or
/// stdout unusable, subscription refused). Connection failures are retried with backoff.
pub async fn run(
    settings: ConsumeSettings,
    shutdown: CancellationToken,
) -> Result<Counters, ConsumeError> {
    let (dir, format, prefix, timeout) = (
        settings.state_dir.clone(),
        settings.format,
        settings.session.topic_prefix.clone(),
        settings.gap_timeout.as_millis() as u64,
    );
    let processor =
        tokio::task::spawn_blocking(move || Processor::open(&dir, format, &prefix, timeout))
            .await
            .expect("opening the state does not panic")?;
    let processor: Shared = Arc::new(Mutex::new(processor));
    tracing::info!(client_id = %settings.session.client_id, filters = ?settings.session.filters(), state = %settings.state_dir.display(), "Consumer starting.");
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
    let result = loop {
        let epoch = match Epoch::start(&settings.session) {
            Ok(e) => e,
            Err(e) => break Err(e.into()),
        };
        match run_epoch(&settings, epoch, &processor, &shutdown).await {
            Ok(EpochEnd::Shutdown) => break Ok(()),
            Ok(EpochEnd::Lost { error, lasted }) => {
                if lasted >= BACKOFF_RESET_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(broker = %format!("{}:{}", settings.session.host, settings.session.port), error, retry_in_ms = delay.as_millis() as u64, "Connection lost; unacknowledged messages will be redelivered.");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    let c = counters(&processor);
    log_counters(&c, "Consumer stopped.");
    result.map(|()| c)
}

/// One connection: subscribe after each CONNACK, then batches, gap checks and stats until the
/// connection drops or shutdown.
async fn run_epoch(
    settings: &ConsumeSettings,
    mut epoch: Epoch,
    processor: &Shared,
    shutdown: &CancellationToken,
) -> Result<EpochEnd, ConsumeError> {
    let started = tokio::time::Instant::now();
    let mut gap_check = tokio::time::interval(GAP_CHECK);
    let mut stats = tokio::time::interval(STATS_EVERY);
    stats.tick().await;
    let mut lookahead: Option<Incoming> = None;
    loop {
        let event = match lookahead.take() {
            Some(e) => e,
            None => tokio::select! {
                _ = shutdown.cancelled() => {
                    epoch.close().await;
                    return Ok(EpochEnd::Shutdown);
                }
                _ = gap_check.tick() => {
                    blocking(processor, |p| p.sweep()).await?;
                    continue;
                }
                _ = stats.tick() => {
                    log_counters(&counters(processor), "Consumer counters.");
                    continue;
                }
                e = epoch.events.recv() => match e {
                    Some(e) => e,
                    None => Incoming::Ended("the poll task stopped".into()),
                },
            },
        };
        match event {
            Incoming::Connected { session_present } => {
                tracing::info!(session_present, "Connected.");
                if let Err(e) = epoch.subscribe(&settings.session).await {
                    return Ok(EpochEnd::Lost {
                        error: e.to_string(),
                        lasted: started.elapsed(),
                    });
                }
            }
            Incoming::Subscribed(true) => tracing::info!("Subscribed."),
            Incoming::Subscribed(false) => {
                return Err(ConsumeError::Refused(settings.session.filters().to_vec()));
            }
            Incoming::Ended(error) => {
                return Ok(EpochEnd::Lost {
                    error,
                    lasted: started.elapsed(),
                });
            }
            Incoming::Publish(first) => {
                let mut batch = vec![first];
                while batch.len() < BATCH_MAX {
                    match epoch.events.try_recv() {
                        Ok(Incoming::Publish(p)) => batch.push(p),
                        Ok(other) => {
                            lookahead = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let batch = blocking(processor, move |p| p.process(&batch).map(|()| batch)).await?;
                for p in &batch {
                    // Only fails when the client's loop is gone: the epoch is over, and the
                    // broker redelivers what was not acknowledged.
                    if epoch.client.ack(p).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// The processor, used by one task at a time but on the blocking pool.
type Shared = Arc<Mutex<Processor>>;

/// Runs `f` on the processor on the blocking pool (file locks, fsync, stdout).
async fn blocking<T: Send + 'static>(
    processor: &Shared,
    f: impl FnOnce(&mut Processor) -> Result<T, BatchError> + Send + 'static,
) -> Result<T, BatchError> {
    let p = Arc::clone(processor);
    tokio::task::spawn_blocking(move || f(&mut p.lock().expect("the processor never panics")))
        .await
        .expect("batch processing does not panic")
}

fn counters(p: &Shared) -> Counters {
    p.lock().expect("the processor never panics").counters
}

fn log_counters(c: &Counters, msg: &'static str) {
    tracing::info!(
        messages = c.messages,
        records = c.records,
        duplicates = c.duplicates,
        gaps = c.gaps,
        gap_seqs = c.gap_seqs,
        losses = c.losses,
        lost_seqs = c.lost_seqs,
        rejected = c.rejected,
        statuses = c.statuses,
        forgotten_holes = c.forgotten_holes,
        unrepresentable = c.unrepresentable,
        "{msg}"
    );
}
