//! `ferry consume` and `ferry decode` on streams, against a real Mosquitto and real agents.
//!
//! The ground truth for "every committed record" is the agent's own spool: a test stops the
//! agent, reads each stream's `next_seq` (every seq below it was accepted), drains the spool
//! through a run without collectors, and then expects each accepted seq exactly once in the
//! union of the consumers' outputs.

mod common;

use common::agent::{Agent, AgentConfig, SYSTEM_COLLECTOR, ferry_bin};
use common::broker::{Broker, BrokerOpts, Secure, mosquitto_pub, run_with_timeout};
use common::drain::{live_status, spool_stats, status_records};
use common::pki::Pki;
use common::subscriber::Subscriber;
use common::{kill_and_reap, read_log, send_signal, wait_for_exit};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Behaviour timeouts (10x and more over what a run takes here).
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A `ferry consume` child process; stdout appended to `<name>.out`, stderr to `<name>.log`.
struct Consumer {
    args: Vec<String>,
    out: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Consumer {
    fn spawn(dir: &Path, name: &str, port: u16, state: &Path, extra: &[&str]) -> Consumer {
        let mut args: Vec<String> = vec![
            "consume".into(),
            "--broker".into(),
            format!("127.0.0.1:{port}"),
            "--state".into(),
            state.display().to_string(),
            "--client-id".into(),
            format!("consume-{name}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Consumer {
            args,
            out: dir.join(format!("{name}.out")),
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        c.start_again();
        c
    }

    fn start_again(&mut self) {
        assert!(self.child.is_none(), "consumer already running");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap()
        };
        let child = Command::new(ferry_bin())
            .args(&self.args)
            .env("RUST_LOG", "warn,ferry=info")
            .stdin(Stdio::null())
            .stdout(open(&self.out))
            .stderr(open(&self.log))
            .spawn()
            .expect("run ferry consume");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        kill_and_reap(self.child.as_mut().expect("running"));
        self.child = None;
    }

    fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), "TERM");
        let status = wait_for_exit(&mut child, WAIT).expect("consumer exits on SIGTERM");
        assert!(
            status.success(),
            "consumer failed: {status}\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        read_log(&self.log)
    }

    fn lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    /// Waits until this start has subscribed (`n` SUBACKs logged in total).
    async fn wait_subscribed(&self, n: usize) {
        let ok = wait(|| self.log().matches("Subscribed.").count() >= n).await;
        assert!(ok, "consumer did not subscribe:\n{}", self.log());
    }

    /// The last value of counter `name` the consumer logged.
    fn counter(&self, name: &str) -> u64 {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("Consumer stopped.") || l.contains("Consumer counters."))
            .unwrap_or_else(|| panic!("no counters in the log:\n{log}"));
        let at = line.find(&format!(" {name}=")).expect("counter logged") + name.len() + 2;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }
}

async fn wait(cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Data records (lines with a `seq`) per (device, stream), seqs in output order.
fn records(lines: &[Value]) -> BTreeMap<(String, String), Vec<u64>> {
    let mut out: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.get("type").is_none()) {
        let key = (
            l["device"].as_str().unwrap().to_string(),
            l["stream"].as_str().unwrap().to_string(),
        );
        out.entry(key).or_default().push(l["seq"].as_u64().unwrap());
    }
    out
}

fn all_lines(consumers: &[&Consumer]) -> Vec<Value> {
    consumers.iter().flat_map(|c| c.lines()).collect()
}

/// Stops the agent, reads what its spool accepted, drains the spool with a run without
/// collectors, and returns the highest accepted seq per stream.
async fn stop_and_drain(agent: &mut Agent, cfg: &AgentConfig) -> BTreeMap<String, u64> {
    agent.terminate();
    let accepted: BTreeMap<String, u64> = spool_stats(cfg)
        .streams
        .iter()
        .filter(|s| s.next_seq > 1 && !s.name.starts_with("ferry."))
        .map(|s| (s.name.clone(), s.next_seq - 1))
        .collect();
    let mut drain = cfg.clone();
    drain.collectors.clear();
    std::fs::write(agent.config_path(), drain.render()).unwrap();
    agent.start_again();
    let empty = wait_async(|| async {
        match live_status(cfg).await {
            Some(s) => accepted.keys().all(|n| status_records(&s, n) == Some(0)),
            None => false,
        }
    })
    .await;
    assert!(empty, "spool did not drain:\n{}", agent.log());
    agent.terminate();
    std::fs::write(agent.config_path(), cfg.render()).unwrap();
    accepted
}

