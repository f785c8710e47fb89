//! A real Mosquitto broker as a child process, one per test, in its own temporary directory.
//!
//! The broker always has a plain, anonymous listener on 127.0.0.1 for test clients
//! ([`Broker::plain_port`]); [`BrokerOpts::secure`] adds a second listener for the agent
//! ([`Broker::secure_port`]). [`Broker::agent_port`] is the one the agent should use.
//!
//! Things about Mosquitto 2.0 this relies on (see also the shared notes on test infra):
//! - `user root`: run as root, Mosquitto otherwise drops to user `mosquitto` after opening the
//!   listeners and then dies on root-owned 0600 keys. The port accepts for a moment before it
//!   dies, so readiness also checks the pid and the "running" log line.
//! - `per_listener_settings true`, so `allow_anonymous` and `password_file` apply per listener.
//! - `max_queued_messages 0` (no limit): the default of 1000 queued QoS 1 messages per client
//!   would make the broker silently drop messages for a slow or offline test subscriber.
//! - With `persistence`, the broker saves its database on SIGTERM and every second
//!   (`autosave_interval 1`); after SIGKILL up to a second of changes is lost.
//! - Restarting on the same port needs the old process to be gone (stop/kill wait for that).
//!
//! All methods block (at most a few seconds); call them from a multi-thread tokio runtime.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::Pki;
use super::ports::free_ports;
use super::{POLL, kill_and_reap, read_log, send_signal, wait_for_exit};

/// How long the broker may take to accept on every listener.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to exit after SIGTERM (it saves its database first).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to start when a port turns out to be taken.
const BIND_ATTEMPTS: u32 = 5;

