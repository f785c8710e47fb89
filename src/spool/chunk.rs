//! Encoding of one stored chunk: consecutive records of one stream packed into one value.
//!
//! ```text
//! u8  format (1)
//! u64 committed_ms (LE)   when the chunk was committed; drives the uplink's linger
//! u64 first_seq (LE)      seqs in a chunk are consecutive
//! u32 count (LE)
//! count x postcard(StoredRecord { ts_ms, clock, body })
//! ```
//!
//! Packing many records per value is what lets the spool commit far more records per second
//! than one sled key per record would.

use super::SpoolError;
use crate::record::{Body, ClockState, Record};
use serde::{Deserialize, Serialize};

pub const FORMAT: u8 = 2;
pub const HEADER_LEN: usize = 1 + 8 + 8 + 4;

#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    ts_ms: u64,
    clock: ClockState,
    #[serde(borrow)]
    body: BodyRef<'a>,
}

/// Borrowing twin of [`Body`] so encoding does not clone field names.
#[derive(Serialize, Deserialize)]
enum BodyRef<'a> {
    #[serde(borrow)]
    Fields(std::borrow::Cow<'a, [(String, crate::record::Value)]>),
    Line(std::borrow::Cow<'a, str>),
}

/// Header fields of a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub committed_ms: u64,
    pub first_seq: u64,
    pub count: u32,
}

/// Appends one encoded record (without header) to `out`.
pub fn encode_record(out: &mut Vec<u8>, ts_ms: u64, clock: ClockState, body: &Body) {
    let body = match body {
        Body::Fields(f) => BodyRef::Fields(std::borrow::Cow::Borrowed(f)),
        Body::Line(l) => BodyRef::Line(std::borrow::Cow::Borrowed(l)),
    };
    let rec = StoredRecord { ts_ms, clock, body };
    // Encoding into a Vec cannot fail for these types.
    let encoded =
        postcard::to_extend(&rec, std::mem::take(out)).expect("postcard encodes into a Vec");
    *out = encoded;
}

/// Builds a chunk value from a header and records already encoded with [`encode_record`].
pub fn assemble(header: Header, records: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + records.len());
    v.push(FORMAT);
    v.extend_from_slice(&header.committed_ms.to_le_bytes());
    v.extend_from_slice(&header.first_seq.to_le_bytes());
    v.extend_from_slice(&header.count.to_le_bytes());
    v.extend_from_slice(records);
    v
}

pub fn header(value: &[u8]) -> Result<Header, SpoolError> {
    if value.len() < HEADER_LEN || value[0] != FORMAT {
        return Err(SpoolError::Corrupt(format!(
            "chunk of {} bytes with format byte {:?}",
            value.len(),
            value.first()
        )));
    }
    let u64_at = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().expect("8 bytes"));
    Ok(Header {
        committed_ms: u64_at(1),
        first_seq: u64_at(9),
        count: u32::from_le_bytes(value[17..21].try_into().expect("4 bytes")),
    })
}

/// Decodes every record of a chunk.
pub fn decode(value: &[u8]) -> Result<(Header, Vec<Record>), SpoolError> {
    let h = header(value)?;
    let mut rest = &value[HEADER_LEN..];
    let mut records = Vec::with_capacity(h.count as usize);
    for i in 0..h.count as u64 {
        let (rec, tail): (StoredRecord, _) = postcard::take_from_bytes(rest).map_err(|e| {
            SpoolError::Corrupt(format!("record {i} of chunk at seq {}: {e}", h.first_seq))
        })?;
        rest = tail;
        records.push(Record {
            seq: h.first_seq + i,
            ts_ms: rec.ts_ms,
            clock: rec.clock,
            body: match rec.body {
                BodyRef::Fields(f) => Body::Fields(f.into_owned()),
                BodyRef::Line(l) => Body::Line(l.into_owned()),
            },
        });
    }
    Ok((h, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    #[test]
    fn round_trip() {
        let bodies = [
            Body::Fields(vec![
                ("a".into(), Value::F64(1.5)),
                ("b".into(), Value::Str("x".into())),
                ("c".into(), Value::U64(7)),
                ("d".into(), Value::I64(-3)),
                ("e".into(), Value::Bool(true)),
            ]),
            Body::Line("raw line".into()),
        ];
        let mut buf = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            encode_record(&mut buf, 1000 + i as u64, ClockState::Synced, b);
        }
        let h = Header {
            committed_ms: 42,
            first_seq: 10,
            count: 2,
        };
        let v = assemble(h, &buf);
        let (h2, recs) = decode(&v).unwrap();
        assert_eq!(h2, h);
        assert_eq!(recs[0].seq, 10);
        assert_eq!(recs[1].seq, 11);
        assert_eq!(recs[1].ts_ms, 1001);
        assert_eq!(recs[0].body, bodies[0]);
        assert_eq!(recs[1].body, bodies[1]);
    }

    #[test]
    fn truncated_chunk_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, ClockState::Synced, &Body::Line("hello".into()));
        let v = assemble(
            Header {
                committed_ms: 0,
                first_seq: 1,
                count: 2,
            },
            &buf,
        );
        assert!(decode(&v).is_err());
        assert!(decode(&v[..5]).is_err());
    }
}
