//! Proves the test harness in `tests/common` against a real Mosquitto, without ferry: if these
//! fail, the other integration tests' failures say nothing about ferry.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::agent::{AgentConfig, AuthConfig, FullPolicy, TlsConfig};
use common::broker::{Broker, BrokerOpts, Secure, mosquitto_pub};
use common::pki::{CLIENT_CN, Pki};
use common::subscriber::{Subscriber, assert_contiguous};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};

const WAIT: Duration = Duration::from_secs(10);

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Publishes at QoS 1 on the plain listener and asserts the broker acknowledged it.
fn publish(broker: &Broker, topic: &str, payload: &str, retain: bool) {
    let mut args = vec!["-q", "1", "-t", topic, "-m", payload];
    if retain {
        args.push("-r");
    }
    let out = mosquitto_pub(broker.plain_port(), &args);
    assert!(
        out.status.success(),
        "mosquitto_pub to {topic} failed ({}): {}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        broker.log()
    );
}

async fn received(sub: &Subscriber, topic: &str, payload: &str) -> bool {
    sub.wait_until(WAIT, |s| {
        s.messages_on(topic)
            .iter()
            .any(|m| m.payload == payload.as_bytes())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_and_decodes_ferry_messages() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "#").await;
    assert_eq!(sub.connacks(), 1);

    publish(&broker, "test/a", "hello", false);
    assert!(received(&sub, "test/a", "hello").await, "{}", broker.log());

    let batch = |seqs: &[u64]| {
        let records: Vec<_> = seqs
            .iter()
            .map(|&seq| serde_json::json!({"seq": seq, "ts": 1_764_100_000_000u64 + seq, "fields": {"cpu.total_pct": 3.2}}))
            .collect();
        serde_json::json!({"v": 1, "device": "gw-01", "boot": "ab12", "stream": "system", "records": records})
            .to_string()
    };
    publish(&broker, "ferry/gw-01/data/system", &batch(&[1, 2]), false);
    publish(&broker, "ferry/gw-01/data/system", &batch(&[2, 3]), false);
    let line = r#"{"v":1,"device":"gw-01","boot":"ab12","stream":"file.app_log","records":[{"seq":7,"ts":1,"line":"raw text"}]}"#;
    publish(&broker, "ferry/gw-01/data/file.app_log", line, false);
    publish(
        &broker,
        "ferry/gw-01/status",
        r#"{"state":"online","boot":"ab12"}"#,
        true,
    );

    assert!(sub.wait_for_seq("system", 3, WAIT).await);
    assert!(sub.wait_for_seqs("file.app_log", 7, 7, WAIT).await);
    assert!(sub.wait_until(WAIT, |s| !s.statuses().is_empty()).await);

    assert_eq!(sub.seqs("system"), [1, 2, 2, 3]);
    assert_eq!(sub.duplicates("system"), 1);
    assert_eq!(sub.duplicates_compared(), 1);
    assert!(sub.conflicting_copies().is_empty());
    assert_contiguous(&sub.unique_seqs("system"), 1, 3);
    assert_eq!(sub.records("system")[0]["fields"]["cpu.total_pct"], 3.2);
    assert_eq!(sub.records("file.app_log")[0]["line"], "raw text");
    assert!(sub.records("sys").is_empty(), "stream names match whole");
    assert_eq!(sub.statuses()[0]["state"], "online");
    // Retained messages are flagged only when delivered from the store, not live.
    assert!(!sub.messages_on("ferry/gw-01/status")[0].retain);
    let late = Subscriber::start(broker.plain_port(), "ferry/+/status").await;
    assert!(late.wait_until(WAIT, |s| !s.messages().is_empty()).await);
    assert!(late.messages()[0].retain);
}

/// A second copy of a seq with a different record is caught by every accessor of the stream:
/// dedupe by seq would silently keep one of two different readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_that_differs_from_its_first_copy_fails_the_test() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let copy = |cpu: f64| {
        serde_json::json!({"v": 1, "device": "gw-01", "boot": "ab12", "stream": "system",
            "records": [{"seq": 1, "ts": 1_764_100_000_000u64, "fields": {"cpu.total_pct": cpu}}]})
        .to_string()
    };
    publish(&broker, "ferry/gw-01/data/system", &copy(3.2), false);
    publish(&broker, "ferry/gw-01/data/system", &copy(3.3), false);
    assert!(
        sub.wait_until(WAIT, |s| s.messages().len() == 2).await,
        "{}",
        broker.log()
    );
    let conflicts = sub.conflicting_copies();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].1, 1);
    let seqs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sub.seqs("system")));
    let message = seqs
        .expect_err("seqs() must refuse a stream whose copies differ")
        .downcast::<String>()
        .expect("a formatted panic message");
    assert!(
        message.contains("duplicate copies differ") && message.contains("seq 1"),
        "{message}"
    );
}

