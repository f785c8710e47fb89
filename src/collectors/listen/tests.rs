//! The listen protocol over a real unix socket and TCP port; the spool's receipts are answered
//! by the test (the end-to-end test with the real spool is tests/listen.rs).

use super::*;
use crate::record::{Body, LOSS_STREAM, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;

fn config(dir: &std::path::Path, extra: &str) -> ListenConfig {
    let yaml = format!(
        "name: app\nsocket: {}\nmax_line_bytes: 64\n{extra}",
        dir.join("push.sock").display()
    );
    let c: ListenConfig = serde_yaml::from_str(&yaml).unwrap();
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c
}

/// Starts the collector; intakes are answered with `receipt` and collected.
async fn start(
    c: &ListenConfig,
    receipt: bool,
) -> (
    CollectorContext,
    tokio::task::JoinHandle<Result<(), CollectorError>>,
    tokio::sync::mpsc::UnboundedReceiver<Vec<Reading>>,
) {
    let (ctx, mut rx) = CollectorContext::new_test("app");
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(intake) = rx.recv().await {
            let _ = seen_tx.send(intake.readings);
            if let Some(tx) = intake.committed {
                let _ = tx.send(receipt);
            }
        }
    });
    let task = tokio::spawn(c.build().run(ctx.clone()));
    let path = std::path::PathBuf::from(&c.socket);
    for _ in 0..1000 {
        if UnixStream::connect(&path).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (ctx, task, seen)
}

async fn exchange(stream: &mut UnixStream, input: &[u8], answers: usize) -> Vec<String> {
    stream.write_all(input).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut out = Vec::new();
    for _ in 0..answers {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        out.push(line.trim_end().to_string());
    }
    out
}

#[tokio::test]
async fn good_bad_and_oversized_lines_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "tags: {app: pump}\n");
    let (ctx, task, mut seen) = start(&c, true).await;
    let mode = std::fs::metadata(&c.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o660);
    let mut s = UnixStream::connect(&c.socket).await.unwrap();
    let long = format!("{{\"x\": \"{}\"}}\n", "a".repeat(100));
    let input = format!("{{\"v\": 1}}\n{{\"v\": 2}}\nnot json\n{long}{{\"v\": 3}}\n");
    let answers = exchange(&mut s, input.as_bytes(), 4).await;
    assert_eq!(answers[0], "ok 2");
    assert!(answers[1].starts_with("error 1 malformed"), "{answers:?}");
    assert_eq!(answers[2], "error 1 line over max_line_bytes 64");
    assert_eq!(answers[3], "ok 1");
    let readings = seen.recv().await.unwrap();
    let data: Vec<&Reading> = readings.iter().filter(|r| r.stream == "app").collect();
    assert_eq!(data.len(), 3);
    let Body::Fields(f) = &data[2].body else {
        panic!()
    };
    assert_eq!(f[0], ("v".into(), Value::I64(3)));
    assert_eq!(f[1], ("tag.app".into(), Value::Str("pump".into())));
    ctx.shutdown.cancel();
    task.await.unwrap().unwrap();
    // The refusals are reported at the latest when the collector stops.
    let mut reasons = Vec::new();
    while let Ok(r) = seen.try_recv() {
        for l in r.iter().filter(|r| r.stream == LOSS_STREAM) {
            let Body::Fields(f) = &l.body else { panic!() };
            reasons.push(f[2].1.clone());
        }
    }
    reasons.sort_by_key(|v| format!("{v:?}"));
    assert_eq!(
        reasons,
        [
            Value::Str("malformed".into()),
            Value::Str("oversized".into())
        ]
    );
    assert!(!std::path::Path::new(&c.socket).exists());
}

#[tokio::test]
async fn lines_not_stored_are_answered_retry() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "format: influx\n");
    let (ctx, task, _seen) = start(&c, false).await;
    let mut s = UnixStream::connect(&c.socket).await.unwrap();
    let answers = exchange(&mut s, b"m v=1\nm v=2\n", 1).await;
    assert_eq!(answers, ["retry 2 not stored: spool full or failing"]);
    ctx.shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_silent_client_does_not_block_others_and_extra_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = config(dir.path(), &format!("max_clients: 3\ntcp_port: {port}\n"));
    let (ctx, task, _seen) = start(&c, true).await;
    // The wait loop in `start` connected once; that connection is gone by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A client that sends half a line and never reads.
    let mut silent = UnixStream::connect(&c.socket).await.unwrap();
    silent.write_all(b"{\"v\":").await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(b"{\"v\": 1}\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(&mut tcp).read_line(&mut line).await.unwrap();
    assert_eq!(line, "ok 1\n");
    let mut third = UnixStream::connect(&c.socket).await.unwrap();
    assert_eq!(exchange(&mut third, b"{\"v\": 2}\n", 1).await, ["ok 1"]);
    let mut fourth = UnixStream::connect(&c.socket).await.unwrap();
    assert_eq!(
        exchange(&mut fourth, b"", 1).await,
        ["retry 0 too many clients"]
    );
    ctx.shutdown.cancel();
    task.await.unwrap().unwrap();
    let mut rest = String::new();
    BufReader::new(&mut silent)
        .read_line(&mut rest)
        .await
        .unwrap();
    assert_eq!(rest, "retry 0 shutting down\n");
}

#[test]
fn bad_config_is_reported() {
    let c: ListenConfig = serde_yaml::from_str(
        "name: a\nsocket: push.sock\nsocket_mode: '0999'\ntcp_port: 0\nmax_clients: 0\n",
    )
    .unwrap();
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(paths, ["socket", "socket_mode", "tcp_port", "max_clients"]);
}
