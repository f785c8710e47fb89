//! The file collector's poll mode end to end: the real `ferry` binary reads a fake sysfs tree
//! (thermal zones and 1-wire sensors in a temporary directory) by glob, scales the values and
//! its readings reach a real Mosquitto subscriber; a value that is not a number is reported
//! on `ferry.loss`.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Write then rename, as the kernel's sysfs never shows a half-written value.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn w1(milli_c: i64, crc_ok: bool) -> String {
    format!(
        "50 01 4b 46 7f ff 0c 10 1c : crc=1c {}\n50 01 4b 46 7f ff 0c 10 1c t={milli_c}\n",
        if crc_ok { "YES" } else { "NO" }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_reads_a_fake_sysfs_tree_by_glob_with_scale() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    let thermal = sys.join("class/thermal");
    write(&thermal.join("thermal_zone0/temp"), "45000\n");
    write(&thermal.join("thermal_zone1/temp"), "51500\n");
    // Not matched by the pattern: must not appear.
    write(&thermal.join("cooling_device0/cur_state"), "3\n");
    let w1_dir = sys.join("bus/w1/devices");
    write(&w1_dir.join("28-0000075a1b2c/w1_slave"), &w1(21_125, true));
    write(&w1_dir.join("28-0000075a9999/w1_slave"), &w1(85_000, false));

    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![format!(
        "type: file\nname: sensors\nmode: poll\ninterval_ms: 200\nscale: 0.001\ntags:\n  rack: r1\npaths:\n  - {}/thermal_zone*/temp\n  - {}/28-*/w1_slave",
        thermal.display(),
        w1_dir.display()
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());

    assert!(
        sub.wait_until(WAIT, |s| !s.records("sensors").is_empty())
            .await,
        "log:\n{}",
        agent.log()
    );
    let first = sub.records("sensors")[0]["fields"].clone();
    let want = serde_json::json!({
        "thermal_zone0.temp": 45.0,
        "thermal_zone1.temp": 51.5,
        "28-0000075a1b2c.w1_slave": 21.125,
        "tag.rack": "r1",
    });
    assert_eq!(first, want);

    // The bad CRC read is counted as malformed, with the file's first bytes as the sample.
    assert!(
        sub.wait_until(WAIT, |s| s
            .records("ferry.loss")
            .iter()
            .any(|r| r["fields"]["stream"] == "sensors"))
            .await
    );
    let loss = sub.records("ferry.loss")[0]["fields"].clone();
    assert_eq!(loss["reason"], "malformed");
    assert!(
        loss["sample"].as_str().unwrap().starts_with("50 01 4b"),
        "{loss}"
    );

    // A new value is picked up at a later interval.
    write(&thermal.join("thermal_zone0/temp"), "47250\n");
    assert!(
        sub.wait_until(WAIT, |s| s
            .records("sensors")
            .iter()
            .any(|r| r["fields"]["thermal_zone0.temp"] == 47.25))
            .await,
        "log:\n{}",
        agent.log()
    );
}