#[test]
#[should_panic(expected = "2 of the seqs 1..=5 are missing; the first 2: [2, 4]")]
fn assert_contiguous_lists_missing_seqs() {
    assert_contiguous(&[1, 3, 5].into(), 1, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_session_and_its_queued_messages() {
    let mut broker = Broker::start(BrokerOpts {
        persistence: true,
        ..Default::default()
    });
    let port = broker.plain_port();
    let mut sub = Subscriber::start(port, "test/#").await;

    for round in 1..=3 {
        // The subscriber stays connected: it must notice, reconnect and subscribe again.
        let subacks = sub.subacks();
        broker.stop();
        broker.start_again();
        assert_eq!(broker.plain_port(), port);
        assert!(
            sub.wait_until(WAIT, |s| s.subacks() > subacks).await,
            "round {round}: no new SubAck; last error {:?}\n{}",
            sub.last_error(),
            broker.log()
        );
        assert!(sub.session_present(), "round {round}: session lost");
        let live = format!("live-{round}");
        publish(&broker, "test/live", &live, false);
        assert!(received(&sub, "test/live", &live).await, "round {round}");

        // Published while the subscriber is away: queued in its session, saved at SIGTERM,
        // delivered after the restart.
        sub.disconnect().await;
        let queued = format!("queued-{round}");
        publish(&broker, "test/queued", &queued, false);
        broker.stop();
        broker.start_again();
        sub.reconnect().await;
        assert!(sub.session_present(), "round {round}: session lost");
        assert!(
            received(&sub, "test/queued", &queued).await,
            "round {round}: queued message lost\n{}",
            broker.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistence_the_subscriber_subscribes_again() {
    let mut broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "test/#").await;
    broker.kill();
    assert!(!broker.is_running());
    broker.start_again();
    assert!(
        sub.wait_until(WAIT, |s| s.subacks() == 2).await,
        "{:?}",
        sub.last_error()
    );
    assert!(!sub.session_present());
    publish(&broker, "test/x", "after", false);
    assert!(received(&sub, "test/x", "after").await);
}

fn openssl_verify(ca: &Path, cert: &Path) -> bool {
    std::process::Command::new("openssl")
        .args(["verify", "-CAfile", path(ca), path(cert)])
        .output()
        .expect("run openssl verify")
        .status
        .success()
}

#[test]
fn pki_chains_verify() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    assert!(openssl_verify(&pki.ca_crt, &pki.server_crt));
    assert!(openssl_verify(&pki.ca_crt, &pki.client_crt));
    assert!(openssl_verify(&pki.other_ca_crt, &pki.other_server_crt));
    assert!(!openssl_verify(&pki.ca_crt, &pki.other_server_crt));
    assert!(!openssl_verify(&pki.other_ca_crt, &pki.server_crt));
}

#[test]
fn tls_listener_checks_the_server_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let broker = Broker::start(BrokerOpts {
        secure: Some(Secure::tls(&pki)),
        ..Default::default()
    });
    let port = broker.secure_port().unwrap();
    assert_eq!(broker.agent_port(), port);
    let msg = ["-q", "1", "-t", "test/tls", "-m", "x"];

    let ok = mosquitto_pub(port, &[&["--cafile", path(&pki.ca_crt)][..], &msg].concat());
    assert!(ok.status.success(), "{ok:?}\n{}", broker.log());
    let by_name = std::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
        .arg(&pki.ca_crt)
        .args(msg)
        .output()
        .unwrap();
    assert!(by_name.status.success(), "{by_name:?}");
    let other_ca = mosquitto_pub(
        port,
        &[&["--cafile", path(&pki.other_ca_crt)][..], &msg].concat(),
    );
    assert!(!other_ca.status.success(), "{other_ca:?}");
    let plain_on_tls = mosquitto_pub(port, &msg);
    assert!(!plain_on_tls.status.success());
    // The plain listener is still there for test clients.
    assert!(mosquitto_pub(broker.plain_port(), &msg).status.success());
}

#[test]
fn mutual_tls_listener_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let broker = Broker::start(BrokerOpts {
        secure: Some(Secure::mutual_tls(&pki)),
        ..Default::default()
    });
    let port = broker.secure_port().unwrap();
    let msg = ["-q", "1", "-t", "test/mtls", "-m", "x"];
    let ca = ["--cafile", path(&pki.ca_crt)];
    let client = [
        "--cert",
        path(&pki.client_crt),
        "--key",
        path(&pki.client_key),
    ];

    let with_cert = mosquitto_pub(port, &[&ca[..], &client, &msg].concat());
    assert!(
        with_cert.status.success(),
        "{with_cert:?}\n{}",
        broker.log()
    );
    assert!(
        broker.log().contains(&format!("u'{CLIENT_CN}'")),
        "the certificate CN should be the username:\n{}",
        broker.log()
    );
    let without = mosquitto_pub(port, &[&ca[..], &msg].concat());
    assert!(!without.status.success(), "{without:?}");
}

#[test]
fn password_listener_checks_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    for tls in [None, Some(&pki)] {
        let broker = Broker::start(BrokerOpts {
            secure: Some(Secure::password(&[("gw", "s3cret"), ("other", "pw2")], tls)),
            ..Default::default()
        });
        let port = broker.secure_port().unwrap();
        let mut base = vec!["-q", "1", "-t", "test/pw", "-m", "x"];
        if tls.is_some() {
            base.extend(["--cafile", path(&pki.ca_crt)]);
        }
        let with = |creds: &[&str]| mosquitto_pub(port, &[&base[..], creds].concat()).status;

        let ok = with(&["-u", "gw", "-P", "s3cret"]);
        assert!(
            ok.success(),
            "tls {}: {ok}\n{}",
            tls.is_some(),
            broker.log()
        );
        assert!(with(&["-u", "other", "-P", "pw2"]).success());
        // 5 = "not authorised" (CONNACK refused).
        assert_eq!(with(&["-u", "gw", "-P", "wrong"]).code(), Some(5));
        assert_eq!(with(&[]).code(), Some(5), "anonymous must be refused");
    }
}

