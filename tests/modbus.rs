//! The modbus collector end to end: the real `ferry` binary polls a real Modbus device
//! (pymodbus's server, tests/common/modbus.rs) over TCP on loopback and over RTU on a socat
//! pty pair, and its readings and loss records arrive at a real Mosquitto subscriber.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::modbus::{ModbusDevice, Transport};
use common::pty::PtyPair;
use common::subscriber::Subscriber;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// Behaviour timeout: losses are reported within ferry's 10 s window, polls come every 300 ms.
const WAIT: Duration = Duration::from_secs(30);

fn broker() -> Broker {
    Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    })
}

/// Sum of `count` per `reason` of the loss records about `stream`.
fn losses(sub: &Subscriber, stream: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in sub.records("ferry.loss") {
        let f = &r["fields"];
        if f["stream"] == stream {
            *out.entry(f["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += f["count"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// The samples of the loss records about `stream` with `reason`.
fn samples(sub: &Subscriber, stream: &str, reason: &str) -> Vec<String> {
    sub.records("ferry.loss")
        .iter()
        .map(|r| &r["fields"])
        .filter(|f| f["stream"] == stream && f["reason"] == reason)
        .map(|f| f["sample"].as_str().unwrap_or("").to_string())
        .collect()
}

fn words_u32(v: u32) -> [u16; 2] {
    [(v >> 16) as u16, v as u16]
}

fn words_u64(v: u64) -> Vec<u16> {
    (0..4).rev().map(|i| (v >> (16 * i)) as u16).collect()
}

/// The collector item: `link` is the `tcp:` or `rtu:` line, `map` the `registers:` entries.
fn collector(link: &str, extra: &str, map: &[&str]) -> String {
    let mut y = format!(
        "type: modbus\nname: meter\n{link}\ninterval_ms: 300\ntimeout_ms: 200\n{extra}registers:\n"
    );
    for entry in map {
        y += &format!("  - {{{entry}}}\n");
    }
    y
}

async fn wait_for_readings(sub: &Subscriber, agent: &Agent, device: &ModbusDevice, n: usize) {
    assert!(
        sub.wait_until(WAIT, |s| s.records("meter").len() >= n)
            .await,
        "{} readings, {:?} lost\nferry log:\n{}\ndevice log:\n{}",
        sub.records("meter").len(),
        losses(sub, "meter"),
        agent.log(),
        device.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_values_of_every_type_and_order_arrive_with_one_request_per_group() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::ports::free_port();
    let i32_cdab = words_u32(-100_000i32 as u32);
    let f32_badc = words_u32(1.5f32.to_bits()).map(u16::swap_bytes);
    let f32_dcba = {
        let w = words_u32(100.0f32.to_bits()).map(u16::swap_bytes);
        [w[1], w[0]]
    };
    let mut holding: Vec<u16> = vec![0xFFFF, (-2i16) as u16];
    holding.extend(words_u32(0x1234_5678));
    holding.extend([i32_cdab[1], i32_cdab[0]]);
    holding.extend(words_u32(21.5f32.to_bits()));
    let cdab = words_u32((-3.25f32).to_bits());
    holding.extend([cdab[1], cdab[0]]);
    holding.extend(f32_badc);
    holding.extend(f32_dcba);
    holding.extend(words_u64(0x0123_4567_89AB_CDEF));
    holding.extend(words_u64((-5i64) as u64));
    holding.extend(words_u64(std::f64::consts::PI.to_bits()));
    holding.push(615);
    assert_eq!(holding.len(), 27);
    let map = json!({
        "1": {
            "holding": [[0, holding], [40, [7]]],
            "input": [[0, words_u32(70_000)]],
            "coil": [[0, [true, false, true]]],
            "discrete": [[5, [true]]],
        },
        "2": {"holding": [[0, [9]]]},
    });
    let device = ModbusDevice::start(dir.path(), "meter", Transport::Tcp(port), &map.to_string());
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![collector(
        &format!("tcp: {{host: 127.0.0.1, port: {port}}}"),
        "tags: {site: plant}\n",
        &[
            "field: u16, function: holding, address: 0",
            "field: i16, function: holding, address: 1, type: i16",
            "field: u32, function: holding, address: 2, type: u32, count: 2",
            "field: i32_cdab, function: holding, address: 4, type: i32, word_order: little",
            "field: f32, function: holding, address: 6, type: f32",
            "field: f32_cdab, function: holding, address: 8, type: f32, word_order: little",
            "field: f32_badc, function: holding, address: 10, type: f32, byte_order: little",
            "field: f32_dcba, function: holding, address: 12, type: f32, byte_order: little, word_order: little",
            "field: u64, function: holding, address: 14, type: u64",
            "field: i64, function: holding, address: 18, type: i64",
            "field: f64, function: holding, address: 22, type: f64",
            "field: scaled, function: holding, address: 26, type: i16, scale: 0.5, offset: -10",
            "field: after_gap, function: holding, address: 40",
            "field: input_u32, function: input, address: 0, type: u32",
            "field: c0, function: coil, address: 0",
            "field: c1, function: coil, address: 1",
            "field: c2, function: coil, address: 2",
            "field: d5, function: discrete, address: 5",
            "field: other_unit, function: holding, address: 0, unit: 2",
        ],
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    wait_for_readings(&sub, &agent, &device, 2).await;

    let r = &sub.records("meter")[0]["fields"];
    let expect = [
        ("u16", json!(65535)),
        ("i16", json!(-2)),
        ("u32", json!(0x1234_5678)),
        ("i32_cdab", json!(-100_000)),
        ("f32", json!(21.5)),
        ("f32_cdab", json!(-3.25)),
        ("f32_badc", json!(1.5)),
        ("f32_dcba", json!(100.0)),
        ("u64", json!(0x0123_4567_89AB_CDEFu64)),
        ("i64", json!(-5)),
        ("f64", json!(std::f64::consts::PI)),
        ("scaled", json!(297.5)),
        ("after_gap", json!(7)),
        ("input_u32", json!(70_000)),
        ("c0", json!(true)),
        ("c1", json!(false)),
        ("c2", json!(true)),
        ("d5", json!(true)),
        ("other_unit", json!(9)),
        ("tag.site", json!("plant")),
    ];
    for (field, value) in &expect {
        assert_eq!(&r[*field], value, "{field} in {r}");
    }
    assert_eq!(r.as_object().map(|o| o.len()), Some(expect.len()), "{r}");
    assert_eq!(losses(&sub, "meter"), BTreeMap::new());

    // 19 values, 6 requests per poll: holding 0-26 (13 values in one), holding 40 (a gap),
    // input 0-1, coils 0-2, discrete 5, and unit 2. The device saw exactly these, poll after
    // poll.
    let per_poll = [
        (1, 3, 0),
        (1, 3, 40),
        (1, 4, 0),
        (1, 1, 0),
        (1, 2, 5),
        (2, 3, 0),
    ];
    let requests = device.requests();
    assert!(requests.len() >= 12, "{requests:?}");
    assert_eq!(requests[..6], per_poll, "{requests:?}");
    assert_eq!(requests[6..12], per_poll, "{requests:?}");
    assert!(
        agent.log().contains("requests=6"),
        "the start log names the plan:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_answer_is_a_loss_record_and_polling_goes_on() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::ports::free_port();
    let map = json!({"1": {"holding": [[0, [42]]]}});
    let device = ModbusDevice::start(dir.path(), "meter", Transport::Tcp(port), &map.to_string());
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![collector(
        &format!("tcp: {{host: 127.0.0.1, port: {port}}}"),
        "",
        &[
            "field: good, function: holding, address: 0",
            // Not in the device's map: exception 2, illegal data address.
            "field: missing, function: holding, address: 50",
        ],
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        sub.wait_until(WAIT, |s| losses(s, "meter")
            .contains_key("modbus_exception"))
            .await,
        "{:?}\n{}",
        losses(&sub, "meter"),
        agent.log()
    );
    let at_loss = sub.records("meter").len();
    assert!(at_loss >= 1);
    let sample = &samples(&sub, "meter", "modbus_exception")[0];
    assert!(
        sample.starts_with("unit 1 holding 50+1: exception 2"),
        "{sample}"
    );
    // The good value of every poll still arrives, and the schedule goes on after the loss.
    wait_for_readings(&sub, &agent, &device, at_loss + 3).await;
    for r in sub.records("meter") {
        assert_eq!(r["fields"]["good"], json!(42), "{r}");
        assert!(r["fields"].get("missing").is_none(), "{r}");
    }
    let lost = losses(&sub, "meter");
    assert_eq!(
        lost.keys().collect::<Vec<_>>(),
        ["modbus_exception"],
        "{lost:?}"
    );
    // One exception per poll that has been reported; no more than polls made.
    assert!(lost["modbus_exception"] <= sub.records("meter").len() as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_answering_gives_timeouts_and_is_read_again_when_back() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::ports::free_port();
    let map = json!({"1": {"input": [[0, [230, 50]]]}});
    let mut device =
        ModbusDevice::start(dir.path(), "meter", Transport::Tcp(port), &map.to_string());
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![collector(
        &format!("tcp: {{host: 127.0.0.1, port: {port}}}"),
        "",
        &[
            "field: volts, function: input, address: 0",
            "field: hz, function: input, address: 1",
        ],
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    wait_for_readings(&sub, &agent, &device, 1).await;

    // Frozen: connections are still accepted by the kernel, requests get no answer.
    device.freeze();
    assert!(
        sub.wait_until(WAIT, |s| losses(s, "meter").contains_key("timeout"))
            .await,
        "{:?}\n{}",
        losses(&sub, "meter"),
        agent.log()
    );
    let sample = &samples(&sub, "meter", "timeout")[0];
    assert_eq!(sample, "unit 1 input 0+2: no answer within 200 ms");
    device.thaw();
    let n = sub.records("meter").len();
    wait_for_readings(&sub, &agent, &device, n + 2).await;

    // Killed: connections are refused; the collector keeps polling and reports `failed`.
    device.kill();
    assert!(
        sub.wait_until(WAIT, |s| losses(s, "meter").contains_key("failed"))
            .await,
        "{:?}\n{}",
        losses(&sub, "meter"),
        agent.log()
    );
    // The first failure is the connection the kill broke; the polls after it find the port
    // closed; both are counted and polling goes on.
    let sample = &samples(&sub, "meter", "failed")[0];
    assert!(sample.starts_with("unit 1 input 0+2: "), "{sample}");
    assert!(
        losses(&sub, "meter")["failed"] >= 2,
        "{:?}",
        losses(&sub, "meter")
    );
    device.start_again();
    let n = sub.records("meter").len();
    wait_for_readings(&sub, &agent, &device, n + 2).await;
    assert!(agent.log().contains("Modbus device answers again."));
    for r in sub.records("meter") {
        assert_eq!(
            (&r["fields"]["volts"], &r["fields"]["hz"]),
            (&json!(230), &json!(50))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_a_pty_pair_reads_the_map_and_survives_a_silent_device() {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::start(dir.path(), "ttyRS485");
    let map = json!({"7": {
        "holding": [[100, words_u32(18.25f32.to_bits())], [102, [1234]]],
        "coil": [[0, [true]]],
    }});
    let mut device = ModbusDevice::start(
        dir.path(),
        "meter",
        Transport::Rtu {
            path: pty.peer.clone(),
            baud: 19200,
            // A Linux pty refuses parity bits (EINVAL from tcsetattr): this pair runs without.
            parity: 'N',
        },
        &map.to_string(),
    );
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![collector(
        &format!(
            "rtu: {{path: {}, baud: 19200, parity: none, data_bits: 8, stop_bits: 1}}",
            pty.device.display()
        ),
        "unit: 7\n",
        &[
            "field: temp, function: holding, address: 100, type: f32",
            "field: count, function: holding, address: 102",
            "field: pump, function: coil, address: 0",
        ],
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    wait_for_readings(&sub, &agent, &device, 2).await;
    let r = &sub.records("meter")[0]["fields"];
    assert_eq!(
        (&r["temp"], &r["count"], &r["pump"]),
        (&json!(18.25), &json!(1234), &json!(true)),
        "{r}"
    );
    // Two requests per poll: holding 100-102 in one, the coil.
    let requests = device.requests();
    assert_eq!(requests[..2], [(7, 3, 100), (7, 1, 0)], "{requests:?}");

    device.freeze();
    assert!(
        sub.wait_until(WAIT, |s| losses(s, "meter").contains_key("timeout"))
            .await,
        "{:?}\n{}",
        losses(&sub, "meter"),
        agent.log()
    );
    device.thaw();
    let n = sub.records("meter").len();
    wait_for_readings(&sub, &agent, &device, n + 2).await;
    drop(pty);
}
