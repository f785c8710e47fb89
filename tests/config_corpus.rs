//! Config validation, end to end: the real `ferry` binary against a corpus of broken configs,
//! the shipped configs, and the library's `config::parse` on a file with several problems.
//!
//! # The corpus
//!
//! Each file in `tests/bad_configs/` is a small config that would be valid but for one defect.
//! It opens with a header of comment lines that says what `ferry validate` must report:
//!
//! ```yaml
//! # expect: uplink.port            (required first line; a substring of stderr)
//! # expect: between 1 and 65535    (optional; another substring)
//! # expect-position: 9:9           (required: some error is positioned at exactly this
//! #                                  line:column; `none`: no error has a position)
//! ```
//!
//! A file whose errors ferry cannot position says `none`, and the test fails once ferry starts
//! to print a position for it, so the pin is added.
//!
//! Every file must make `validate` exit with 78, print only `error: ...` lines on stderr and
//! nothing on stdout, and never panic. The files are validated from a temporary copy of the
//! folder that also holds a real CA certificate, `ca.crt`, so a file can name a readable CA
//! with a relative path; every other path in the corpus is under `/nonexistent/`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// sysexits EX_CONFIG. Written out rather than taken from `ferry::config::EXIT_CONFIG`: a
/// systemd `RestartPreventExitStatus=78` depends on the number itself, not on the constant.
const EXIT_CONFIG: i32 = 78;
/// Longest a `validate` or a refused `run` may take; both read one small file.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Fewer files than this means the corpus folder was emptied or moved.
const MIN_CORPUS_FILES: usize = 16;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------------------------------------
// Running the binary

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "status: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `ferry <args>` with a clean logging environment. Kills it and panics if it has not
/// exited within `timeout`, so a test cannot hang.
fn ferry(args: &[&str], timeout: Duration) -> Outcome {
    let mut child = Command::new(FERRY)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ferry binary starts");
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on ferry") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "`ferry {}` still running after {timeout:?}; killed. stderr:\n{err}",
                args.join(" ")
            );
        }
        // std has no wait-with-timeout; poll, the child normally exits within milliseconds.
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn validate(config: &Path) -> Outcome {
    let config = config.to_str().expect("test paths are UTF-8");
    ferry(&["validate", "--config", config], COMMAND_TIMEOUT)
}

fn panicked(out: &Outcome) -> bool {
    let all = format!("{}{}", out.stdout, out.stderr);
    all.contains("panicked") || all.contains("RUST_BACKTRACE")
}

