//! The layering of `src/`: which top-level module may import which.
//!
//! [`TABLE`] is the list of allowed arrows written down in docs/ARCHITECTURE.md ("Layers");
//! the two change together. The test reads every `.rs` file under `src/`, finds every path
//! into another top-level module — `use crate::x::..`, `use crate::{x::.., y::..}` over
//! several lines, `crate::x::f()` inline in code, `super::super::x` climbing out of a
//! top-level module, and `ferry::x` in `main.rs` — and fails on an arrow the table does not
//! allow, naming the file, the line and the arrow. Independently of the table, it fails on
//! any cycle between top-level modules. Comments, doc comments and string literals are not
//! code and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A leaf may be imported by every module and imports only the leaves listed with it. A layer
/// imports every leaf and only the layers listed with it (`*`: every module).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Leaf,
    Layer,
}
use Kind::{Layer, Leaf};

/// The allowed arrows between top-level modules of `src/` (docs/ARCHITECTURE.md, "Layers").
/// `main` is the binary (`src/main.rs`), which reaches the library as `ferry::`.
const TABLE: &[(&str, Kind, &[&str])] = &[
    // Leaves: small shared types and functions.
    ("backoff", Leaf, &[]),
    ("clock", Leaf, &[]),
    ("command_link", Leaf, &[]),
    ("control", Leaf, &[]),
    ("heartbeat", Leaf, &[]),
    ("issue", Leaf, &[]),
    ("loss", Leaf, &["record", "clock"]),
    ("record", Leaf, &["clock"]),
    ("tls", Leaf, &[]),
    // Layers, bottom up.
    ("spool", Layer, &[]),
    ("wire", Layer, &[]),
    ("collectors", Layer, &["spool"]),
    ("uplink", Layer, &["spool", "wire"]),
    ("commands", Layer, &["spool"]),
    // The receiving side (`ferry consume`): decodes what the uplink sent, nothing of the agent.
    ("consume", Layer, &["wire"]),
    // Every module owns its settings type; config assembles and validates them.
    (
        "config",
        Layer,
        &["collectors", "commands", "spool", "uplink", "wire"],
    ),
    ("lifecycle", Layer, &["*"]),
    // The CLI: `run` goes through the lifecycle; `validate`, `spool inspect|export` and
    // `decode` are offline tools over config, spool and wire.
    (
        "main",
        Layer,
        &["lifecycle", "config", "spool", "wire", "consume"],
    ),
];

/// One path from a file of one top-level module into another.
#[derive(Debug, Clone)]
struct Arrow {
    file: String,
    line: usize,
    from: String,
    to: String,
    /// The source line, trimmed.
    text: String,
}

fn entry(module: &str) -> Option<&'static (&'static str, Kind, &'static [&'static str])> {
    TABLE.iter().find(|(m, _, _)| *m == module)
}

/// Why `from -> to` is not allowed, if it is not.
fn forbidden(table: &[(&str, Kind, &[&str])], from: &str, to: &str) -> Option<String> {
    let find = |m: &str| table.iter().find(|(n, _, _)| *n == m).copied();
    let Some((_, from_kind, deps)) = find(from) else {
        return Some(format!("module `{from}` is not in the table"));
    };
    let Some((_, to_kind, _)) = find(to) else {
        return Some(format!("module `{to}` is not in the table"));
    };
    let listed = deps.iter().any(|d| *d == to || *d == "*");
    let ok = match (from_kind, to_kind) {
        (Layer, Leaf) => true,
        _ => listed,
    };
    (!ok).then(|| "not an allowed arrow".to_string())
}

/// `src` with comments, string, byte-string and char literals blanked out (newlines kept, so
/// offsets and line numbers stay those of the file). Non-ASCII bytes become spaces.
fn strip(src: &str) -> Vec<u8> {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && ident(b[i - 1]);
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if !prev_ident && (c == b'r' || (c == b'b' && b.get(i + 1) == Some(&b'r'))) && {
            let mut j = i + if c == b'b' { 2 } else { 1 };
            while b.get(j) == Some(&b'#') {
                j += 1;
            }
            b.get(j) == Some(&b'"')
        } {
            // Raw string: r"..", r#".."#, br"..".
            let start = i;
            i += if c == b'b' { 2 } else { 1 };
            let mut hashes = 0;
            while b[i] == b'#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == b'"' && b[i + 1..].iter().take_while(|&&h| h == b'#').count() >= hashes {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            for &x in &b[start..i.min(b.len())] {
                blank(&mut out, x);
            }
        } else if c == b'"' || (c == b'b' && !prev_ident && b.get(i + 1) == Some(&b'"')) {
            let start = i;
            i += if c == b'b' { 2 } else { 1 };
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            for &x in &b[start..i] {
                blank(&mut out, x);
            }
        } else if c == b'\'' && char_literal_len(&b[i..]).is_some() {
            let n = char_literal_len(&b[i..]).unwrap_or(1);
            for &x in &b[i..i + n] {
                blank(&mut out, x);
            }
            i += n;
        } else {
            out.push(if c.is_ascii() { c } else { b' ' });
            i += 1;
        }
    }
    out
}

