//! The device id when the config does not set one.
//!
//! Topics and the MQTT client id are built from it, so two devices must never share it. The
//! host name is used when it names this device; but images are flashed by the thousand with a
//! stock host name (`raspberrypi`, `debian`, ...), and two gateways with the same id knock each
//! other off the broker. For those, and for an empty host name, the id is the host name plus a
//! stable per-device suffix derived from `/etc/machine-id` (or, on boards without one, the
//! device-tree serial number). The machine id itself is not published: like systemd's
//! `sd_id128_get_machine_app_specific`, the suffix is an HMAC-SHA256 of a ferry-specific
//! constant keyed by it, so it cannot be traced back to the machine id.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// Host names that ship with common images and so do not tell devices apart.
pub const STOCK_HOST_NAMES: &[&str] = &[
    "raspberrypi",
    "raspberry",
    "localhost",
    "localhost.localdomain",
    "debian",
    "ubuntu",
    "dietpi",
    "armbian",
    "orangepi",
    "rockpi",
    "beaglebone",
    "pi",
    "openwrt",
    "alarmpi",
    "alarm",
    "nixos",
    "fedora",
    "archlinux",
    "ferry",
];

/// Where per-device identity is read from, in order.
const MACHINE_ID_FILES: &[&str] = &["/etc/machine-id", "/var/lib/dbus/machine-id"];
const SERIAL_FILES: &[&str] = &[
    "/sys/firmware/devicetree/base/serial-number",
    "/proc/device-tree/serial-number",
];

/// Characters of the derived suffix (48 bits: collisions are negligible for any fleet).
const SUFFIX_HEX: usize = 12;
const APP_KEY: &[u8] = b"ferry device id v1";

/// A device id and why it was chosen (logged at start).
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultId {
    pub id: String,
    pub source: String,
}

/// The default device id from this machine's host name and identity files.
pub fn default_device_id() -> DefaultId {
    let host = host_name();
    derive(
        &host,
        read_identity(MACHINE_ID_FILES).or_else(|| read_identity(SERIAL_FILES)),
    )
}

fn read_identity(files: &[&str]) -> Option<(String, String)> {
    files.iter().find_map(|f| {
        let text = std::fs::read(Path::new(f)).ok()?;
        let text = String::from_utf8_lossy(&text);
        let id = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        (!id.is_empty()).then(|| (f.to_string(), id.to_string()))
    })
}

/// `host` when it is not a stock name; otherwise `host` (or `ferry`) plus a suffix derived
/// from the identity `(file, value)`.
fn derive(host: &str, identity: Option<(String, String)>) -> DefaultId {
    let stock = host.is_empty()
        || STOCK_HOST_NAMES
            .iter()
            .any(|s| s.eq_ignore_ascii_case(host));
    if !stock {
        return DefaultId {
            id: host.to_string(),
            source: "host name".into(),
        };
    }
    let base = if host.is_empty() { "ferry" } else { host };
    match identity {
        Some((file, value)) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(value.as_bytes())
                .expect("HMAC takes a key of any length");
            mac.update(APP_KEY);
            let digest = hex::encode(mac.finalize().into_bytes());
            DefaultId {
                id: format!("{base}-{}", &digest[..SUFFIX_HEX]),
                source: format!("host name {host:?} is a stock name; suffix derived from {file}"),
            }
        }
        None => DefaultId {
            id: base.to_string(),
            source: format!(
                "host name {host:?} is a stock name and no machine id or board serial was found; set device_id"
            ),
        },
    }
}

/// The host name, reduced to characters usable in a topic; "ferry" if it cannot be read.
fn host_name() -> String {
    let name = sysinfo::System::host_name()
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let clean: String = name
        .trim()
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-') {
                ch
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "ferry".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(file: &str, v: &str) -> Option<(String, String)> {
        Some((file.to_string(), v.to_string()))
    }

    #[test]
    fn a_distinct_host_name_is_used_as_it_is() {
        let d = derive("gw-north-7", id("/etc/machine-id", "abc"));
        assert_eq!(d.id, "gw-north-7");
    }

    #[test]
    fn stock_names_get_a_stable_suffix_that_differs_per_machine() {
        let a = derive(
            "raspberrypi",
            id("/etc/machine-id", "0123456789abcdef0123456789abcdef"),
        );
        let a2 = derive(
            "raspberrypi",
            id("/etc/machine-id", "0123456789abcdef0123456789abcdef"),
        );
        let b = derive(
            "raspberrypi",
            id("/etc/machine-id", "fedcba9876543210fedcba9876543210"),
        );
        assert_eq!(a, a2, "stable across starts");
        assert_ne!(a.id, b.id, "two machines, two ids");
        assert!(a.id.starts_with("raspberrypi-"), "{a:?}");
        assert_eq!(a.id.len(), "raspberrypi-".len() + SUFFIX_HEX);
        assert!(
            !a.id.contains("0123456789abcdef"),
            "the machine id itself is not published"
        );
        assert!(crate::record::is_valid_stream_name(&a.id));
    }

    #[test]
    fn stock_names_are_matched_without_case_and_an_empty_name_counts_as_stock() {
        assert!(
            derive("Ubuntu", id("/etc/machine-id", "x"))
                .id
                .starts_with("Ubuntu-")
        );
        assert!(
            derive("", id("/etc/machine-id", "x"))
                .id
                .starts_with("ferry-")
        );
    }

    #[test]
    fn without_any_identity_the_name_stays_and_the_source_says_to_set_it() {
        let d = derive("raspberrypi", None);
        assert_eq!(d.id, "raspberrypi");
        assert!(d.source.contains("set device_id"), "{d:?}");
    }
}
