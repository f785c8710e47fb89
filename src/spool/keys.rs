//! Key layout of the spool tree. Integers are big-endian so sled's byte order is numeric order.

pub const CHUNK: u8 = b'c';
pub const STREAM: u8 = b's';
pub const GLOBAL: &[u8] = b"g";
pub const COUNTERS: &[u8] = b"n";
pub const POSITION: u8 = b'p';
/// Loss reports held back and extended in place (`drop_newest` while full), not yet written as
/// loss records.
pub const PENDING_LOSSES: &[u8] = b"l";
/// The generation of the unreported-failures file last reported on the loss stream.
pub const FAILURES_REPORTED: &[u8] = b"f";

pub fn chunk(stream_id: u32, chunk_id: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = CHUNK;
    k[1..5].copy_from_slice(&stream_id.to_be_bytes());
    k[5..13].copy_from_slice(&chunk_id.to_be_bytes());
    k
}

/// The chunk id of a chunk key.
pub fn chunk_id(key: &[u8]) -> Option<u64> {
    (key.len() == 13 && key[0] == CHUNK)
        .then(|| u64::from_be_bytes(key[5..13].try_into().expect("8 bytes")))
}

pub fn stream(stream_id: u32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = STREAM;
    k[1..5].copy_from_slice(&stream_id.to_be_bytes());
    k
}

pub fn position(source: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + source.len());
    k.push(POSITION);
    k.extend_from_slice(source.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_sort_numerically_within_a_stream() {
        let a = chunk(1, 255);
        let b = chunk(1, 256);
        let c = chunk(2, 1);
        assert!(a < b && b < c);
        assert_eq!(chunk_id(&b), Some(256));
    }
}
