//! Daemon behaviour: systemd notification and shutdown in the middle of a drain.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::drain::drain_stopped;
use common::subscriber::Subscriber;
use ferry::record::{Body, Reading, Value};
use ferry::spool::{Intake, Spool};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_status_and_watchdog_pings() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // No broker: ferry must still be ready and alive.
    let cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    let socket_env = socket_path.display().to_string();
    let mut agent = Agent::spawn_with_env(
        dir.path(),
        &cfg.render(),
        &[("NOTIFY_SOCKET", &socket_env), ("WATCHDOG_USEC", "400000")],
    );
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); got {got:?}\n{}", agent.log()));
        got.extend(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string),
        );
        if got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3 {
            break;
        }
    }
    let ready = got.iter().position(|l| l == "READY=1").expect("READY=1");
    let first_ping = got
        .iter()
        .position(|l| l == "WATCHDOG=1")
        .expect("WATCHDOG=1");
    assert!(ready < first_ping, "{got:?}");
    assert!(
        got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3,
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.starts_with("STATUS=disconnected to 127.0.0.1:") && l.contains("records")),
        "{got:?}"
    );
    assert!(agent.terminate().success());
    let mut rest = Vec::new();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|l| l.contains("STOPPING=1")), "{rest:?}");
}

const BACKLOG: u64 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_drain_exits_cleanly_and_loses_nothing() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![];
    let fast = cfg.render();
    // One record per message, one message in flight: a drain that takes a while.
    let slow = fast
        .replace("window: 4", "window: 1")
        .replace("max_records: 500", "max_records: 1");
    {
        let config = ferry::config::parse(&slow, &dir.path().join("ferry.yaml")).unwrap();
        let spool = Spool::open(&config.spool).unwrap();
        for g in 0..BACKLOG / 1000 {
            let group: Vec<Intake> = (0..1000)
                .map(|i| {
                    Intake::reading(Reading {
                        stream: "bulk".into(),
                        ts_ms: 1_700_000_000_000 + g * 1000 + i,
                        body: Body::Fields(vec![("i".into(), Value::U64(g * 1000 + i))]),
                    })
                })
                .collect();
            spool.commit(&group).unwrap();
        }
    }
    let mut agent = Agent::spawn(dir.path(), &slow);
    assert!(
        sub.wait_for_seq("bulk", 200, Duration::from_secs(20)).await,
        "{}",
        agent.log()
    );
    let started = Instant::now();
    let status = agent.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit {status:?}\n{}", agent.log());
    // It stops without draining the backlog first (a wall-time bound would be a figure; the
    // harness allows 20 s, the uplink waits at most shutdown_grace_ms = 2 s for PUBACKs).
    let delivered = sub.unique_seqs("bulk").len() as u64;
    assert!(
        delivered < BACKLOG,
        "the drain had finished before SIGTERM; the test proves nothing"
    );
    eprintln!("SIGTERM after {delivered} of {BACKLOG} records; stopped in {took:?}");

    // The rest is sent by the next run: every seq the spool accepted arrives.
    let drained = drain_stopped(
        &mut agent,
        &cfg,
        &sub,
        &["bulk".to_string()],
        Duration::from_secs(40),
    )
    .await;
    drained.assert_nothing_lost(&agent.log());
    assert_eq!(
        drained.produced(),
        BACKLOG,
        "the spool accepted the whole backlog"
    );
}
