//! Configuration: one YAML file, parsed, then validated into a frozen runtime form.
//!
//! - [`raw`] is what the file says (serde structs, unknown keys rejected).
//! - [`load`] is the one function that knows the file is YAML (serde_yaml behind it, so the
//!   crate can be swapped in one place). It reports *every* problem it can find: a syntax or
//!   type error stops parsing at that point, but validation after a successful parse lists all
//!   issues, each with its key path and line/column.
//! - [`Config`] is the validated form the rest of the agent uses. Relative paths in the file are
//!   taken relative to the directory holding the file.
//!
//! Direction: every module owns its settings type (`spool::SpoolSettings`,
//! `uplink::UplinkSettings`, `commands::CommandSettings`, `collectors::CollectorConfig`), and
//! config only assembles and validates them. So config imports those modules and none of them
//! imports config; only the lifecycle and `main` do (docs/ARCHITECTURE.md, "Layers").

mod device_id;
mod dropin;
mod env;
pub mod locate;
pub mod raw;
mod settings;

pub use settings::{BUILTIN_COMMANDS, ClockSettings, Config};

use crate::issue::{Issue, Position};
use locate::Locator;
use std::path::{Path, PathBuf};

/// Exit code for a configuration error (sysexits EX_CONFIG); systemd's
/// `RestartPreventExitStatus=78` keeps a bad config from crash-looping.
pub const EXIT_CONFIG: i32 = 78;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_issues(file, issues))]
    Invalid { file: PathBuf, issues: Vec<Issue> },
    /// Problems of a config merged from several files (drop-ins), each with its own file.
    #[error("{}", issues.iter().map(|(f, i)| render_issue(f, i)).collect::<Vec<_>>().join("\n"))]
    InvalidIn { issues: Vec<(PathBuf, Issue)> },
}

impl ConfigError {
    /// The issues found, one per line as `validate` prints them.
    pub fn issues(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { file, issues } => {
                issues.iter().map(|i| render_issue(file, i)).collect()
            }
            ConfigError::InvalidIn { issues } => {
                issues.iter().map(|(f, i)| render_issue(f, i)).collect()
            }
        }
    }
}

fn render_issue(file: &Path, issue: &Issue) -> String {
    let mut s = file.display().to_string();
    if let Some(p) = issue.position {
        s.push_str(&format!(":{}:{}", p.line, p.column));
    }
    s.push_str(": ");
    if !issue.path.is_empty() {
        s.push_str(&issue.path);
        s.push_str(": ");
    }
    s.push_str(&issue.message);
    s
}

fn render_issues(file: &Path, issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| render_issue(file, i))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and validates the config file at `path`, with its drop-in files
/// (`ferry.d/*.yaml` beside `ferry.yaml`, see [`dropin`]) merged over it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let text = read(path)?;
    let dropins = dropin::files(path).map_err(|source| ConfigError::Read {
        path: dropin::dir_of(path),
        source,
    })?;
    if dropins.is_empty() {
        return parse(&text, path);
    }
    let mut files = vec![(path.to_path_buf(), text)];
    for p in dropins {
        let t = read(&p)?;
        files.push((p, t));
    }
    parse_merged(&files)
}

/// The checks every file gets before YAML parsing: byte order mark, `${NAME}`, tabs. Returns
/// the text to parse.
fn prepare(text: &str) -> Result<String, Vec<Issue>> {
    // Editors on Windows save UTF-8 with a byte order mark; YAML would read it as part of the
    // first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // `${NAME}` from the environment; values never add lines, so positions stay true.
    let text = env::expand(text, |name| std::env::var(name).ok())?;
    if let Some((n, line)) = text.lines().enumerate().find(|(_, l)| {
        let indent: String = l.chars().take_while(|c| c.is_whitespace()).collect();
        indent.contains('\t')
    }) {
        let column = line.find('\t').unwrap_or(0) + 1;
        return Err(vec![Issue {
            path: String::new(),
            message: "a tab is used for indentation; YAML allows only spaces".into(),
            position: Some(Position {
                line: n + 1,
                column,
            }),
        }]);
    }
    Ok(text)
}

