//! What a gateway in the field needs beyond the pipeline: journal priorities, one identity per
//! device, the small operator commands.

mod common;

use common::agent::{Agent, AgentConfig};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// Under systemd, stderr is the journal stream named by `JOURNAL_STREAM`; every line then
/// carries its syslog priority so that `journalctl -p warning` finds the warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lines_carry_their_priority_only_when_stderr_is_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    // No broker on this port: ferry warns that it cannot connect.
    let cfg = AgentConfig::new(dir.path(), common::ports::free_port());
    let log_path = dir.path().join("ferry.log");
    std::fs::write(&log_path, b"").unwrap();
    let meta = std::fs::metadata(&log_path).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut agent =
        Agent::spawn_with_env(dir.path(), &cfg.render(), &[("JOURNAL_STREAM", &stream)]);
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(30))
            .await,
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
    let log = agent.log();
    let warn = log
        .lines()
        .find(|l| l.contains("Cannot connect to the broker"))
        .expect("the warning line");
    assert!(warn.starts_with("<4>"), "a WARN is priority 4: {warn:?}");
    assert!(warn.contains("WARN"), "{warn:?}");
    let info = log
        .lines()
        .find(|l| l.contains(" INFO "))
        .unwrap_or_else(|| panic!("an INFO line in\n{log}"));
    assert!(info.starts_with("<6>"), "an INFO is priority 6: {info:?}");
    assert!(
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.starts_with('<')),
        "every line carries a priority:\n{log}"
    );

    // The variable alone (inherited by a shell of the unit) is not the journal: no prefix.
    let other = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(other.path(), common::ports::free_port());
    let mut agent =
        Agent::spawn_with_env(other.path(), &cfg.render(), &[("JOURNAL_STREAM", &stream)]);
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(30))
            .await,
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
    assert!(
        !agent.log().lines().any(|l| l.starts_with('<')),
        "no prefix when stderr is not the journal stream:\n{}",
        agent.log()
    );
}
