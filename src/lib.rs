//! ferry: an edge telemetry agent that never loses a reading.
//!
//! # Layout
//!
//! The folders follow the data:
//!
//! - [`collectors`]: sample the host, serial lines and files and hand
//!   [`record::Reading`]s to the spool through a bounded channel.
//! - [`spool`]: the disk-backed queue on sled. A reading becomes a record with a per-stream
//!   `seq` when its group is committed and flushed; only then is it "accepted".
//! - [`uplink`]: drains the spool to an MQTT broker at QoS 1 and deletes a record only after the
//!   broker's PUBACK for the message that carried it.
//!
//! Beside them:
//!
//! - [`config`]: the YAML file, parsed and validated into a frozen runtime form, assembled
//!   from the settings types the other modules own.
//! - [`commands`]: the command topic: requests decoded, recorded, run at most once, replied to
//!   through the spool.
//! - [`lifecycle`]: start-up order, signals, logging, systemd notification and shutdown phases.
//! - [`record`]: the record model shared by every part.
//! - [`loss`]: the one typed loss report (`ferry.loss`), built by whoever drops data.
//! - [`wire`]: every encoding of a message on the wire, and the decoder.
//!
//! Leaves that any part may import: [`record`] (the record model shared by every part),
//! [`clock`], [`backoff`], [`issue`] (validation issues), [`heartbeat`] (watchdog liveness),
//! [`control`] (runtime requests to the lifecycle), [`command_link`] (uplink <-> command
//! service channels), [`tls`] (the TLS loader).
//!
//! Imports between these modules go one way only: collectors and commands use the spool,
//! the uplink uses the spool and wire, config assembles the settings each module owns, the
//! lifecycle uses everything. `docs/ARCHITECTURE.md` ("Layers") lists the allowed arrows
//! (`tests/layering.rs` enforces them) and describes how the parts fit and which contracts
//! they keep.

pub mod backoff;
pub mod clock;
pub mod collectors;
pub mod command_link;
pub mod commands;
pub mod config;
pub mod consume;
pub mod control;
pub mod heartbeat;
pub mod issue;
pub mod lifecycle;
pub mod loss;
pub mod record;
pub mod spool;
pub mod tls;
pub mod uplink;
pub mod wire;

/// The agent's version, as published in the online status and `ferry --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
