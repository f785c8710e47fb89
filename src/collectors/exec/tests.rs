//! The exec collector against real programs: shell scripts written into a temp dir.

use super::*;
use crate::record::{Body, LOSS_STREAM, Reading, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

fn config(command: &str, extra: &str) -> ExecConfig {
    let yaml = format!("name: modem\ncommand: {command}\n{extra}");
    let c: ExecConfig = serde_yaml::from_str(&yaml).unwrap();
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c
}

async fn once(c: &ExecConfig) -> Vec<Reading> {
    let parser = Parser::new(&c.format).unwrap();
    run_once(c, "modem", parser, 0).await.readings
}

fn field<'a>(r: &'a Reading, name: &str) -> Option<&'a Value> {
    match &r.body {
        Body::Fields(f) => f.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        Body::Line(_) => None,
    }
}

/// (reason, count, sample) of every loss record.
fn losses(readings: &[Reading]) -> Vec<(String, u64, String)> {
    readings
        .iter()
        .filter(|r| r.stream == LOSS_STREAM)
        .map(|r| {
            let s = |n| match field(r, n) {
                Some(Value::Str(s)) => s.clone(),
                other => panic!("{n}: {other:?}"),
            };
            let Some(Value::U64(count)) = field(r, "count") else {
                panic!("count")
            };
            (s("reason"), *count, s("sample"))
        })
        .collect()
}

#[tokio::test]
async fn output_is_parsed_and_the_environment_is_only_path_and_the_listed_variables() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(
        dir.path(),
        "env.sh",
        r#"echo "{\"rssi\": -71, \"arg\": \"$1\", \"home\": \"${HOME:-unset}\", \"x\": \"$X\", \"path_set\": \"${PATH:+yes}\"}"
echo "{\"rssi\": -70"
printf '{"rssi": -69}'"#,
    );
    // SAFETY of the assertion: the test process has HOME; the program must not see it.
    let c = config(
        &cmd,
        "args: [wwan0]\nenv: {X: given}\nformat: {type: json}\ntags: {site: north}\n",
    );
    let readings = once(&c).await;
    let data: Vec<&Reading> = readings.iter().filter(|r| r.stream == "modem").collect();
    assert_eq!(data.len(), 2, "{readings:?}");
    assert_eq!(field(data[0], "rssi"), Some(&Value::I64(-71)));
    assert_eq!(field(data[0], "arg"), Some(&Value::Str("wwan0".into())));
    assert_eq!(field(data[0], "home"), Some(&Value::Str("unset".into())));
    assert_eq!(field(data[0], "x"), Some(&Value::Str("given".into())));
    assert_eq!(field(data[0], "path_set"), Some(&Value::Str("yes".into())));
    assert_eq!(
        field(data[0], "tag.site"),
        Some(&Value::Str("north".into()))
    );
    // The last line had no newline: it counts once the program exited.
    assert_eq!(field(data[1], "rssi"), Some(&Value::I64(-69)));
    let l = losses(&readings);
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].0.as_str(), l[0].1), ("malformed", 1));
    assert!(l[0].2.starts_with("{\"rssi\": -70"), "{l:?}");
}

#[tokio::test]
async fn line_protocol_output_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(
        dir.path(),
        "lp.sh",
        "echo 'modem,iface=wwan0 rssi=-71i,tech=\"lte\"'",
    );
    let c = config(&cmd, "format: {type: influx}\n");
    let readings = once(&c).await;
    assert_eq!(readings.len(), 1, "{readings:?}");
    assert_eq!(field(&readings[0], "rssi"), Some(&Value::I64(-71)));
    assert_eq!(
        field(&readings[0], "tag.iface"),
        Some(&Value::Str("wwan0".into()))
    );
}

#[tokio::test]
async fn a_non_zero_exit_is_a_loss_with_the_start_of_stderr_and_its_output_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(
        dir.path(),
        "fail.sh",
        "echo v=1\necho 'modem not found' >&2\nexit 3",
    );
    let c = config(&cmd, "format: {type: kv}\n");
    let readings = once(&c).await;
    let l = losses(&readings);
    assert_eq!(readings.len(), 1, "{readings:?}");
    assert_eq!((l[0].0.as_str(), l[0].1), ("failed", 1));
    assert!(l[0].2.contains("exit status: 3"), "{l:?}");
    assert!(l[0].2.contains("modem not found"), "{l:?}");
}

