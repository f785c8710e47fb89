//! Config validation, and one poll against a scripted device on a loopback socket (the real
//! device tests, against pymodbus, are in tests/modbus.rs).

use super::*;
use crate::record::{Body, LOSS_STREAM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(yaml: &str) -> ModbusConfig {
    serde_yaml::from_str(yaml).unwrap()
}

fn issue_paths(yaml: &str) -> Vec<(String, String)> {
    config(yaml)
        .validate()
        .into_iter()
        .map(|i| (i.path, i.message))
        .collect()
}

const TCP: &str = "name: meter\ntcp: {host: 127.0.0.1, port: 5020}\n";

#[test]
fn defaults_and_a_valid_map() {
    let c = config(&format!(
        "{TCP}registers:\n  - {{field: v, function: holding, address: 0}}\n  - {{field: on, function: coil, address: 3}}\n  - {{field: e, function: input, address: 65532, type: f64, count: 4, word_order: little, byte_order: little, scale: 0.5, offset: 1}}\n"
    ));
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    assert_eq!((c.unit, c.interval_ms, c.timeout_ms), (1, 10_000, 1_000));
    assert_eq!(c.registers[0].value_type(), ValueType::U16);
    assert_eq!(c.registers[1].value_type(), ValueType::Bool);
    let rtu = config(
        "name: m\nrtu: {path: /dev/ttyUSB0, baud: 19200, parity: even}\nregisters: [{field: v, function: input, address: 0}]\n",
    );
    assert!(rtu.validate().is_empty(), "{:?}", rtu.validate());
    assert_eq!(rtu.rtu.as_ref().map(|r| r.parity), Some(Parity::Even));
}

#[test]
fn bad_maps_name_the_entry_and_key() {
    let paths = issue_paths(&format!(
        "{TCP}registers:\n  - {{field: a, function: holding, address: 0, type: f32, count: 1}}\n  - {{field: a, function: holding, address: 2}}\n  - {{field: b, function: holding, address: 65535, type: u32}}\n  - {{field: c, function: coil, address: 0, type: u16}}\n  - {{field: d, function: input, address: 70000}}\n  - {{field: e, function: input, address: 0, type: bool}}\n  - {{field: tag.x, function: input, address: 1, scale: 0}}\n"
    ));
    let got: Vec<&str> = paths.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        got,
        [
            "registers[0].count",
            "registers[1].field",
            "registers[2].address",
            "registers[3].type",
            "registers[4].address",
            "registers[5].type",
            "registers[6].field",
            "registers[6].scale",
        ],
        "{paths:#?}"
    );
    assert!(
        paths[0]
            .1
            .contains("count 1 does not match type f32, which spans 2")
    );
    assert!(paths[1].1.contains("already used by registers[0]"));
    assert!(paths[2].1.contains("address overflow"));
    assert!(paths[4].1.contains("between 0 and 65535, got 70000"));
}

