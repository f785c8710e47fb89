//! Logging: tracing to stderr, in a form journald shows well (no ANSI colours unless stderr is
//! a terminal; level and target on every line; structured fields).
//!
//! Logging starts before the config is read, at `info` (or `RUST_LOG`). Once the config is
//! loaded, its `log_level` applies unless `RUST_LOG` is set.
//!
//! Under systemd, stderr is connected to the journal and systemd says so in `JOURNAL_STREAM`
//! (`DEVICE:INODE` of that stream). Each line then starts with its syslog priority as an
//! sd-daemon prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace), which
//! journald strips and stores as the entry's priority, so `journalctl -p warning` works.
//! The prefix is written only when stderr really is that stream (a `ferry status` run by hand
//! from a unit's shell inherits the variable but not the stream).

use std::io::IsTerminal;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
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
        .with_target(true)
        .event_format(Prioritised {
            journal: stderr_is_journal(),
            inner: format::Format::default().with_target(true),
        });
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    LogHandle { handle, from_env }
}

/// The sd-daemon priority prefix for a level (syslog numbering).
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// Whether stderr is the journal stream systemd named in `JOURNAL_STREAM`.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The default line format, behind the priority prefix when writing to the journal.
struct Prioritised<F> {
    journal: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            writer.write_str(priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
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