fn is_blank(text: &str) -> bool {
    text.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// A YAML syntax or type error as an issue (position and path from the error).
fn yaml_issue(e: serde_path_to_error::Error<serde_yaml::Error>, locator: &Locator) -> Issue {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let position = inner.location().map(|l| Position {
        line: l.line(),
        column: l.column(),
    });
    let path = if path == "." { String::new() } else { path };
    let message = strip_path_prefix(&strip_location(&inner.to_string()), &path);
    // serde_yaml places a duplicated key at its mapping; point at the second occurrence.
    let position = duplicate_field(&message)
        .and_then(|field| locator.find_nth(&join_path(&path, field), 1))
        .or(position);
    Issue {
        path,
        message,
        position,
    }
}

/// Parses the main file and its drop-ins (in order), merges them and validates the result;
/// every problem names the file it is in.
fn parse_merged(files: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
    let mut issues: Vec<(PathBuf, Issue)> = Vec::new();
    let mut sources = Vec::new();
    let mut values = Vec::new();
    for (file, text) in files {
        let text = match prepare(text) {
            Ok(t) => t,
            Err(found) => {
                issues.extend(found.into_iter().map(|i| (file.clone(), i)));
                continue;
            }
        };
        let locator = Locator::new(&text);
        if is_blank(&text) {
            values.push((sources.len(), None));
        } else {
            let de = serde_yaml::Deserializer::from_str(&text);
            match serde_path_to_error::deserialize::<_, serde_yaml::Value>(de) {
                Ok(v) if v.is_mapping() => values.push((sources.len(), Some(v))),
                Ok(_) => issues.push((
                    file.clone(),
                    Issue::new("", "a config file must be a mapping of keys to values"),
                )),
                Err(e) => issues.push((file.clone(), yaml_issue(e, &locator))),
            }
        }
        sources.push(dropin::Source {
            file: file.clone(),
            locator,
        });
    }
    if !issues.is_empty() {
        return Err(ConfigError::InvalidIn { issues });
    }
    let mut merged = serde_yaml::Value::Mapping(Default::default());
    let mut prov = dropin::Provenance::default();
    for (source, value) in values {
        if let Some(v) = value {
            dropin::merge(&mut merged, v, source, &mut prov);
        }
    }
    let invalid = |found: Vec<Issue>| ConfigError::InvalidIn {
        issues: found.into_iter().map(|i| prov.place(&sources, i)).collect(),
    };
    let raw: raw::RawConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = strip_path_prefix(&strip_location(&e.into_inner().to_string()), &path);
        invalid(vec![Issue::new(path, message)])
    })?;
    let path = &files[0].0;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    settings::validate(raw, &base, path).map_err(invalid)
}

/// Where the running agent's status socket is, for `ferry status` when the config file does
/// not validate (an edit in progress must not hide a running agent): `status_socket`, else
/// next to `spool.dir`, read leniently from whatever of the file parses as YAML; `None` when
/// not even that does.
pub fn status_socket_hint(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let resolve = |p: &str| base.join(p);
    if let Some(sock) = doc.get("status_socket").and_then(|v| v.as_str()) {
        return Some(resolve(sock));
    }
    let dir = doc.get("spool")?.get("dir")?.as_str()?;
    Some(settings::default_status_socket(&resolve(dir)))
}

/// Parses and validates config text; `path` names the file in messages and anchors relative
/// paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |issues: Vec<Issue>| ConfigError::Invalid {
        file: path.to_path_buf(),
        issues,
    };
    let text = prepare(text).map_err(invalid)?;
    let text = text.as_str();
    let locator = Locator::new(text);
    let place = |mut issue: Issue| {
        if issue.position.is_none() {
            issue.position = locator.find(&issue.path);
        }
        issue
    };
    if text.trim().is_empty() || is_blank(text) {
        return Err(invalid(vec![Issue::new(
            "",
            "the config file is empty; see config/ferry.yaml for a complete example",
        )]));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: raw::RawConfig = serde_path_to_error::deserialize(de)
        .map_err(|e| invalid(vec![place(yaml_issue(e, &locator))]))?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    settings::validate(raw, &base, path)
        .map_err(|issues| invalid(issues.into_iter().map(place).collect()))
}

/// serde_yaml inserts " at line L column C"; the position is printed separately.
fn strip_location(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + " at line ".len()..];
        let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let n = digits(tail);
        match tail[n..].strip_prefix(" column ") {
            Some(after) if n > 0 && digits(after) > 0 => rest = &after[digits(after)..],
            _ => {
                out.push_str(" at line ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// serde_yaml starts some messages with (part of) the key path, which is printed separately.
fn strip_path_prefix(msg: &str, path: &str) -> String {
    if let Some((head, tail)) = msg.split_once(": ")
        && !head.is_empty()
        && !head.contains(' ')
        && path.starts_with(head)
    {
        return tail.to_string();
    }
    msg.to_string()
}

fn duplicate_field(msg: &str) -> Option<&str> {
    let rest = msg.split("duplicate field `").nth(1)?;
    rest.split('`').next()
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_path_prefixes_are_stripped() {
        assert_eq!(
            strip_location(
                "did not find expected ',' at line 14 column 5, while parsing at line 13 column 14"
            ),
            "did not find expected ',', while parsing"
        );
        assert_eq!(strip_location("at line x"), "at line x");
        assert_eq!(
            strip_path_prefix("uplink.port: invalid type", "uplink.port"),
            "invalid type"
        );
        assert_eq!(
            strip_path_prefix("uplink: unknown field `tsl`", "uplink.tsl"),
            "unknown field `tsl`"
        );
        assert_eq!(
            strip_path_prefix("invalid type: string", "uplink.port"),
            "invalid type: string"
        );
        assert_eq!(duplicate_field("duplicate field `port`"), Some("port"));
    }
}