/// The second listener, for the agent.
#[derive(Debug, Clone)]
pub enum Secure {
    /// Server-authenticated TLS, anonymous clients allowed.
    Tls {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    /// TLS with a client certificate signed by `ca` required; its CN becomes the username.
    MutualTls {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    /// Username and password required, optionally over TLS (`(cert, key, ca)`).
    Password {
        users: Vec<(String, String)>,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    },
}

impl Secure {
    /// TLS with the PKI's server certificate.
    pub fn tls(pki: &Pki) -> Secure {
        Secure::Tls {
            cert: pki.server_crt.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_crt.clone(),
        }
    }

    /// mTLS with the PKI's server certificate, client certificates checked against its CA.
    pub fn mutual_tls(pki: &Pki) -> Secure {
        Secure::MutualTls {
            cert: pki.server_crt.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_crt.clone(),
        }
    }

    /// Username/password, over TLS with the PKI's server certificate when `tls` is given.
    pub fn password(users: &[(&str, &str)], tls: Option<&Pki>) -> Secure {
        Secure::Password {
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            tls: tls.map(|pki| {
                (
                    pki.server_crt.clone(),
                    pki.server_key.clone(),
                    pki.ca_crt.clone(),
                )
            }),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BrokerOpts {
    pub secure: Option<Secure>,
    /// Keep sessions, queued messages and retained messages across restarts.
    pub persistence: bool,
}

pub struct Broker {
    dir: TempDir,
    plain_port: u16,
    secure_port: Option<u16>,
    child: Option<Child>,
    /// The plain listener applies `<dir>/acl` ([`Broker::start_with_acl`]).
    acl: bool,
    /// Mosquitto's default `max_queued_messages` (1000) instead of no limit.
    default_queue_limit: bool,
}

/// What the broker logs.
#[derive(Clone, Copy)]
enum Logging {
    /// Every packet: the log explains a failed test.
    Everything,
    /// Everything but packets: see [`Broker::start_quiet`].
    Quiet,
}

/// Why a start attempt failed.
enum StartError {
    /// The broker could not bind a port; trying again (later, or elsewhere) may work.
    AddressInUse,
    Failed(String),
}

impl Broker {
    /// Starts a broker on fresh ports and waits until every listener accepts.
    pub fn start(opts: BrokerOpts) -> Broker {
        Self::start_with(opts, Logging::Everything, None, None)
    }

    /// [`Broker::start`] with an ACL file (Mosquitto's format) on the plain listener; lines
    /// without a `user` apply to anonymous clients. Change it with [`Broker::set_acl`].
    ///
    /// `queue_limit`: keep Mosquitto's default `max_queued_messages` (1000). Mosquitto 2.0.11
    /// with `max_queued_messages 0` closes an MQTT 5 connection right after the PUBACK 0x87 of
    /// a denied QoS 1 publish; with the default it keeps the connection.
    pub fn start_with_acl(opts: BrokerOpts, acl: &str, queue_limit: bool) -> Broker {
        Self::start_with(opts, Logging::Everything, None, Some((acl, queue_limit)))
    }

    /// Rewrites the ACL file and makes the running broker reload it (SIGHUP).
    pub fn set_acl(&self, acl: &str) {
        assert!(self.acl, "set_acl() on a broker started without an ACL");
        std::fs::write(self.dir.path().join("acl"), acl).expect("write the ACL file");
        let pid = self.pid().expect("set_acl() on a stopped broker");
        assert!(send_signal(pid, "HUP"), "cannot SIGHUP mosquitto {pid}");
    }

    /// A broker for benchmarks: the plain listener only (on `port` if given, e.g. one an agent
    /// has been failing to reach), no persistence, and no per-packet (debug) logging: that
    /// would cost the broker about as much as the traffic a benchmark measures.
    pub fn start_quiet(port: Option<u16>) -> Broker {
        Self::start_with(BrokerOpts::default(), Logging::Quiet, port, None)
    }

    fn start_with(
        opts: BrokerOpts,
        logging: Logging,
        port: Option<u16>,
        acl: Option<(&str, bool)>,
    ) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("ferry-broker-")
            .tempdir()
            .expect("create a temp dir for the broker");
        let dir_str = dir.path().to_str().expect("temp dir path is UTF-8");
        // The config file format has no quoting.
        assert!(
            !dir_str.contains(char::is_whitespace),
            "mosquitto config paths cannot contain spaces: {dir_str}"
        );
        std::fs::create_dir(dir.path().join("data")).expect("create the broker's data dir");
        if let Some(Secure::Password { users, .. }) = &opts.secure {
            write_password_file(&dir.path().join("passwd"), users);
        }
        if let Some((acl, _)) = acl {
            std::fs::write(dir.path().join("acl"), acl).expect("write the ACL file");
        }

        let mut broker = Broker {
            dir,
            plain_port: 0,
            secure_port: None,
            child: None,
            acl: acl.is_some(),
            default_queue_limit: acl.is_some_and(|(_, limit)| limit),
        };
        for attempt in 1..=BIND_ATTEMPTS {
            let ports = free_ports(if opts.secure.is_some() { 2 } else { 1 });
            broker.plain_port = port.unwrap_or(ports[0]);
            broker.secure_port = ports.get(1).copied();
            let config = broker.render_config(&opts, logging);
            std::fs::write(broker.config_path(), config).expect("write mosquitto.conf");
            match broker.try_start() {
                Ok(()) => return broker,
                // Someone took a port between free_ports() and the broker's bind: pick others.
                Err(StartError::AddressInUse) if attempt < BIND_ATTEMPTS && port.is_none() => {}
                Err(StartError::AddressInUse) => broker.fail("could not bind a free port"),
                Err(StartError::Failed(why)) => broker.fail(&why),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts the broker again after [`Broker::stop`] or [`Broker::kill`]: same ports, config
    /// and data directory.
    pub fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "start_again() on a running broker: call stop() or kill() first"
        );
        for attempt in 1..=BIND_ATTEMPTS {
            match self.try_start() {
                Ok(()) => return,
                // Normally the old process is gone and SO_REUSEADDR lets the broker rebind at
                // once; this covers a client socket that happened to get the port as its source port.
                Err(StartError::AddressInUse) if attempt < BIND_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(100) * attempt);
                }
                Err(StartError::AddressInUse) => {
                    self.fail("port still in use after several restarts")
                }
                Err(StartError::Failed(why)) => self.fail(&why),
            }
        }
    }

    /// The anonymous plain listener, for test clients.
    pub fn plain_port(&self) -> u16 {
        self.plain_port
    }

    /// The TLS / mTLS / password listener, if the broker has one.
    pub fn secure_port(&self) -> Option<u16> {
        self.secure_port
    }

    /// The port the agent should connect to: the secure listener if any, else the plain one.
    pub fn agent_port(&self) -> u16 {
        self.secure_port.unwrap_or(self.plain_port)
    }

    /// The broker's temporary directory (config, log, `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM, then wait until the process is gone (it saves its database first).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().expect("try_wait on mosquitto").is_none() {
            send_signal(child.id(), "TERM");
        }
        if wait_for_exit(&mut child, STOP_TIMEOUT).is_none() {
            kill_and_reap(&mut child);
            self.fail(&format!(
                "did not exit within {STOP_TIMEOUT:?} of SIGTERM (SIGKILLed it)"
            ));
        }
    }

    /// SIGKILL, then wait until the process is gone. With persistence, changes since the last
    /// autosave (up to a second) are lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait on mosquitto").is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Mosquitto's log (all starts so far), followed by whatever it printed to stdout/stderr.
    pub fn log(&self) -> String {
        format!(
            "{}\n--- mosquitto stdout/stderr ---\n{}",
            read_log(&self.log_path()),
            read_log(&self.output_path())
        )
    }

    /// Waits until the broker's log contains `needle` at least `count` times.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if read_log(&self.log_path()).matches(needle).count() >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn output_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.out")
    }

    fn ports(&self) -> Vec<u16> {
        std::iter::once(self.plain_port)
            .chain(self.secure_port)
            .collect()
    }