/// Length of the char literal at the start of `b` (`'x'`, `'\n'`, `'\u{..}'`, `'é'`), or
/// `None` for a lifetime or label.
fn char_literal_len(b: &[u8]) -> Option<usize> {
    if b.get(1) == Some(&b'\\') {
        // The escaped character, then anything up to the closing quote (`\u{..}`).
        let end = b.get(3..)?.iter().position(|&c| c == b'\'')?;
        return Some(end + 4);
    }
    // One UTF-8 character, then the closing quote.
    let first = *b.get(1)?;
    let width = match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    };
    (b.get(1 + width) == Some(&b'\'')).then_some(width + 2)
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Path,
    Open,
    Close,
    Comma,
    Other,
}

/// Tokens with their byte offset: identifiers, `::`, braces, commas, everything else.
fn tokens(code: &[u8]) -> Vec<(usize, Tok)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < code.len() {
        let c = code[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < code.len() && (code[i].is_ascii_alphanumeric() || code[i] == b'_') {
                i += 1;
            }
            let word = String::from_utf8_lossy(&code[start..i]).into_owned();
            out.push((start, Tok::Ident(word)));
            continue;
        }
        let tok = match c {
            b':' if code.get(i + 1) == Some(&b':') => {
                out.push((i, Tok::Path));
                i += 2;
                continue;
            }
            b'{' => Tok::Open,
            b'}' => Tok::Close,
            b',' => Tok::Comma,
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            _ => Tok::Other,
        };
        out.push((i, tok));
        i += 1;
    }
    out
}

