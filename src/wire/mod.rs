//! What a data message looks like on the wire, in every encoding ferry can send, and the
//! decoder that turns any of them back into records (`ferry decode`, tests, consumers).
//! docs/WIRE.md is the specification a consumer writes a decoder from.
//!
//! A payload says how it is encoded in its first byte:
//! - `{` (0x7B): plain JSON, [`payload`] (readable with `mosquitto_sub`).
//! - a header byte with bit 7 set: `0b1000_ccee`, `ee` the encoding (0 JSON, 1 CBOR columnar),
//!   `cc` the compression of everything after the header (0 none, 1 zstd). So `0x81` is CBOR,
//!   `0x85` CBOR+zstd, `0x84` JSON+zstd. Other values are refused.
//!
//! Invariants:
//! - Decoding any payload ferry encoded gives back the same records (seq, ts, clock flag,
//!   fields or line), within what the encoding can tell apart: JSON cannot tell a positive
//!   `I64` from a `U64` nor carry NaN/infinity (sent as null, decoded as NaN), and neither
//!   encoding carries an unsynced record's uptime (it is only used on the device).
//! - A compressed payload is never larger than the uncompressed one plus its header: when
//!   zstd does not help, the payload is sent uncompressed and its header says so.
//! - The decoder never panics on hostile input and refuses to inflate past [`MAX_INFLATED`].

pub mod columnar;
pub mod payload;
pub mod rowjson;
pub mod stream;

use crate::record::ChunkData;
use crate::record::Record;
use payload::Origin;
use serde::Deserialize;
use std::io::Read;

/// Largest decompressed payload the decoder accepts (a zstd bomb stops here).
pub const MAX_INFLATED: u64 = 64 << 20;
/// Bit 7 of the first byte marks a header byte (plain JSON starts with `{`, 0x7B).
const HEADER_FLAG: u8 = 0x80;
const ENCODING_MASK: u8 = 0b11;
const COMPRESSION_SHIFT: u8 = 2;

/// How a stream's batches are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Row JSON: human-readable, about 80 bytes per field value.
    #[default]
    Json,
    /// CBOR columnar: field names once per message, integers and timestamps as deltas.
    Cbor,
}

/// Compression of a whole message after the header byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Zstd {
        level: i32,
    },
}

/// Encoding plus compression of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Format {
    pub encoding: Encoding,
    pub compression: Compression,
}

impl Format {
    pub const JSON: Format = Format {
        encoding: Encoding::Json,
        compression: Compression::None,
    };

    /// Short name as used in docs and benchmarks: `json`, `cbor`, `cbor+zstd`...
    pub fn name(&self) -> String {
        let e = match self.encoding {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        };
        match self.compression {
            Compression::None => e.to_string(),
            Compression::Zstd { level } => format!("{e}+zstd{level}"),
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub device: String,
    pub boot: String,
    pub stream: String,
    pub records: Vec<Record>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty payload")]
    Empty,
    #[error("unknown header byte 0x{0:02x} (not JSON and not a ferry header)")]
    Header(u8),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("decompressed payload larger than {MAX_INFLATED} bytes")]
    TooLarge,
    #[error("JSON: {0}")]
    Json(String),
    #[error("CBOR: {0}")]
    Cbor(String),
    #[error("bad message: {0}")]
    Layout(String),
}

/// Encodes the leading chunks of a batch that fit in `max_bytes` (always at least one) in
/// `format`. Returns the payload and how many chunks it holds.
pub fn encode(
    format: Format,
    origin: &Origin,
    stream: &str,
    chunks: &[ChunkData],
    max_bytes: usize,
) -> (Vec<u8>, usize) {
    let (body, used) = match format.encoding {
        Encoding::Json => payload::encode(origin, stream, chunks, max_bytes.saturating_sub(1)),
        Encoding::Cbor => columnar::encode(origin, stream, chunks, max_bytes.saturating_sub(1)),
    };
    (frame(format, body), used)
}

/// Puts the header byte in front of `body`, compressing it when asked and when that helps.
fn frame(format: Format, body: Vec<u8>) -> Vec<u8> {
    let encoding_bits = match format.encoding {
        Encoding::Json => 0,
        Encoding::Cbor => 1,
    };
    if let Compression::Zstd { level } = format.compression
        && let Ok(z) = zstd::bulk::compress(&body, level)
        && z.len() < body.len()
    {
        let mut out = Vec::with_capacity(z.len() + 1);
        out.push(HEADER_FLAG | (1 << COMPRESSION_SHIFT) | encoding_bits);
        out.extend_from_slice(&z);
        return out;
    }
    if format.encoding == Encoding::Json {
        return body;
    }
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(HEADER_FLAG | encoding_bits);
    out.extend_from_slice(&body);
    out
}

/// Decodes any ferry data payload.
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    let (&first, rest) = payload.split_first().ok_or(WireError::Empty)?;
    if first == b'{' {
        return rowjson::decode(payload);
    }
    if first & HEADER_FLAG == 0 || first & 0b0111_0000 != 0 {
        return Err(WireError::Header(first));
    }
    let inflated;
    let body = match (first >> COMPRESSION_SHIFT) & 0b11 {
        0 => rest,
        1 => {
            inflated = inflate(rest)?;
            &inflated[..]
        }
        _ => return Err(WireError::Header(first)),
    };
    match first & ENCODING_MASK {
        0 => rowjson::decode(body),
        1 => columnar::decode(body),
        _ => Err(WireError::Header(first)),
    }
}

fn inflate(compressed: &[u8]) -> Result<Vec<u8>, WireError> {
    let decoder =
        zstd::stream::read::Decoder::new(compressed).map_err(|e| WireError::Zstd(e.to_string()))?;
    let mut out = Vec::new();
    decoder
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| WireError::Zstd(e.to_string()))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(WireError::TooLarge);
    }
    Ok(out)
}

/// One decoded record as a JSON line: `{"device","boot","stream","seq","ts","clock"?,
/// "fields"|"line"}` (what `ferry decode` prints).
pub fn json_line(message: &Message, record: &Record) -> String {
    record_json(message, record).to_string()
}

/// The JSON object of [`json_line`].
pub fn record_json(message: &Message, record: &Record) -> serde_json::Value {
    let mut v = payload::record_value(&message.stream, record);
    if let Some(o) = v.as_object_mut() {
        o.insert("device".into(), message.device.clone().into());
        o.insert("boot".into(), message.boot.clone().into());
    }
    v
}

/// Size of the MQTT 3.1.1 PUBLISH packet (QoS 1) that carries `payload` on `topic`: fixed
/// header (1 byte + remaining length as 1-4 bytes) + topic (2 + len) + packet id (2) + payload.
/// This is what a message costs on the wire before TLS.
pub fn publish_packet_bytes(topic_len: usize, payload_len: usize) -> usize {
    let remaining = 2 + topic_len + 2 + payload_len;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

#[cfg(test)]
mod tests;
