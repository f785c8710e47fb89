//! Several payloads in one input, for `ferry decode` at the end of a pipe
//! (`mosquitto_sub -t 'ferry/+/data/#' -F '%x' | ferry decode`).
//!
//! An input is read as:
//! - **hex lines** when it starts with a hex digit: one payload per line, hex-encoded (what
//!   `mosquitto_sub -F '%x'` prints); a line may start with the topic and a space
//!   (`-F '%t %x'`), which is ignored; blank lines are skipped;
//! - **JSON payloads** one after the other when it starts with `{` (what `mosquitto_sub`
//!   prints for JSON-format streams, one per line);
//! - otherwise **one binary payload** (a CBOR or zstd message has no framing of its own).

use super::WireError;

/// The payloads in `input`, each with where it starts (1-based line for hex, byte offset
/// otherwise) for error messages.
pub fn payloads(input: &[u8]) -> Vec<(String, Result<Vec<u8>, WireError>)> {
    let start = input.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| input[i]) {
        Some(b) if b.is_ascii_hexdigit() => hex_lines(input),
        Some(b'{') => json_values(input),
        _ => vec![("input".to_string(), Ok(input.to_vec()))],
    }
}

fn hex_lines(input: &[u8]) -> Vec<(String, Result<Vec<u8>, WireError>)> {
    let text = String::from_utf8_lossy(input);
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let hex = l.split_whitespace().next_back().unwrap_or_default();
            let decoded =
                hex::decode(hex).map_err(|e| WireError::Layout(format!("not a hex payload: {e}")));
            (format!("line {}", i + 1), decoded)
        })
        .collect()
}

fn json_values(input: &[u8]) -> Vec<(String, Result<Vec<u8>, WireError>)> {
    let mut out = Vec::new();
    let mut values =
        serde_json::Deserializer::from_slice(input).into_iter::<serde::de::IgnoredAny>();
    let mut begin = 0;
    loop {
        let at = values.byte_offset();
        match values.next() {
            None => break,
            Some(Ok(_)) => {
                let end = values.byte_offset();
                let slice = &input[at..end];
                let skip = slice.iter().take_while(|b| b.is_ascii_whitespace()).count();
                out.push((format!("byte {}", at + skip), Ok(slice[skip..].to_vec())));
                begin = end;
            }
            Some(Err(e)) => {
                out.push((format!("byte {begin}"), Err(WireError::Json(e.to_string()))));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_lines_with_and_without_topics() {
        let p = payloads(b"7b7d\nferry/a/data/s 8101\n\n");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].1.as_ref().unwrap(), b"{}");
        assert_eq!(p[1].1.as_ref().unwrap(), &[0x81, 0x01]);
        assert!(
            payloads(b"zz\n")[0].1.is_ok(),
            "not hex at the start: one binary payload"
        );
        assert!(payloads(b"7g\n")[0].1.is_err());
    }

    #[test]
    fn json_values_one_after_the_other() {
        let p = payloads(b"{\"a\":1}\n{\"b\":\n2}\n");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].1.as_ref().unwrap(), b"{\"b\":\n2}");
        let bad = payloads(b"{\"a\":1}\n{oops");
        assert_eq!(bad.len(), 2);
        assert!(bad[1].1.is_err());
    }
}
