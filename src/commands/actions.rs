//! Actions: programs named in the config that a command may run.
//!
//! - Only actions the config names exist; the program is an absolute path run directly, never
//!   through a shell. Arguments are the configured fixed ones, then each parameter the command
//!   gave, in the configured order, as one argv item each.
//! - Parameters are typed and checked: strings are 1-256 characters of `A-Z a-z 0-9 _ . : / @ + -`
//!   and may not start with `-` (no option injection); integers and booleans are written in
//!   decimal / `true`/`false`. Unknown parameters are refused.
//! - The program runs in its own process group with an empty environment (but `PATH`), no
//!   stdin; stdout and stderr are captured up to `max_output_bytes` each. On timeout, on a stop
//!   of ferry (`stop` cancelled) and when the run is dropped before its program was reaped, the
//!   whole process group is killed (SIGKILL), so a background grandchild does not outlive it.

use super::{ActionSettings, ParamKind};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// What a finished (or killed) action produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// None when killed at the timeout or by a stop.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Killed because ferry is stopping.
    pub stopped: bool,
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
}

/// Checks the command's parameters against the action's and returns the argv tail.
pub fn build_args(
    action: &ActionSettings,
    args: &Map<String, Value>,
) -> Result<Vec<String>, String> {
    if let Some(k) = args
        .keys()
        .find(|k| !action.params.iter().any(|p| p.name == **k))
    {
        return Err(format!("action {} has no parameter {k:?}", action.name));
    }
    let mut out = action.args.clone();
    for p in &action.params {
        let Some(v) = args.get(&p.name) else {
            if p.required {
                return Err(format!("missing required parameter {:?}", p.name));
            }
            continue;
        };
        let text = match (p.kind, v) {
            (ParamKind::String, Value::String(s)) if valid_string(s.as_str()) => s.clone(),
            (ParamKind::String, _) => {
                return Err(format!(
                    "parameter {:?} must be a string of 1-256 characters of A-Z a-z 0-9 _ . : / @ + - not starting with -",
                    p.name
                ));
            }
            (ParamKind::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            (ParamKind::Integer, _) => {
                return Err(format!("parameter {:?} must be an integer", p.name));
            }
            (ParamKind::Bool, Value::Bool(b)) => b.to_string(),
            (ParamKind::Bool, _) => {
                return Err(format!("parameter {:?} must be true or false", p.name));
            }
        };
        out.push(text);
    }
    Ok(out)
}

fn valid_string(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/@+-".contains(&b))
}

/// Kills a process group when dropped while armed: a run dropped mid-way (its task aborted,
/// the runtime shut down) must not leave the program's children behind.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    /// Kills the group now and disarms the guard.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the action to completion, its timeout or `stop`.
pub async fn run(
    action: &ActionSettings,
    argv: Vec<String>,
    stop: &CancellationToken,
) -> Result<Outcome, String> {
    let mut child = tokio::process::Command::new(&action.program)
        .args(&argv)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", action.program.display()))?;
    // Armed until the program is reaped: its pid is the group id and cannot be reused before.
    let mut group = GroupGuard(child.id().map(|id| Pid::from_raw(id as i32)));
    let cap = action.max_output_bytes;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let work = async {
        let (out, err, status) = tokio::join!(
            read_capped(stdout, cap),
            read_capped(stderr, cap),
            child.wait()
        );
        (out, err, status)
    };
    let ended = tokio::select! {
        r = tokio::time::timeout(action.timeout, work) => r.map_err(|_| false),
        _ = stop.cancelled() => Err(true),
    };
    match ended {
        Ok(((out, t1), (err, t2), status)) => {
            // Reaped: the group id may be reused from now on.
            group.0 = None;
            Ok(Outcome {
                exit_code: status.ok().and_then(|s| s.code()),
                timed_out: false,
                stopped: false,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
                truncated: t1 || t2,
            })
        }
        Err(stopped) => {
            group.kill();
            let _ = child.wait().await;
            Ok(Outcome {
                exit_code: None,
                timed_out: !stopped,
                stopped,
                stdout: String::new(),
                stderr: String::new(),
                truncated: false,
            })
        }
    }
}

async fn read_capped<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut truncated = false;
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(buf.len());
                if n > room {
                    truncated = true;
                }
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    (buf, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::ParamSettings;
    use std::time::Duration;

    fn action(program: &str, args: &[&str], timeout_ms: u64) -> ActionSettings {
        ActionSettings {
            name: "a".into(),
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            params: vec![
                ParamSettings {
                    name: "target".into(),
                    kind: ParamKind::String,
                    required: true,
                },
                ParamSettings {
                    name: "count".into(),
                    kind: ParamKind::Integer,
                    required: false,
                },
            ],
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: 16,
            max_concurrent: 1,
        }
    }

    fn args(v: serde_json::Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parameters_are_typed_and_ordered() {
        let a = action("/bin/echo", &["fixed"], 1000);
        let argv = build_args(&a, &args(serde_json::json!({"count": 3, "target": "x.y"}))).unwrap();
        assert_eq!(argv, vec!["fixed", "x.y", "3"]);
        assert!(build_args(&a, &args(serde_json::json!({"target": "; rm -rf /"}))).is_err());
        assert!(build_args(&a, &args(serde_json::json!({"target": "-rf"}))).is_err());
        assert!(build_args(&a, &args(serde_json::json!({"target": "x", "count": "3"}))).is_err());
        assert!(build_args(&a, &args(serde_json::json!({"count": 3}))).is_err());
        assert!(build_args(&a, &args(serde_json::json!({"target": "x", "other": 1}))).is_err());
    }

    #[tokio::test]
    async fn captures_output_up_to_the_cap() {
        let a = action("/bin/echo", &[], 5000);
        let o = run(
            &a,
            vec!["hello world, this is long".into()],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, Some(0));
        assert_eq!(o.stdout, "hello world, thi");
        assert!(o.truncated);
    }

    /// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
    }

    /// Starts an action whose shell leaves a `sleep` running in the background (its pid in a
    /// file) and waits past `timeout_ms`; returns the run's task and the grandchild's pid.
    async fn with_grandchild(
        dir: &std::path::Path,
        timeout_ms: u64,
        stop: CancellationToken,
    ) -> (tokio::task::JoinHandle<Result<Outcome, String>>, u32) {
        let pid_file = dir.join("grandchild.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let a = action("/bin/sh", &["-c", &script], timeout_ms);
        let task = tokio::spawn(async move { run(&a, a.args.clone(), &stop).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the action never started its grandchild"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(alive(pid), "the grandchild {pid} is running");
        (task, pid)
    }

    async fn gone(pid: u32) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !alive(pid)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kills_the_process_group_at_the_timeout() {
        // Killing only the shell would leave the grandchild behind.
        let dir = tempfile::tempdir().unwrap();
        let (task, pid) = with_grandchild(dir.path(), 2000, CancellationToken::new()).await;
        let o = task.await.unwrap().unwrap();
        assert!(o.timed_out && !o.stopped, "{o:?}");
        assert!(gone(pid).await, "the grandchild {pid} outlived the timeout");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kills_the_process_group_on_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (task, pid) = with_grandchild(dir.path(), 60_000, stop.clone()).await;
        stop.cancel();
        let o = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a stop ends the run at once")
            .unwrap()
            .unwrap();
        assert!(o.stopped && !o.timed_out, "{o:?}");
        assert!(gone(pid).await, "the grandchild {pid} outlived the stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kills_the_process_group_when_the_run_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (task, pid) = with_grandchild(dir.path(), 60_000, CancellationToken::new()).await;
        task.abort();
        let _ = task.await;
        assert!(
            gone(pid).await,
            "the grandchild {pid} outlived its dropped run"
        );
    }
}
