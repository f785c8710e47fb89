//! The real `ferry` binary as a child process, and a builder for its config.
//!
//! The agent's stdout and stderr are appended to `<dir>/ferry.log`, so one log covers every
//! start in the same directory (after a crash and a restart, for example). `RUST_LOG` and
//! `NOTIFY_SOCKET` from the test runner's environment are not passed on; set them with
//! [`Agent::spawn_with_env`].
//!
//! The benchmarks run the same agent with [`Agent::start_timed`]: a given binary (e.g. a
//! release build) on a config file they wrote, with every log line stamped with the moment it
//! arrived, so phases (spool opened, connected) can be timed from the log.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{kill_and_reap, read_log, send_signal, wait_for_exit};

/// How long a SIGTERMed agent may take to exit (its own grace period is far shorter).
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often [`Agent::wait_for_log`] re-reads the log.
const LOG_POLL: Duration = Duration::from_millis(20);

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

pub struct Agent {
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// When the current process was started.
    started: Instant,
    /// With [`Agent::start_timed`]: every log line, across restarts, with the moment it arrived.
    stamps: Option<Arc<Stamped>>,
}

/// Log lines with the moment each arrived.
type Stamped = Mutex<Vec<(Instant, String)>>;

impl Agent {
    /// Writes `dir/ferry.yaml` and runs `ferry run --config dir/ferry.yaml`.
    pub fn spawn(dir: &Path, config_yaml: &str) -> Agent {
        Self::spawn_with_env(dir, config_yaml, &[])
    }

