//! The command channel against a real Mosquitto, with commands published by `mosquitto_pub`.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts, mosquitto_pub};
use common::replies::{REPLIES, final_reply, replies};
use common::subscriber::Subscriber;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::path::Path;
use std::time::Duration;

const COMMANDS: &str = "ferry/test-gw/commands";

fn broker() -> Broker {
    Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    })
}

fn send(broker: &Broker, payload: &str) {
    let out = mosquitto_pub(
        broker.plain_port(),
        &["-q", "1", "-t", COMMANDS, "-m", payload],
    );
    assert!(out.status.success(), "mosquitto_pub failed: {out:?}");
}

/// A config with extra top-level YAML appended.
fn config(dir: &Path, port: u16, collectors: &[&str], extra: &str) -> String {
    let mut cfg = AgentConfig::new(dir, port);
    cfg.collectors = collectors.iter().map(|s| s.to_string()).collect();
    format!("{}{extra}", cfg.render())
}

/// An executable script that prints each argument on its own line, in brackets, and appends a
/// line to `ran.log` beside it.
fn argv_script(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("show-args.sh");
    let log = dir.join("ran.log");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho run >> '{}'\nfor a in \"$@\"; do echo \"[$a]\"; done\n",
            log.display()
        ),
    )
    .unwrap();
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).unwrap();
    p
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("ran.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Where the `hang` action writes the pid of the `sleep` it leaves running in the background.
fn grandchild_pid_file(dir: &Path) -> std::path::PathBuf {
    dir.join("grandchild.pid")
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The actions: `show_args` runs [`argv_script`]; `hang` is a shell that starts a `sleep` in the
/// background (its pid in [`grandchild_pid_file`]) and waits for it, past its 300 ms timeout;
/// `slow` finishes in 2 s.
fn actions_yaml(dir: &Path, script: &Path) -> String {
    format!(
        "commands:
  actions:
    - name: show_args
      program: {script}
      args: [fixed]
      params:
        - {{name: target, type: string, required: true}}
        - {{name: count, type: integer}}
      timeout_ms: 5000
    - name: hang
      program: /bin/sh
      args: [\"-c\", \"sleep 30 & echo $! > {pid_file}; wait\"]
      timeout_ms: 300
    - name: slow
      program: /bin/sleep
      args: [\"2\"]
      timeout_ms: 10000
",
        script = script.display(),
        pid_file = grandchild_pid_file(dir).display()
    )
}

/// The set-up every command test shares: a persistent Mosquitto, a subscriber to everything
/// under `ferry/`, and ferry with the config `yaml(dir, broker port)` returns, started and
/// subscribed to its commands topic.
struct Rig {
    // Dropped in this order: ferry first, the directory last.
    agent: Agent,
    sub: Subscriber,
    broker: Broker,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(yaml: impl FnOnce(&Path, u16) -> String) -> Rig {
        let broker = broker();
        let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::spawn(dir.path(), &yaml(dir.path(), broker.agent_port()));
        let rig = Rig {
            agent,
            sub,
            broker,
            dir,
        };
        rig.wait_subscribed(1).await;
        rig
    }

    /// [`Rig::start`] with no collector and the actions of [`actions_yaml`].
    async fn with_actions() -> Rig {
        Rig::start(|dir, port| {
            let script = argv_script(dir);
            config(dir, port, &[], &actions_yaml(dir, &script))
        })
        .await
    }

    /// [`Rig::start`] with one system collector that samples every 30 s: a reload to a shorter
    /// interval is visible at once. Returns the config text too.
    async fn slow_collector() -> (Rig, String) {
        let mut slow = String::new();
        let rig = Rig::start(|dir, port| {
            slow = config(
                dir,
                port,
                &["type: system\nname: system\ninterval_ms: 30000"],
                "",
            );
            slow.clone()
        })
        .await;
        (rig, slow)
    }

    /// Waits until ferry has subscribed to its commands `count` times (the log spans restarts).
    async fn wait_subscribed(&self, count: usize) {
        assert!(
            self.agent
                .wait_for_log_count("Subscribed to commands", count, Duration::from_secs(15))
                .await,
            "ferry did not subscribe to its commands:\n{}",
            self.agent.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_ins_reply() {
    let Rig {
        mut agent,
        sub,
        broker,
        dir: _dir,
    } = Rig::start(|dir, port| {
        let mut cfg = AgentConfig::new(dir, port);
        cfg.linger_ms = 60_000;
        cfg.collectors = vec!["type: system\nname: system\ninterval_ms: 60000".into()];
        cfg.render()
    })
    .await;

    send(&broker, r#"{"id":"p1","name":"ping"}"#);
    let r = final_reply(&sub, &agent, "p1", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["result"]["pong"], true);
    assert!(r["seq"].as_u64().is_some() && r["device"] == "test-gw");

    send(&broker, r#"{"id":"s1","name":"status"}"#);
    let r = final_reply(&sub, &agent, "s1", Duration::from_secs(10)).await;
    let st = &r["result"];
    assert_eq!(st["connection"]["connected"], true);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["spool"]["streams"].is_array());
    assert!(st["config_hash"].as_str().unwrap().len() == 16);
    assert_eq!(st["collectors"][0]["name"], "system");

    // The first sample is held by the 60 s linger: flush sends it now.
    let early = sub
        .wait_until(Duration::from_secs(3), |s| !s.records("system").is_empty())
        .await;
    assert!(!early, "the batch should linger");
    send(&broker, r#"{"id":"f1","name":"flush"}"#);
    assert_eq!(
        final_reply(&sub, &agent, "f1", Duration::from_secs(10)).await["status"],
        "ok"
    );
    assert!(
        sub.wait_for_seq("system", 1, Duration::from_secs(5)).await,
        "flush did not send the lingering batch"
    );

    // sample_now takes a sample although the interval is a minute.
    send(
        &broker,
        r#"{"id":"n1","name":"sample_now","args":{"collector":"system"}}"#,
    );
    assert_eq!(
        final_reply(&sub, &agent, "n1", Duration::from_secs(10)).await["status"],
        "ok"
    );
    send(&broker, r#"{"id":"f2","name":"flush"}"#);
    assert!(
        sub.wait_for_seq("system", 2, Duration::from_secs(10)).await,
        "sample_now took no sample"
    );

    // set_interval: from a minute to 200 ms.
    send(
        &broker,
        r#"{"id":"i1","name":"set_interval","args":{"collector":"system","interval_ms":200}}"#,
    );
    assert_eq!(
        final_reply(&sub, &agent, "i1", Duration::from_secs(10)).await["status"],
        "ok"
    );
    send(
        &broker,
        r#"{"id":"i2","name":"set_interval","args":{"collector":"nope","interval_ms":200}}"#,
    );
    assert_eq!(
        final_reply(&sub, &agent, "i2", Duration::from_secs(10)).await["status"],
        "error"
    );
    send(&broker, r#"{"id":"f3","name":"flush"}"#);
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(&broker, r#"{"id":"f4","name":"flush"}"#);
    assert!(
        sub.wait_for_seq("system", 8, Duration::from_secs(10)).await,
        "interval did not change: {:?}",
        sub.unique_seqs("system")
    );

    // set_log_level
    send(
        &broker,
        r#"{"id":"l1","name":"set_log_level","args":{"level":"trace"}}"#,
    );
    assert_eq!(
        final_reply(&sub, &agent, "l1", Duration::from_secs(10)).await["status"],
        "ok"
    );
    send(
        &broker,
        r#"{"id":"l2","name":"set_log_level","args":{"level":"loud"}}"#,
    );
    let r = final_reply(&sub, &agent, "l2", Duration::from_secs(10)).await;
    assert!(r["error"].as_str().unwrap().contains("unknown level"));

    // Unknown and malformed commands get error replies.
    send(&broker, r#"{"id":"u1","name":"format_disk"}"#);
    let r = final_reply(&sub, &agent, "u1", Duration::from_secs(10)).await;
    assert!(r["error"].as_str().unwrap().contains("unknown command"));
    send(&broker, "this is not json");
    assert!(
        sub.wait_until(Duration::from_secs(10), |s| s
            .messages_on(REPLIES)
            .iter()
            .filter_map(|m| m.json.clone())
            .any(|j| j["id"].is_null()
                && j["error"].as_str().is_some_and(|e| e.contains("malformed"))))
            .await,
        "no error reply to a malformed command"
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_applies_a_good_file_and_refuses_a_bad_one() {
    let (
        Rig {
            mut agent,
            sub,
            broker,
            dir: _dir,
        },
        slow,
    ) = Rig::slow_collector().await;

    // A broken file is refused with its errors; the running config stays.
    std::fs::write(
        agent.config_path(),
        slow.replace("interval_ms: 30000", "interval_ms: fast"),
    )
    .unwrap();
    send(&broker, r#"{"id":"r1","name":"reload_config"}"#);
    let r = final_reply(&sub, &agent, "r1", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "error");
    assert!(r["details"].to_string().contains("interval_ms"), "{r}");
    assert!(agent.is_running());

    // A good file with a faster interval changes behaviour without a restart.
    let fast = slow.replace("interval_ms: 30000", "interval_ms: 200");
    std::fs::write(agent.config_path(), &fast).unwrap();
    send(&broker, r#"{"id":"r2","name":"reload_config"}"#);
    let r = final_reply(&sub, &agent, "r2", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(
        r["result"]["changes"]
            .to_string()
            .contains("collector system"),
        "{r}"
    );
    assert!(
        sub.wait_for_seq("system", 6, Duration::from_secs(10)).await,
        "the reloaded interval did not apply"
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_keeps_running_on_a_bad_one() {
    let (
        Rig {
            mut agent,
            sub,
            broker: _broker,
            dir: _dir,
        },
        slow,
    ) = Rig::slow_collector().await;

    std::fs::write(agent.config_path(), slow.replace("uplink:", "uplinkk:")).unwrap();
    agent.sighup();
    assert!(
        agent
            .wait_for_log(
                "Reload refused, the running config stays",
                Duration::from_secs(10)
            )
            .await,
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("uplinkk"),
        "the validation error is logged"
    );
    assert!(agent.is_running());

    std::fs::write(
        agent.config_path(),
        slow.replace("interval_ms: 30000", "interval_ms: 200"),
    )
    .unwrap();
    agent.sighup();
    assert!(
        agent
            .wait_for_log("Config reloaded", Duration::from_secs(10))
            .await,
        "{}",
        agent.log()
    );
    assert!(
        sub.wait_for_seq("system", 6, Duration::from_secs(10)).await,
        "interval did not change"
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_get_separate_argv_items_and_hanging_ones_are_killed() {
    let Rig {
        mut agent,
        sub,
        broker,
        dir,
    } = Rig::with_actions().await;

    send(
        &broker,
        r#"{"id":"a1","name":"show_args","args":{"target":"a.b c","count":3}}"#,
    );
    let r = final_reply(&sub, &agent, "a1", Duration::from_secs(10)).await;
    assert_eq!(
        r["status"], "error",
        "a space is not a valid string parameter: {r}"
    );

    send(
        &broker,
        r#"{"id":"a2","name":"show_args","args":{"target":"$(reboot);x","count":3}}"#,
    );
    assert_eq!(
        final_reply(&sub, &agent, "a2", Duration::from_secs(10)).await["status"],
        "error"
    );

    send(
        &broker,
        r#"{"id":"a3","name":"show_args","args":{"target":"host.example:80","count":3}}"#,
    );
    let r = final_reply(&sub, &agent, "a3", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["result"]["stdout"], "[fixed]\n[host.example:80]\n[3]\n");
    assert_eq!(r["result"]["exit_code"], 0);
    assert!(
        replies(&sub, "a3")
            .iter()
            .any(|x| x["status"] == "accepted")
    );

    send(&broker, r#"{"id":"h1","name":"hang"}"#);
    let r = final_reply(&sub, &agent, "h1", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "error");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{r}"
    );
    // The whole process group is killed, also the shell's background grandchild.
    let pid_file = grandchild_pid_file(dir.path());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("the hang action wrote no {}: {e}", pid_file.display()))
        .trim()
        .parse()
        .expect("a pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "the background grandchild {pid} outlived the timeout"
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_ferry_is_stopped_runs_once_after_start() {
    // The first run creates the persistent session with the subscription.
    let Rig {
        mut agent,
        sub,
        broker,
        dir,
    } = Rig::with_actions().await;
    assert!(agent.terminate().success());

    send(
        &broker,
        r#"{"id":"off1","name":"show_args","args":{"target":"x"}}"#,
    );
    agent.start_again();
    let r = final_reply(&sub, &agent, "off1", Duration::from_secs(15)).await;
    assert_eq!(r["status"], "ok", "{r}");
    // A restart does not run it again (the broker has it acknowledged; the ledger remembers).
    assert!(agent.terminate().success());
    agent.start_again();
    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(15))
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs(dir.path()), 1);
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_runs_once_and_expired_commands_are_refused() {
    let Rig {
        mut agent,
        sub,
        broker,
        dir,
    } = Rig::with_actions().await;

    let cmd = r#"{"id":"d1","name":"show_args","args":{"target":"x"}}"#;
    send(&broker, cmd);
    final_reply(&sub, &agent, "d1", Duration::from_secs(10)).await;
    send(&broker, cmd);
    assert!(
        sub.wait_until(Duration::from_secs(10), |s| replies(s, "d1")
            .iter()
            .filter(|r| r["status"] == "ok")
            .count()
            >= 2)
            .await,
        "the repeated id got no reply"
    );
    assert_eq!(runs(dir.path()), 1, "the same id ran twice");

    send(&broker, r#"{"id":"e1","name":"ping","expires_at":1000}"#);
    let r = final_reply(&sub, &agent, "e1", Duration::from_secs(10)).await;
    assert_eq!(r["status"], "error");
    assert_eq!(r["error"], "expired");
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_produced_while_the_link_is_down_arrives_after_it_returns() {
    let Rig {
        mut agent,
        sub,
        mut broker,
        dir: _dir,
    } = Rig::with_actions().await;

    send(&broker, r#"{"id":"slow1","name":"slow"}"#);
    assert!(
        sub.wait_until(Duration::from_secs(10), |s| replies(s, "slow1")
            .iter()
            .any(|r| r["status"] == "accepted"))
            .await
    );
    broker.stop();
    // The action finishes (2 s) while the broker is down; its reply waits in the spool.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.log().contains("Action finished"), "{}", agent.log());
    broker.start_again();
    let r = final_reply(&sub, &agent, "slow1", Duration::from_secs(20)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(agent.terminate().success());
}

/// `commands:` requiring signatures with the key in `dir/cmd.key` (id k1).
fn signature_yaml(dir: &Path) -> String {
    format!(
        "commands:\n  require_signature: true\n  keys:\n    - {{id: k1, key_file: {}}}\n",
        dir.join("cmd.key").display()
    )
}

fn sign(req: &Value, key: &[u8]) -> String {
    let mut body = serde_json::Map::new();
    for k in ["args", "expires_at", "id", "name"] {
        if let Some(v) = req.get(k) {
            body.insert(k.into(), v.clone());
        }
    }
    body.entry("args").or_insert(json!({}));
    // serde_json's map is ordered by key, like Python's sort_keys=True.
    let canonical = serde_json::to_string(&Value::Object(body)).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(canonical.as_bytes());
    let mut signed = req.clone();
    signed["sig"] = json!({"kid": "k1", "hmac": hex::encode(mac.finalize().into_bytes())});
    signed.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_when_required() {
    let key = b"0123456789abcdef0123456789abcdef";
    let Rig {
        mut agent,
        sub,
        broker,
        dir: _dir,
    } = Rig::start(|dir, port| {
        std::fs::write(dir.join("cmd.key"), key).unwrap();
        config(dir, port, &[], &signature_yaml(dir))
    })
    .await;

    send(&broker, r#"{"id":"u1","name":"ping"}"#);
    let r = final_reply(&sub, &agent, "u1", Duration::from_secs(10)).await;
    assert!(r["error"].as_str().unwrap().contains("not signed"), "{r}");

    let signed = sign(
        &json!({"id": "s1", "name": "ping", "args": {"x": [1, "b"]}}),
        key,
    );
    send(&broker, &signed);
    assert_eq!(
        final_reply(&sub, &agent, "s1", Duration::from_secs(10)).await["status"],
        "ok"
    );

    let forged = sign(
        &json!({"id": "s2", "name": "ping"}),
        b"another key of enough length!!",
    );
    send(&broker, &forged);
    let r = final_reply(&sub, &agent, "s2", Duration::from_secs(10)).await;
    assert!(
        r["error"].as_str().unwrap().contains("does not match"),
        "{r}"
    );

    send(&broker, &signed);
    assert!(
        sub.wait_until(Duration::from_secs(10), |s| replies(s, "s1")
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|e| e.contains("replayed"))))
            .await,
        "replay not refused"
    );
    // Both refusals are WARNs with their own message (recovered, nothing lost).
    let log = agent.log();
    for message in [
        "Command refused: signature check failed.",
        "Replayed signed command refused.",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(" WARN ") && l.contains(message)),
            "no WARN {message:?} in the log:\n{log}"
        );
    }
    // Counted: the unsigned and the forged one, and the replay.
    let refused = &agent.status_json().await["commands"]["refused"];
    assert_eq!(refused["unsigned"], 2, "{refused}");
    assert_eq!(refused["replayed"], 1, "{refused}");
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_signing_example_in_the_docs_is_accepted() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/COMMANDS.md")).unwrap();
    let start = doc
        .find("```python\n")
        .expect("a python example in docs/COMMANDS.md")
        + 10;
    let code = &doc[start..start + doc[start..].find("```").unwrap()];
    let key = "a-long-shared-secret-for-tests";
    let Rig {
        mut agent,
        sub,
        broker,
        dir,
    } = Rig::start(|dir, port| {
        std::fs::write(dir.join("cmd.key"), format!("{key}\n")).unwrap();
        std::fs::write(dir.join("sign.py"), code).unwrap();
        config(dir, port, &[], &signature_yaml(dir))
    })
    .await;
    let out = std::process::Command::new("python3")
        .arg(dir.path().join("sign.py"))
        .env("FERRY_KEY_FILE", dir.path().join("cmd.key"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signed = String::from_utf8(out.stdout).unwrap();
    let id = serde_json::from_str::<Value>(signed.trim()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    send(&broker, signed.trim());
    let r = final_reply(&sub, &agent, &id, Duration::from_secs(10)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(agent.terminate().success());
}

/// A signed reload_config that changes uplink settings reconnects before its PUBACK goes out,
/// so the broker redelivers it (DUP): that redelivery gets only the stored reply, not a
/// "replayed" error on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_redelivery_gets_only_its_stored_reply() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let key = b"0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("cmd.key"), key).unwrap();
    let extra = format!(
        "commands:\n  require_signature: true\n  keys:\n    - {{id: k1, key_file: {}}}\n",
        dir.path().join("cmd.key").display()
    );
    let yaml = config(dir.path(), broker.agent_port(), &[], &extra);
    let mut agent = Agent::spawn(dir.path(), &yaml);
    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(15))
            .await,
        "{}",
        agent.log()
    );
    let changed = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace("keepalive_s: 5", "keepalive_s: 6");
    std::fs::write(agent.config_path(), changed).unwrap();
    send(
        &broker,
        &sign(&json!({"id": "r1", "name": "reload_config"}), key),
    );
    let r = final_reply(&sub, &agent, "r1", Duration::from_secs(15)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(
        agent
            .wait_for_log_count("Connected to the broker.", 2, Duration::from_secs(15))
            .await
    );
    // The redelivery arrives on the new connection; a marker sent after it is answered after it.
    send(&broker, &sign(&json!({"id": "m1", "name": "ping"}), key));
    final_reply(&sub, &agent, "m1", Duration::from_secs(15)).await;
    let all = replies(&sub, "r1");
    assert!(
        all.iter().all(|r| r["status"] == "ok"),
        "a redelivery was refused: {all:?}"
    );
    let log = agent.log();
    println!(
        "signed redelivery: {} replies to r1, redelivered: {}",
        all.len(),
        log.contains("Command id seen before")
    );
    assert!(!log.contains("Replayed signed command refused"), "{log}");
    assert!(
        log.contains("Command id seen before"),
        "no redelivery happened; the test proves nothing:\n{log}"
    );
    assert!(agent.terminate().success());
}

/// An action killed with ferry (SIGKILL) was acknowledged with its `accepted` reply, so the
/// broker never redelivers it: the restart itself sends the final `interrupted` reply, and the
/// action does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_interrupted_by_sigkill_gets_a_final_reply_after_restart() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("long.sh");
    let log = dir.path().join("ran.log");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho run >> '{}'\nsleep 30\n", log.display()),
    )
    .unwrap();
    let mut perm = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&script, perm).unwrap();
    let extra = format!(
        "commands:\n  actions:\n    - name: long\n      program: {}\n      timeout_ms: 60000\n",
        script.display()
    );
    let yaml = config(dir.path(), broker.agent_port(), &[], &extra);
    let mut agent = Agent::spawn(dir.path(), &yaml);
    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(15))
            .await,
        "{}",
        agent.log()
    );
    send(&broker, r#"{"id":"long1","name":"long"}"#);
    assert!(
        sub.wait_until(Duration::from_secs(15), |s| replies(s, "long1")
            .iter()
            .any(|r| r["status"] == "accepted"))
            .await,
        "{}",
        agent.log()
    );
    // The `accepted` reply can come before the script has started.
    let started = tokio::time::Instant::now();
    while runs(dir.path()) == 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs(dir.path()), 1);
    agent.kill9();
    agent.start_again();
    let r = final_reply(&sub, &agent, "long1", Duration::from_secs(20)).await;
    assert_eq!(r["status"], "error", "{r}");
    assert!(r["error"].as_str().unwrap().contains("interrupted"), "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(dir.path()), 1, "the action ran again");
    assert!(agent.terminate().success());
}

/// Processes whose process group is `pgid`, from /proc (zombies included: they are gone).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the name in parentheses: state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first().is_some_and(|s| *s != "Z") && f.get(2) == Some(&pgid.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_a_running_actions_whole_process_group() {
    // A grace well above ferry's own stop time, and below the 10 s the spool writer would be
    // held by a running action before the fix: the bound below tells the two apart.
    const GRACE: Duration = Duration::from_secs(8);
    let Rig {
        mut agent,
        sub,
        broker,
        dir,
    } = Rig::start(|dir, port| {
        let pgid_file = dir.join("group.pid");
        let extra = format!(
            "commands:\n  actions:\n    - name: forever\n      program: /bin/sh\n      args: [\"-c\", \"echo $$ > {}; sleep 1000 & sleep 1000\"]\n      timeout_ms: 600000\n",
            pgid_file.display()
        );
        config(dir, port, &[], &extra).replace(
            "shutdown_grace_ms: 2000",
            &format!("shutdown_grace_ms: {}", GRACE.as_millis()),
        )
    })
    .await;
    send(&broker, r#"{"id":"f1","name":"forever"}"#);
    let pgid_file = dir.path().join("group.pid");
    let started = tokio::time::Instant::now();
    let pgid = loop {
        let members = std::fs::read_to_string(&pgid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|g| (g, group_members(g)));
        // The shell, its background sleep and its foreground sleep.
        if let Some((g, m)) = members
            && m.len() >= 3
        {
            break g;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the action never started its children\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stopping = std::time::Instant::now();
    let status = agent.terminate();
    let took = stopping.elapsed();
    println!("SIGTERM with a running action: ferry exited in {took:?} (grace {GRACE:?})");
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert!(
        took < GRACE,
        "ferry took {took:?} to stop with an action running\n{}",
        agent.log()
    );
    let left = group_members(pgid);
    assert!(
        left.is_empty(),
        "processes of the action's group {pgid} outlived ferry: {left:?}"
    );
    // The final reply went out before ferry exited, or comes after a restart; either way
    // exactly one, `interrupted`, and the action does not run again.
    agent.start_again();
    let r = final_reply(&sub, &agent, "f1", Duration::from_secs(20)).await;
    assert_eq!(r["status"], "error", "{r}");
    assert!(r["error"].as_str().unwrap().contains("interrupted"), "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let finals = replies(&sub, "f1")
        .into_iter()
        .filter(|r| r["status"] != "accepted")
        .count();
    assert_eq!(finals, 1, "{:?}", replies(&sub, "f1"));
    assert!(
        group_members(pgid).is_empty(),
        "the action ran again after the restart"
    );
    assert!(agent.terminate().success());
}
