//! The serial collector end to end: the real `ferry` binary reads a socat pseudo-terminal
//! (opened by path, like a USB adapter) and its records arrive at a real Mosquitto
//! subscriber. Garbage is counted on `ferry.loss`, an unplug is survived without a restart
//! and without a busy loop.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::pty::PtyPair;
use common::subscriber::Subscriber;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn broker() -> Broker {
    Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    })
}

/// Sum of `count` per `reason` of the loss records about `stream`.
fn losses(sub: &Subscriber, stream: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in sub.records("ferry.loss") {
        let f = &r["fields"];
        if f["stream"] == stream {
            *out.entry(f["reason"].as_str().unwrap().to_string())
                .or_default() += f["count"].as_u64().unwrap();
        }
    }
    out
}

/// CPU time (user + system) of a process so far, from /proc/<pid>/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')').expect("comm in parentheses") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Clock ticks per second for /proc times (USER_HZ).
fn ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// The `n` field of every record of `stream`, in arrival order.
fn ns(sub: &Subscriber, stream: &str) -> Vec<i64> {
    sub.records(stream)
        .iter()
        .filter_map(|r| r["fields"]["n"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_kv_lines_arrive_typed_garbage_is_counted_and_a_replug_is_survived() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(dir.path(), "ttyWX");
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![format!(
        "type: serial\nname: weather\npath: {}\nbaud: 115200\ntags:\n  site: roof\nformat:\n  type: kv\n  types:\n    station: string",
        pty.device.display()
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent.wait_for_log("Serial port opened.", WAIT).await,
        "{}",
        agent.log()
    );
    let pid = agent.pid();

    for n in 1..=3 {
        pty.write(format!("n={n} temp=21.5 hum=40 station=007 ok=true\r\n").as_bytes());
    }
    // Invalid UTF-8; binary noise (no newline inside, 0xff makes it invalid UTF-8); a 1 MB
    // line that passes max_line_bytes (64 KiB by default); then a good line again.
    pty.write(b"\xff\xfe\xfd\n");
    let mut noise: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .filter(|b| *b != b'\n' && *b != b'\r')
        .collect();
    noise.push(0xff);
    noise.push(b'\n');
    pty.write(&noise);
    pty.write(b"this line is not key=value pairs\n");
    pty.write(&vec![b'x'; 1 << 20]);
    pty.write(b"\nn=4 temp=-3 hum=99 station=12 ok=false\n");

    assert!(
        sub.wait_until(WAIT, |s| ns(s, "weather").contains(&4)
            && losses(s, "weather").get("oversized") == Some(&1))
            .await,
        "records: {:?}\nloss: {:?}\nlog:\n{}",
        ns(&sub, "weather"),
        sub.records("ferry.loss"),
        agent.log()
    );
    assert_eq!(ns(&sub, "weather"), [1, 2, 3, 4]);
    let first = &sub.records("weather")[0]["fields"];
    assert_eq!(first["temp"], Value::from(21.5));
    assert_eq!(first["hum"], Value::from(40));
    assert_eq!(first["station"], Value::from("007"));
    assert_eq!(first["ok"], Value::from(true));
    assert_eq!(first["tag.site"], Value::from("roof"));
    let lost = losses(&sub, "weather");
    assert_eq!(lost.get("malformed"), Some(&3), "{lost:?}");
    let samples: Vec<String> = sub
        .records("ferry.loss")
        .iter()
        .map(|r| r["fields"]["sample"].as_str().unwrap().to_string())
        .collect();
    assert!(samples.iter().any(|s| s == &"x".repeat(64)), "{samples:?}");

    // Unplug: the collector's run ends and the supervisor waits; no busy loop meanwhile.
    pty.unplug();
    assert!(
        agent
            .wait_for_log("Collector failed; restarting.", WAIT)
            .await,
        "{}",
        agent.log()
    );
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    let hz = ticks_per_second();
    eprintln!("CPU while unplugged: {used} ticks in 3 s ({hz} ticks/s)");
    assert!(
        used * 2 < hz,
        "ferry used {used} ticks ({hz}/s) in 3 s while the device was unplugged"
    );

    // Replug on the same path: read again without a restart of ferry.
    pty.plug();
    pty.write(b"n=5 temp=1 hum=2 station=x ok=true\n");
    assert!(
        sub.wait_until(WAIT, |s| ns(s, "weather").contains(&5))
            .await,
        "nothing after the replug; log:\n{}",
        agent.log()
    );
    assert_eq!(agent.pid(), pid, "ferry restarted");
    assert!(agent.log().matches("Serial port opened.").count() >= 2);
    assert_eq!(ns(&sub, "weather"), [1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_every_format_arrives_typed_and_skips_what_does_not_parse() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let formats = [
        (
            "s_raw",
            "  type: raw",
            "$GPGGA,123519,4807.038,N\n",
            "\u{fffd}\n",
        ),
        (
            "s_json",
            "  type: json",
            "{\"t\": 21.5, \"gps\": {\"fix\": 3}, \"id\": \"a\"}\n",
            "{not json\n",
        ),
        ("s_kv", "  type: kv", "t=21.5,fix=3 id=a\n", "t 21.5\n"),
        (
            "s_csv",
            "  type: csv\n  columns:\n    - {name: t, type: float}\n    - {name: fix, type: int}\n    - {name: id, type: string}",
            "21.5,3,a\n",
            "21.5,three,a\n",
        ),
        (
            "s_regex",
            "  type: regex\n  pattern: '^T=(?P<t>[0-9.]+) FIX=(?P<fix>[0-9]+) ID=(?P<id>\\w+)$'\n  types:\n    t: float\n    id: string",
            "T=21.5 FIX=3 ID=a\n",
            "T=oops\n",
        ),
    ];
    let mut ptys = Vec::new();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors.clear();
    for (name, format, _, _) in &formats {
        let pty = PtyPair::start(dir.path(), name);
        cfg.collectors.push(format!(
            "type: serial\nname: {name}\npath: {}\nformat:\n{format}",
            pty.device.display()
        ));
        ptys.push(pty);
    }
    let agent = Agent::spawn(dir.path(), &cfg.render());
    // Bytes written before ferry opens a port wait in the pty, so no need to wait here.
    for (pty, (_, _, good, bad)) in ptys.iter_mut().zip(&formats) {
        pty.write(bad.as_bytes());
        pty.write(good.as_bytes());
    }
    let names: Vec<&str> = formats.iter().map(|f| f.0).collect();
    assert!(
        sub.wait_until(WAIT, |s| names.iter().all(|n| !s.records(n).is_empty()
            && (n == &"s_raw" || losses(s, n).get("malformed") == Some(&1))))
            .await,
        "log:\n{}",
        agent.log()
    );
    let raw: Vec<Value> = sub.records("s_raw");
    // The raw "bad" line is valid UTF-8 (U+FFFD), so raw keeps it as a line too.
    assert_eq!(raw[0]["line"], "\u{fffd}");
    assert!(
        sub.wait_until(WAIT, |s| s.records("s_raw").len() == 2)
            .await,
        "{:?}",
        sub.records("s_raw")
    );
    assert_eq!(sub.records("s_raw")[1]["line"], "$GPGGA,123519,4807.038,N");
    for name in ["s_kv", "s_csv", "s_regex"] {
        let f = &sub.records(name)[0]["fields"];
        assert_eq!(f["t"], Value::from(21.5), "{name}: {f}");
        assert_eq!(f["fix"], Value::from(3), "{name}: {f}");
        assert_eq!(f["id"], Value::from("a"), "{name}: {f}");
    }
    let f = &sub.records("s_json")[0]["fields"];
    assert_eq!(f["t"], Value::from(21.5));
    assert_eq!(f["gps.fix"], Value::from(3));
    assert_eq!(f["id"], Value::from("a"));
}

/// The real open path as an unprivileged user: socat's pty is owned by root with mode 0600,
/// as /dev/ttyUSB0 (root:dialout 0660) is to a service user without group dialout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_names_the_missing_group() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged agent creates its spool here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pty = PtyPair::start(dir.path(), "ttyLOCKED");
    let mut cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    cfg.collectors = vec![format!(
        "type: serial\nname: locked\npath: {}",
        pty.device.display()
    )];
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, cfg.render()).unwrap();
    let log_path = dir.path().join("ferry.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::agent::ferry_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux) runs");
    let deadline = std::time::Instant::now() + WAIT;
    let needle = "permission denied (is the user in group dialout?";
    while !common::read_log(&log_path).contains(needle) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = common::read_log(&log_path);
    common::kill_and_reap(&mut child);
    assert!(text.contains(needle), "log:\n{text}");
    assert!(
        text.contains(&pty.device.display().to_string()),
        "log:\n{text}"
    );
}
