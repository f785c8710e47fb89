//! Every YAML example in docs/COLLECTORS.md is a valid config: each fenced ` ```yaml ` block
//! is put into a minimal valid config and must pass `ferry::config::parse`, and together the
//! examples show every collector kind and both file modes.

use std::path::Path;

const MINIMAL: &str = "\
device_id: docs-test
spool:
  dir: /nonexistent/ferry-spool
uplink:
  host: 127.0.0.1
";

/// The text of every ```yaml block, with the line it starts on.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut current, fence) {
            (None, true) if line.trim() == "```yaml" => current = Some((i + 2, String::new())),
            (Some(_), true) => blocks.push(current.take().expect("in a block")),
            (Some((_, text)), false) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```yaml block");
    blocks
}

#[test]
fn every_collector_example_in_the_docs_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/COLLECTORS.md");
    let markdown = std::fs::read_to_string(&path).expect("docs/COLLECTORS.md exists");
    let blocks = yaml_blocks(&markdown);
    assert!(blocks.len() >= 5, "only {} yaml examples", blocks.len());
    let mut kinds = Vec::new();
    let mut failures = Vec::new();
    for (line, block) in &blocks {
        assert!(
            block.starts_with("collectors:"),
            "docs/COLLECTORS.md:{line}: an example must be a `collectors:` list"
        );
        let text = format!("{MINIMAL}{block}");
        match ferry::config::parse(&text, &path) {
            Ok(config) => {
                assert!(!config.collectors.is_empty());
                for c in &config.collectors {
                    let kind = match c {
                        ferry::collectors::CollectorConfig::System(_) => "system",
                        ferry::collectors::CollectorConfig::Serial(_) => "serial",
                        ferry::collectors::CollectorConfig::File(f) => match f.mode {
                            ferry::collectors::file::FileMode::Tail => "file/tail",
                            ferry::collectors::file::FileMode::Poll => "file/poll",
                        },
                        ferry::collectors::CollectorConfig::Exec(_) => "exec",
                        ferry::collectors::CollectorConfig::Listen(_) => "listen",
                        ferry::collectors::CollectorConfig::Modbus(_) => "modbus",
                    };
                    kinds.push(kind);
                }
            }
            Err(e) => failures.push(format!("docs/COLLECTORS.md:{line}:\n{e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for kind in [
        "system",
        "serial",
        "file/tail",
        "file/poll",
        "exec",
        "listen",
        "modbus",
    ] {
        assert!(kinds.contains(&kind), "no example of {kind}");
    }
}

#[test]
fn the_block_extractor_finds_blocks_and_their_lines() {
    let md = "text\n```yaml\ncollectors: []\n```\n```sh\nnot yaml\n```\n";
    assert_eq!(yaml_blocks(md), vec![(3, "collectors: []\n".to_string())]);
}