#[test]
fn link_unit_and_timing_are_checked() {
    let map = "registers: [{field: v, function: holding, address: 0}]\n";
    let paths = |yaml: &str| -> Vec<String> {
        issue_paths(&format!("{yaml}{map}"))
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    assert_eq!(paths("name: m\n"), [""]);
    assert_eq!(
        paths("name: m\ntcp: {host: a}\nrtu: {path: /dev/ttyS0}\n"),
        ["rtu"]
    );
    assert_eq!(
        paths("name: m\nrtu: {path: ttyS0, baud: 1, data_bits: 9, stop_bits: 3}\nunit: 0\n"),
        [
            "rtu.path",
            "rtu.baud",
            "rtu.data_bits",
            "rtu.stop_bits",
            "unit"
        ]
    );
    assert_eq!(
        paths("name: m\ntcp: {host: a, port: 0}\ninterval_ms: 1000\ntimeout_ms: 2000\n"),
        ["tcp.port", "timeout_ms"]
    );
    // An unknown type is a parse error that names the key.
    let err = crate::collectors::CollectorConfig::from_yaml(
        serde_yaml::from_str(&format!(
            "type: modbus\n{TCP}registers:\n  - {{field: v, function: holding, address: 0, type: u17}}\n"
        ))
        .unwrap(),
    )
    .unwrap_err();
    assert_eq!(err[0].path, "registers[0].type");
    assert!(err[0].message.contains("u17"), "{:?}", err[0]);
}

/// A scripted Modbus TCP device: answers each request with what `answer` makes of its PDU
/// (`None`: no answer at all). Returns its port.
async fn scripted_device(answer: fn(&[u8]) -> Option<Vec<u8>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut header = [0u8; 7];
                while sock.read_exact(&mut header).await.is_ok() {
                    let len = u16::from_be_bytes([header[4], header[5]]) as usize;
                    let mut pdu = vec![0u8; len.saturating_sub(1)];
                    if sock.read_exact(&mut pdu).await.is_err() {
                        return;
                    }
                    let Some(reply) = answer(&pdu) else { continue };
                    let mut frame = header[..4].to_vec();
                    frame.extend_from_slice(&((reply.len() + 1) as u16).to_be_bytes());
                    frame.push(header[6]);
                    frame.extend_from_slice(&reply);
                    if sock.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Holding registers answer `address + i` for each register; address 100 and up is illegal,
/// and input registers never answer.
fn device(pdu: &[u8]) -> Option<Vec<u8>> {
    let address = u16::from_be_bytes([pdu[1], pdu[2]]);
    let count = u16::from_be_bytes([pdu[3], pdu[4]]);
    match pdu[0] {
        3 if address >= 100 => Some(vec![0x83, 2]),
        3 => {
            let mut r = vec![3, (count * 2) as u8];
            for i in 0..count {
                r.extend_from_slice(&(address + i).to_be_bytes());
            }
            Some(r)
        }
        _ => None,
    }
}

fn losses(readings: &[Reading]) -> Vec<(String, u64, String)> {
    readings
        .iter()
        .filter(|r| r.stream == LOSS_STREAM)
        .map(|r| {
            let Body::Fields(f) = &r.body else {
                panic!("loss fields")
            };
            let get = |n: &str| f.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let (Some(Value::Str(reason)), Some(Value::U64(count)), Some(Value::Str(sample))) =
                (get("reason"), get("count"), get("sample"))
            else {
                panic!("loss record {f:?}")
            };
            (reason, count, sample)
        })
        .collect()
}

#[tokio::test]
async fn exceptions_and_silence_are_losses_and_the_schedule_goes_on() {
    let port = scripted_device(device).await;
    let c = config(&format!(
        "name: meter\ntcp: {{host: 127.0.0.1, port: {port}}}\ninterval_ms: 100\ntimeout_ms: 50\ntags: {{site: a}}\nregisters:\n  - {{field: a, function: holding, address: 10}}\n  - {{field: b, function: holding, address: 11, type: u32}}\n  - {{field: bad, function: holding, address: 100}}\n  - {{field: silent, function: input, address: 0}}\n"
    ));
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    let (ctx, mut rx) = CollectorContext::new_test("meter");
    let stop = ctx.shutdown.clone();
    let task = tokio::spawn(c.build().run(ctx));
    // Three polls, each with its reading of the fields that did answer.
    let mut readings = Vec::new();
    while readings
        .iter()
        .filter(|r: &&Reading| r.stream == "meter")
        .count()
        < 3
    {
        let intake = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the collector keeps polling")
            .expect("intake open");
        readings.extend(intake.readings);
    }
    let first = readings.iter().find(|r| r.stream == "meter").unwrap();
    assert_eq!(
        first.body,
        Body::Fields(vec![
            ("a".into(), Value::U64(10)),
            ("b".into(), Value::U64((11 << 16) | 12)),
            ("tag.site".into(), Value::Str("a".into())),
        ])
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    while let Ok(intake) = rx.try_recv() {
        readings.extend(intake.readings);
    }
    let lost = losses(&readings);
    let count = |reason: &str| -> u64 {
        lost.iter()
            .filter(|(r, _, _)| r == reason)
            .map(|(_, n, _)| n)
            .sum()
    };
    let polls = readings.iter().filter(|r| r.stream == "meter").count() as u64;
    // One of each per poll; the poll that shutdown cut short may have counted its exception
    // (or its timeout) without sending its reading.
    for reason in ["modbus_exception", "timeout"] {
        let n = count(reason);
        assert!(
            n == polls || n == polls + 1,
            "{reason}: {n} in {polls} polls: {lost:?}"
        );
    }
    let sample = |reason: &str| {
        lost.iter()
            .find(|(r, _, _)| r == reason)
            .map(|(_, _, s)| s.clone())
            .unwrap()
    };
    assert_eq!(
        sample("modbus_exception"),
        "unit 1 holding 100+1: exception 2 (IllegalDataAddress)"
    );
    assert_eq!(
        sample("timeout"),
        "unit 1 input 0+1: no answer within 50 ms"
    );
}

#[tokio::test]
async fn a_device_that_is_not_there_is_a_failed_loss_not_an_error() {
    // A port with nothing listening: bind, learn the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = config(&format!(
        "name: meter\ntcp: {{host: 127.0.0.1, port: {port}}}\ninterval_ms: 100\ntimeout_ms: 50\nregisters: [{{field: a, function: holding, address: 0}}, {{field: b, function: input, address: 0}}]\n"
    ));
    let (ctx, mut rx) = CollectorContext::new_test("meter");
    let stop = ctx.shutdown.clone();
    let task = tokio::spawn(c.build().run(ctx));
    tokio::time::sleep(Duration::from_millis(350)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let mut readings = Vec::new();
    while let Ok(intake) = rx.try_recv() {
        readings.extend(intake.readings);
    }
    let lost = losses(&readings);
    assert_eq!(lost.len(), 1, "{lost:?}");
    let (reason, count, sample) = &lost[0];
    assert_eq!(reason, "failed");
    // Two requests per poll, at least two polls.
    assert!(*count >= 4 && count % 2 == 0, "{lost:?}");
    assert!(sample.contains("cannot connect to 127.0.0.1"), "{sample}");
}

/// Answers every read of input registers with one register more than asked for, and coils
/// with a function code that does not match.
fn confused_device(pdu: &[u8]) -> Option<Vec<u8>> {
    let count = u16::from_be_bytes([pdu[3], pdu[4]]);
    match pdu[0] {
        4 => {
            let mut r = vec![4, ((count + 1) * 2) as u8];
            r.extend(std::iter::repeat_n(0u8, (count as usize + 1) * 2));
            Some(r)
        }
        1 => Some(vec![3, 2, 0, 1]),
        _ => None,
    }
}

#[tokio::test]
async fn answers_that_do_not_match_the_request_are_losses_not_panics() {
    let port = scripted_device(confused_device).await;
    let c = config(&format!(
        "name: meter\ntcp: {{host: 127.0.0.1, port: {port}}}\ninterval_ms: 100\ntimeout_ms: 50\nregisters: [{{field: a, function: input, address: 0, type: u32}}, {{field: b, function: coil, address: 0}}]\n"
    ));
    let (ctx, mut rx) = CollectorContext::new_test("meter");
    let stop = ctx.shutdown.clone();
    let task = tokio::spawn(c.build().run(ctx));
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let mut readings = Vec::new();
    while let Ok(intake) = rx.try_recv() {
        readings.extend(intake.readings);
    }
    assert!(
        readings.iter().all(|r| r.stream == LOSS_STREAM),
        "{readings:?}"
    );
    let lost = losses(&readings);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, "failed");
    assert!(lost[0].1 >= 2, "{lost:?}");
    assert!(lost[0].2.starts_with("unit 1 input 0+2: "), "{lost:?}");
}
