//! The channel pair between the uplink and the command service.
//!
//! A leaf module, so that neither side imports the other: the uplink hands each command
//! publish over as a [`CommandDelivery`] and sends its PUBACK only when the command service
//! asks with an [`AckRequest`], after the command is durably recorded. The lifecycle creates
//! both bounded channels and gives the uplink its [`CommandLink`] end.

use bytes::Bytes;
use tokio::sync::mpsc;

/// A command publish as either MQTT version delivered it: what the command service reads and
/// what the uplink needs to acknowledge it.
#[derive(Debug, Clone)]
pub struct CommandPublish {
    pub payload: Bytes,
    pub retain: bool,
    /// Sent again by the broker (its PUBACK was lost), not a new publish.
    pub dup: bool,
    /// 0, 1 or 2.
    pub qos: u8,
    pub pkid: u16,
    /// MQTT 5 message expiry, as a wall-clock deadline (ms since the epoch): the remaining
    /// interval the broker sent, counted from receipt. `None` with MQTT 3.1.1 or no expiry.
    pub expires_at_ms: Option<u64>,
}

/// A command publish received in connection epoch `epoch`, not yet acknowledged.
#[derive(Debug)]
pub struct CommandDelivery {
    pub epoch: u64,
    pub publish: CommandPublish,
}

/// The command service's request to PUBACK a delivery it has durably recorded. Ignored if the
/// epoch has ended meanwhile: the broker then redelivers on the next connection.
#[derive(Debug)]
pub struct AckRequest {
    pub epoch: u64,
    pub publish: CommandPublish,
}

/// The uplink's side of the command channel.
pub struct CommandLink {
    pub deliveries: mpsc::Sender<CommandDelivery>,
    /// Commands that arrived while `deliveries` was full, by id when readable: already
    /// acknowledged, to be refused with a `busy` error reply (best effort: a crash before it
    /// loses the reply, never a run).
    pub busy: mpsc::Sender<Option<String>>,
    pub acks: mpsc::Receiver<AckRequest>,
}

/// The longest command id (the request format's limit; [`sniff_id`] accepts no longer one).
pub const MAX_ID_LEN: usize = 128;
/// How far into a request that cannot be decoded [`sniff_id`] looks for its id.
const SNIFF_BYTES: usize = 4096;

/// The id of a request that cannot be decoded (too large, not JSON), when one can be read
/// near its start: `"id"`, a colon and a string of 1..=[`MAX_ID_LEN`] plain characters (no
/// escapes). Best effort, only to address the error reply; never trusted for anything else.
pub fn sniff_id(bytes: &[u8]) -> Option<String> {
    let head = &bytes[..bytes.len().min(SNIFF_BYTES)];
    let at = head.windows(4).position(|w| w == b"\"id\"")?;
    let rest = &head[at + 4..];
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' || end == 0 || end > MAX_ID_LEN {
        return None;
    }
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    id.chars().all(|c| !c.is_control()).then(|| id.to_string())
}
