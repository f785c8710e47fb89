//! The `ferry` command: run the agent, validate a config, ask a running agent for its status,
//! look into a spool while the agent is stopped, or decode data messages (docs/WIRE.md).

use clap::{Parser, Subcommand};
use ferry::config::{self, Config, EXIT_CONFIG};
use ferry::lifecycle;
use ferry::spool::Spool;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const DEFAULT_CONFIG: &str = "/etc/ferry/ferry.yaml";
/// `ferry status` when no agent answers (like `systemctl status` for a stopped unit).
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Edge telemetry agent: collectors -> durable spool -> MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a config file: prints `ok`, or every problem found with its key and line
    /// (exit code 78).
    Validate {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run every enabled collector once and print what it produces as JSON lines (as the
    /// records would be sent, without their seq), with no spool and no broker; then exit.
    /// Exit code 1 if a collector produced nothing.
    Test {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait for each collector's first readings.
        #[arg(long, default_value_t = 10_000)]
        wait_ms: u64,
    },
    /// Ask the running agent for its state (through its local status socket).
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The agent's status socket (default: from the config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Look into the spool while the agent is stopped.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Internal: open the spool in DIR and exit (run by ferry itself before it opens a spool,
    /// to survive a spool that makes the storage library crash).
    #[command(name = "__probe-spool", hide = true)]
    ProbeSpool { dir: PathBuf },
    /// Turn ferry data messages (any encoding, docs/WIRE.md) back into JSON lines, one per
    /// record. Each FILE (standard input when none is given) holds one binary payload, JSON
    /// payloads one after the other, or hex payloads one per line (`mosquitto_sub -F '%x'`).
    Decode { files: Vec<PathBuf> },
    /// Subscribe to a fleet's data, drop duplicates, report gaps and print one line per record
    /// (docs/CONSUMING.md).
    Consume(Box<ConsumeArgs>),
}

#[derive(clap::Args)]
struct ConsumeArgs {
    /// The broker, HOST:PORT.
    #[arg(long)]
    broker: String,
    /// Dedupe state; consumers of one share group give the same directory (one host).
    #[arg(long)]
    state: PathBuf,
    /// Share the subscription with the other consumers of GROUP ($share/GROUP/...).
    #[arg(long)]
    share: Option<String>,
    #[arg(long, value_enum, default_value = "jsonl")]
    format: OutputFormat,
    #[arg(long, default_value = "ferry")]
    topic_prefix: String,
    /// MQTT client id; stable across restarts (the broker keeps the session under it).
    /// Default: ferry-consume-HOSTNAME, plus -GROUP with --share.
    #[arg(long)]
    client_id: Option<String>,
    /// Report a hole in the seqs not covered by a loss report after this long.
    #[arg(long, default_value_t = 600_000)]
    gap_timeout_ms: u64,
    /// TLS: verify the broker against this CA file.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// mTLS: client certificate (needs --key-file and --ca-file).
    #[arg(long, requires_all = ["key_file", "ca_file"])]
    cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// File holding the password (first line).
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    keepalive_s: u64,
    #[arg(long, default_value_t = 4 << 20)]
    max_packet_bytes: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Jsonl,
    Influx,
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Depth, bytes, seq range and sample times per stream, and the size on disk.
    Inspect {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every stored record of one stream as JSON lines, oldest first.
    Export {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        stream: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. } | Command::Spool { .. })
        && let Ok(me) = std::env::current_exe()
    {
        ferry::spool::probe::enable(me);
    }
    match cli.command {
        Command::ProbeSpool { dir } => {
            ExitCode::from(ferry::spool::probe::child(&dir).clamp(0, 255) as u8)
        }
        Command::Validate { config } => match config::load(&config) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config } => run(config),
        Command::Test { config, wait_ms } => dry_run(config, wait_ms),
        Command::Status {
            config,
            socket,
            json,
        } => status(config, socket, json),
        Command::Spool { command } => spool(command),
        Command::Decode { files } => decode(&files),
        Command::Consume(args) => consume(*args),
    }
}

/// sysexits' EX_DATAERR: the input is not a ferry message.
const EXIT_DATA: u8 = 65;

