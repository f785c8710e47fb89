//! Bytes a month on the wire with the shipped production config.
//!
//! Runs `config/ferry.production.yaml` as shipped, with only what must change to run here
//! changed (broker host and port, the CA file, the spool directory and status socket, and a
//! device id so the two agents can be told apart), against a local Mosquitto over TLS,
//! through a counting TCP proxy. Beside it, in the same run, the same file with the settings
//! it had before the cellular profile (JSON, no compression, 5 s linger, 60 s keepalive,
//! self-metrics every 60 s): the baseline the ratio is taken against.
//!
//! The proxy counts every byte of the TCP stream in both directions: TLS handshakes and
//! records, MQTT CONNECT, SUBSCRIBE, PUBLISH, PUBACK, PINGREQ/PINGRESP, status messages. A
//! month is 30 days; bytes per month = bytes counted / run time x 30 days. The run must cover
//! several `linger_ms` periods of the shipped config (600 s) for the figure to mean anything:
//! the default run is 1800 s.
//!
//! Run: `cargo bench --bench link_month` (knob: `FERRY_BENCH_SECONDS`, default 1800).
//! Target (issue #15): the shipped config at most 10 MB a month.

#[path = "../tests/common/mod.rs"]
mod common;

use common::agent::Agent;
use common::broker::{Broker, BrokerOpts, Secure};
use common::pki::Pki;
use common::proxy::Proxy;
use common::subscriber::Subscriber;
use std::path::Path;
use std::time::{Duration, Instant};

const MONTH_S: f64 = 30.0 * 86_400.0;
const PRODUCTION: &str = include_str!("../config/ferry.production.yaml");

/// The settings the production file had before the cellular profile.
const BEFORE: &[(&str, &str)] = &[
    (
        "self_metrics_interval_ms: 3600000",
        "self_metrics_interval_ms: 60000",
    ),
    ("keepalive_s: 120", "keepalive_s: 60"),
    ("linger_ms: 600000", "linger_ms: 5000"),
    ("encoding: cbor", "encoding: json"),
    ("compression: zstd", "compression: none"),
];

/// The shipped file with only the settings that must change to run on this machine.
fn localise(text: &str, device: &str, port: u16, ca: &Path, dir: &Path) -> String {
    let swaps = [
        ("host: mqtt.example.com", "host: 127.0.0.1".to_string()),
        ("port: 8883", format!("port: {port}")),
        (
            "ca_file: /etc/ssl/certs/ca-certificates.crt",
            format!("ca_file: {}", ca.display()),
        ),
        (
            "dir: /var/lib/ferry/spool",
            format!("dir: {}", dir.join("spool").display()),
        ),
        (
            "status_socket: /run/ferry/ferry.sock",
            format!("status_socket: {}", dir.join("ferry.sock").display()),
        ),
    ];
    let mut out = text.to_string();
    for (from, to) in swaps {
        assert!(
            out.contains(from),
            "the production config no longer has {from:?}"
        );
        out = out.replacen(from, &to, 1);
    }
    format!("device_id: {device}\n{out}")
}

struct Run {
    name: &'static str,
    device: &'static str,
    proxy: Proxy,
    agent: Agent,
    _dir: tempfile::TempDir,
}

fn start(name: &'static str, device: &'static str, text: &str, broker: &Broker, pki: &Pki) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = Proxy::start(broker.secure_port().expect("a TLS listener"));
    let yaml = localise(text, device, proxy.port(), &pki.ca_crt, dir.path());
    let agent = Agent::spawn(dir.path(), &yaml);
    Run {
        name,
        device,
        proxy,
        agent,
        _dir: dir,
    }
}

fn main() {
    let seconds: u64 = std::env::var("FERRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(seconds));
}

async fn bench(seconds: u64) {
    let pki_dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate(pki_dir.path());
    let broker = Broker::start(BrokerOpts {
        secure: Some(Secure::tls(&pki)),
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let mut before_text = PRODUCTION.to_string();
    for (now, then) in BEFORE {
        assert!(
            before_text.contains(now),
            "the production config no longer has {now:?}"
        );
        before_text = before_text.replacen(now, then, 1);
    }
    let mut runs = vec![
        start("shipped", "gw-month-a", PRODUCTION, &broker, &pki),
        start(
            "before (baseline)",
            "gw-month-b",
            &before_text,
            &broker,
            &pki,
        ),
    ];
    let started = Instant::now();
    eprintln!("link_month: running both agents for {seconds} s");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    // Counted up to here: a clean stop would add a goodbye that a running agent does not send.
    let counted: Vec<_> = runs.iter().map(|r| r.proxy.counters()).collect();
    for r in &mut runs {
        assert!(r.agent.is_running(), "{} died:\n{}", r.name, r.agent.log());
        r.agent.terminate();
    }

    println!("link_month: {elapsed:.0} s, MQTT over TLS through a counting proxy, month = 30 days");
    println!(
        "{:<20} {:>10} {:>10} {:>6} {:>9} {:>8} {:>8} {:>12} {:>7}",
        "profile",
        "bytes up",
        "bytes dn",
        "conns",
        "data msgs",
        "records",
        "B/record",
        "MB/month",
        "ratio"
    );
    let month =
        |c: &common::proxy::Counters| (c.bytes_up + c.bytes_down) as f64 / elapsed * MONTH_S / 1e6;
    let baseline = month(&counted[1]);
    for (r, c) in runs.iter().zip(&counted) {
        let prefix = format!("ferry/{}/data/", r.device);
        let data = sub
            .messages()
            .into_iter()
            .filter(|m| m.topic.starts_with(&prefix));
        let (msgs, records) = data.fold((0usize, 0usize), |(n, recs), m| {
            let k = m
                .json
                .as_ref()
                .and_then(|j| j["records"].as_array().map(Vec::len))
                .unwrap_or(0);
            (n + 1, recs + k)
        });
        let total = (c.bytes_up + c.bytes_down) as f64;
        println!(
            "{:<20} {:>10} {:>10} {:>6} {:>9} {:>8} {:>8.1} {:>12.2} {:>6.3}x",
            r.name,
            c.bytes_up,
            c.bytes_down,
            c.connections,
            msgs,
            records,
            if records > 0 {
                total / records as f64
            } else {
                f64::NAN
            },
            month(c),
            month(c) / baseline
        );
    }
}