/// The `(line, column)` of every `error: <file>:<line>:<col>: ...` line about `file`.
fn positions(stderr: &str, file: &Path) -> Vec<(usize, usize)> {
    let prefix = format!("error: {}:", file.display());
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let column = parts.next()?.parse().ok()?;
            parts.next()?.starts_with(' ').then_some((line, column))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Test PKI, made with the openssl CLI

struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// Runs `openssl` in `dir` with whitespace-separated `args` (no argument contains a space).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl CLI runs (install the openssl package)");
    assert!(
        out.status.success(),
        "openssl {args} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`) and a client certificate and key signed by it, all P-256, X.509 v3.
fn make_pki(dir: &Path) -> Pki {
    const P256: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(
        dir,
        &format!(
            "req -x509 {P256} -days 3650 -subj /CN=ferry-test-CA \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.crt"
        ),
    );
    openssl(
        dir,
        &format!("req {P256} -subj /CN=test-gw -keyout client.key -out client.csr"),
    );
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n\
         subjectKeyIdentifier=hash\n\
         authorityKeyIdentifier=keyid\n",
    )
    .expect("write client.ext");
    openssl(
        dir,
        "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -set_serial 2 -days 825 -sha256 \
         -extfile client.ext -out client.crt",
    );
    openssl(dir, "verify -CAfile ca.crt client.crt");
    Pki {
        ca: dir.join("ca.crt"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

// ---------------------------------------------------------------------------------------------
// The corpus

enum PositionRule {
    /// No error carries a position.
    None,
    /// Some error is positioned at this (line, column).
    At(usize, usize),
}

struct Expectations {
    substrings: Vec<String>,
    position: PositionRule,
}

fn parse_header(text: &str) -> Result<Expectations, String> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let Some(substring) = first.strip_prefix("# expect: ") else {
        return Err(format!(
            "first line must be `# expect: <substring>`, got {first:?}"
        ));
    };
    let mut substrings = vec![substring.to_string()];
    let mut position = None;
    for line in lines.take_while(|l| l.starts_with("# expect")) {
        if let Some(s) = line.strip_prefix("# expect: ") {
            substrings.push(s.to_string());
        } else if let Some(p) = line.strip_prefix("# expect-position: ") {
            let bad = || format!("bad `# expect-position: {p}`: `LINE:COLUMN` or `none`");
            position = Some(match p.trim() {
                "none" => PositionRule::None,
                at => {
                    let (line, column) = at.split_once(':').ok_or_else(bad)?;
                    PositionRule::At(
                        line.parse().map_err(|_| bad())?,
                        column.parse().map_err(|_| bad())?,
                    )
                }
            });
        } else {
            return Err(format!("unknown header line {line:?}"));
        }
    }
    if substrings.iter().any(|s| s.trim().is_empty()) {
        return Err("an `# expect:` substring is empty".into());
    }
    let position = position.ok_or("no `# expect-position: LINE:COLUMN` (or `none`) line")?;
    Ok(Expectations {
        substrings,
        position,
    })
}

struct CorpusRun {
    /// Keeps the copied corpus alive while the results are checked.
    _dir: tempfile::TempDir,
    results: Vec<(String, PathBuf, String, Outcome)>,
}

/// Copies the corpus beside a real `ca.crt` and validates every file: `(name, copied path,
/// text, outcome)`, sorted by name.
fn run_corpus() -> CorpusRun {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let mut names: Vec<String> = std::fs::read_dir(repo_path("tests/bad_configs"))
        .expect("tests/bad_configs exists")
        .map(|e| e.expect("read tests/bad_configs").file_name())
        .map(|n| n.into_string().expect("corpus file names are UTF-8"))
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(
        names.len() >= MIN_CORPUS_FILES,
        "expected at least {MIN_CORPUS_FILES} files in tests/bad_configs, found {}",
        names.len()
    );
    let results = names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(repo_path("tests/bad_configs").join(&name))
                .expect("read corpus file");
            let copy = dir.path().join(&name);
            std::fs::write(&copy, &text).expect("copy corpus file");
            let out = validate(&copy);
            (name, copy, text, out)
        })
        .collect();
    CorpusRun { _dir: dir, results }
}

/// What is wrong with one corpus result; empty when it behaves as its header says.
fn corpus_problems(text: &str, file: &Path, out: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    let expect = match parse_header(text) {
        Ok(e) => e,
        Err(e) => return vec![format!("bad header: {e}")],
    };
    if panicked(out) {
        problems.push("panicked".into());
    }
    if out.status.code() != Some(EXIT_CONFIG) {
        problems.push(format!(
            "exit status {}, expected {EXIT_CONFIG}",
            out.status
        ));
    }
    if !out.stdout.is_empty() {
        problems.push("printed on stdout".into());
    }
    if out.stderr.trim().is_empty() {
        problems.push("stderr is empty".into());
    }
    if let Some(l) = out.stderr.lines().find(|l| !l.starts_with("error: ")) {
        problems.push(format!("stderr line not in `error: ...` form: {l:?}"));
    }
    for s in &expect.substrings {
        if !out.stderr.contains(s.as_str()) {
            problems.push(format!("missing expected text {s:?}"));
        }
    }
    let found = positions(&out.stderr, file);
    match expect.position {
        PositionRule::None if !found.is_empty() => problems.push(format!(
            "errors are positioned now ({found:?}): pin one with `# expect-position: LINE:COLUMN`"
        )),
        PositionRule::None => {}
        PositionRule::At(line, column) if !found.contains(&(line, column)) => {
            problems.push(format!(
                "no error positioned at {line}:{column} (positions given: {found:?})"
            ));
        }
        PositionRule::At(..) => {}
    }
    problems
}

#[test]
fn every_bad_config_is_rejected_as_its_header_says() {
    let run = run_corpus();
    let failures: Vec<String> = run
        .results
        .iter()
        .filter_map(|(name, file, text, out)| {
            let problems = corpus_problems(text, file, out);
            (!problems.is_empty()).then(|| {
                format!(
                    "tests/bad_configs/{name}:\n  - {}\n  {}",
                    problems.join("\n  - "),
                    out.describe().replace('\n', "\n    ")
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} corpus files misbehave:\n\n{}",
        failures.len(),
        run.results.len(),
        failures.join("\n\n")
    );
}

/// `error: <file>:<line>:<col>: <key.path>: <message>` names the key once; a message that
/// starts with the key path again (`uplink.port: uplink.port: invalid type`) is noise.
#[test]
fn error_messages_name_the_key_only_once() {
    let run = run_corpus();
    let mut repeated = Vec::new();
    for (name, file, _, out) in &run.results {
        let prefix = format!("error: {}", file.display());
        for line in out.stderr.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            // Skip the optional ":<line>:<col>" and the ": " after the file name.
            let rest = rest.trim_start_matches(|c: char| c == ':' || c.is_ascii_digit());
            let rest = rest.trim_start();
            let Some((key, message)) = rest.split_once(": ") else {
                continue;
            };
            let Some((again, _)) = message.split_once(": ") else {
                continue;
            };
            let is_key = |s: &str| !s.is_empty() && !s.contains(' ');
            if is_key(key)
                && is_key(again)
                && (key == again
                    || key.starts_with(&format!("{again}."))
                    || key.starts_with(&format!("{again}[")))
            {
                repeated.push(format!("tests/bad_configs/{name}: {line}"));
            }
        }
    }
    assert!(
        repeated.is_empty(),
        "{} error lines repeat their key path in the message:\n{}",
        repeated.len(),
        repeated.join("\n")
    );
}

#[test]
fn a_file_with_nothing_in_it_is_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in [("zero-bytes.yaml", ""), ("blank.yaml", "\n  \n\n")] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write");
        let out = validate(&file);
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "{name}: {}",
            out.describe()
        );
        assert!(out.stderr.contains("empty"), "{name}: {}", out.describe());
        assert!(!panicked(&out), "{name}: {}", out.describe());
    }
}

