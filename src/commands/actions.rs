//! Actions: programs named in the config that a command may run.
//!
//! - Only actions the config names exist; the program is an absolute path run directly, never
//!   through a shell. Arguments are the configured fixed ones, then each parameter the command
//!   gave, in the configured order, as one argv item each.
//! - Parameters are typed and checked: strings are 1-256 characters of `A-Z a-z 0-9 _ . : / @ + -`
//!   and may not start with `-` (no option injection); integers and booleans are written in
//!   decimal / `true`/`false`. Unknown parameters are refused.
//! - The program runs in its own process group with an empty environment (but `PATH`), no
//!   stdin; stdout and stderr are captured up to `max_output_bytes` each. On timeout the whole
//!   process group is killed.

use crate::config::{ActionSettings, ParamKind};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a finished (or killed) action produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// None when killed at the timeout.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
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

/// Runs the action to completion or its timeout.
pub async fn run(action: &ActionSettings, argv: Vec<String>) -> Result<Outcome, String> {
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
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
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
    match tokio::time::timeout(action.timeout, work).await {
        Ok(((out, t1), (err, t2), status)) => Ok(Outcome {
            exit_code: status.ok().and_then(|s| s.code()),
            timed_out: false,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            truncated: t1 || t2,
        }),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Ok(Outcome {
                exit_code: None,
                timed_out: true,
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
    use crate::config::ParamSettings;
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
        let o = run(&a, vec!["hello world, this is long".into()])
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kills_the_process_group_at_the_timeout() {
        // The shell leaves a `sleep` running in the background (its pid in a file) and waits
        // past the timeout; killing only the shell would leave the grandchild behind.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let a = action("/bin/sh", &["-c", &script], 2000);
        let task = tokio::spawn(async move { run(&a, a.args.clone()).await });
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
        assert!(
            alive(pid),
            "the grandchild {pid} is running before the timeout"
        );
        let o = task.await.unwrap().unwrap();
        assert!(o.timed_out, "{o:?}");
        while alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!alive(pid), "the grandchild {pid} outlived the timeout");
    }
}