/// Every arrow in one file. `modules` is the file's module path inside the crate
/// (`src/collectors/file/tail.rs` is `collectors::file::tail`); `root` is how the file names
/// the library's root (`crate`, or `ferry` in the binary).
fn scan(file: &str, modules: &[&str], root: &str, text: &str) -> Vec<Arrow> {
    let code = strip(text);
    let line_of = |offset: usize| 1 + code[..offset].iter().filter(|&&c| c == b'\n').count();
    let toks = tokens(&code);
    let from = modules[0];
    let ident = |k: usize| match toks.get(k) {
        Some((_, Tok::Ident(w))) => Some(w.as_str()),
        _ => None,
    };
    let is = |k: usize, t: Tok| toks.get(k).map(|(_, x)| *x == t).unwrap_or(false);
    let mut arrows = Vec::new();
    let mut push = |offset: usize, to: &str| {
        let line = line_of(offset);
        arrows.push(Arrow {
            file: file.to_string(),
            line,
            from: from.to_string(),
            to: to.to_string(),
            text: text.lines().nth(line - 1).unwrap_or("").trim().to_string(),
        })
    };
    // Inline `mod name {` blocks: (name, brace depth inside the block).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut k = 0;
    while k < toks.len() {
        let starts_path = k == 0 || !is(k - 1, Tok::Path);
        match (&toks[k].1, ident(k)) {
            (Tok::Open, _) => depth += 1,
            (Tok::Close, _) => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            (_, Some("mod")) if ident(k + 1).is_some() && is(k + 2, Tok::Open) => {
                inline.push((ident(k + 1).unwrap_or_default().to_string(), depth + 1));
            }
            (_, Some(w)) if starts_path && is(k + 1, Tok::Path) && (w == root || w == "super") => {
                // Where the path lands after its `crate::` or `super::` prefix.
                let mut j = k;
                let climbed_out = if w == root {
                    j += 2;
                    true
                } else {
                    let mut ups = 0;
                    while ident(j) == Some("super") && is(j + 1, Tok::Path) {
                        ups += 1;
                        j += 2;
                    }
                    ups >= modules.len() + inline.len()
                };
                if climbed_out {
                    for (offset, name) in first_segments(&toks, j) {
                        if name != from && name != "self" {
                            push(offset, &name);
                        }
                    }
                }
                k = j;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    arrows
}

/// The first segment after a path prefix ending at token `j`: one identifier, or each item's
/// first identifier in a `{..}` group (nested groups belong to the items).
fn first_segments(toks: &[(usize, Tok)], j: usize) -> Vec<(usize, String)> {
    match toks.get(j) {
        Some((offset, Tok::Ident(w))) => vec![(*offset, w.clone())],
        Some((_, Tok::Open)) => {
            let mut out = Vec::new();
            let mut level = 1;
            let mut item_start = true;
            for (offset, t) in &toks[j + 1..] {
                match t {
                    Tok::Open => level += 1,
                    Tok::Close => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    Tok::Comma if level == 1 => {
                        item_start = true;
                        continue;
                    }
                    Tok::Ident(w) if level == 1 && item_start => out.push((*offset, w.clone())),
                    _ => {}
                }
                item_start = false;
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The top-level modules of `src/`: `x.rs` and `x/` (lib.rs and main.rs are roots).
fn top_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("src/ is readable")
        .map(|e| e.expect("src/ entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            if p.is_dir() {
                Some(name)
            } else {
                let stem = name.strip_suffix(".rs")?;
                (stem != "lib" && stem != "main").then(|| stem.to_string())
            }
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable directory") {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every arrow in `src/`.
fn arrows_in_src() -> Vec<Arrow> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut arrows = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&src).expect("under src/");
        let mut modules: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if modules.last().is_some_and(|m| m == "mod") {
            modules.pop();
        }
        let crate_root = match modules.as_slice() {
            [m] if m == "lib" => continue,
            [m] if m == "main" => "ferry",
            _ => "crate",
        };
        let text = std::fs::read_to_string(&path).expect("readable source");
        let label = path
            .strip_prefix(root)
            .expect("in the crate")
            .display()
            .to_string();
        let modules: Vec<&str> = modules.iter().map(String::as_str).collect();
        arrows.extend(scan(&label, &modules, crate_root, &text));
    }
    let tops = top_modules(&src);
    arrows.retain(|a| tops.contains(&a.to));
    arrows
}

/// A cycle among the arrows, as the arrows that form it.
fn find_cycle(arrows: &[Arrow]) -> Option<Vec<Arrow>> {
    let mut edges: BTreeMap<&str, BTreeMap<&str, &Arrow>> = BTreeMap::new();
    for a in arrows {
        edges
            .entry(a.from.as_str())
            .or_default()
            .entry(a.to.as_str())
            .or_insert(a);
    }
    // Depth-first search; `path` holds the arrows from the start to the current module.
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeMap<&'a str, &'a Arrow>>,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a Arrow>,
    ) -> Option<Vec<Arrow>> {
        if let Some(at) = path.iter().position(|a| a.from == node) {
            return Some(path[at..].iter().map(|a| (*a).clone()).collect());
        }
        if !done.insert(node) {
            return None;
        }
        for (next, arrow) in edges.get(node).into_iter().flatten() {
            path.push(arrow);
            let found = visit(next, edges, done, path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        if let Some(c) = visit(start, &edges, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn render(a: &Arrow) -> String {
    format!("{}:{}: {} -> {}", a.file, a.line, a.from, a.to)
}

#[test]
fn only_allowed_arrows_between_top_level_modules() {
    let arrows = arrows_in_src();
    assert!(
        arrows
            .iter()
            .any(|a| a.from == "lifecycle" && a.to == "spool"),
        "the scan found none of the lifecycle's imports; it is not reading src/"
    );
    let mut problems: Vec<String> = arrows
        .iter()
        .filter_map(|a| {
            let why = forbidden(TABLE, &a.from, &a.to)?;
            Some(format!("{}: {why}: `{}`", render(a), a.text))
        })
        .collect();
    for m in top_modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
        if entry(&m).is_none() {
            problems.push(format!("src/{m}: module `{m}` is not in the table"));
        }
    }
    assert!(
        problems.is_empty(),
        "forbidden arrows between top-level modules (allowed: docs/ARCHITECTURE.md, \"Layers\", \
         and TABLE in tests/layering.rs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_cycle_between_top_level_modules() {
    if let Some(cycle) = find_cycle(&arrows_in_src()) {
        let lines: Vec<String> = cycle.iter().map(render).collect();
        panic!("cycle between top-level modules:\n{}", lines.join("\n"));
    }
}

#[test]
fn the_table_allows_no_cycle() {
    let arrows: Vec<Arrow> = TABLE
        .iter()
        .flat_map(|(from, _, deps)| {
            let targets: Vec<&str> = if deps.contains(&"*") {
                // Every library module; `main` is the binary, which nothing imports.
                TABLE
                    .iter()
                    .map(|(m, _, _)| *m)
                    .filter(|m| m != from && *m != "main")
                    .collect()
            } else {
                deps.to_vec()
            };
            targets.into_iter().map(|to| Arrow {
                file: "tests/layering.rs".into(),
                line: 0,
                from: from.to_string(),
                to: to.to_string(),
                text: String::new(),
            })
        })
        .collect();
    // Layers import every leaf; a leaf listing a layer would close a loop.
    let mut all = arrows.clone();
    for (m, kind, _) in TABLE {
        for (l, lk, _) in TABLE {
            if *kind == Layer && *lk == Leaf {
                all.push(Arrow {
                    file: "tests/layering.rs".into(),
                    line: 0,
                    from: m.to_string(),
                    to: l.to_string(),
                    text: String::new(),
                });
            }
        }
    }
    assert!(find_cycle(&all).is_none(), "{:?}", find_cycle(&all));
}

// The scanner itself, on sources written for it.

fn arrows_of(file: &str, modules: &[&str], text: &str) -> Vec<(usize, String)> {
    scan(file, modules, "crate", text)
        .into_iter()
        .map(|a| (a.line, a.to))
        .collect()
}

#[test]
fn the_scan_finds_use_lines_groups_inline_paths_and_climbing_super() {
    let text = "\
use crate::record::Value;
use crate::{
    clock::now_ms,
    uplink::{self, Uplink},
};
use super::store::Spool;
fn f() {
    let t = crate::lifecycle::TICK;
    let p = super::super::config::load();
}
";
    assert_eq!(
        arrows_of("src/spool/writer.rs", &["spool", "writer"], text),
        vec![
            (1, "record".to_string()),
            (3, "clock".to_string()),
            (4, "uplink".to_string()),
            (8, "lifecycle".to_string()),
            (9, "config".to_string()),
        ]
    );
}

#[test]
fn the_scan_skips_comments_strings_and_paths_inside_the_module() {
    let text = r##"
//! Docs name [`crate::uplink::Uplink`].
/* a block naming crate::config */
fn f() -> &'static str {
    let c = '"';
    let s = "crate::lifecycle::run";
    let r = r#"crate::config"#;
    "also crate::commands"
}
#[cfg(test)]
mod tests {
    use super::super::StartAt;
    use crate::collectors::common::loss_reading;
}
"##;
    assert!(
        arrows_of(
            "src/collectors/file/tail.rs",
            &["collectors", "file", "tail"],
            text
        )
        .is_empty()
    );
    // Out of `spool::writer::tests`, `super::super` is still the spool; one more leaves it.
    let text =
        "mod tests {\n    use super::super::X;\n    use super::super::super::uplink::X;\n}\n";
    assert_eq!(
        arrows_of("src/spool/writer.rs", &["spool", "writer"], text),
        vec![(3, "uplink".to_string())]
    );
}

#[test]
fn a_forbidden_arrow_is_named_with_file_line_and_arrow() {
    let arrows = scan(
        "src/wire/mod.rs",
        &["wire"],
        "crate",
        "\nuse crate::uplink::payload::Origin;\n",
    );
    let messages: Vec<String> = arrows
        .iter()
        .filter_map(|a| {
            let why = forbidden(TABLE, &a.from, &a.to)?;
            Some(format!("{}: {why}: `{}`", render(a), a.text))
        })
        .collect();
    assert_eq!(
        messages,
        vec![
            "src/wire/mod.rs:2: wire -> uplink: not an allowed arrow: \
             `use crate::uplink::payload::Origin;`"
                .to_string()
        ]
    );
    assert!(forbidden(TABLE, "uplink", "wire").is_none());
    assert!(forbidden(TABLE, "spool", "record").is_none());
    assert!(forbidden(TABLE, "record", "spool").is_some());
    assert!(forbidden(TABLE, "spool", "loss_x").is_some());
}

#[test]
fn a_cycle_is_found_even_when_each_arrow_is_allowed() {
    let table: &[(&str, Kind, &[&str])] = &[
        ("a", Layer, &["b"]),
        ("b", Layer, &["c"]),
        ("c", Layer, &["a"]),
    ];
    let mut arrows = scan("src/a.rs", &["a"], "crate", "use crate::b::X;");
    arrows.extend(scan(
        "src/b/mod.rs",
        &["b"],
        "crate",
        "fn f() { crate::c::g() }",
    ));
    arrows.extend(scan("src/c.rs", &["c"], "crate", "use crate::{a::Y};"));
    assert!(
        arrows
            .iter()
            .all(|a| forbidden(table, &a.from, &a.to).is_none())
    );
    let cycle = find_cycle(&arrows).expect("a -> b -> c -> a");
    let names: Vec<String> = cycle
        .iter()
        .map(|a| format!("{}->{}", a.from, a.to))
        .collect();
    assert_eq!(names, vec!["a->b", "b->c", "c->a"]);
    assert!(find_cycle(&arrows[..2]).is_none());
}
