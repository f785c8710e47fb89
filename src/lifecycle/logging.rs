//! Logging: tracing to stderr, in a form journald shows well (no ANSI colours unless stderr is
//! a terminal; level and target on every line; structured fields).
//!
//! Logging starts before the config is read, at `info` (or `RUST_LOG`). Once the config is
//! loaded, its `log_level` applies unless `RUST_LOG` is set.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;

/// Changes the level after start.
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    from_env: bool,
}

pub fn init() -> LogHandle {
    let from_env = std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty());
    let filter = if from_env {
        EnvFilter::from_default_env()
    } else {
        EnvFilter::new(default_directive("info"))
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    LogHandle { handle, from_env }
}

fn default_directive(level: &str) -> String {
    // Dependencies are chatty at debug; keep them at warn unless asked via RUST_LOG.
    format!("warn,ferry={level}")
}

impl LogHandle {
    /// Sets the level now (remote command), even over `RUST_LOG`; until the next restart.
    pub fn set_level_now(&self, level: &str) -> Result<(), String> {
        const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
        if !LEVELS.contains(&level) {
            return Err(format!(
                "unknown level {level:?}; expected one of {}",
                LEVELS.join(", ")
            ));
        }
        self.handle
            .reload(EnvFilter::new(default_directive(level)))
            .map_err(|e| e.to_string())
    }

    /// Applies the config's level unless `RUST_LOG` decides.
    pub fn set_level(&self, level: Option<&str>) {
        if self.from_env {
            return;
        }
        if let Some(level) = level {
            let _ = self.handle.reload(EnvFilter::new(default_directive(level)));
        }
    }
}
