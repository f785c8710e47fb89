//! The fault-injecting proxy (tests/common/proxy.rs) against a local echo server, without
//! ferry: if these fail, the chaos tests' results say nothing about ferry.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::proxy::{Counters, Direction, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(5);

/// An echo server on a free loopback port; runs until the test's runtime ends.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rx, mut tx) = socket.into_split();
                let _ = tokio::io::copy(&mut rx, &mut tx).await;
            });
        }
    });
    port
}

async fn connect(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
        .await
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads exactly `n` bytes, failing the test after `WAIT`.
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes did not come back within {WAIT:?}"))
        .unwrap();
    buf
}

/// True if nothing at all (no byte, no EOF) arrives within `d`.
async fn silent_for(s: &mut TcpStream, d: Duration) -> bool {
    let mut b = [0u8; 1];
    timeout(d, s.read(&mut b)).await.is_err()
}

async fn counters_reach(proxy: &Proxy, want: impl Fn(&Counters) -> bool) -> Counters {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = proxy.counters();
        if want(&c) || Instant::now() >= deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_both_ways_and_counts() {
    let proxy = Proxy::start(echo_server().await);
    let mut c = connect(&proxy).await;
    let data = pattern(100_000);
    c.write_all(&data).await.unwrap();
    assert_eq!(read_n(&mut c, data.len()).await, data);
    let got = counters_reach(&proxy, |c| c.bytes_down == 100_000).await;
    assert_eq!(
        got,
        Counters {
            bytes_up: 100_000,
            bytes_down: 100_000,
            connections: 1,
            open: 1
        }
    );
    assert_eq!(proxy.bytes(Direction::Up), 100_000);

    drop(c);
    let got = counters_reach(&proxy, |c| c.open == 0).await;
    assert_eq!(got.open, 0, "the closed connection is still counted open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_closes_current_connections_only() {
    let proxy = Proxy::start(echo_server().await);
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    for s in [&mut a, &mut b] {
        s.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(s, 4).await, b"ping");
    }
    assert_eq!(proxy.cut(), 2);
    for s in [&mut a, &mut b] {
        let mut buf = [0u8; 16];
        let r = timeout(WAIT, s.read(&mut buf))
            .await
            .expect("a cut connection stays open");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "read {r:?} after the cut instead of EOF"
        );
    }
    assert_eq!(counters_reach(&proxy, |c| c.open == 0).await.open, 0);

    let mut c = connect(&proxy).await;
    c.write_all(b"after").await.unwrap();
    assert_eq!(read_n(&mut c, 5).await, b"after");
    assert_eq!(proxy.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_bytes_without_closing_and_delivers_them_afterwards() {
    let proxy = Proxy::start(echo_server().await);
    let mut old = connect(&proxy).await;
    old.write_all(b"before").await.unwrap();
    assert_eq!(read_n(&mut old, 6).await, b"before");
    let up_before = proxy.bytes(Direction::Up);

    proxy.blackhole(true);
    old.write_all(b"during").await.unwrap();
    assert!(
        silent_for(&mut old, Duration::from_millis(700)).await,
        "bytes or EOF came through the blackhole"
    );
    // New connections are accepted and just as silent.
    let mut new = connect(&proxy).await;
    new.write_all(b"new").await.unwrap();
    assert!(silent_for(&mut new, Duration::from_millis(300)).await);
    assert_eq!(
        proxy.bytes(Direction::Up),
        up_before,
        "bytes were forwarded"
    );
    assert_eq!(proxy.open_connections(), 2);

    proxy.blackhole(false);
    assert_eq!(read_n(&mut old, 6).await, b"during");
    assert_eq!(read_n(&mut new, 3).await, b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_limits_each_direction_to_the_rate() {
    let proxy = Proxy::start(echo_server().await);
    let mut c = connect(&proxy).await;
    let data = pattern(20_000);

    proxy.throttle(Some(10_000));
    let t = Instant::now();
    c.write_all(&data).await.unwrap();
    assert_eq!(read_n(&mut c, data.len()).await, data);
    let throttled = t.elapsed();
    // 20 kB at 10 kB/s, less the first 0.1 s burst; up and down overlap: about 1.9 s. Load
    // only makes it slower, so the floor is the check; the ceiling (10x) only catches a stall.
    eprintln!("20 kB echoed at 10 kB/s in {throttled:?}");
    assert!(
        throttled >= Duration::from_millis(1700) && throttled <= Duration::from_secs(20),
        "20 kB echoed at 10 kB/s in {throttled:?}"
    );

    proxy.throttle(None);
    let t = Instant::now();
    c.write_all(&data).await.unwrap();
    assert_eq!(read_n(&mut c, data.len()).await, data);
    // Unthrottled it takes milliseconds; at the old rate it could not take less than 1.7 s.
    eprintln!("unthrottled echo in {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_millis(1700),
        "unthrottled echo took {:?}: the throttle is still on",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_every_chunk_and_keeps_order() {
    let proxy = Proxy::start(echo_server().await);
    let mut c = connect(&proxy).await;
    proxy.latency(Duration::from_millis(200));

    let t = Instant::now();
    c.write_all(b"x").await.unwrap();
    read_n(&mut c, 1).await;
    let rtt = t.elapsed();
    // About 400 ms; the ceiling (10x) only catches a delay applied over and over.
    eprintln!("round trip {rtt:?} with 200 ms each way");
    assert!(
        rtt >= Duration::from_millis(400) && rtt < Duration::from_secs(4),
        "round trip {rtt:?} with 200 ms each way"
    );

    // Many small writes in quick succession come back complete and in order.
    let mut sent = Vec::new();
    for i in 0..50u8 {
        c.write_all(&[i; 3]).await.unwrap();
        sent.extend_from_slice(&[i; 3]);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(read_n(&mut c, sent.len()).await, sent);

    proxy.latency(Duration::ZERO);
    let t = Instant::now();
    c.write_all(b"y").await.unwrap();
    read_n(&mut c, 1).await;
    // Milliseconds without latency; with it, at least 400 ms.
    eprintln!("round trip without latency {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "round trip {:?}: the latency is still on",
        t.elapsed()
    );
}
