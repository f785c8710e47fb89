//! The system collector: CPU, load, memory, disks, networks, temperatures and uptime from
//! sysinfo, one reading with named fields per interval.
//!
//! - Only what is enabled is refreshed, with the narrowest sysinfo refresh kind (a full
//!   `refresh_all` would also scan every process).
//! - CPU usage is a difference between two refreshes, so the sampler refreshes once at start
//!   and waits `MINIMUM_CPU_UPDATE_INTERVAL` before the first sample: the first reading is
//!   right, not the garbage sysinfo reports after a single refresh.
//! - Counters (network bytes, packets, errors) are sent as totals since boot, so a lost or
//!   evicted sample costs resolution, never a wrong sum.
//! - Sampling reads /proc and /sys synchronously; it runs on the blocking pool.

use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::config::Issue;
use crate::record::{Reading, Value};
use crate::spool::Intake;
use serde::Deserialize;
use std::time::Duration;
use sysinfo::{
    Components, CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, System,
};

/// Shortest interval accepted: sysinfo's CPU usage needs at least this between refreshes.
pub const MIN_INTERVAL_MS: u64 = 200;

fn yes() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Static `tag.<key>` fields added to every reading.
    #[serde(default)]
    pub tags: super::common::Tags,
    /// Total CPU usage in percent.
    #[serde(default = "yes")]
    pub cpu: bool,
    /// Also one usage field per core.
    #[serde(default)]
    pub per_core: bool,
    #[serde(default = "yes")]
    pub load: bool,
    #[serde(default = "yes")]
    pub memory: bool,
    #[serde(default = "yes")]
    pub disks: bool,
    /// Only these mount points; all listed disks when empty.
    #[serde(default)]
    pub mounts: Vec<String>,
    #[serde(default = "yes")]
    pub networks: bool,
    /// Only these interfaces; all but `lo` when empty.
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default = "yes")]
    pub temperatures: bool,
    #[serde(default = "yes")]
    pub uptime: bool,
    /// Report-on-change thresholds and heartbeat (see [`super::deadband`]).
    #[serde(default)]
    pub deadband: Option<super::deadband::DeadbandConfig>,
}

impl CollectorSpec for SystemConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = super::common::validate_tags(&self.tags);
        if !(MIN_INTERVAL_MS..=86_400_000).contains(&self.interval_ms) {
            issues.push(Issue::new(
                "interval_ms",
                format!(
                    "must be between {MIN_INTERVAL_MS} and 86400000, got {} (CPU usage needs at least {MIN_INTERVAL_MS} ms between samples)",
                    self.interval_ms
                ),
            ));
        }
        issues
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(SystemCollector {
            config: self.clone(),
        })
    }

    fn deadband(&self) -> Option<&super::deadband::DeadbandConfig> {
        self.deadband.as_ref()
    }

    fn set_interval_ms(&mut self, interval_ms: u64) -> bool {
        self.interval_ms = interval_ms;
        true
    }
}

pub struct SystemCollector {
    config: SystemConfig,
}

impl Collector for SystemCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        Box::pin(run(self.config, ctx))
    }
}

async fn run(config: SystemConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let interval = Duration::from_millis(config.interval_ms);
    let tags = config.tags.clone();
    let mut sampler = tokio::task::spawn_blocking(move || Sampler::new(config))
        .await
        .map_err(|e| CollectorError::Source(format!("sampler start panicked: {e}")))??;
    // CPU usage is a difference between two refreshes: wait before the first sample.
    tokio::select! {
        _ = ctx.shutdown.cancelled() => return Ok(()),
        _ = tokio::time::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL) => {}
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
            _ = ctx.sample_now.notified() => {}
        }
        let (back, mut fields) = tokio::task::spawn_blocking(move || {
            let fields = sampler.sample();
            (sampler, fields)
        })
        .await
        .map_err(|e| CollectorError::Source(format!("sampling panicked: {e}")))?;
        sampler = back;
        super::common::add_tags(&mut fields, &tags);
        ctx.send(Intake::reading(Reading::fields(ctx.name.clone(), fields)))
            .await?;
    }
}

