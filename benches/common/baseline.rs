//! The baseline publisher of the drain benchmarks (`drain`, `drain_satellite`): one plain
//! rumqttc client with ferry's options and window, no spool, publishing prepared payloads at
//! QoS 1. It is what MQTT alone costs.

use ferry::config::Config;
use ferry::uplink::options::rumqttc_inflight;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Publishes every message of `msgs` on `topic` to 127.0.0.1:`port` from a thread of its own;
/// the thread ends once every message is acknowledged and the DISCONNECT is written (waiting
/// at most `disconnect_wait` for that).
pub fn spawn(
    port: u16,
    topic: String,
    msgs: Arc<Vec<Vec<u8>>>,
    config: Arc<Config>,
    disconnect_wait: Duration,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(publish_all(port, topic, msgs, config, disconnect_wait))
    })
}

async fn publish_all(
    port: u16,
    topic: String,
    msgs: Arc<Vec<Vec<u8>>>,
    config: Arc<Config>,
    disconnect_wait: Duration,
) -> Result<(), String> {
    let s = &config.uplink;
    let mut o = MqttOptions::new("bench-baseline", "127.0.0.1", port);
    o.set_keep_alive(s.keepalive);
    o.set_clean_session(false);
    o.set_max_packet_size(s.max_packet_bytes, s.max_packet_bytes);
    o.set_inflight(rumqttc_inflight(s.window));
    let (client, mut el) = AsyncClient::new(o, s.window + 8);
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(s.connect_timeout.as_secs().max(1));
    el.set_network_options(net);
    let (mut next, mut unacked, mut acked, mut connected) = (0, 0, 0, false);
    while acked < msgs.len() {
        match el.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => connected = true,
            Event::Incoming(Packet::PubAck(_)) => {
                unacked -= 1;
                acked += 1;
            }
            _ => {}
        }
        while connected && unacked < s.window && next < msgs.len() {
            client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, msgs[next].clone())
                .map_err(|e| e.to_string())?;
            next += 1;
            unacked += 1;
        }
    }
    client.try_disconnect().map_err(|e| e.to_string())?;
    let _ = tokio::time::timeout(disconnect_wait, async {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}
