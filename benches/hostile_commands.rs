//! What junk on the command topic costs the data: records acknowledged per window while ferry
//! drains a backlog to a local Mosquitto, with and without hostile commands, in the same run.
//!
//! A spool is pre-filled with `FERRY_BENCH_RECORDS` readings through the library, then the
//! `ferry` binary starts with no collectors and `linger_ms: 0`, so it sends as fast as it can.
//! Windows of `FERRY_BENCH_WINDOW_S` seconds follow each other, `FERRY_BENCH_REPS` pairs of
//! (without junk, with junk). In a junk window a round of hostile commands (a 400 kB request, a
//! 5 MB one, 4 KiB of binary junk, invalid UTF-8 and a retained command, as in
//! `tests/hostile.rs`) is published at its start and every `FERRY_BENCH_JUNK_EVERY_S` seconds. A
//! record counts for the window in which the subscriber first saw its seq (ferry deletes it on
//! the PUBACK that follows the broker's forward). The ratio is the median of the junk windows
//! over the median of the others; the target from issue #14 is >= 0.9. The run is void if the
//! backlog ran out before the last window ended.
//!
//! Run: `cargo bench --bench hostile_commands` (release build of ferry) or, to reuse a debug
//! build, `cargo bench --profile dev --bench hostile_commands`. Knobs: `FERRY_BENCH_RECORDS`
//! (default 1000000), `FERRY_BENCH_WINDOW_S` (default 10), `FERRY_BENCH_REPS` (default 3),
//! `FERRY_BENCH_JUNK_EVERY_S` (default 5), `FERRY_BENCH_DIR`.

mod common;

use common::harness::agent::{Agent, AgentConfig};
use common::harness::broker::mosquitto_pub;
use common::harness::subscriber::Subscriber;
use common::{env_or, machine_header, median, suite, tempdir};
use std::path::{Path, PathBuf};
use std::time::Duration;

const STREAM: &str = "sensor";
const COMMANDS: &str = "ferry/test-gw/commands";

/// The hostile messages of one round, as files for `mosquitto_pub -f` (plus `-r` for the
/// retained one, published with `-m`).
fn junk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (id, size) in [("big-400k", 400_000usize), ("big-5m", 5_000_000)] {
        let head = format!(r#"{{"id":"{id}","name":"ping","args":{{"pad":""#);
        let mut text = head.clone();
        text.push_str(&"x".repeat(size - head.len() - 3));
        text.push_str(r#""}}"#);
        let path = dir.join(format!("{id}.json"));
        std::fs::write(&path, text).expect("write junk");
        files.push(path);
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let path = dir.join("junk.bin");
    std::fs::write(&path, junk).expect("write junk");
    files.push(path);
    let path = dir.join("bad-utf8.json");
    std::fs::write(&path, b"{\"id\":\"bad-utf8\",\"name\":\"p\xffng\"}").expect("write junk");
    files.push(path);
    files
}

fn publish_round(port: u16, files: &[PathBuf], round: usize) {
    for f in files {
        let path = f.display().to_string();
        let out = mosquitto_pub(port, &["-q", "1", "-t", COMMANDS, "-f", &path]);
        assert!(out.status.success(), "mosquitto_pub: {out:?}");
    }
    let retained = format!(r#"{{"id":"ret-{round}","name":"ping"}}"#);
    let out = mosquitto_pub(port, &["-q", "1", "-r", "-t", COMMANDS, "-m", &retained]);
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// Seqs of [`STREAM`] the subscriber holds now.
fn seen(sub: &Subscriber) -> usize {
    sub.unique_seqs(STREAM).len()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if common::skip_unless_cargo_bench("hostile_commands") {
        return;
    }
    let records: u64 = env_or("FERRY_BENCH_RECORDS", 1_000_000);
    let window = Duration::from_secs(env_or("FERRY_BENCH_WINDOW_S", 10));
    let reps: usize = env_or("FERRY_BENCH_REPS", 3);
    let junk_every = Duration::from_secs(env_or("FERRY_BENCH_JUNK_EVERY_S", 5));
    println!("{}", machine_header());
    let broker = common::broker(None);
    let dir = tempdir("hostile-commands");
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = Vec::new();
    cfg.linger_ms = 0;
    cfg.max_bytes = 4 << 30;
    std::fs::write(dir.path().join("ferry.yaml"), cfg.render()).expect("write config");
    let config = suite::load(&dir.path().join("ferry.yaml"));
    {
        let spool = ferry::spool::Spool::open(&config.spool).expect("open spool");
        let took = suite::prefill(&spool, STREAM, 0, records, 1000);
        spool.flush().expect("flush");
        println!("prefilled {records} records in {:.1} s", took.as_secs_f64());
    }
    let files = junk_files(dir.path());
    let sub = Subscriber::start(broker.plain_port(), "ferry/test-gw/data/#").await;
    let replies = Subscriber::start(broker.plain_port(), "ferry/test-gw/replies").await;
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        sub.wait_until(Duration::from_secs(60), |s| seen(s) > 0)
            .await,
        "ferry sent nothing:\n{}",
        agent.log()
    );

    let (mut clean, mut hostile) = (Vec::new(), Vec::new());
    let schedule = (0..reps).flat_map(|_| [("without junk", false), ("with junk", true)]);
    for (name, junk) in schedule {
        let before = seen(&sub);
        let start = tokio::time::Instant::now();
        let mut round = 0;
        while start.elapsed() < window {
            if junk && start.elapsed() >= junk_every * round as u32 {
                let port = broker.plain_port();
                let f = files.clone();
                tokio::task::spawn_blocking(move || publish_round(port, &f, round))
                    .await
                    .expect("publish junk");
                round += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = seen(&sub) - before;
        println!(
            "{name}: {n} records acknowledged in {} s{}",
            window.as_secs(),
            if junk {
                format!(" ({round} rounds of 5 hostile commands)")
            } else {
                String::new()
            }
        );
        if junk { &mut hostile } else { &mut clean }.push(n as f64);
    }
    let left = records as usize - seen(&sub);
    let (base, with) = (median(&clean), median(&hostile));
    let ratio = with / base;
    println!("medians: {base:.0} records per window without junk, {with:.0} with");
    let connects = agent.log().matches("Connected to the broker.").count();
    println!(
        "hostile_commands: ratio {ratio:.2} (target >= 0.9) {}; {} replies; {connects} connection(s); {left} records still to send{}",
        suite::verdict(ratio >= 0.9),
        replies.messages().len(),
        if left == 0 {
            " -- VOID: the backlog ran out, raise FERRY_BENCH_RECORDS"
        } else {
            ""
        }
    );
    agent.terminate();
}
