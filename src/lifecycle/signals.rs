//! Signal handling with signal-hook on a dedicated thread.
//!
//! - SIGTERM / SIGINT: the first cancels the shutdown token (graceful, phased shutdown); a
//!   second exits at once. Committed records are durable, so nothing accepted is lost.
//! - SIGHUP reloads the config through the lifecycle loop (validated first; a bad file keeps
//!   the running config and its errors are logged).

use crate::control::Control;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code of the immediate exit on a second SIGTERM/SIGINT (128 + SIGTERM).
pub const EXIT_FORCED: i32 = 143;

pub fn install(shutdown: CancellationToken, control: Control) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGHUP => {
                        info!("SIGHUP received: reloading the config.");
                        control.request_reload();
                    }
                    _ if shutdown.is_cancelled() => {
                        warn!(
                            signal = sig,
                            "Second stop signal: exiting now. Committed records are safe on disk."
                        );
                        std::process::exit(EXIT_FORCED);
                    }
                    _ => {
                        info!(signal = sig, "Stop signal received.");
                        shutdown.cancel();
                    }
                }
            }
        })?;
    Ok(())
}