async fn wait_async<F: std::future::Future<Output = bool>>(cond: impl Fn() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the union of the outputs holds every accepted seq of `device`, then asserts
/// each exactly once.
async fn assert_exactly_once(
    consumers: &[&Consumer],
    device: &str,
    accepted: &BTreeMap<String, u64>,
) {
    let complete = || {
        let r = records(&all_lines(consumers));
        accepted.iter().all(|(s, &max)| {
            let got: BTreeSet<u64> = r
                .get(&(device.to_string(), s.clone()))
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            (1..=max).all(|q| got.contains(&q))
        })
    };
    let done = wait(complete).await;
    let r = records(&all_lines(consumers));
    for (stream, &max) in accepted {
        let seqs = r
            .get(&(device.to_string(), stream.clone()))
            .cloned()
            .unwrap_or_default();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        let missing: Vec<u64> = (1..=max).filter(|q| !unique.contains(q)).collect();
        assert!(
            done && missing.is_empty(),
            "{device}/{stream}: {} of {max} seqs missing: {:?}\nlogs:\n{}",
            missing.len(),
            &missing[..missing.len().min(20)],
            consumers
                .iter()
                .map(|c| c.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        assert_eq!(
            seqs.len(),
            unique.len(),
            "{device}/{stream}: duplicates in the output"
        );
        assert!(
            unique.iter().all(|&q| q <= max),
            "{device}/{stream}: seq beyond the spool's"
        );
    }
}

fn agent_config(dir: &Path, port: u16, device: &str) -> AgentConfig {
    let mut cfg = AgentConfig::new(dir, port);
    cfg.device_id = device.to_string();
    cfg.collectors = vec![SYSTEM_COLLECTOR.to_owned()];
    cfg
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-consume-")
        .tempdir()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_every_wire_format_over_mtls() {
    let dir = tempdir();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = Broker::start(BrokerOpts {
        secure: Some(Secure::mutual_tls(&pki)),
        ..Default::default()
    });
    let pki_args = [
        "--ca-file".to_string(),
        pki.ca_crt.display().to_string(),
        "--cert-file".into(),
        pki.client_crt.display().to_string(),
        "--key-file".into(),
        pki.client_key.display().to_string(),
    ];
    let pki_args: Vec<&str> = pki_args.iter().map(String::as_str).collect();
    let consumer = Consumer::spawn(
        dir.path(),
        "c",
        broker.secure_port().unwrap(),
        &dir.path().join("state"),
        &pki_args,
    );
    consumer.wait_subscribed(2).await;
    let raw = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;

    let formats = [
        ("json", vec![]),
        ("cbor", vec!["encoding: cbor"]),
        ("json-zstd", vec!["compression: zstd"]),
        ("cbor-zstd", vec!["encoding: cbor", "compression: zstd"]),
    ];
    let mut agents = Vec::new();
    for (name, extra) in &formats {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = agent_config(&d, broker.plain_port(), name);
        cfg.uplink_extra = extra.iter().map(|s| s.to_string()).collect();
        // Batches of several records, so zstd pays and the compressed headers are used.
        cfg.linger_ms = 1500;
        agents.push((Agent::spawn(&d, &cfg.render()), cfg));
    }
    let expected_header = [b'{', 0x81, 0x84, 0x85];
    let headers_seen = || {
        let msgs = raw.messages();
        formats.iter().zip(expected_header).all(|((name, _), h)| {
            msgs.iter()
                .any(|m| m.topic == format!("ferry/{name}/data/system") && m.payload[0] == h)
        })
    };
    assert!(wait(headers_seen).await, "not every encoding was published");
    for (agent, cfg) in &mut agents {
        let accepted = stop_and_drain(agent, cfg).await;
        assert_exactly_once(&[&consumer], &cfg.device_id, &accepted).await;
    }
    let lines = consumer.lines();
    for (name, _) in &formats {
        let rec = lines
            .iter()
            .find(|l| l["device"] == *name && l["stream"] == "system")
            .unwrap();
        assert!(
            rec["fields"]["mem.total_bytes"].as_u64().unwrap() > 0,
            "{rec}"
        );
        assert!(rec["ts"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(rec["boot"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_duplicates_across_consumer_restarts_and_agent_sigkills() {
    let dir = tempdir();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = Broker::start(BrokerOpts {
        secure: Some(Secure::password(&[("reader", "s3cret")], Some(&pki))),
        ..Default::default()
    });
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let pw = dir.path().join("pw").display().to_string();
    let ca = pki.ca_crt.display().to_string();
    let args = [
        "--username",
        "reader",
        "--password-file",
        &pw,
        "--ca-file",
        &ca,
    ];
    let state = dir.path().join("state");
    let mut consumer = Consumer::spawn(
        dir.path(),
        "c",
        broker.secure_port().unwrap(),
        &state,
        &args,
    );
    consumer.wait_subscribed(2).await;
    let raw = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;

    let mut cfg = agent_config(dir.path(), broker.plain_port(), "gw");
    cfg.collectors = vec!["type: system\nname: system\ninterval_ms: 200".into()];
    cfg.linger_ms = 20;
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let mut subscribed = 2;
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        agent.kill9();
        agent.start_again();
        if round % 2 == 1 {
            consumer.terminate();
            consumer.start_again();
            subscribed += 2;
            consumer.wait_subscribed(subscribed).await;
        }
    }
    // Replay a message the consumer has already output, as a broker or bridge might.
    let first = raw
        .messages()
        .into_iter()
        .find(|m| m.topic == "ferry/gw/data/system")
        .expect("a data message");
    let replayed = first.json.as_ref().unwrap()["records"]
        .as_array()
        .unwrap()
        .len() as u64;
    let payload = dir.path().join("replay.json");
    std::fs::write(&payload, &first.payload).unwrap();
    let p = payload.display().to_string();
    let out = mosquitto_pub(
        broker.plain_port(),
        &["-q", "1", "-t", "ferry/gw/data/system", "-f", &p],
    );
    assert!(out.status.success(), "{out:?}");

    let accepted = stop_and_drain(&mut agent, &cfg).await;
    assert_exactly_once(&[&consumer], "gw", &accepted).await;
    consumer.terminate();
    assert!(
        consumer.counter("duplicates") >= replayed,
        "{}",
        consumer.log()
    );
    assert_eq!(consumer.counter("gaps"), 0, "{}", consumer.log());
    let raw_dups = raw.duplicates("system");
    eprintln!(
        "agent SIGKILLs gave {raw_dups} duplicate records on the broker; the output has none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_a_reported_loss_from_an_unexplained_gap() {
    let dir = tempdir();
    let broker = Broker::start(BrokerOpts::default());
    let port = broker.plain_port();
    let consumer = Consumer::spawn(
        dir.path(),
        "c",
        port,
        &dir.path().join("state"),
        &["--gap-timeout-ms", "1500"],
    );
    consumer.wait_subscribed(2).await;
    let publish = |stream: &str, seqs: &[u64], fields: &str| {
        let records: Vec<String> = seqs
            .iter()
            .map(|s| format!(r#"{{"seq":{s},"ts":1764100000000,"fields":{fields}}}"#))
            .collect();
        let msg = format!(
            r#"{{"v":1,"device":"crafted","boot":"b1","stream":"{stream}","records":[{}]}}"#,
            records.join(",")
        );
        let out = mosquitto_pub(
            port,
            &[
                "-q",
                "1",
                "-t",
                &format!("ferry/crafted/data/{stream}"),
                "-m",
                &msg,
            ],
        );
        assert!(out.status.success(), "{out:?}");
    };
    publish("s", &[1, 2], r#"{"x":1}"#);
    publish("s", &[5], r#"{"x":1}"#); // hole 3..=4
    publish(
        "ferry.loss",
        &[1],
        r#"{"stream":"s","first_seq":3,"last_seq":4,"count":2,"reason":"evicted"}"#,
    );
    publish("s", &[8], r#"{"x":1}"#); // hole 6..=7, never reported
    let gap = || consumer.lines().iter().any(|l| l["type"] == "gap");
    assert!(wait(gap).await, "no gap reported:\n{}", consumer.log());
    publish("s", &[7], r#"{"x":1}"#); // late, after its gap was reported: still output once
    publish("s", &[7], r#"{"x":1}"#);
    assert!(
        wait(|| records(&consumer.lines())
            .get(&("crafted".into(), "s".into()))
            .is_some_and(|v| v.contains(&7)))
        .await
    );
    // A message whose payload is not a ferry message is acknowledged, saved and logged.
    let out = mosquitto_pub(
        port,
        &["-q", "1", "-t", "ferry/crafted/data/s", "-m", "garbage"],
    );
    assert!(out.status.success());
    assert!(wait(|| consumer.log().contains("Rejected a message")).await);
    assert_eq!(
        std::fs::read_dir(dir.path().join("state/rejected"))
            .unwrap()
            .count(),
        1
    );

    let lines = consumer.lines();
    let holes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "gap" || l["type"] == "loss")
        .collect();
    assert_eq!(holes.len(), 2, "{holes:?}");
    let loss = holes.iter().find(|l| l["type"] == "loss").unwrap();
    assert_eq!(
        (loss["first_seq"].as_u64(), loss["last_seq"].as_u64()),
        (Some(3), Some(4))
    );
    assert_eq!(loss["reason"], "evicted");
    assert_eq!(loss["stream"], "s");
    let gap = holes.iter().find(|l| l["type"] == "gap").unwrap();
    assert_eq!(
        (gap["first_seq"].as_u64(), gap["count"].as_u64()),
        (Some(6), Some(2))
    );
    assert_eq!(
        records(&lines)[&("crafted".to_string(), "s".to_string())],
        vec![1, 2, 5, 8, 7]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_group_outputs_exactly_once_even_when_a_consumer_is_sigkilled() {
    let dir = tempdir();
    let broker = Broker::start(BrokerOpts::default());
    let port = broker.plain_port();
    let state = dir.path().join("state");
    let mut consumers: Vec<Consumer> = (0..3)
        .map(|i| {
            Consumer::spawn(
                dir.path(),
                &format!("c{i}"),
                port,
                &state,
                &["--share", "g"],
            )
        })
        .collect();
    for c in &consumers {
        c.wait_subscribed(2).await;
    }
    let mut agents = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("a{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = agent_config(&d, port, &format!("gw{i}"));
        cfg.linger_ms = 20;
        agents.push((Agent::spawn(&d, &cfg.render()), cfg));
    }
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (agent, _) = &mut agents[round % 3];
        agent.kill9();
        agent.start_again();
        if round == 1 {
            consumers[0].kill9();
            tokio::time::sleep(Duration::from_millis(500)).await;
            consumers[0].start_again();
        }
    }
    let mut accepted = Vec::new();
    for (agent, cfg) in &mut agents {
        accepted.push((cfg.device_id.clone(), stop_and_drain(agent, cfg).await));
    }
    let refs: Vec<&Consumer> = consumers.iter().collect();
    for (device, acc) in &accepted {
        assert_exactly_once(&refs, device, acc).await;
    }
    let busy = consumers
        .iter()
        .filter(|c| !records(&c.lines()).is_empty())
        .count();
    assert!(busy >= 2, "the share group did not spread the messages");
    for c in &mut consumers {
        c.terminate();
    }
}

/// A strict reader of the line protocol ferry writes: `measurement[,k=v...] f=v[,f=v...] ts`.
fn parse_line_protocol(
    line: &str,
) -> (
    String,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    u128,
) {
    fn split_unescaped(s: &str, sep: char) -> Vec<String> {
        let (mut parts, mut cur, mut esc, mut quoted) = (Vec::new(), String::new(), false, false);
        for c in s.chars() {
            if esc {
                cur.push(c);
                esc = false;
            } else if c == '\\' {
                cur.push(c);
                esc = true;
            } else if c == '"' {
                quoted = !quoted;
                cur.push(c);
            } else if c == sep && !quoted {
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        assert!(!esc && !quoted, "unterminated escape or string in {s:?}");
        parts.push(cur);
        parts
    }
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut esc = false;
        for c in s.chars() {
            if esc || c != '\\' {
                out.push(c);
                esc = false;
            } else {
                esc = true;
            }
        }
        out
    }
    let sections = split_unescaped(line, ' ');
    assert_eq!(sections.len(), 3, "not `series fields timestamp`: {line:?}");
    let mut series = split_unescaped(&sections[0], ',').into_iter();
    let measurement = unescape(&series.next().unwrap());
    assert!(!measurement.is_empty());
    let kv = |s: String| {
        let p = split_unescaped(&s, '=');
        assert_eq!(p.len(), 2, "not key=value: {s:?} in {line:?}");
        (unescape(&p[0]), p[1].clone())
    };
    let tags: BTreeMap<_, _> = series.map(kv).map(|(k, v)| (k, unescape(&v))).collect();
    assert!(tags.iter().all(|(k, v)| !k.is_empty() && !v.is_empty()));
    let fields: BTreeMap<_, _> = split_unescaped(&sections[1], ',')
        .into_iter()
        .map(kv)
        .collect();
    assert!(!fields.is_empty());
    for (k, v) in &fields {
        let ok = (v.ends_with('i') && v[..v.len() - 1].parse::<i64>().is_ok())
            || (v.ends_with('u') && v[..v.len() - 1].parse::<u64>().is_ok())
            || v == "true"
            || v == "false"
            || (v.starts_with('"') && v.ends_with('"') && v.len() >= 2)
            || v.parse::<f64>().is_ok_and(f64::is_finite);
        assert!(ok, "field {k} has a bad value {v:?} in {line:?}");
    }
    let ts = sections[2].parse::<u128>().expect("integer timestamp");
    (measurement, tags, fields, ts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_output_parses_with_tags_as_tags() {
    let dir = tempdir();
    let broker = Broker::start(BrokerOpts::default());
    let port = broker.plain_port();
    let consumer = Consumer::spawn(
        dir.path(),
        "c",
        port,
        &dir.path().join("state"),
        &["--format", "influx"],
    );
    consumer.wait_subscribed(2).await;
    let mut cfg = agent_config(dir.path(), port, "gw1");
    cfg.collectors = vec!["type: system\nname: system\ninterval_ms: 200\nper_core: true\ntags:\n  site: north field\n  rack: \"7\"".into()];
    cfg.uplink_extra = vec!["encoding: cbor".into(), "compression: zstd".into()];
    let _agent = Agent::spawn(dir.path(), &cfg.render());
    let text = || std::fs::read_to_string(&consumer.out).unwrap_or_default();
    assert!(
        wait(|| text().lines().any(|l| l.contains(",cpu=0"))).await,
        "{}",
        consumer.log()
    );
    let mut measurements = BTreeSet::new();
    for line in text().lines() {
        let (m, tags, fields, ts) = parse_line_protocol(line);
        measurements.insert(m.clone());
        if m == "system" {
            assert_eq!(tags["device"], "gw1", "{line}");
            assert_eq!(tags["site"], "north field", "{line}");
            assert_eq!(tags["rack"], "7", "{line}");
            assert!(fields.keys().all(|k| !k.starts_with("tag.")), "{line}");
            assert!(ts > 1_700_000_000_000_000_000, "ns timestamps: {line}");
            if let Some(core) = tags.get("cpu") {
                assert!(core.parse::<u32>().is_ok());
                assert!(fields.contains_key("cpu.pct"), "{line}");
            }
        }
    }
    assert!(measurements.contains("system"), "{measurements:?}");
    let lines = text();
    assert!(
        lines
            .lines()
            .any(|l| l.contains("mem.total_bytes=") && l.contains("i"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_reads_a_stream_of_hex_lines_from_mosquitto_sub() {
    let dir = tempdir();
    let broker = Broker::start(BrokerOpts::default());
    let port = broker.plain_port();
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            "ferry/+/data/system",
            "-C",
            "4",
            "-F",
            "%t %x",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cfg = agent_config(dir.path(), port, "gw");
    cfg.uplink_extra = vec!["encoding: cbor".into(), "compression: zstd".into()];
    cfg.linger_ms = 20;
    let _agent = Agent::spawn(dir.path(), &cfg.render());
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_for_exit(&mut sub, WAIT);
        let mut out = String::new();
        std::io::Read::read_to_string(sub.stdout.as_mut().unwrap(), &mut out).unwrap();
        (s, out)
    })
    .await
    .unwrap();
    let (Some(s), hex_lines) = status else {
        panic!("mosquitto_sub did not get 4 messages")
    };
    assert!(s.success());
    assert_eq!(hex_lines.lines().count(), 4);
    let input = dir.path().join("hex.txt");
    std::fs::write(&input, &hex_lines).unwrap();
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("decode")
        .stdin(std::fs::File::open(&input).unwrap());
    let out = run_with_timeout(cmd, WAIT);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 4);
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(lines.iter().all(|l| l["device"] == "gw"));

    // A broken line is reported with its number; the others are still decoded.
    std::fs::write(&input, format!("{hex_lines}zz-not-hex\n")).unwrap();
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("decode").arg(&input);
    let out = run_with_timeout(cmd, WAIT);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 5"),
        "{out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        lines.len()
    );
}