fn decode(files: &[PathBuf]) -> ExitCode {
    let inputs: Vec<(String, std::io::Result<Vec<u8>>)> = if files.is_empty() {
        let mut buf = Vec::new();
        let read = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf);
        vec![("standard input".to_string(), read)]
    } else {
        files
            .iter()
            .map(|f| (f.display().to_string(), std::fs::read(f)))
            .collect()
    };
    let mut out = std::io::stdout().lock();
    let mut code = ExitCode::SUCCESS;
    for (name, data) in inputs {
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: cannot read {name}: {e}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        for (at, payload) in ferry::wire::stream::payloads(&data) {
            let message = match payload.and_then(|p| ferry::wire::decode(&p)) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {name} ({at}) is not a ferry message: {e}");
                    code = ExitCode::from(EXIT_DATA);
                    continue;
                }
            };
            for r in &message.records {
                let line = ferry::wire::json_line(&message, r);
                if writeln!(out, "{line}").is_err() {
                    return code;
                }
            }
        }
    }
    code
}

/// sysexits' EX_USAGE.
const EXIT_USAGE: u8 = 64;

fn consume(a: ConsumeArgs) -> ExitCode {
    let _log = lifecycle::logging::init();
    let Some((host, port)) = a
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
    else {
        eprintln!("error: --broker {:?} is not HOST:PORT", a.broker);
        return ExitCode::from(EXIT_USAGE);
    };
    let client_id = a.client_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut id = format!("ferry-consume-{}", host.trim());
        if let Some(g) = &a.share {
            id += &format!("-{g}");
        }
        id
    });
    let settings = ferry::consume::ConsumeSettings {
        session: ferry::consume::session::SessionSettings {
            host,
            port,
            client_id,
            share: a.share,
            topic_prefix: a.topic_prefix,
            ca_file: a.ca_file,
            client_cert: a.cert_file.zip(a.key_file),
            username: a.username,
            password_file: a.password_file,
            keepalive: std::time::Duration::from_secs(a.keepalive_s.max(1)),
            connect_timeout: std::time::Duration::from_secs(30),
            max_packet_bytes: a.max_packet_bytes,
        },
        state_dir: a.state,
        format: match a.format {
            OutputFormat::Jsonl => ferry::consume::Format::Jsonl,
            OutputFormat::Influx => ferry::consume::Format::Influx,
        },
        gap_timeout: std::time::Duration::from_millis(a.gap_timeout_ms),
        backoff_initial: std::time::Duration::from_millis(500),
        backoff_max: std::time::Duration::from_secs(30),
    };
    let result = ferry::consume::run_until_signal(settings);
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    for line in e.issues() {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_CONFIG as u8)
}

