//! The canonical VM configuration measured into PCR5.
//!
//! Two launches that give the guest the same machine must produce the same PCR5, whoever computes
//! it (the VMM at launch, or `outboard attest measure` on a user's laptop). So the configuration
//! is reduced to what the guest can observe or depends on, and encoded deterministically:
//!
//! **Encoding** (deterministic CBOR, RFC 8949 §4.2.1 core rules: definite lengths, shortest
//! integer forms, map keys sorted by their encoded bytes):
//!
//! ```text
//! { "version": 1,                       ; encoding version
//!   "vcpus": uint,
//!   "memory_bytes": uint,
//!   "devices": [ { "kind": text,        ; e.g. "virtio-blk", "virtio-net", "serial"
//!                  "id": text,          ; the VMM's device id
//!                  "backend": text,     ; backend identity, e.g. "card:vol-3f2a" or "vhost-user:/run/card/net0.sock"
//!                  "properties": { text => text } } ... ] }   ; e.g. "mac", "read_only"
//! ```
//!
//! Devices keep the order in which the VMM attaches them, because that order assigns their PCI
//! slots (which the guest sees). `properties` is a sorted map. The JSON form accepted by the CLI
//! (`--config F`) is the serde form of [`CanonicalVmConfig`].

use std::collections::BTreeMap;

use ciborium::Value;
use serde::{Deserialize, Serialize};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid memory size {0:?} (expected e.g. 512M, 2G, 1048576)")]
    BadSize(String),
    #[error("Cannot encode the VM configuration")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
}

/// Encoding version written into the canonical form.
pub const CONFIG_ENCODING_VERSION: u64 = 1;

/// One device the guest sees, with the identity of what backs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub kind: String,
    pub id: String,
    pub backend: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// What PCR5 measures about a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalVmConfig {
    pub vcpus: u32,
    pub memory_bytes: u64,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

impl CanonicalVmConfig {
    /// The deterministic CBOR encoding described in the module documentation.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, Error> {
        let devices = self
            .devices
            .iter()
            .map(|d| {
                let props = d
                    .properties
                    .iter()
                    .map(|(k, v)| (Value::Text(k.clone()), Value::Text(v.clone())))
                    .collect();
                canonical_map(vec![
                    ("kind", Value::Text(d.kind.clone())),
                    ("id", Value::Text(d.id.clone())),
                    ("backend", Value::Text(d.backend.clone())),
                    ("properties", sorted_map(props)?),
                ])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let top = canonical_map(vec![
            ("version", Value::Integer(CONFIG_ENCODING_VERSION.into())),
            ("vcpus", Value::Integer(self.vcpus.into())),
            ("memory_bytes", Value::Integer(self.memory_bytes.into())),
            ("devices", Value::Array(devices)),
        ])?;
        encode(&top)
    }
}

fn encode(v: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(Error::Encode)?;
    Ok(out)
}

fn canonical_map(entries: Vec<(&str, Value)>) -> Result<Value, Error> {
    sorted_map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::Text(k.to_owned()), v))
            .collect(),
    )
}

/// A map whose keys are in the order of their encoded bytes (RFC 8949 §4.2.1).
fn sorted_map(entries: Vec<(Value, Value)>) -> Result<Value, Error> {
    let mut keyed = entries
        .into_iter()
        .map(|(k, v)| Ok((encode(&k)?, k, v)))
        .collect::<Result<Vec<_>, Error>>()?;
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Value::Map(
        keyed.into_iter().map(|(_, k, v)| (k, v)).collect(),
    ))
}

/// Parses a memory size: plain bytes, or a number with a binary suffix `K`, `M`, `G`, `T`
/// (optionally followed by `iB` or `B`), e.g. `512M`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || Error::BadSize(s.to_owned());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_deterministic_and_sorted() {
        let mut props = BTreeMap::new();
        props.insert("read_only".to_owned(), "false".to_owned());
        let cfg = CanonicalVmConfig {
            vcpus: 2,
            memory_bytes: 512 << 20,
            devices: vec![DeviceConfig {
                kind: "virtio-blk".into(),
                id: "root".into(),
                backend: "card:vol-1".into(),
                properties: props,
            }],
        };
        let a = cfg.canonical_bytes().unwrap();
        assert_eq!(a, cfg.clone().canonical_bytes().unwrap());
        // Keys by encoded bytes: shorter text first, so "vcpus"(5) < "devices"(7) < "version"(7) < "memory_bytes"(12).
        let v: Value = ciborium::from_reader(&a[..]).unwrap();
        let keys: Vec<_> = v
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_text().unwrap().to_owned())
            .collect();
        assert_eq!(keys, ["vcpus", "devices", "version", "memory_bytes"]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
