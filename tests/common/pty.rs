//! A serial "device" made of a socat pseudo-terminal pair: ferry opens [`PtyPair::device`]
//! exactly as it would open /dev/ttyUSB0, and the test writes on the other end.
//!
//! Things about socat 1.7 this relies on (see also the shared notes on test infra):
//! - The `link=` symlinks appear a few ms after start and are removed when socat exits, so
//!   [`PtyPair::unplug`] looks like a USB unplug to ferry (EOF or EIO, then ENOENT on open).
//! - Bytes written to the peer before ferry opens the device are buffered in the pty and read
//!   once it does.
//! - The test keeps the peer open for the life of the pair, so no close of the peer can end
//!   socat's transfer loop.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{POLL, kill_and_reap, read_log, send_signal, wait_for_exit};

/// How long socat may take to create its links.
const START_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PtyPair {
    /// The end ferry opens.
    pub device: PathBuf,
    /// The end the test writes to.
    pub peer: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    writer: Option<File>,
}

impl PtyPair {
    /// Starts socat with links `dir/<name>` (device) and `dir/<name>.peer`.
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut pair = PtyPair {
            device: dir.join(name),
            peer: dir.join(format!("{name}.peer")),
            log: dir.join(format!("{name}.socat.log")),
            child: None,
            writer: None,
        };
        pair.plug();
        pair
    }

    /// Starts socat again on the same link paths (a replug). Panics if it is running.
    pub fn plug(&mut self) {
        assert!(self.child.is_none(), "plug() while plugged in");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the socat log");
        let child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", self.device.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.peer.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone a file handle"))
            .stderr(log)
            .spawn()
            .expect("socat runs (install the socat package)");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !(self.device.exists() && self.peer.exists()) {
            assert!(
                Instant::now() < deadline,
                "socat made no links within {START_TIMEOUT:?}; log:\n{}",
                read_log(&self.log)
            );
            std::thread::sleep(POLL);
        }
        self.writer = Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.peer)
                .expect("open the peer end of the pty"),
        );
    }

    /// Kills socat (the links disappear), like pulling the USB plug.
    pub fn unplug(&mut self) {
        self.writer = None;
        if let Some(mut child) = self.child.take() {
            // SIGTERM: socat closes the ptys and removes its links, as udev would.
            send_signal(child.id(), "TERM");
            if wait_for_exit(&mut child, START_TIMEOUT).is_none() {
                kill_and_reap(&mut child);
            }
        }
        // After a SIGKILL socat could not remove them.
        let _ = std::fs::remove_file(&self.device);
        let _ = std::fs::remove_file(&self.peer);
    }

    /// Writes `bytes` on the peer end; they arrive at the device end.
    pub fn write(&mut self, bytes: &[u8]) {
        let w = self.writer.as_mut().expect("write() while unplugged");
        w.write_all(bytes).expect("write to the pty");
        w.flush().expect("flush the pty");
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.writer = None;
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}
