//! Line framing shared by the serial and file collectors.
//!
//! Bytes go in as they arrive; complete lines come out without their delimiter (and without a
//! trailing `\r` when the delimiter is `\n`, so CRLF input works). Invariants:
//!
//! - Memory is bounded by `max_line_bytes`: a line that grows past it is reported once as
//!   [`Frame::Oversized`] (with its first bytes) the moment it passes the limit, and the rest
//!   of it is discarded up to the next delimiter. Runaway input without any delimiter costs no
//!   memory and is reported before it ends.
//! - [`LineSplitter::pending_bytes`] is the number of bytes pushed since the last delimiter
//!   (kept or discarded). A file reader's committed position is its read offset minus this: the
//!   end of the last complete line handed over.

use super::common::LOSS_SAMPLE_BYTES;

/// One unit of framed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its delimiter (may be empty).
    Line(Vec<u8>),
    /// A line passed `max_line_bytes`; it is dropped. Carries its first bytes.
    Oversized(Vec<u8>),
}

#[derive(Debug)]
pub struct LineSplitter {
    delimiter: u8,
    max_line_bytes: usize,
    buf: Vec<u8>,
    /// Inside a line that passed the limit: drop bytes until the next delimiter.
    discarding: bool,
    pending: u64,
}

impl LineSplitter {
    pub fn new(delimiter: u8, max_line_bytes: usize) -> LineSplitter {
        LineSplitter {
            delimiter,
            max_line_bytes: max_line_bytes.max(1),
            buf: Vec::new(),
            discarding: false,
            pending: 0,
        }
    }

    /// Frames `data`, appending complete lines and oversize reports to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while !data.is_empty() {
            let end = memchr(self.delimiter, data);
            let (part, found) = match end {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            self.pending += part.len() as u64;
            if !self.discarding {
                if self.buf.len() + part.len() > self.max_line_bytes {
                    let room = LOSS_SAMPLE_BYTES.saturating_sub(self.buf.len());
                    let mut sample = std::mem::take(&mut self.buf);
                    sample.truncate(LOSS_SAMPLE_BYTES);
                    sample.extend_from_slice(&part[..part.len().min(room)]);
                    out.push(Frame::Oversized(sample));
                    self.discarding = true;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if found {
                if !self.discarding {
                    let mut line = std::mem::take(&mut self.buf);
                    if self.delimiter == b'\n' && line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(Frame::Line(line));
                }
                self.discarding = false;
                self.pending = 0;
                data = &data[part.len() + 1..];
            } else {
                data = &[];
            }
        }
        // Keep the buffer from holding on to a big allocation after one long line.
        if self.buf.is_empty() && self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
    }

    /// Bytes pushed since the last delimiter.
    pub fn pending_bytes(&self) -> u64 {
        self.pending
    }

    /// At the end of a source that will not grow any more: the unterminated rest as a line
    /// (nothing if it is empty or was being discarded). Resets the splitter.
    pub fn take_partial(&mut self) -> Option<Frame> {
        let rest = std::mem::take(&mut self.buf);
        let discarding = std::mem::replace(&mut self.discarding, false);
        let had = self.pending > 0;
        self.pending = 0;
        (had && !discarding && !rest.is_empty()).then_some(Frame::Line(rest))
    }

    /// Forgets any partial line (the source was truncated).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
        self.pending = 0;
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> (Vec<Frame>, u64) {
        let mut s = LineSplitter::new(b'\n', max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        (out, s.pending_bytes())
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_across_chunks_and_crlf() {
        let (out, pending) = split(100, &[b"ab", b"c\r\nde\n\nf", b"g"]);
        assert_eq!(out, vec![line("abc"), line("de"), line("")]);
        assert_eq!(pending, 2);
    }

    #[test]
    fn oversized_is_reported_once_at_the_limit_and_dropped_to_the_delimiter() {
        let long = vec![b'x'; 300];
        let (out, pending) = split(100, &[b"ok\n", &long, &long]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], line("ok"));
        assert_eq!(out[1], Frame::Oversized(vec![b'x'; LOSS_SAMPLE_BYTES]));
        assert_eq!(pending, 600);
        let (out, pending) = split(100, &[&long, b"\nnext\n"]);
        assert_eq!(out, vec![Frame::Oversized(vec![b'x'; 64]), line("next")]);
        assert_eq!(pending, 0);
    }

    #[test]
    fn a_line_exactly_at_the_limit_is_kept() {
        let (out, _) = split(3, &[b"abc\nabcd\n"]);
        assert_eq!(out, vec![line("abc"), Frame::Oversized(b"abcd".to_vec())]);
    }

    #[test]
    fn other_delimiters_and_partials() {
        let mut s = LineSplitter::new(b'\r', 10);
        let mut out = Vec::new();
        s.push(b"a\rb\nc\rtail", &mut out);
        assert_eq!(out, vec![line("a"), line("b\nc")]);
        assert_eq!(s.take_partial(), Some(line("tail")));
        assert_eq!(s.pending_bytes(), 0);
        assert_eq!(s.take_partial(), None);
    }
}
