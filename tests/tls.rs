//! The uplink's TLS and authentication against a real Mosquitto with certificates made by
//! openssl at test time.

mod common;

use common::agent::{Agent, AgentConfig, AuthConfig, TlsConfig};
use common::broker::{Broker, BrokerOpts, Secure};
use common::drain::stop_and_drain;
use common::pki::Pki;
use common::subscriber::Subscriber;
use std::time::Duration;

const STREAM: &str = "system";

fn broker(secure: Secure) -> Broker {
    Broker::start(BrokerOpts {
        secure: Some(secure),
        persistence: false,
    })
}

async fn assert_delivers(broker: &Broker, cfg: &AgentConfig) {
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let mut agent = Agent::spawn(&cfg.dir, &cfg.render());
    assert!(
        sub.wait_for_seqs(STREAM, 1, 5, Duration::from_secs(20))
            .await,
        "nothing delivered; agent log:\n{}\nbroker log:\n{}",
        agent.log(),
        broker.log()
    );
    assert!(agent.log().contains("tls=true"));
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = broker(Secure::tls(&pki));
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.tls = Some(TlsConfig {
        ca_file: pki.ca_crt.clone(),
        client: None,
    });
    assert_delivers(&broker, &cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_retried_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    // The broker presents a certificate of the other CA; ferry trusts only the first.
    let broker = broker(Secure::Tls {
        cert: pki.other_server_crt.clone(),
        key: pki.other_server_key.clone(),
        ca: pki.other_ca_crt.clone(),
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let ca_file = dir.path().join("trusted-ca.crt");
    std::fs::copy(&pki.ca_crt, &ca_file).unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.backoff_initial_ms = 200;
    cfg.tls = Some(TlsConfig {
        ca_file: ca_file.clone(),
        client: None,
    });
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let clear =
        "TLS handshake failed: the broker's certificate is not signed by uplink.tls.ca_file";
    assert!(
        agent.wait_for_log(clear, Duration::from_secs(15)).await,
        "no clear TLS error; log:\n{}",
        agent.log()
    );
    // Retried with backoff: several attempts, none delivered anything.
    assert!(
        agent
            .wait_for_log_count("Cannot connect to the broker", 2, Duration::from_secs(20))
            .await
            || agent.log().matches("Still cannot connect").count() >= 1,
        "no retries; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("ERROR"),
        "a refused certificate is an ERROR"
    );
    assert!(sub.unique_seqs(STREAM).is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The operator installs the right CA: the files are read again at the next attempt and
    // everything buffered meanwhile arrives, from seq 1.
    std::fs::copy(&pki.other_ca_crt, &ca_file).unwrap();
    assert!(
        sub.wait_for_seqs(STREAM, 1, 10, Duration::from_secs(30))
            .await,
        "log:\n{}",
        agent.log()
    );
    // Every seq the spool accepted, before the fix and after, reaches the subscriber.
    stop_and_drain(
        &mut agent,
        &cfg,
        &sub,
        &[STREAM.to_string()],
        Duration::from_secs(30),
    )
    .await
    .assert_nothing_lost(&agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = broker(Secure::mutual_tls(&pki));
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.tls = Some(TlsConfig {
        ca_file: pki.ca_crt.clone(),
        client: Some((pki.client_crt.clone(), pki.client_key.clone())),
    });
    assert_delivers(&broker, &cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = broker(Secure::mutual_tls(&pki));
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.tls = Some(TlsConfig {
        ca_file: pki.ca_crt.clone(),
        client: None,
    });
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(15))
            .await,
        "log:\n{}",
        agent.log()
    );
    assert!(!agent.log().contains("Connected to the broker"));
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_over_tls_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    let broker = broker(Secure::password(&[("gw", "s3cret")], Some(&pki)));
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.tls = Some(TlsConfig {
        ca_file: pki.ca_crt.clone(),
        client: None,
    });
    cfg.auth = Some(AuthConfig {
        username: "gw".into(),
        password: "s3cret".into(),
    });
    assert_delivers(&broker, &cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gives_a_clear_error_and_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(Secure::password(&[("gw", "s3cret")], None));
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.auth = Some(AuthConfig {
        username: "gw".into(),
        password: "wrong-password".into(),
    });
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("the broker refused the connection", Duration::from_secs(15))
            .await,
        "log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("uplink.auth"),
        "the error should name the config key:\n{log}"
    );
    assert!(
        !log.contains("wrong-password"),
        "the password leaked into the log"
    );
    assert!(agent.terminate().success());
}