fn rustls_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// Connects with rumqttc over rustls (the agent's stack) and reports the first event or error.
async fn rumqttc_connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut options = MqttOptions::new("rustls-check", "127.0.0.1", port);
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok(()),
        Ok(Ok(other)) => Err(format!("unexpected first event {other:?}")),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => panic!("rumqttc neither connected nor failed within {WAIT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_accepts_the_test_pki() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());

    let tls = Broker::start(BrokerOpts {
        secure: Some(Secure::tls(&pki)),
        ..Default::default()
    });
    let port = tls.secure_port().unwrap();
    let result = rumqttc_connect(port, rustls_config(&pki.ca_crt, None)).await;
    assert_eq!(result, Ok(()), "{}", tls.log());
    let wrong_ca = rumqttc_connect(port, rustls_config(&pki.other_ca_crt, None)).await;
    assert!(wrong_ca.unwrap_err().contains("UnknownIssuer"));

    let mtls = Broker::start(BrokerOpts {
        secure: Some(Secure::mutual_tls(&pki)),
        ..Default::default()
    });
    let port = mtls.secure_port().unwrap();
    let client = Some((pki.client_crt.as_path(), pki.client_key.as_path()));
    let result = rumqttc_connect(port, rustls_config(&pki.ca_crt, client)).await;
    assert_eq!(result, Ok(()), "{}", mtls.log());
    let without = rumqttc_connect(port, rustls_config(&pki.ca_crt, None)).await;
    assert!(without.is_err());
}

#[test]
fn agent_config_renders_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), 1883);
    let plain = cfg.render();
    assert!(plain.starts_with("device_id: \"test-gw\"\nlog_level: debug\nspool:\n"));
    assert!(plain.contains("\n  client_id: \"ferry-test-gw\"\n"));
    assert!(plain.contains("\n  full_policy: drop_oldest\n"));
    assert!(plain.ends_with(
        "  shutdown_grace_ms: 2000\ncollectors:\n  - type: system\n    name: system\n    interval_ms: 200\n"
    ));
    assert!(!plain.contains("tls:") && !plain.contains("auth:"));

    cfg.full_policy = FullPolicy::DropNewest;
    cfg.tls = Some(TlsConfig {
        ca_file: dir.path().join("ca.crt"),
        client: Some((dir.path().join("c.crt"), dir.path().join("c.key"))),
    });
    cfg.auth = Some(AuthConfig {
        username: "gw".into(),
        password: "s3cret".into(),
    });
    cfg.collectors = vec![];
    let full = cfg.render();
    let d = dir.path().display();
    assert!(full.contains(&format!(
        "  shutdown_grace_ms: 2000\n  tls:\n    ca_file: \"{d}/ca.crt\"\n    cert_file: \"{d}/c.crt\"\n    key_file: \"{d}/c.key\"\n  auth:\n    username: \"gw\"\n    password_file: \"{d}/password\"\ncollectors: []\n"
    )));
    assert!(full.contains("\n  full_policy: drop_newest\n"));
    assert_eq!(
        std::fs::read_to_string(cfg.password_path()).unwrap(),
        "s3cret"
    );
}

#[test]
fn start_again_retries_while_the_port_is_taken() {
    let mut broker = Broker::start(BrokerOpts::default());
    let port = broker.plain_port();
    broker.stop();
    // Somebody else holds the port for a moment (as a client socket briefly could).
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(250));
        drop(squatter);
    });
    broker.start_again();
    release.join().unwrap();
    assert!(broker.is_running());
    assert_eq!(broker.plain_port(), port);
    assert!(broker.log().contains("Address already in use"));
    assert!(
        mosquitto_pub(port, &["-q", "1", "-t", "t", "-m", "x"])
            .status
            .success()
    );
}
