//! A stored chunk that cannot be read back (damaged on disk between two runs): ferry moves it
//! aside, reports its seqs as a `spool_corrupt` loss, and delivers everything else.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use ferry::config::BatchLimits;
use std::collections::HashMap;
use std::time::Duration;

/// Records of `stream` in the running agent's spool, from its status; `None` while it does
/// not answer.
async fn spooled(cfg: &AgentConfig, stream: &str) -> Option<u64> {
    let status = common::drain::live_status(cfg).await?;
    Some(
        status["spool"]["streams"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == stream)
            .map_or(0, |s| s["records"].as_u64().unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_chunk_is_moved_aside_reported_and_everything_else_arrives() {
    let dir = tempfile::tempdir().unwrap();
    // 1. Spool some data with no broker to send it to.
    let mut broker = Broker::start(BrokerOpts::default());
    broker.stop();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec!["type: system\nname: sys0\ninterval_ms: 200".into()];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while spooled(&cfg, "sys0").await.unwrap_or(0) < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(agent.terminate().success(), "{}", agent.log());

    // 2. Damage the fifth chunk of sys0 in the stopped spool, as a bad value on disk would.
    let settings = common::drain::parse(&cfg).spool;
    let (sid, cid, bad, accepted) = {
        let spool = ferry::spool::Spool::open(&settings).unwrap();
        let limits = BatchLimits {
            max_records: 100_000,
            max_bytes: usize::MAX,
            linger: Duration::ZERO,
        };
        let mut cursors = HashMap::new();
        let batch = loop {
            let b = spool
                .next_batch(&cursors, &limits)
                .unwrap()
                .expect("sys0 has chunks");
            cursors.insert(b.stream_id, b.chunks.last().unwrap().chunk_id);
            if b.stream == "sys0" {
                break b;
            }
        };
        assert!(batch.chunks.len() >= 10, "{} chunks", batch.chunks.len());
        let c = &batch.chunks[4];
        let bad: Vec<u64> = c.records.iter().map(|r| r.seq).collect();
        let accepted = spool.stats().stream("sys0").unwrap().next_seq - 1;
        (batch.stream_id, c.chunk_id, bad, accepted)
    };
    std::thread::sleep(Duration::from_millis(1100)); // sled's flusher releases the lock
    {
        let db = sled::open(&settings.dir).unwrap();
        let tree = db.open_tree("spool").unwrap();
        let key = ferry::spool::keys::chunk(sid, cid);
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        value[..ferry::spool::chunk::HEADER_LEN].fill(0xff);
        tree.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));

    // 3. With the broker back, everything else arrives and the bad seqs are reported.
    broker.start_again();
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    cfg.collectors.clear();
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let expected: Vec<u64> = (1..=accepted).filter(|s| !bad.contains(s)).collect();
    let corrupt = |s: &Subscriber| {
        s.records("ferry.loss")
            .into_iter()
            .filter(|l| l["fields"]["reason"] == "spool_corrupt")
            .collect::<Vec<_>>()
    };
    assert!(
        sub.wait_until(Duration::from_secs(30), |s| {
            let got = s.unique_seqs("sys0");
            expected.iter().all(|q| got.contains(q)) && !corrupt(s).is_empty()
        })
        .await,
        "{}",
        agent.log()
    );
    let got = sub.unique_seqs("sys0");
    assert!(bad.iter().all(|q| !got.contains(q)), "a bad seq arrived");
    assert_eq!(got.len() as u64, accepted - bad.len() as u64);
    let losses = corrupt(&sub);
    let l = &losses[0]["fields"];
    eprintln!("bad seqs {bad:?}, loss record {l}");
    assert_eq!(l["stream"], "sys0");
    assert_eq!(l["first_seq"].as_u64(), bad.first().copied());
    assert_eq!(l["last_seq"].as_u64(), bad.last().copied());
    assert_eq!(l["count"].as_u64(), Some(bad.len() as u64));
    let export = dir.path().join(format!("spool.badchunk-sys0-{cid}"));
    assert_eq!(l["quarantined"], export.display().to_string());
    assert!(
        export.exists(),
        "the chunk's bytes are kept at {}",
        export.display()
    );
    // The counters stay exact: the spool empties.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while spooled(&cfg, "sys0").await != Some(0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(spooled(&cfg, "sys0").await, Some(0), "{}", agent.log());
    assert!(agent.log().contains("A stored chunk is unreadable"));
    assert!(agent.terminate().success());
}
