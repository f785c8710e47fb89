//! Finds where a key path (`uplink.tls.ca_file`, `collectors[1].interval_ms`) stands in the
//! YAML text, so that errors found after parsing (by validation, or inside a collector item)
//! still name a line and column.
//!
//! serde_yaml keeps no positions in its `Value`, so this reads the block-style text directly:
//! indentation gives nesting, `- ` opens a sequence item. Flow style (`{a: 1}`) is not
//! followed; a path that cannot be found falls back to its nearest found parent.

use std::collections::HashMap;

use crate::issue::Position;

/// Index of every key path found in a YAML text.
pub struct Locator {
    /// Every occurrence of each path, in text order (a duplicated key has several).
    paths: HashMap<String, Vec<Position>>,
}

enum Frame {
    Key {
        indent: usize,
        path: String,
    },
    Seq {
        indent: usize,
        path: String,
        index: usize,
    },
}

impl Frame {
    fn indent(&self) -> usize {
        match self {
            Frame::Key { indent, .. } | Frame::Seq { indent, .. } => *indent,
        }
    }
}

impl Locator {
    pub fn new(text: &str) -> Locator {
        let mut paths = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for (line_no, raw_line) in text.lines().enumerate() {
            let line = strip_comment(raw_line);
            if line.trim().is_empty() || line.trim_start().starts_with("---") {
                continue;
            }
            let mut indent = line.len() - line.trim_start_matches(' ').len();
            let mut rest = &line[indent..];
            // A run of "- " opens items; each dash nests one level deeper.
            while let Some(after) = rest
                .strip_prefix('-')
                .filter(|a| a.is_empty() || a.starts_with(' '))
            {
                while stack.last().is_some_and(|f| f.indent() > indent) {
                    stack.pop();
                }
                let parent = match stack.last() {
                    Some(Frame::Key { path, .. }) => path.clone(),
                    Some(Frame::Seq { path, index, .. }) => format!("{path}[{index}]"),
                    None => String::new(),
                };
                match stack.last_mut() {
                    Some(Frame::Seq {
                        indent: i, index, ..
                    }) if *i == indent => *index += 1,
                    _ => stack.push(Frame::Seq {
                        indent,
                        path: parent,
                        index: 0,
                    }),
                }
                if let Some(Frame::Seq { path, index, .. }) = stack.last() {
                    paths
                        .entry(format!("{path}[{index}]"))
                        .or_insert_with(Vec::new)
                        .push(Position {
                            line: line_no + 1,
                            column: indent + 1,
                        });
                }
                let skipped = 1 + after.len() - after.trim_start_matches(' ').len();
                indent += skipped;
                rest = &rest[skipped..];
            }
            let Some(key) = key_of(rest) else { continue };
            while stack.last().is_some_and(|f| {
                f.indent() >= indent && !matches!(f, Frame::Seq { indent: i, .. } if *i < indent)
            }) {
                stack.pop();
            }
            let parent = match stack.last() {
                Some(Frame::Key { path, .. }) => path.clone(),
                Some(Frame::Seq { path, index, .. }) => format!("{path}[{index}]"),
                None => String::new(),
            };
            let path = if parent.is_empty() {
                key.to_string()
            } else {
                format!("{parent}.{key}")
            };
            paths
                .entry(path.clone())
                .or_insert_with(Vec::new)
                .push(Position {
                    line: line_no + 1,
                    column: indent + 1,
                });
            stack.push(Frame::Key { indent, path });
        }
        Locator { paths }
    }

    /// Position of `path`, or of its nearest parent that was found.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.paths.get(&p).and_then(|v| v.first()) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// Position of the `n`th occurrence (0-based) of exactly `path`, e.g. a duplicated key.
    pub fn find_nth(&self, path: &str, n: usize) -> Option<Position> {
        self.paths.get(path).and_then(|v| v.get(n)).copied()
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_single = false;
    let mut in_double = false;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !in_double => in_single = !in_single,
            '"' if !in_single => in_double = !in_double,
            '#' if !in_single && !in_double && (prev == ' ' || prev == '\t' || i == 0) => {
                return &line[..i];
            }
            _ => {}
        }
        prev = c;
    }
    line
}

fn key_of(rest: &str) -> Option<&str> {
    let colon = rest.find(':')?;
    let after = &rest[colon + 1..];
    if !(after.is_empty() || after.starts_with(' ') || after.starts_with('\t')) {
        return None;
    }
    let key = rest[..colon].trim().trim_matches('"').trim_matches('\'');
    (!key.is_empty() && !key.contains(' ')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
device_id: gw  # comment
spool:
  dir: /var/lib/ferry
uplink:
  host: example
  tls:
    ca_file: /etc/ca.crt
collectors:
  - type: system
    name: system
  - type: system
    name: other
    interval_ms: 5
";

    #[test]
    fn finds_nested_keys_and_sequence_items() {
        let l = Locator::new(TEXT);
        assert_eq!(l.find("device_id"), Some(Position { line: 1, column: 1 }));
        assert_eq!(
            l.find("uplink.tls.ca_file"),
            Some(Position { line: 7, column: 5 })
        );
        assert_eq!(
            l.find("collectors[0].name"),
            Some(Position {
                line: 10,
                column: 5
            })
        );
        assert_eq!(
            l.find("collectors[1].interval_ms"),
            Some(Position {
                line: 13,
                column: 5
            })
        );
        assert_eq!(
            l.find("collectors[1]"),
            Some(Position {
                line: 11,
                column: 3
            })
        );
    }

    #[test]
    fn falls_back_to_parent() {
        let l = Locator::new(TEXT);
        assert_eq!(
            l.find("uplink.auth.username"),
            Some(Position { line: 4, column: 1 })
        );
        assert_eq!(l.find("nowhere"), None);
    }
}
