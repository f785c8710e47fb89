//! Runtime control of the agent: what remote commands and SIGHUP may change while it runs.
//!
//! The lifecycle loop owns the running parts (collectors, uplink settings, log level, current
//! config) and serves [`Request`]s one at a time, so a reload and a `set_interval` never race.
//! Every change is validated first; a request that fails changes nothing.
//!
//! A leaf module: the command service, signals and the status socket send requests through a
//! [`Control`] without importing the lifecycle that serves them.

use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the lifecycle loop. Commands run one at a time, so a handful suffices;
/// a full queue makes the sender wait.
pub const CONTROL_CAPACITY: usize = 8;

pub enum Request {
    /// Re-read the config file; reply with what changed or the validation errors.
    Reload(oneshot::Sender<Result<Vec<String>, Vec<String>>>),
    SetInterval {
        collector: String,
        interval_ms: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SampleNow {
        collector: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SetLogLevel {
        level: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status(oneshot::Sender<serde_json::Value>),
}

/// Handle to send control requests; cheap to clone.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<Request>,
}

const GONE: &str = "the agent is shutting down";

impl Control {
    pub fn channel() -> (Control, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(CONTROL_CAPACITY);
        (Control { tx }, rx)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request, gone: T) -> T {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(make(tx)).await.is_err() {
            return gone;
        }
        rx.await.unwrap_or(gone)
    }

    pub async fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        self.ask(Request::Reload, Err(vec![GONE.into()])).await
    }

    pub async fn set_interval(&self, collector: String, interval_ms: u64) -> Result<(), String> {
        self.ask(
            |reply| Request::SetInterval {
                collector,
                interval_ms,
                reply,
            },
            Err(GONE.into()),
        )
        .await
    }

    pub async fn sample_now(&self, collector: String) -> Result<(), String> {
        self.ask(
            |reply| Request::SampleNow { collector, reply },
            Err(GONE.into()),
        )
        .await
    }

    pub async fn set_log_level(&self, level: String) -> Result<(), String> {
        self.ask(
            |reply| Request::SetLogLevel { level, reply },
            Err(GONE.into()),
        )
        .await
    }

    pub async fn status(&self) -> serde_json::Value {
        self.ask(Request::Status, serde_json::json!({ "error": GONE }))
            .await
    }

    /// Asks for a reload without waiting for the answer (SIGHUP).
    pub fn request_reload(&self) {
        let (tx, _rx) = oneshot::channel();
        if self.tx.try_send(Request::Reload(tx)).is_err() {
            tracing::warn!("A reload is already pending; this one is skipped.");
        }
    }
}