#[tokio::test]
async fn a_program_that_cannot_start_is_a_loss() {
    let c = config("/nonexistent/ferry-test-tool", "");
    let l = losses(&once(&c).await);
    assert_eq!(l[0].0, "failed");
    assert!(l[0].2.contains("/nonexistent/ferry-test-tool"), "{l:?}");
}

/// State letter of a process from /proc, `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

#[tokio::test]
async fn a_hanging_program_is_killed_with_its_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let cmd = script(
        dir.path(),
        "hang.sh",
        &format!(
            "sleep 1000 &\necho $! > {}\necho 'still thinking' >&2\nsleep 1000",
            pidfile.display()
        ),
    );
    let c = config(&cmd, "timeout_ms: 500\n");
    let started = std::time::Instant::now();
    let l = losses(&once(&c).await);
    // Far below the scripts' own 1000 s: the run ended by the kill.
    assert!(started.elapsed() < Duration::from_secs(100));
    assert_eq!((l[0].0.as_str(), l[0].1), ("timeout", 1), "{l:?}");
    assert!(l[0].2.contains("killed after 500 ms"), "{l:?}");
    assert!(l[0].2.contains("still thinking"), "{l:?}");
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Killed: gone, or a zombie waiting for whoever adopted it to reap it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match proc_state(grandchild) {
            None | Some('Z') | Some('X') => break,
            Some(s) if std::time::Instant::now() > deadline => {
                panic!("grandchild {grandchild} still alive in state {s}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn ten_megabytes_of_output_are_capped_and_the_excess_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(
        dir.path(),
        "flood.sh",
        "yes 'v=1' | head -c 10000000\necho done >&2",
    );
    let c = config(
        &cmd,
        "max_output_bytes: 4096\nformat: {type: kv}\ntimeout_ms: 60000\n",
    );
    let readings = once(&c).await;
    let data = readings.iter().filter(|r| r.stream == "modem").count();
    // 4096 bytes kept are 1024 lines of "v=1\n"; nothing past the cap was parsed.
    assert_eq!(data, 1024);
    let l = losses(&readings);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0].0, "truncated");
    assert!(
        l[0].2
            .starts_with(&format!("{} bytes over", 10_000_000 - 4096)),
        "{l:?}"
    );
}

#[tokio::test]
async fn overlapping_ticks_are_skipped_and_counted_and_failures_never_stop_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("runs");
    let cmd = script(
        dir.path(),
        "slow.sh",
        &format!(
            "echo x >> {}\nsleep 0.4\necho 'boom' >&2\nexit 1",
            counter.display()
        ),
    );
    let c = config(&cmd, "interval_ms: 100\ntimeout_ms: 5000\n");
    let (ctx, mut rx) = CollectorContext::new_test("modem");
    let task = tokio::spawn(c.build().run(ctx.clone()));
    let mut reasons = BTreeMap::<String, u64>::new();
    // Three runs reported: the collector went on after each failure.
    let mut runs = 0;
    while runs < 3 {
        let intake = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a run within 30 s")
            .expect("collector alive");
        for (reason, count, _) in losses(&intake.readings) {
            *reasons.entry(reason).or_default() += count;
        }
        runs += 1;
    }
    ctx.shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(reasons.get("failed"), Some(&3), "{reasons:?}");
    assert!(
        reasons.get("skipped").copied().unwrap_or(0) >= 1,
        "{reasons:?}"
    );
    let started = std::fs::read_to_string(&counter).unwrap().lines().count();
    assert!(started >= 3, "{started}");
}

#[test]
fn bad_config_is_reported() {
    let c: ExecConfig = serde_yaml::from_str(
        "name: m\ncommand: mmcli\nenv: {PATH: /tmp}\ninterval_ms: 5\nmax_output_bytes: 0\nformat: {type: csv}\n",
    )
    .unwrap();
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        [
            "command",
            "env.PATH",
            "interval_ms",
            "max_output_bytes",
            "format.columns"
        ]
    );
}