fn run(path: PathBuf) -> ExitCode {
    let log = lifecycle::logging::init();
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            for line in e.issues() {
                tracing::error!("Invalid config: {line}");
            }
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    log.set_level(config.log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("ferry")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(lifecycle::run(config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

/// The socket of the packaged agent (spool in /var/lib/ferry/spool).
const DEFAULT_SOCKET: &str = "/var/lib/ferry/ferry.sock";

/// Where `ferry status` asks: `--socket`, else the config's socket. A config that does not
/// validate (an edit not yet applied) still names the socket of the agent running on the
/// previous one, so its problems are printed as a warning and the socket is read leniently.
fn status_socket(path: &std::path::Path, socket: Option<PathBuf>) -> PathBuf {
    if let Some(s) = socket {
        return s;
    }
    match config::load(path) {
        Ok(c) => c.status_socket,
        Err(e) => {
            for line in e.issues() {
                eprintln!("warning: {line}");
            }
            let socket = config::status_socket_hint(path).unwrap_or_else(|| DEFAULT_SOCKET.into());
            eprintln!(
                "warning: the config does not validate (a running agent keeps its last good one); asking {}",
                socket.display()
            );
            socket
        }
    }
}

fn dry_run(path: PathBuf, wait_ms: u64) -> ExitCode {
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rounds = runtime.block_on(lifecycle::dry_run::one_round(
        &config,
        std::time::Duration::from_millis(wait_ms),
    ));
    let mut out = std::io::stdout().lock();
    let mut code = ExitCode::SUCCESS;
    for round in rounds {
        for r in &round.readings {
            if writeln!(out, "{}", lifecycle::dry_run::reading_json(r)).is_err() {
                return ExitCode::FAILURE;
            }
        }
        eprintln!(
            "{}: {} readings{}",
            round.collector,
            round.readings.len(),
            round.note.map_or(String::new(), |n| format!(" ({n})"))
        );
        if round.readings.is_empty() {
            code = ExitCode::FAILURE;
        }
    }
    code
}

fn status(path: PathBuf, socket: Option<PathBuf>, json: bool) -> ExitCode {
    let socket = status_socket(&path, socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let answer = match runtime {
        Ok(rt) => rt.block_on(lifecycle::status_socket::request_status(&socket)),
        Err(e) => Err(e),
    };
    let status = match answer {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ferry is not running (or not answering) on {}: {e}",
                socket.display()
            );
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
    };
    if json {
        println!("{status}");
    } else {
        print!("{}", render_status(&status));
    }
    ExitCode::SUCCESS
}

/// A JSON value as table text: strings without quotes, missing values as `-`, so that
/// width and alignment apply (a `serde_json::Value` ignores them).
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render_status(s: &serde_json::Value) -> String {
    let c = &s["connection"];
    let mut out = String::new();
    let state = if c["connected"] == true {
        "connected"
    } else {
        "disconnected"
    };
    out += &format!(
        "ferry {}  device {}  boot {}  up {} s  config {}\n",
        s["version"].as_str().unwrap_or("?"),
        s["device"].as_str().unwrap_or("?"),
        s["boot"].as_str().unwrap_or("?"),
        s["uptime_s"],
        s["config_hash"].as_str().unwrap_or("?")
    );
    out += &format!("broker {}  {state}", c["broker"].as_str().unwrap_or("?"));
    if c["connected"] != true {
        out += &format!("  next attempt in {} ms", c["backoff_ms"]);
    }
    out += "\n";
    if let Some(e) = c["last_error"].as_str() {
        out += &format!("last error: {e}\n");
    }
    out += &format!(
        "published {} messages, {} records acknowledged, {} connections, MQTT {}\n",
        c["messages_published"],
        c["records_acked"],
        c["connects"],
        cell(&c["mqtt_version"])
    );
    if c["publishes_refused"].as_u64().is_some_and(|n| n > 0) {
        out += &format!(
            "refused by the broker: {} publishes, {} records (kept in the spool); last: {}\n",
            c["publishes_refused"],
            c["records_refused"],
            cell(&c["last_refusal"])
        );
    }
    let b = &s["budget"];
    let limit = |v: &serde_json::Value| {
        v.as_u64()
            .map_or("unlimited".to_string(), |l| l.to_string())
    };
    out += &format!(
        "budget: today {} of {} bytes, this month {} of {} bytes{}\n",
        b["daily_used"],
        limit(&b["daily_limit"]),
        b["monthly_used"],
        limit(&b["monthly_limit"]),
        if b["spent"] == true {
            "  SPENT: only the high lane flows"
        } else {
            ""
        }
    );
    let n = &s["counters"];
    out += &format!(
        "records: collected {}, committed {}, published {}, acknowledged {}, resent {}, evicted {}\n",
        n["collected"], n["committed"], n["published"], n["acked"], n["resent"], n["evicted"]
    );
    let lost: Vec<String> = n["lost_by_reason"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    out += &format!(
        "lost: {}\n",
        if lost.is_empty() {
            "none".to_string()
        } else {
            lost.join(", ")
        }
    );
    let refused: Vec<String> = s["commands"]["refused"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, count)| count.as_u64().is_some_and(|n| n > 0))
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    out += &format!(
        "commands refused: {}\n",
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        }
    );
    out += &format!(
        "\n{:<20} {:>10} {:>12} {:>10} {:>9} {:>12}\n",
        "STREAM", "RECORDS", "BYTES", "NEXT SEQ", "EVICTED", "OLDEST (s)"
    );
    for st in s["spool"]["streams"].as_array().into_iter().flatten() {
        let age = st["oldest_age_ms"]
            .as_u64()
            .map_or("-".to_string(), |ms| (ms / 1000).to_string());
        out += &format!(
            "{:<20} {:>10} {:>12} {:>10} {:>9} {:>12}\n",
            st["name"].as_str().unwrap_or("?"),
            cell(&st["records"]),
            cell(&st["bytes"]),
            cell(&st["next_seq"]),
            cell(&st["evicted"]),
            age
        );
    }
    out += &format!(
        "\n{:<20} {:>8} {:>9} {:>11}\n",
        "COLLECTOR", "TYPE", "RESTARTS", "SUPPRESSED"
    );
    for col in s["collectors"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<20} {:>8} {:>9} {:>11}\n",
            col["name"].as_str().unwrap_or("?"),
            col["kind"].as_str().unwrap_or("?"),
            cell(&col["restarts"]),
            cell(&col["suppressed"])
        );
    }
    out
}

/// sysexits' EX_NOINPUT: there is no spool to look into.
const EXIT_NO_INPUT: u8 = 66;

/// Opens an existing spool for inspection. A missing or empty directory is an error, not a
/// new spool: `inspect` on a typo must not create a database and report it empty.
fn open_spool(path: &std::path::Path) -> Result<(Config, Spool), ExitCode> {
    let config = config::load(path).map_err(|e| config_error(&e))?;
    let dir = &config.spool.dir;
    if !dir.join("db").is_file() {
        eprintln!(
            "error: no spool at {} (spool.dir in {}); nothing to inspect",
            dir.display(),
            path.display()
        );
        return Err(ExitCode::from(EXIT_NO_INPUT));
    }
    // Never moves a corrupt spool aside: inspecting must not change what is inspected.
    match Spool::open_to_inspect(&config.spool) {
        Ok(s) => Ok((config, s)),
        Err(e) => {
            eprintln!("error: {e}");
            if matches!(e, ferry::spool::SpoolError::Locked { .. }) {
                eprintln!("stop the agent first (systemctl stop ferry)");
            }
            Err(ExitCode::FAILURE)
        }
    }
}

fn spool(command: SpoolCommand) -> ExitCode {
    match command {
        SpoolCommand::Inspect { config, json } => {
            let (config, spool) = match open_spool(&config) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let report = match spool.inspect() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let disk = spool.disk_bytes();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": config.spool.dir, "disk_bytes": disk, "streams": report })
                );
            } else {
                println!(
                    "spool {}  {} bytes on disk",
                    config.spool.dir.display(),
                    disk
                );
                println!(
                    "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9} {:>15} {:>15}",
                    "STREAM",
                    "RECORDS",
                    "BYTES",
                    "FIRST SEQ",
                    "LAST SEQ",
                    "EVICTED",
                    "OLDEST TS",
                    "NEWEST TS"
                );
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
                for r in report {
                    println!(
                        "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9} {:>15} {:>15}",
                        r.name,
                        r.records,
                        r.bytes,
                        opt(r.first_seq),
                        opt(r.last_seq),
                        r.evicted,
                        opt(r.oldest_ts_ms),
                        opt(r.newest_ts_ms)
                    );
                }
            }
            ExitCode::SUCCESS
        }
        SpoolCommand::Export { config, stream } => {
            let (_, spool) = match open_spool(&config) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let known: Vec<String> = match spool.inspect() {
                Ok(r) => r.into_iter().map(|s| s.name).collect(),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if !known.contains(&stream) {
                eprintln!(
                    "error: the spool has no stream {stream:?}; its streams: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
                return ExitCode::from(EXIT_NO_INPUT);
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut write_error = None;
            let result = spool.for_each_record(&stream, |r| {
                match writeln!(out, "{}", ferry::wire::payload::export_line(&stream, r)) {
                    Ok(()) => true,
                    Err(e) => {
                        write_error = Some(e);
                        false
                    }
                }
            });
            let flushed = out.flush();
            match (result, write_error.map_or(flushed, Err)) {
                (Ok(n), Ok(())) => {
                    eprintln!("{n} records of {stream}");
                    ExitCode::SUCCESS
                }
                (Err(e), _) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
                (_, Err(e)) => {
                    eprintln!("error writing the export: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
