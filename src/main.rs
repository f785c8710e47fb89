//! The `ferry` command: run the agent, or validate a config file.

use clap::{Parser, Subcommand};
use ferry::config::{self, EXIT_CONFIG};
use ferry::lifecycle;
use std::path::PathBuf;
use std::process::ExitCode;

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
        #[arg(long, short, default_value = "/etc/ferry/ferry.yaml")]
        config: PathBuf,
    },
    /// Check a config file: prints `ok`, or every problem found with its key and line
    /// (exit code 78).
    Validate {
        #[arg(long, short, default_value = "/etc/ferry/ferry.yaml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match config::load(&config) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                for line in e.issues() {
                    eprintln!("error: {line}");
                }
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
        Command::Run { config } => run(config),
    }
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