    fn render_config(&self, opts: &BrokerOpts, logging: Logging) -> String {
        let dir = self.dir.path().display();
        let mut lines = vec![
            "# Written by tests/common/broker.rs".to_owned(),
            "user root".to_owned(),
            "per_listener_settings true".to_owned(),
            format!("log_dest file {dir}/mosquitto.log"),
            "log_timestamp_format %Y-%m-%dT%H:%M:%S".to_owned(),
        ];
        if !self.default_queue_limit {
            lines.push("max_queued_messages 0".to_owned());
        }
        match logging {
            Logging::Everything => lines.push("log_type all".to_owned()),
            Logging::Quiet => {
                // "running" (readiness) is information, as are connects; packets are debug. No
                // limit on messages in flight towards a subscriber either: the benchmark's
                // counter must never be what limits a drain.
                lines.extend(
                    ["error", "warning", "notice", "information"].map(|t| format!("log_type {t}")),
                );
                lines.push("max_inflight_messages 0".to_owned());
            }
        }
        if opts.persistence {
            lines.push("persistence true".to_owned());
            lines.push(format!("persistence_location {dir}/data/"));
            lines.push("autosave_interval 1".to_owned());
        }
        lines.push(String::new());
        lines.push(format!("listener {} 127.0.0.1", self.plain_port));
        lines.push("allow_anonymous true".to_owned());
        if self.acl {
            lines.push(format!("acl_file {dir}/acl"));
        }

        if let (Some(secure), Some(port)) = (&opts.secure, self.secure_port) {
            lines.push(String::new());
            lines.push(format!("listener {port} 127.0.0.1"));
            let tls = |cert: &Path, key: &Path, ca: &Path| {
                [
                    format!("certfile {}", cert.display()),
                    format!("keyfile {}", key.display()),
                    format!("cafile {}", ca.display()),
                ]
            };
            match secure {
                Secure::Tls { cert, key, ca } => {
                    lines.push("allow_anonymous true".to_owned());
                    lines.extend(tls(cert, key, ca));
                }
                Secure::MutualTls { cert, key, ca } => {
                    lines.push("allow_anonymous false".to_owned());
                    lines.push("require_certificate true".to_owned());
                    lines.push("use_identity_as_username true".to_owned());
                    lines.extend(tls(cert, key, ca));
                }
                Secure::Password { tls: certs, .. } => {
                    lines.push("allow_anonymous false".to_owned());
                    lines.push(format!("password_file {dir}/passwd"));
                    if let Some((cert, key, ca)) = certs {
                        lines.extend(tls(cert, key, ca));
                    }
                }
            }
        }
        lines.push(String::new());
        lines.join("\n")
    }

    /// Spawns mosquitto and waits until it is ready, or reports why not (the process is reaped).
    fn try_start(&mut self) -> Result<(), StartError> {
        let log_offset = std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.output_path())
            .expect("open mosquitto.out");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone a file handle"))
            .stderr(out)
            .spawn()
            .expect("cannot run mosquitto (is the mosquitto package installed?)");

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = std::fs::read(self.log_path()).unwrap_or_default();
            let new_log = String::from_utf8_lossy(log.get(log_offset..).unwrap_or_default());
            if let Some(status) = child.try_wait().expect("try_wait on mosquitto") {
                return Err(if new_log.contains("Address already in use") {
                    StartError::AddressInUse
                } else {
                    StartError::Failed(format!("exited during start-up ({status})"))
                });
            }
            // "running" is logged once every listener is bound: a port that accepts without it
            // belongs to somebody else.
            let bound = new_log.contains(" running");
            if bound
                && self.ports().iter().all(|&p| accepts(p))
                && child.try_wait().expect("try_wait on mosquitto").is_none()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                return Err(StartError::Failed(format!(
                    "not ready within {START_TIMEOUT:?} (\"running\" logged: {bound})"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "mosquitto on 127.0.0.1:{} (secure: {:?}) {why}\nconfig:\n{}\nlog:\n{}",
            self.plain_port,
            self.secure_port,
            read_log(&self.config_path()),
            self.log()
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn write_password_file(path: &Path, users: &[(String, String)]) {
    assert!(
        !users.is_empty(),
        "Secure::Password needs at least one user"
    );
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        // -c creates the file (first user only), -b takes the password from the command line.
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(path)
            .args([user, password])
            .output()
            .expect("cannot run mosquitto_passwd (is the mosquitto package installed?)");
        assert!(
            out.status.success(),
            "mosquitto_passwd -b {} {user} failed ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p PORT ARGS...` (10 s limit) and returns its output.
/// With `-q 1` it exits 0 only after the broker's PUBACK.
pub fn mosquitto_pub<S: AsRef<OsStr>>(port: u16, args: &[S]) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null());
    run_with_timeout(cmd, Duration::from_secs(10))
}

/// Runs a short command to completion, SIGKILLing it (and panicking) after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            // The thread still owns the child; unless it exited this very moment, the pid is ours.
            send_signal(pid, "KILL");
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}