    /// Like [`Agent::spawn`], with extra environment variables (e.g. `RUST_LOG`).
    pub fn spawn_with_env(dir: &Path, config_yaml: &str, env: &[(&str, &str)]) -> Agent {
        let config_path = dir.join("ferry.yaml");
        std::fs::write(&config_path, config_yaml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut agent = Agent {
            bin: PathBuf::from(ferry_bin()),
            config_path,
            log_path: dir.join("ferry.log"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            started: Instant::now(),
            stamps: None,
        };
        agent.start_again();
        agent
    }

    /// Runs `bin run --config CONFIG_PATH` on a config file that is already written, logging to
    /// the same path with the extension `.log`. Its stderr (the log) is read by a thread that
    /// stamps each line as it arrives ([`Agent::logged`]) and appends it to the log file.
    pub fn start_timed(bin: &Path, config_path: &Path) -> Agent {
        let mut agent = Agent {
            bin: bin.to_path_buf(),
            config_path: config_path.to_path_buf(),
            log_path: config_path.with_extension("log"),
            env: Vec::new(),
            child: None,
            started: Instant::now(),
            stamps: Some(Arc::default()),
        };
        agent.start_again();
        agent
    }

    /// Starts the agent again with the same config file and environment, e.g. after
    /// [`Agent::kill9`]. Panics if it is still running.
    pub fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "start_again() on a running agent: kill9() or terminate() it first"
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone a file handle"));
        match &self.stamps {
            Some(_) => cmd.stderr(Stdio::piped()),
            None => cmd.stderr(log.try_clone().expect("clone a file handle")),
        };
        self.started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        if let Some(stamps) = &self.stamps {
            let stderr = child.stderr.take().expect("stderr is piped");
            let sink = stamps.clone();
            std::thread::spawn(move || stamp_lines(stderr, log, &sink));
        }
        self.child = Some(child);
    }

    /// Runs `ferry validate --config PATH` to completion.
    pub fn validate(config_path: &Path) -> Output {
        Command::new(ferry_bin())
            .arg("validate")
            .arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", ferry_bin()))
    }

    /// `ferry status --json` against this agent, on the blocking pool; panics unless it
    /// answers.
    pub async fn status_json(&self) -> serde_json::Value {
        let config = self.config_path().to_path_buf();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(ferry_bin())
                .args(["status", "--json", "--config"])
                .arg(&config)
                .output()
                .expect("ferry status runs")
        })
        .await
        .expect("the status command's task");
        assert!(out.status.success(), "ferry status failed: {out:?}");
        serde_json::from_slice(&out.stdout).expect("ferry status --json prints JSON")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Pid of the current process. Panics if it was never started or has been reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait on ferry").is_none(),
            None => false,
        }
    }

    /// SIGKILL (a crash, as far as the agent can tell), then reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("kill9() on an agent that is not running");
        kill_and_reap(&mut child)
    }

    /// SIGTERM, then wait up to 20 s for the agent to exit. Panics with the log if it does not.
    pub fn terminate(&mut self) -> ExitStatus {
        match self.terminate_within(TERMINATE_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "ferry did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM (SIGKILLed it); log:\n{}",
                self.log()
            ),
        }
    }

    /// SIGTERM, then wait up to `grace` for the agent to exit; if it does not, SIGKILL it and
    /// return `None`.
    pub fn terminate_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self
            .child
            .take()
            .expect("terminate() on an agent that is not running");
        if child.try_wait().expect("try_wait on ferry").is_none() {
            send_signal(child.id(), "TERM");
        }
        let status = wait_for_exit(&mut child, grace);
        if status.is_none() {
            kill_and_reap(&mut child);
        }
        status
    }

    /// SIGHUP (reload the config). Panics if the agent is not running.
    pub fn sighup(&mut self) {
        assert!(
            self.is_running(),
            "sighup() on an agent that is not running"
        );
        assert!(send_signal(self.pid(), "HUP"), "cannot SIGHUP ferry");
    }

    /// Everything the agent has written to stdout and stderr so far, across restarts (with
    /// [`Agent::start_timed`]: its stderr, as the stamping thread has read it).
    pub fn log(&self) -> String {
        match &self.stamps {
            Some(stamps) => stamps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(_, l)| format!("{l}\n"))
                .collect(),
            None => read_log(&self.log_path),
        }
    }

    /// Log lines at WARN or ERROR.
    pub fn problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }

    /// When the current process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the first log line containing `needle` arrived. Only for [`Agent::start_timed`].
    pub fn logged(&self, needle: &str) -> Option<Instant> {
        self.stamps
            .as_ref()
            .expect("logged() needs an agent started with start_timed()")
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout).await
    }

    /// Waits until the log contains `needle` at least `count` times (the log spans restarts).
    pub async fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(LOG_POLL).await;
        }
    }
}

/// Reads the agent's stderr line by line: stamps each line with the moment it arrived and
/// appends it to the log file.
fn stamp_lines(stderr: std::process::ChildStderr, mut log: std::fs::File, sink: &Stamped) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let at = Instant::now();
        let _ = writeln!(log, "{line}");
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, line));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// `uplink.tls`: server verification against `ca_file`, plus a client certificate for mTLS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    /// `(cert_file, key_file)`.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `uplink.auth`: the password is written to `<dir>/password` by [`AgentConfig::render`].
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    DropOldest,
    DropNewest,
}

/// A ferry config with test defaults: fast flushes, short backoff, one system collector every
/// 200 ms. Change the fields, then [`AgentConfig::render`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's directory: the spool and the password file go here.
    pub dir: PathBuf,
    pub device_id: String,
    pub spool_dir: PathBuf,
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    pub flush_interval_ms: u64,
    pub port: u16,
    pub keepalive_s: u64,
    pub linger_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// `uplink.min_link_bytes_per_s`; ferry's default when None.
    pub min_link_bytes_per_s: Option<u64>,
    pub tls: Option<TlsConfig>,
    pub auth: Option<AuthConfig>,
    /// Items of the `collectors` list as YAML mappings, one string each (multi-line).
    pub collectors: Vec<String>,
    /// `uplink.batch.max_records`.
    pub batch_max_records: u64,
    /// More keys of the `uplink` mapping, as YAML lines without indentation.
    pub uplink_extra: Vec<String>,
    /// More top-level YAML (e.g. a `streams:` mapping), appended as it is.
    pub extra: String,
}