/// Editors on Windows save UTF-8 with a byte order mark; it must not change what the file
/// means (or, at least, the error must say that the BOM is the problem).
#[test]
fn a_utf8_byte_order_mark_does_not_hide_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bom.yaml");
    let text = std::fs::read_to_string(repo_path("config/ferry.yaml")).expect("read ferry.yaml");
    // Start with a key, not a comment: a BOM before a comment line is already harmless.
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, format!("\u{feff}device_id: test-gw\n{body}")).expect("write");
    let out = validate(&file);
    let accepted = out.status.success() && out.stdout.trim() == "ok";
    let explained = out.stderr.contains("BOM") || out.stderr.contains("byte order mark");
    assert!(
        accepted || explained,
        "a BOM before the first key is misreported:\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// The shipped configs

#[test]
fn shipped_development_config_is_valid() {
    let out = validate(&repo_path("config/ferry.yaml"));
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
    assert!(out.stderr.is_empty(), "{}", out.describe());
}

/// The mutual-TLS lines the production config has commented out, and the files they name.
const PRODUCTION_FILES: [&str; 2] = ["/etc/ferry/client.crt", "/etc/ferry/client.key"];

fn production_with_mtls() -> String {
    let text =
        std::fs::read_to_string(repo_path("config/ferry.production.yaml")).expect("read config");
    for path in PRODUCTION_FILES {
        assert!(
            text.contains(path),
            "the production config no longer names {path}"
        );
    }
    text.replace("    # cert_file:", "    cert_file:")
        .replace("    # key_file:", "    key_file:")
}

#[test]
fn shipped_production_config_is_valid_as_shipped() {
    // It trusts the system CA bundle (Debian's ca-certificates), so it validates on any
    // gateway where that package is installed.
    if !Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        panic!("install ca-certificates: the production config trusts its bundle");
    }
    let out = validate(&repo_path("config/ferry.production.yaml"));
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
}