/// Holds the sysinfo state between samples.
pub struct Sampler {
    config: SystemConfig,
    system: System,
    disks: Option<Disks>,
    networks: Option<Networks>,
    components: Option<Components>,
}

fn source_err(what: &str, e: impl std::fmt::Display) -> CollectorError {
    CollectorError::Source(format!("cannot read {what}: {e}"))
}

impl Sampler {
    pub fn new(config: SystemConfig) -> Result<Sampler, CollectorError> {
        let mut system = System::new().map_err(|e| source_err("system information", e))?;
        if config.cpu || config.per_core {
            system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        }
        let disks = config
            .disks
            .then(|| {
                Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage())
            })
            .transpose()
            .map_err(|e| source_err("disks", e))?;
        let networks = config
            .networks
            .then(Networks::new_with_refreshed_list)
            .transpose()
            .map_err(|e| source_err("network interfaces", e))?;
        let components = config
            .temperatures
            .then(Components::new_with_refreshed_list)
            .transpose()
            .map_err(|e| source_err("temperature sensors", e))?;
        Ok(Sampler {
            config,
            system,
            disks,
            networks,
            components,
        })
    }

    /// Refreshes what is enabled and returns one reading's fields.
    pub fn sample(&mut self) -> Vec<(String, Value)> {
        let c = &self.config;
        let mut f: Vec<(String, Value)> = Vec::with_capacity(32);
        if c.cpu || c.per_core {
            self.system
                .refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
            if c.cpu {
                f.push(("cpu.total_pct".into(), pct(self.system.global_cpu_usage())));
            }
            if c.per_core {
                for (i, cpu) in self.system.cpus().iter().enumerate() {
                    f.push((format!("cpu.{i}.pct"), pct(cpu.usage())));
                }
            }
        }
        if c.load
            && let Ok(l) = System::load_average()
        {
            f.push(("load.1".into(), Value::F64(l.one)));
            f.push(("load.5".into(), Value::F64(l.five)));
            f.push(("load.15".into(), Value::F64(l.fifteen)));
        }
        if c.memory {
            self.system
                .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
            let s = &self.system;
            f.push(("mem.total_bytes".into(), Value::U64(s.total_memory())));
            f.push(("mem.used_bytes".into(), Value::U64(s.used_memory())));
            f.push((
                "mem.available_bytes".into(),
                Value::U64(s.available_memory()),
            ));
            f.push(("swap.total_bytes".into(), Value::U64(s.total_swap())));
            f.push(("swap.used_bytes".into(), Value::U64(s.used_swap())));
        }
        if let Some(disks) = &mut self.disks {
            disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
            // Bind mounts (e.g. systemd's sandbox, containers) list one filesystem under several
            // mount points: unless mounts are chosen explicitly, report each filesystem once,
            // under its shortest mount point.
            let mut list: Vec<_> = disks.iter().collect();
            list.sort_by_key(|d| d.mount_point().as_os_str().len());
            let mut seen_mounts = std::collections::HashSet::new();
            let mut seen_filesystems = std::collections::HashSet::new();
            for d in list {
                let mount = d.mount_point().to_string_lossy().into_owned();
                let wanted = if c.mounts.is_empty() {
                    seen_filesystems.insert((d.name().to_owned(), d.total_space()))
                } else {
                    c.mounts.contains(&mount)
                };
                if !wanted || !seen_mounts.insert(mount.clone()) {
                    continue;
                }
                let key = mount_key(&mount);
                let (total, avail) = (d.total_space(), d.available_space());
                f.push((format!("disk.{key}.total_bytes"), Value::U64(total)));
                f.push((
                    format!("disk.{key}.used_bytes"),
                    Value::U64(total.saturating_sub(avail)),
                ));
                f.push((format!("disk.{key}.available_bytes"), Value::U64(avail)));
            }
        }
        if let Some(nets) = &mut self.networks {
            nets.refresh(true);
            let mut names: Vec<_> = nets.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, data) in names {
                let name = name.to_string_lossy();
                let wanted = if c.interfaces.is_empty() {
                    name != "lo"
                } else {
                    c.interfaces.iter().any(|i| *i == *name)
                };
                if !wanted {
                    continue;
                }
                let key = sanitize(&name);
                for (field, v) in [
                    ("rx_bytes", data.total_received()),
                    ("tx_bytes", data.total_transmitted()),
                    ("rx_packets", data.total_packets_received()),
                    ("tx_packets", data.total_packets_transmitted()),
                    ("rx_errors", data.total_errors_on_received()),
                    ("tx_errors", data.total_errors_on_transmitted()),
                ] {
                    f.push((format!("net.{key}.{field}"), Value::U64(v)));
                }
            }
        }
        if let Some(components) = &mut self.components {
            components.refresh(false);
            for comp in components.iter() {
                if let Some(t) = comp.temperature().filter(|t| t.is_finite()) {
                    f.push((format!("temp.{}.celsius", sanitize(comp.label())), pct(t)));
                }
            }
        }
        if c.uptime
            && let Ok(up) = System::uptime()
        {
            f.push(("uptime_s".into(), Value::U64(up)));
        }
        f
    }
}

