//! Crash-exact resume of the file collector: ferry is SIGKILLed twice while another process
//! appends 20 000 numbered lines to the file it follows. After each restart it goes on from the
//! position committed with the last lines it handed to the spool, so at the subscriber every
//! line arrives, and no line was ingested twice: all copies of one line carry one seq (the
//! uplink may deliver a record twice after a crash; that is a duplicate of the same seq, which
//! consumers drop, not a second ingest).

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

const STREAM: &str = "app";
const LINES: u32 = 20_000;

fn line(n: u32) -> String {
    format!("line-{n:06}")
}

/// Line content -> the distinct seqs it arrived with.
fn arrivals(sub: &Subscriber) -> BTreeMap<String, BTreeSet<u64>> {
    let mut m: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for r in sub.records(STREAM) {
        let content = r["line"]
            .as_str()
            .expect("raw records carry `line`")
            .to_string();
        m.entry(content)
            .or_default()
            .insert(r["seq"].as_u64().unwrap());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_file_is_appended_loses_no_line_and_ingests_none_twice() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    std::fs::File::create(&path).unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50",
        path.display()
    )];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Following file.", Duration::from_secs(20))
            .await,
        "{}",
        agent.log()
    );

    // The "other process": appends numbered lines at about 5 000 lines/s.
    let p = path.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        for n in 1..=LINES {
            writeln!(f, "{}", line(n)).unwrap();
            if n % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });

    for kill_after in [2_000, 9_000] {
        assert!(
            sub.wait_until(Duration::from_secs(20), |s| arrivals(s).len() >= kill_after)
                .await,
            "only {} lines before kill; log:\n{}",
            arrivals(&sub).len(),
            agent.log()
        );
        agent.kill9();
        eprintln!(
            "SIGKILL with {} lines at the subscriber",
            arrivals(&sub).len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.start_again();
    }
    writer.join().unwrap();

    let done = sub
        .wait_until(Duration::from_secs(25), |s| {
            arrivals(s).len() >= LINES as usize
        })
        .await;
    let got = arrivals(&sub);
    let missing: Vec<String> = (1..=LINES)
        .map(line)
        .filter(|l| !got.contains_key(l))
        .collect();
    assert!(
        done && missing.is_empty(),
        "{} lines missing, first: {:?}\nlog:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        agent.log()
    );
    let twice: Vec<_> = got
        .iter()
        .filter(|(_, seqs)| seqs.len() > 1)
        .take(10)
        .collect();
    assert!(twice.is_empty(), "lines ingested more than once: {twice:?}");
    assert_eq!(
        got.len(),
        LINES as usize,
        "lines that were never written arrived"
    );
    eprintln!(
        "{} records received for {LINES} lines ({} redelivered duplicates)",
        sub.records(STREAM).len(),
        sub.duplicates(STREAM)
    );
    assert!(agent.terminate().success());
}