#[test]
fn shipped_production_config_with_mutual_tls_is_valid_when_its_files_exist() {
    let text = production_with_mtls();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path());
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).expect("mkdir etc");
    for (from, name) in [
        (&pki.client_cert, "client.crt"),
        (&pki.client_key, "client.key"),
    ] {
        std::fs::copy(from, etc.join(name)).expect("copy PEM file");
    }
    let rewritten = text
        .replace("/etc/ferry/", &format!("{}/", etc.display()))
        .replace(
            "/etc/ssl/certs/ca-certificates.crt",
            &pki.ca.display().to_string(),
        );
    assert!(!rewritten.contains("/etc/ferry/"));
    let file = dir.path().join("ferry.production.yaml");
    std::fs::write(&file, rewritten).expect("write config");
    let out = validate(&file);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
}

#[test]
fn shipped_production_config_with_mutual_tls_fails_only_for_its_missing_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ferry.production.yaml");
    std::fs::write(&file, production_with_mtls()).expect("write config");
    let out = validate(&file);
    assert!(!panicked(&out), "{}", out.describe());
    let missing: Vec<&str> = PRODUCTION_FILES
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    // On a machine where the files exist, only the remaining checks apply.
    if !missing.is_empty() {
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", out.describe());
        for path in &missing {
            assert!(
                out.stderr.contains(path),
                "{path} not reported:\n{}",
                out.describe()
            );
        }
    }
    for line in out.stderr.lines() {
        assert!(
            line.contains("/etc/ferry/"),
            "an error that is not about a file under /etc/ferry/: {line}\n{}",
            out.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `ferry run` refuses a bad config before starting anything

#[test]
fn run_with_a_bad_config_exits_78_without_starting() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    for name in [
        "03-unknown-nested-key-tsl.yaml",
        "08-port-zero.yaml",
        "14-tab-indentation.yaml",
    ] {
        let text = std::fs::read_to_string(repo_path("tests/bad_configs").join(name))
            .expect("read corpus file");
        let expect = parse_header(&text).expect("corpus header");
        let file = dir.path().join(name);
        std::fs::write(&file, &text).expect("copy corpus file");
        let started = Instant::now();
        let out = ferry(
            &["run", "--config", file.to_str().expect("UTF-8 path")],
            COMMAND_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "{name}: {}",
            out.describe()
        );
        assert!(!panicked(&out), "{name}: {}", out.describe());
        for s in &expect.substrings {
            assert!(
                out.stderr.contains(s.as_str()),
                "{name}: no {s:?}: {}",
                out.describe()
            );
        }
        // The corpus configs keep their spool in `spool` beside the file.
        assert!(
            !dir.path().join("spool").exists(),
            "{name}: the spool was opened before the config was accepted"
        );
        eprintln!("{name}: refused in {:?}", started.elapsed());
    }
}

// ---------------------------------------------------------------------------------------------
// The library API reports every semantic problem at once

#[test]
fn parse_reports_every_semantic_issue_with_its_position() {
    let text = "\
device_id: test-gw
spool:
  dir: spool
uplink:
  host: 127.0.0.1
  port: 0
  backoff:
    initial_ms: 60000
    max_ms: 1000
collectors:
  - type: system
    name: system
    interval_ms: 50
";
    let path = Path::new("/nonexistent/ferry/three-problems.yaml");
    let err = ferry::config::parse(text, path).expect_err("three problems");
    let ferry::config::ConfigError::Invalid { file, issues } = &err else {
        panic!("expected ConfigError::Invalid, got {err:?}");
    };
    assert_eq!(file, path);
    let mut found: Vec<(&str, Option<usize>)> = issues
        .iter()
        .map(|i| (i.path.as_str(), i.position.map(|p| p.line)))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("collectors[0].interval_ms", Some(13)),
            ("uplink.backoff.max_ms", Some(9)),
            ("uplink.port", Some(6)),
        ],
        "{err}"
    );
    let rendered = err.issues();
    assert_eq!(rendered.len(), 3, "{rendered:?}");
    for line in &rendered {
        assert!(
            line.starts_with("/nonexistent/ferry/three-problems.yaml:"),
            "{line}"
        );
        assert_eq!(
            positions(&format!("error: {line}"), path).len(),
            1,
            "{line}"
        );
    }
}
