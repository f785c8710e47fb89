//! Shared helpers for ferry's integration tests.
//!
//! Every test binary says `mod common;` and uses a subset of this, hence the module-wide
//! `allow(dead_code)`.
//!
//! Layout:
//! - [`ports`]: free loopback ports (tests never use fixed ports).
//! - [`pki`]: a throwaway CA, server and client certificates made with the `openssl` CLI.
//! - [`broker`]: a real Mosquitto child process with a plain listener for test clients and an
//!   optional TLS / mTLS / password listener for the agent.
//! - [`replies`]: command replies to one id, and waiting for the final one.
//! - [`subscriber`]: an MQTT test client (rumqttc) that records everything it receives and
//!   understands ferry's data and status messages.
//! - [`counter`]: a subscriber that only counts distinct seqs, for drains too large to keep
//!   (the benchmarks include this harness too).
//! - [`agent`]: the real `ferry` binary as a child process, and its config builder (the
//!   benchmarks run it too, with its log lines timed).
//! - [`drain`]: the end of a fault test: stop the agent, drain its spool, tally accepted seqs
//!   against received ones.
//! - [`modbus`]: a real Modbus device (pymodbus's server from a venv) over TCP or a pty.
//! - [`proxy`]: a fault-injecting TCP proxy (cuts, blackhole, throttle, latency) to put between
//!   the agent and the broker.
//!
//! Everything binds to 127.0.0.1 only. Child processes are killed on drop.
//!
//! Signals: the crate has `unsafe_code = "forbid"`, which also covers the tests and cannot be
//! lifted with `allow`, so `libc::kill` is out of reach. Signals other than SIGKILL are sent
//! with the shell's `kill` builtin ([`send_signal`]); SIGKILL uses `Child::kill`.
#![allow(dead_code)]

pub mod agent;
pub mod broker;
pub mod counter;
pub mod drain;
pub mod modbus;
pub mod pki;
pub mod ports;
pub mod proxy;
pub mod pty;
pub mod replies;
pub mod subscriber;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often blocking helpers re-check a child process or a log file.
const POLL: Duration = Duration::from_millis(10);

/// Sends `signal` (a name such as `"TERM"` or `"HUP"`) to `pid`; false if there is no such
/// process.
///
/// Uses `sh`'s `kill` builtin: `sh` is always installed, `/bin/kill` (procps) is not.
/// Only call this for a child that has not been reaped yet (`try_wait` returned `None`), so
/// the pid cannot have been reused.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("sh")
        .args(["-c", r#"kill -s "$1" "$2""#, "sh", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cannot run sh to send a signal")
        .success()
}

/// Waits up to `timeout` for `child` to exit and reaps it. `None` if it is still running.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGKILLs `child` (if it still runs) and reaps it.
pub fn kill_and_reap(child: &mut Child) -> ExitStatus {
    if let Some(status) = child.try_wait().expect("try_wait on a child process") {
        return status;
    }
    // Fails only if the process is already gone, which `wait` then reports.
    let _ = child.kill();
    child.wait().expect("wait for a killed child process")
}

/// Appends `lines` to `path` (created when missing), each with a newline: a log that grows.
pub fn append_lines<S: AsRef<str>>(path: &std::path::Path, lines: &[S]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    for l in lines {
        writeln!(f, "{}", l.as_ref()).expect("append a line");
    }
}

/// Reads a log file written by a child process; missing or unreadable gives a placeholder.
pub fn read_log(path: &std::path::Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
