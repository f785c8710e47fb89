//! What a gateway in the field needs beyond the pipeline: journal priorities, one identity per
//! device, the small operator commands.

mod common;

use common::agent::{Agent, AgentConfig};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// Under systemd, stderr is the journal stream named by `JOURNAL_STREAM`; every line then
/// carries its syslog priority so that `journalctl -p warning` finds the warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lines_carry_their_priority_only_when_stderr_is_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    // No broker on this port: ferry warns that it cannot connect.
    let cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    let log_path = dir.path().join("ferry.log");
    std::fs::write(&log_path, b"").unwrap();
    let meta = std::fs::metadata(&log_path).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut agent =
        Agent::spawn_with_env(dir.path(), &cfg.render(), &[("JOURNAL_STREAM", &stream)]);
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(30))
            .await,
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
    let log = agent.log();
    let warn = log
        .lines()
        .find(|l| l.contains("Cannot connect to the broker"))
        .expect("the warning line");
    assert!(warn.starts_with("<4>"), "a WARN is priority 4: {warn:?}");
    assert!(warn.contains("WARN"), "{warn:?}");
    let info = log
        .lines()
        .find(|l| l.contains(" INFO "))
        .unwrap_or_else(|| panic!("an INFO line in\n{log}"));
    assert!(info.starts_with("<6>"), "an INFO is priority 6: {info:?}");
    assert!(
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.starts_with('<')),
        "every line carries a priority:\n{log}"
    );

    // The variable alone (inherited by a shell of the unit) is not the journal: no prefix.
    let other = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(other.path(), common::ports::free_port());
    let mut agent =
        Agent::spawn_with_env(other.path(), &cfg.render(), &[("JOURNAL_STREAM", &stream)]);
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(30))
            .await,
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
    assert!(
        !agent.log().lines().any(|l| l.starts_with('<')),
        "no prefix when stderr is not the journal stream:\n{}",
        agent.log()
    );
}

