//! The listen collector end to end: applications push lines into the real `ferry` binary over
//! its unix socket, ferry is SIGKILLed in the middle, and every line that was answered `ok`
//! arrives at a real Mosquitto subscriber after the restart. The Python client of
//! docs/COLLECTORS.md runs against it too.
//!
//! Size: 20 clients x 1500 lines in batches of 50 (the issue's 100k lines per client is a
//! soak: `LISTEN_LINES_PER_CLIENT=100000 cargo nextest run --profile soak --run-ignored all -E
//! 'test(listen_soak)'`).

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const CLIENTS: u64 = 20;
const BATCH: u64 = 50;

fn listen_config(socket: &Path) -> String {
    format!(
        "type: listen\nname: app\nsocket: {}\nsocket_mode: '0600'",
        socket.display()
    )
}

/// Pushes `lines` lines `{"c": client, "n": k}` in batches; returns how many were confirmed
/// with `ok` (they are the first ones, answers come in order). Stops at the first broken
/// connection or non-`ok` answer.
fn push(socket: &Path, client: u64, lines: u64, confirmed_total: &AtomicU64) -> u64 {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return 0;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut confirmed = 0;
    for start in (0..lines).step_by(BATCH as usize) {
        let end = (start + BATCH).min(lines);
        let text: String = (start..end)
            .map(|n| format!("{{\"c\": {client}, \"n\": {n}}}\n"))
            .collect();
        if stream.write_all(text.as_bytes()).is_err() {
            return confirmed;
        }
        let mut answered = start;
        while answered < end {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return confirmed,
                Ok(_) => {}
            }
            let mut parts = line.split_whitespace();
            let (Some("ok"), Some(n)) = (parts.next(), parts.next()) else {
                return confirmed;
            };
            let n: u64 = n.parse().unwrap();
            answered += n;
            confirmed += n;
            confirmed_total.fetch_add(n, Ordering::Relaxed);
        }
    }
    confirmed
}

fn delivered(sub: &Subscriber) -> BTreeSet<(u64, u64)> {
    sub.records("app")
        .iter()
        .map(|r| {
            let f = &r["fields"];
            (f["c"].as_u64().unwrap(), f["n"].as_u64().unwrap())
        })
        .collect()
}

async fn kill_in_the_middle(lines: u64) {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("push.sock");
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![listen_config(&socket)];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Listening for pushed readings.", WAIT)
            .await,
        "{}",
        agent.log()
    );
    let total = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (socket, total) = (socket.clone(), total.clone());
            std::thread::spawn(move || push(&socket, c, lines, &total))
        })
        .collect();
    // SIGKILL once a quarter of everything is confirmed: clients are mid-stream.
    let quarter = CLIENTS * lines / 4;
    let deadline = std::time::Instant::now() + WAIT;
    while total.load(Ordering::Relaxed) < quarter && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.kill9();
    let confirmed: Vec<u64> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let sum: u64 = confirmed.iter().sum();
    assert!(sum >= quarter, "only {sum} lines confirmed before the kill");
    assert!(
        sum < CLIENTS * lines,
        "every line was confirmed: the kill was not in the middle"
    );
    agent.start_again();
    let expected: BTreeSet<(u64, u64)> = confirmed
        .iter()
        .enumerate()
        .flat_map(|(c, k)| (0..*k).map(move |n| (c as u64, n)))
        .collect();
    // The soak's 2M lines take longer than WAIT to drain: 60 s plus 1 s per 10k lines.
    let drain_wait = WAIT + Duration::from_millis(CLIENTS * lines / 10);
    let ok = sub
        .wait_until(drain_wait, |s| delivered(s).is_superset(&expected))
        .await;
    let got = delivered(&sub);
    eprintln!(
        "listen: {} clients x {lines} lines, {sum} confirmed before the SIGKILL, {} distinct \
         delivered, {} confirmed missing",
        CLIENTS,
        got.len(),
        expected.difference(&got).count()
    );
    let missing: Vec<_> = expected.difference(&got).take(10).collect();
    assert!(
        ok,
        "{} confirmed lines not delivered, e.g. {missing:?}\n{}",
        expected.difference(&got).count(),
        agent.log()
    );
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_line_of_20_clients_is_delivered_across_a_sigkill() {
    kill_in_the_middle(1500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 20 clients x 100k lines"]
async fn listen_soak_100k_lines_per_client() {
    let lines = std::env::var("LISTEN_LINES_PER_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    kill_in_the_middle(lines).await;
}

/// The first ```python block of the listen section of docs/COLLECTORS.md.
fn python_example() -> String {
    let md = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/COLLECTORS.md"),
    )
    .unwrap();
    let section = &md[md.find("\n## listen").expect("a listen section")..];
    let start = section.find("```python\n").expect("a python example") + 10;
    let len = section[start..].find("```").unwrap();
    section[start..start + len].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_of_the_docs_gets_its_lines_confirmed_and_delivered() {
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "the test needs /usr/bin/python3");
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("push.sock");
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![listen_config(&socket)];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Listening for pushed readings.", WAIT)
            .await,
        "{}",
        agent.log()
    );
    let script = dir.path().join("client.py");
    std::fs::write(&script, python_example()).unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .env("FERRY_SOCKET", &socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "confirmed 3 of 3");
    assert!(
        sub.wait_until(WAIT, |s| s.records("app").len() == 3).await,
        "{}",
        agent.log()
    );
    assert_eq!(sub.records("app")[2]["fields"]["rssi"], -69);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_drop_newest_answers_retry_instead_of_dropping_silently() {
    // No broker: nothing drains, so the 64 KiB spool fills up.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("push.sock");
    let mut cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    cfg.max_bytes = 64 << 10;
    cfg.full_policy = common::agent::FullPolicy::DropNewest;
    cfg.collectors = vec![listen_config(&socket)];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Listening for pushed readings.", WAIT)
            .await,
        "{}",
        agent.log()
    );
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let pad = "x".repeat(500);
        let (mut confirmed, mut n) = (0u64, 0u64);
        // 2.5 MB of lines is far more than the 64 KiB spool holds.
        while n < 5_000 {
            let text: String = (n..n + 10)
                .map(|i| format!("{{\"n\": {i}, \"pad\": \"{pad}\"}}\n"))
                .collect();
            n += 10;
            stream.write_all(text.as_bytes()).unwrap();
            let mut answered = 0;
            while answered < 10 {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let (word, count) = (parts.next().unwrap(), parts.next().unwrap());
                let count: u64 = count.parse().unwrap();
                if word != "ok" {
                    return (line, confirmed);
                }
                answered += count;
                confirmed += count;
            }
        }
        (String::from("never refused"), confirmed)
    })
    .await
    .unwrap();
    assert_eq!(
        answer.0.trim_end(),
        "retry 10 not stored: spool full or failing",
        "after {} confirmed lines\n{}",
        answer.1,
        agent.log()
    );
    assert!(
        answer.1 > 0,
        "nothing was confirmed before the spool filled"
    );
}