pub const SYSTEM_COLLECTOR: &str = "type: system\nname: system\ninterval_ms: 200";

impl AgentConfig {
    pub fn new(dir: &Path, port: u16) -> AgentConfig {
        AgentConfig {
            dir: dir.to_path_buf(),
            device_id: "test-gw".to_owned(),
            spool_dir: dir.join("spool"),
            max_bytes: 64 * 1024 * 1024,
            full_policy: FullPolicy::DropOldest,
            flush_interval_ms: 50,
            port,
            keepalive_s: 5,
            linger_ms: 100,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            min_link_bytes_per_s: None,
            tls: None,
            auth: None,
            collectors: vec![SYSTEM_COLLECTOR.to_owned()],
            batch_max_records: 500,
            uplink_extra: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn password_path(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// The YAML text. Also writes `<dir>/password` (mode 0600) when `auth` is set.
    pub fn render(&self) -> String {
        let policy = match self.full_policy {
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::DropNewest => "drop_newest",
        };
        let mut y = format!(
            "\
device_id: {device_id}
log_level: debug
spool:
  dir: {spool_dir}
  max_bytes: {max_bytes}
  full_policy: {policy}
  flush_interval_ms: {flush_interval_ms}
  flush_max_records: 1000
  cache_bytes: 4194304
uplink:
  host: 127.0.0.1
  port: {port}
  client_id: {client_id}
  topic_prefix: ferry
  keepalive_s: {keepalive_s}
  connect_timeout_ms: 5000
  max_packet_bytes: 262144
  window: 4
  batch:
    max_records: {batch_max_records}
    max_bytes: 65536
    linger_ms: {linger_ms}
  backoff:
    initial_ms: {backoff_initial_ms}
    max_ms: {backoff_max_ms}
    reset_after_ms: 5000
  shutdown_grace_ms: 2000
",
            device_id = quote(&self.device_id),
            spool_dir = quote_path(&self.spool_dir),
            max_bytes = self.max_bytes,
            flush_interval_ms = self.flush_interval_ms,
            port = self.port,
            client_id = quote(&format!("ferry-{}", self.device_id)),
            keepalive_s = self.keepalive_s,
            linger_ms = self.linger_ms,
            batch_max_records = self.batch_max_records,
            backoff_initial_ms = self.backoff_initial_ms,
            backoff_max_ms = self.backoff_max_ms,
        );
        if let Some(rate) = self.min_link_bytes_per_s {
            y += &format!("  min_link_bytes_per_s: {rate}\n");
        }
        for line in &self.uplink_extra {
            y += &format!("  {line}\n");
        }
        if let Some(tls) = &self.tls {
            y += "  tls:\n";
            y += &format!("    ca_file: {}\n", quote_path(&tls.ca_file));
            if let Some((cert, key)) = &tls.client {
                y += &format!("    cert_file: {}\n", quote_path(cert));
                y += &format!("    key_file: {}\n", quote_path(key));
            }
        }
        if let Some(auth) = &self.auth {
            let path = self.password_path();
            write_secret(&path, &auth.password);
            y += "  auth:\n";
            y += &format!("    username: {}\n", quote(&auth.username));
            y += &format!("    password_file: {}\n", quote_path(&path));
        }
        if self.collectors.is_empty() {
            y += "collectors: []\n";
        } else {
            y += "collectors:\n";
            for item in &self.collectors {
                for (i, line) in item.trim().lines().enumerate() {
                    y += if i == 0 { "  - " } else { "    " };
                    y += line;
                    y += "\n";
                }
            }
        }
        y += &self.extra;
        y
    }
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn quote_path(p: &Path) -> String {
    quote(p.to_str().expect("test paths are UTF-8"))
}

fn write_secret(path: &Path, secret: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.write_all(secret.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