/// Runs `ferry run` in a new UTS namespace whose host name is `host`, with `config` (which
/// sets no device_id); returns the child and its log path.
fn run_with_host_name(
    dir: &std::path::Path,
    host: &str,
    config: &str,
) -> (std::process::Child, std::path::PathBuf) {
    let config_path = dir.join("ferry.yaml");
    std::fs::write(&config_path, config).unwrap();
    let log_path = dir.join("ferry.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = std::process::Command::new("unshare")
        .args([
            "--uts",
            "sh",
            "-c",
            "hostname \"$1\" && exec \"$2\" run --config \"$3\"",
            "sh",
        ])
        .arg(host)
        .arg(common::agent::ferry_bin())
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("run unshare (util-linux)");
    (child, log_path)
}

/// The retained status topic's device part, once it arrives.
async fn status_device(sub: &common::subscriber::Subscriber) -> Option<String> {
    sub.wait_until(Duration::from_secs(30), |s| !s.statuses().is_empty())
        .await
        .then(|| {
            let m = sub
                .messages()
                .into_iter()
                .find(|m| m.topic.ends_with("/status"))?;
            m.topic
                .strip_prefix("ferry/")
                .and_then(|t| t.strip_suffix("/status"))
                .map(str::to_string)
        })
        .flatten()
}

/// A fresh Raspberry Pi is called `raspberrypi`; two of them must not share topics and a client
/// id. Without `device_id` ferry derives a stable id from /etc/machine-id for stock host names
/// and uses any other host name as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_host_name_gets_a_device_id_derived_from_the_machine_id() {
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .expect("this test needs /etc/machine-id (systemd's machine id), as every Debian has");
    assert!(!machine_id.trim().is_empty(), "/etc/machine-id is empty");
    let mut ids = Vec::new();
    for host in ["raspberrypi", "gw-field-1"] {
        // A broker each: the first run's retained status must not answer for the second.
        let broker = common::broker::Broker::start(common::broker::BrokerOpts::default());
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::new(dir.path(), broker.plain_port());
        let yaml: String = cfg
            .render()
            .lines()
            .filter(|l| !l.starts_with("device_id:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let sub =
            common::subscriber::Subscriber::start(broker.plain_port(), "ferry/+/status").await;
        let (mut child, log_path) = run_with_host_name(dir.path(), host, &yaml);
        let device = status_device(&sub).await;
        common::send_signal(child.id(), "TERM");
        let exited = common::wait_for_exit(&mut child, Duration::from_secs(30));
        let log = common::read_log(&log_path);
        assert!(exited.is_some_and(|s| s.success()), "{log}");
        let device = device.unwrap_or_else(|| panic!("no status message from {host}\n{log}"));
        let started = log
            .lines()
            .find(|l| l.contains("ferry starting."))
            .unwrap_or_else(|| panic!("no start line\n{log}"));
        assert!(started.contains(&format!("device={device}")), "{started}");
        ids.push((host, device, started.to_string()));
    }
    let (_, pi, pi_line) = &ids[0];
    let suffix = pi
        .strip_prefix("raspberrypi-")
        .unwrap_or_else(|| panic!("{pi} is not raspberrypi-<suffix>"));
    assert_eq!(suffix.len(), 12, "{pi}");
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{pi}");
    assert!(
        !machine_id.contains(suffix),
        "the machine id itself is not published"
    );
    assert!(
        pi_line.contains("/etc/machine-id"),
        "the log says where the id came from: {pi_line}"
    );
    assert_eq!(
        ids[1].1, "gw-field-1",
        "a distinct host name is used as it is"
    );
}

fn ferry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::agent::ferry_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ferry")
}

/// The rows under the table header starting with `title`, up to the next blank line.
fn table<'a>(status: &'a str, title: &str) -> Vec<&'a str> {
    status
        .lines()
        .skip_while(|l| !l.starts_with(title))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ferry status`: columns line up; a config with a bad edit (not yet applied) does not hide
/// the running agent; `--socket` asks a given socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_aligns_its_table_survives_a_bad_edit_and_takes_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    let agent = Agent::spawn(dir.path(), &cfg.render());
    let config = agent.config_path().display().to_string();
    // Wait until the agent answers and its stream table has the system stream.
    let mut status = None;
    for _ in 0..300 {
        let out = ferry(&["status", "--config", &config]);
        let t = text(&out.stdout);
        if out.status.success() && table(&t, "STREAM").iter().any(|r| r.starts_with("system ")) {
            status = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status =
        status.unwrap_or_else(|| panic!("no status with a system stream\n{}", agent.log()));
    let header = status
        .lines()
        .find(|l| l.starts_with("STREAM"))
        .expect("stream table header");
    let rows = table(&status, "STREAM");
    for row in &rows {
        assert_eq!(
            row.len(),
            header.len(),
            "row {row:?} does not line up with {header:?}\n{status}"
        );
    }
    let collectors = status
        .lines()
        .skip_while(|l| !l.starts_with("COLLECTOR"))
        .collect::<Vec<_>>();
    assert!(collectors.len() >= 2, "{status}");
    for row in &collectors[1..] {
        assert_eq!(row.len(), collectors[0].len(), "{row:?}\n{status}");
    }

    // A bad edit of the file: status still reaches the running agent, with a warning.
    let good = std::fs::read_to_string(agent.config_path()).unwrap();
    std::fs::write(agent.config_path(), format!("{good}\nnot_a_key: 1\n")).unwrap();
    let out = ferry(&["status", "--config", &config]);
    assert!(out.status.success(), "status with a bad edit: {out:?}");
    assert!(
        text(&out.stderr).contains("not_a_key"),
        "the problem is shown: {out:?}"
    );
    assert!(text(&out.stdout).contains("STREAM"), "{out:?}");

    // --socket, with no config file at all.
    let socket = dir.path().join("ferry.sock");
    assert!(
        socket.exists(),
        "the default socket sits beside the spool dir"
    );
    let out = ferry(&[
        "status",
        "--json",
        "--config",
        "/nonexistent/ferry.yaml",
        "--socket",
        &socket.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["device"], "test-gw");
}

/// `spool inspect` and `spool export` look into an existing spool; they never create one, and
/// a stream name that is not there is an error that lists the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_commands_refuse_a_missing_spool_and_an_unknown_stream() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    let config_path = dir.path().join("ferry.yaml");
    std::fs::write(&config_path, cfg.render()).unwrap();
    let config = config_path.display().to_string();
    let spool_dir = cfg.spool_dir.clone();

    // Missing directory.
    let out = ferry(&["spool", "inspect", "--config", &config]);
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    assert!(text(&out.stderr).contains("no spool at"), "{out:?}");
    assert!(
        !spool_dir.exists(),
        "inspect created {}",
        spool_dir.display()
    );
    // Empty directory.
    std::fs::create_dir_all(&spool_dir).unwrap();
    let out = ferry(&["spool", "export", "--stream", "system", "--config", &config]);
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    assert_eq!(
        std::fs::read_dir(&spool_dir).unwrap().count(),
        0,
        "export wrote into an empty directory"
    );

    // A real spool, then a typo in the stream name.
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("ferry starting.", Duration::from_secs(30))
            .await,
        "{}",
        agent.log()
    );
    let mut committed = false;
    for _ in 0..300 {
        let out = ferry(&["status", "--json", "--config", &config]);
        if out.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if json["counters"]["committed"].as_u64() > Some(0) {
                committed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(committed, "nothing committed\n{}", agent.log());
    assert!(agent.terminate().success());
    let out = ferry(&["spool", "export", "--stream", "sytsem", "--config", &config]);
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("\"sytsem\"") && err.contains("system"),
        "{err}"
    );
    let out = ferry(&["spool", "export", "--stream", "system", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    assert!(!out.stdout.is_empty(), "{out:?}");
}

/// `ferry test` runs each collector once and prints what it produces, with no broker and no
/// spool; a collector that produces nothing makes it exit 1, saying which.
#[test]
fn ferry_test_prints_one_round_of_every_collector_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "temp=21.5 hum=40\ntemp=22 hum=41\ngarbage line\n").unwrap();
    let quiet = dir.path().join("quiet.log");
    std::fs::write(&quiet, "").unwrap();
    let spool = dir.path().join("spool");
    let config = dir.path().join("ferry.yaml");
    let yaml = format!(
        "device_id: t\nspool:\n  dir: {spool}\nuplink:\n  host: 127.0.0.1\n  port: {port}\ncollectors:\n  - type: system\n    name: system\n    interval_ms: 1000\n  - type: file\n    name: app\n    path: {log}\n    start_at: beginning\n    format:\n      type: kv\n",
        spool = spool.display(),
        port = common::ports::free_port(),
        log = log.display()
    );
    std::fs::write(&config, &yaml).unwrap();
    let out = ferry(&["test", "--config", &config.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let of = |stream: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["stream"] == stream).collect()
    };
    let system = of("system");
    assert_eq!(system.len(), 1, "{lines:?}");
    assert!(
        system[0]["fields"]["mem.total_bytes"].as_u64() > Some(0),
        "{lines:?}"
    );
    let app = of("app");
    assert_eq!(app.len(), 2, "{lines:?}");
    assert_eq!(app[0]["fields"]["temp"], 21.5);
    assert_eq!(app[1]["fields"]["hum"], 41);
    let loss = of("ferry.loss");
    assert_eq!(
        loss.len(),
        1,
        "the garbage line is reported as it would be: {lines:?}"
    );
    assert_eq!(loss[0]["fields"]["reason"], "malformed");
    assert!(!spool.exists(), "ferry test must not create the spool");

    // A collector with nothing to say: exit 1 and its name on stderr.
    let yaml = format!(
        "{yaml}  - type: file\n    name: quiet\n    path: {}\n    start_at: beginning\n",
        quiet.display()
    );
    std::fs::write(&config, yaml).unwrap();
    let out = ferry(&[
        "test",
        "--wait-ms",
        "1500",
        "--config",
        &config.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("quiet: 0 readings (nothing within 1500 ms"),
        "{out:?}"
    );
    assert!(!spool.exists(), "ferry test must not create the spool");
}

/// `ferry.d/*.yaml` beside `ferry.yaml` is merged over it in name order: mappings merge,
/// collectors are appended, and every problem names the drop-in file and line it is on.
#[test]
fn drop_in_files_merge_in_name_order_and_errors_name_their_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("site.log");
    std::fs::write(&log, "level=3\n").unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(
        &config,
        format!(
            "device_id: main-id\nspool:\n  dir: {}\nuplink:\n  host: 127.0.0.1\n  port: 1\ncollectors:\n  - type: system\n    name: system\n    interval_ms: 1000\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let d = dir.path().join("ferry.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("20-site.yaml"),
        format!(
            "# per-site collectors\ncollectors:\n  - type: file\n    name: site\n    path: {}\n    start_at: beginning\n    format:\n      type: kv\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::write(d.join("10-device.yaml"), "device_id: dropin-id\n").unwrap();
    std::fs::write(d.join("notes.txt"), "not: [yaml").unwrap();
    let cfg = config.display().to_string();
    let out = ferry(&["validate", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");
    let out = ferry(&["test", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("\"stream\":\"site\"") && stdout.contains("\"level\":3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"stream\":\"system\""),
        "the main file's collector stays: {stdout}"
    );

    // Errors: an unknown key in one drop-in, a bad value in a collector of another.
    std::fs::write(
        d.join("10-device.yaml"),
        "device_id: dropin-id\nuplink:\n  tsl: {}\n",
    )
    .unwrap();
    let site = std::fs::read_to_string(d.join("20-site.yaml")).unwrap();
    std::fs::write(
        d.join("20-site.yaml"),
        site.replace("start_at: beginning", "start_at: middle"),
    )
    .unwrap();
    let out = ferry(&["validate", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = text(&out.stderr);
    let first = d.join("10-device.yaml").display().to_string();
    assert!(
        err.contains(&format!("{first}:3:3: uplink.tsl")) || err.contains(&format!("{first}:3:")),
        "the unknown key is placed in its drop-in:\n{err}"
    );
    // Fix the first; the second's error is then placed in its own file, with the item's index
    // there (0), not in the merged list (1).
    std::fs::write(d.join("10-device.yaml"), "device_id: dropin-id\n").unwrap();
    let out = ferry(&["validate", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = text(&out.stderr);
    let second = d.join("20-site.yaml").display().to_string();
    assert!(
        err.contains(&format!("{second}:6:")) && err.contains("collectors[0].start_at"),
        "the bad value is placed at its line in its drop-in:\n{err}"
    );
}
