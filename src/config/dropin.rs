//! Drop-in files: `ferry.d/*.yaml` beside `ferry.yaml` (the config file's name with `.d` for
//! its extension), merged over it in name order, like Telegraf's `telegraf.d` and Vector's
//! config directories. A fleet ships one main file and adds per-device or per-site pieces.
//!
//! Merge rules (each drop-in is a partial config):
//! - mappings merge key by key, recursively;
//! - the top-level `collectors` list is appended to: a drop-in adds collectors;
//! - anything else in a later file replaces the earlier value (a scalar, or any other list).
//!
//! Every problem names the file and line where the offending key was set: the merge keeps,
//! for each path it took from a drop-in, the file and the path there ([`Provenance`]).

use super::locate::Locator;
use crate::issue::Issue;
use crate::issue::Position;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// The drop-in directory of a config file: `ferry.yaml` -> `ferry.d`.
pub fn dir_of(config: &Path) -> PathBuf {
    config.with_extension("d")
}

/// The drop-in files of `config`, in name order (`*.yaml` and `*.yml`; other names are
/// ignored, so editors' backups do not count). A missing directory has none.
pub fn files(config: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = dir_of(config);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One file of the merge: its name, its (expanded) text and a locator over it.
pub struct Source {
    pub file: PathBuf,
    pub locator: Locator,
}

/// Which file set which part of the merged document.
#[derive(Default)]
pub struct Provenance {
    /// `(merged path prefix, source index, path prefix in that source)`; later entries win.
    entries: Vec<(String, usize, String)>,
}

impl Provenance {
    /// The source and its own path for a path of the merged document (source 0, the main
    /// file, unless a drop-in set it).
    pub fn resolve(&self, path: &str) -> (usize, String) {
        let mut best: Option<&(String, usize, String)> = None;
        for e in &self.entries {
            if covers(&e.0, path) && best.is_none_or(|b| e.0.len() >= b.0.len()) {
                best = Some(e);
            }
        }
        match best {
            Some((prefix, source, local)) => (*source, format!("{local}{}", &path[prefix.len()..])),
            None => (0, path.to_string()),
        }
    }

    /// Places an issue of the merged document in its file.
    pub fn place(&self, sources: &[Source], issue: Issue) -> (PathBuf, Issue) {
        let (source, local) = self.resolve(&issue.path);
        let src = &sources[source];
        let position: Option<Position> = src.locator.find(&local);
        // The key path as it is in that file (a drop-in's first collector is its
        // `collectors[0]`, whatever its place in the merged list).
        (
            src.file.clone(),
            Issue {
                path: local,
                position: issue.position.or(position),
                message: issue.message,
            },
        )
    }
}

/// Whether `prefix` is `path` or a parent of it in key-path syntax.
fn covers(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Merges `over` (from source `source`) into `base`.
pub fn merge(base: &mut Value, over: Value, source: usize, prov: &mut Provenance) {
    merge_at(base, over, source, "", prov);
}

fn merge_at(base: &mut Value, over: Value, source: usize, path: &str, prov: &mut Provenance) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                let key = match &k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match b.get_mut(&k) {
                    Some(existing) if path.is_empty() && key == "collectors" => {
                        append(existing, v, source, prov);
                    }
                    Some(existing) if existing.is_mapping() && v.is_mapping() => {
                        merge_at(existing, v, source, &child, prov);
                    }
                    _ => {
                        prov.entries.push((child.clone(), source, child));
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => {
            prov.entries
                .push((path.to_string(), source, path.to_string()));
            *b = o;
        }
    }
}

fn append(existing: &mut Value, items: Value, source: usize, prov: &mut Provenance) {
    match (existing, items) {
        (Value::Sequence(list), Value::Sequence(new)) => {
            for (i, item) in new.into_iter().enumerate() {
                prov.entries.push((
                    format!("collectors[{}]", list.len()),
                    source,
                    format!("collectors[{i}]"),
                ));
                list.push(item);
            }
        }
        (existing, other) => {
            // Not two lists: the later value replaces, and its errors point there.
            prov.entries
                .push(("collectors".into(), source, "collectors".into()));
            *existing = other;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn mappings_merge_collectors_append_and_the_rest_is_replaced() {
        let mut base = yaml(
            "device_id: a\nspool: {dir: s, max_bytes: 1}\ncollectors:\n  - {type: system, name: system}\n",
        );
        let mut prov = Provenance::default();
        merge(
            &mut base,
            yaml("spool: {max_bytes: 2}\ncollectors:\n  - {type: file, name: f}\n"),
            1,
            &mut prov,
        );
        merge(&mut base, yaml("device_id: b\n"), 2, &mut prov);
        let expected = yaml(
            "device_id: b\nspool: {dir: s, max_bytes: 2}\ncollectors:\n  - {type: system, name: system}\n  - {type: file, name: f}\n",
        );
        assert_eq!(base, expected);
        assert_eq!(prov.resolve("spool.dir"), (0, "spool.dir".into()));
        assert_eq!(
            prov.resolve("spool.max_bytes"),
            (1, "spool.max_bytes".into())
        );
        assert_eq!(
            prov.resolve("collectors[0].name"),
            (0, "collectors[0].name".into())
        );
        assert_eq!(
            prov.resolve("collectors[1].name"),
            (1, "collectors[0].name".into())
        );
        assert_eq!(prov.resolve("device_id"), (2, "device_id".into()));
        assert_eq!(
            prov.resolve("device_idx"),
            (0, "device_idx".into()),
            "a prefix of a name is not a parent"
        );
    }

    #[test]
    fn drop_in_files_are_yaml_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.yaml");
        assert!(
            files(&config).unwrap().is_empty(),
            "no directory, no drop-ins"
        );
        let d = dir.path().join("ferry.d");
        std::fs::create_dir(&d).unwrap();
        for name in [
            "20-b.yaml",
            "10-a.yml",
            "30-c.yaml~",
            ".hidden.yaml",
            "README",
        ] {
            std::fs::write(d.join(name), "").unwrap();
        }
        let names: Vec<String> = files(&config)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-a.yml", "20-b.yaml"]);
    }
}