/// One decimal is all a percentage needs; it keeps the wire small.
fn pct(v: f32) -> Value {
    Value::F64((f64::from(v) * 10.0).round() / 10.0)
}

/// `/` -> `root`, `/boot/efi` -> `boot_efi`.
fn mount_key(mount: &str) -> String {
    let trimmed = mount.trim_matches('/');
    if trimmed.is_empty() {
        "root".into()
    } else {
        sanitize(trimmed)
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '-' {
                ch.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SystemConfig {
        serde_yaml::from_str("name: system\ninterval_ms: 1000\nper_core: true\n").unwrap()
    }

    #[test]
    fn mount_keys_are_topic_safe() {
        assert_eq!(mount_key("/"), "root");
        assert_eq!(mount_key("/boot/efi"), "boot_efi");
        assert_eq!(sanitize("Package id 0"), "package_id_0");
    }

    #[test]
    fn first_sample_has_sane_cpu_and_memory() {
        let mut s = Sampler::new(config()).unwrap();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let fields = s.sample();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match get("cpu.total_pct") {
            Some(Value::F64(v)) => assert!((0.0..=100.0).contains(&v), "cpu {v}"),
            other => panic!("cpu.total_pct missing: {other:?}"),
        }
        assert!(fields.iter().any(|(n, _)| n == "cpu.0.pct"));
        match get("mem.total_bytes") {
            Some(Value::U64(v)) => assert!(v > 0),
            other => panic!("mem.total_bytes missing: {other:?}"),
        }
        assert!(get("uptime_s").is_some());
        assert!(get("load.1").is_some());
    }

    #[test]
    fn disabled_sections_are_not_sampled() {
        let cfg: SystemConfig = serde_yaml::from_str(
            "name: s\ncpu: false\nload: false\ndisks: false\nnetworks: false\ntemperatures: false\nuptime: false\n",
        )
        .unwrap();
        let mut s = Sampler::new(cfg).unwrap();
        let mut names: Vec<String> = s.sample().into_iter().map(|(n, _)| n).collect();
        names.sort();
        // Memory is the one section left on: exactly its fields, nothing of the others.
        assert_eq!(
            names,
            [
                "mem.available_bytes",
                "mem.total_bytes",
                "mem.used_bytes",
                "swap.total_bytes",
                "swap.used_bytes"
            ],
        );
    }

    #[tokio::test]
    async fn tags_are_added_to_every_reading() {
        let cfg: SystemConfig = serde_yaml::from_str(
            "name: s\ninterval_ms: 200\ncpu: false\ndisks: false\nnetworks: false\ntemperatures: false\ntags: {site: north}\n",
        )
        .unwrap();
        let (ctx, mut rx) = CollectorContext::new_test("s");
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(cfg.build().run(ctx));
        let intake = rx.recv().await.unwrap();
        let crate::record::Body::Fields(f) = &intake.readings[0].body else {
            panic!("fields expected")
        };
        assert!(
            f.contains(&("tag.site".into(), Value::Str("north".into()))),
            "{f:?}"
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn interval_below_cpu_minimum_is_rejected() {
        let mut cfg = config();
        cfg.interval_ms = 50;
        assert_eq!(cfg.validate().len(), 1);
    }
}
