//! Device option strings: `--disk socket=PATH[,num_queues=N,queue_size=M]`,
//! `--net socket=PATH[,mac=MAC,num_queues=N,queue_size=M]` and
//! `--vsock cid=N,uds_path=PATH`. The same structs come from the API as JSON.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUES: u16 = 64;

/// Errors of parsing a device option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Unknown option {key:?} (expected one of {expected})")]
    UnknownKey { key: String, expected: &'static str },
    #[error("Option {0:?} has no value (expected key=value)")]
    NoValue(String),
    #[error("Option {key} given twice")]
    Duplicate { key: String },
    #[error("Option {key}={value} is invalid: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("Option {0} is required")]
    Missing(&'static str),
}

/// A vhost-user block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// A vhost-user net device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub socket: PathBuf,
    pub mac: Option<[u8; 6]>,
    /// Virtqueues (an RX/TX pair per queue pair).
    pub num_queues: u16,
    pub queue_size: u16,
}

/// The in-VMM vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: PathBuf,
}

/// Splits `a=b,c=d` into pairs, refusing unknown and repeated keys.
fn pairs<'a>(
    s: &'a str,
    keys: &'static [&'static str],
    expected: &'static str,
) -> Result<Vec<(&'static str, &'a str)>, Error> {
    let mut out: Vec<(&'static str, &str)> = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Error::NoValue(item.to_string()))?;
        let key = keys
            .iter()
            .find(|known| **known == k)
            .ok_or_else(|| Error::UnknownKey {
                key: k.to_string(),
                expected,
            })?;
        if out.iter().any(|(seen, _)| seen == key) {
            return Err(Error::Duplicate { key: k.to_string() });
        }
        out.push((key, v));
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, Error> {
    value.parse().map_err(|_| Error::BadValue {
        key,
        value: value.to_string(),
        reason: "not a number",
    })
}

fn queue_count(key: &'static str, value: &str, pairs_needed: bool) -> Result<u16, Error> {
    let n: u16 = number(key, value)?;
    let bad = |reason| Error::BadValue {
        key,
        value: value.to_string(),
        reason,
    };
    if n == 0 || n > MAX_QUEUES {
        return Err(bad("must be 1 to 64"));
    }
    if pairs_needed && n & 1 != 0 {
        return Err(bad("must be even (RX/TX pairs)"));
    }
    Ok(n)
}

fn queue_size(value: &str) -> Result<u16, Error> {
    let n: u16 = number("queue_size", value)?;
    if n == 0 || !n.is_power_of_two() || n > 32768 {
        return Err(Error::BadValue {
            key: "queue_size",
            value: value.to_string(),
            reason: "must be a power of two up to 32768",
        });
    }
    Ok(n)
}

fn socket(value: &str) -> Result<PathBuf, Error> {
    if value.is_empty() {
        return Err(Error::BadValue {
            key: "socket",
            value: String::new(),
            reason: "empty path",
        });
    }
    Ok(PathBuf::from(value))
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`; multicast addresses are refused.
pub fn parse_mac(value: &str) -> Result<[u8; 6], Error> {
    let bad = |reason| Error::BadValue {
        key: "mac",
        value: value.to_string(),
        reason,
    };
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| bad("expected six hex bytes"))?;
        if part.len() != 2 {
            return Err(bad("expected six hex bytes"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad("expected six hex bytes"))?;
    }
    if parts.next().is_some() {
        return Err(bad("expected six hex bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(bad("multicast address"));
    }
    Ok(mac)
}

impl std::str::FromStr for DiskConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut cfg = DiskConfig {
            socket: PathBuf::new(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        };
        let mut have_socket = false;
        for (k, v) in pairs(
            s,
            &["socket", "num_queues", "queue_size"],
            "socket, num_queues, queue_size",
        )? {
            match k {
                "socket" => {
                    cfg.socket = socket(v)?;
                    have_socket = true;
                }
                "num_queues" => cfg.num_queues = queue_count(k, v, false)?,
                _ => cfg.queue_size = queue_size(v)?,
            }
        }
        if !have_socket {
            return Err(Error::Missing("socket"));
        }
        Ok(cfg)
    }
}

impl std::str::FromStr for NetConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut cfg = NetConfig {
            socket: PathBuf::new(),
            mac: None,
            num_queues: 2,
            queue_size: DEFAULT_QUEUE_SIZE,
        };
        let mut have_socket = false;
        for (k, v) in pairs(
            s,
            &["socket", "mac", "num_queues", "queue_size"],
            "socket, mac, num_queues, queue_size",
        )? {
            match k {
                "socket" => {
                    cfg.socket = socket(v)?;
                    have_socket = true;
                }
                "mac" => cfg.mac = Some(parse_mac(v)?),
                "num_queues" => cfg.num_queues = queue_count(k, v, true)?,
                _ => cfg.queue_size = queue_size(v)?,
            }
        }
        if !have_socket {
            return Err(Error::Missing("socket"));
        }
        Ok(cfg)
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (mut cid, mut uds) = (None, None);
        for (k, v) in pairs(s, &["cid", "uds_path"], "cid, uds_path")? {
            match k {
                "cid" => {
                    let n: u64 = number("cid", v)?;
                    // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
                    if n < 3 || n >= u64::from(u32::MAX) {
                        return Err(Error::BadValue {
                            key: "cid",
                            value: v.to_string(),
                            reason: "must be 3 to 4294967294",
                        });
                    }
                    cid = Some(n);
                }
                _ => uds = Some(socket(v)?),
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or(Error::Missing("cid"))?,
            uds_path: uds.ok_or(Error::Missing("uds_path"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_defaults_and_full_form() {
        let d: DiskConfig = "socket=/run/d.sock".parse().unwrap();
        assert_eq!((d.num_queues, d.queue_size), (1, 256));
        let d: DiskConfig = "socket=/a,num_queues=4,queue_size=128".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                socket: "/a".into(),
                num_queues: 4,
                queue_size: 128
            }
        );
    }

    #[test]
    fn disk_bad_strings() {
        let cases: &[(&str, &str)] = &[
            ("", "Option socket is required"),
            ("num_queues=2", "Option socket is required"),
            ("socket=", "Option socket= is invalid: empty path"),
            ("socket=/a,path=/b", "Unknown option \"path\""),
            ("socket=/a,socket=/b", "Option socket given twice"),
            ("socket=/a,num_queues", "Option \"num_queues\" has no value"),
            ("socket=/a,num_queues=0", "must be 1 to 64"),
            ("socket=/a,num_queues=x", "not a number"),
            ("socket=/a,queue_size=100", "power of two"),
            ("socket=/a,queue_size=65536", "not a number"),
        ];
        for (input, want) in cases {
            let err = input.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn net_mac_and_queue_pairs() {
        let n: NetConfig = "socket=/n,mac=52:54:00:12:34:56,num_queues=4"
            .parse()
            .unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(n.num_queues, 4);
        let n: NetConfig = "socket=/n".parse().unwrap();
        assert_eq!((n.mac, n.num_queues), (None, 2));
        for bad in [
            "socket=/n,num_queues=3",
            "socket=/n,mac=01:00:00:00:00:01",
            "socket=/n,mac=52:54:00:12:34",
            "socket=/n,mac=52:54:00:12:34:56:78",
            "socket=/n,mac=5:54:00:12:34:56",
            "socket=/n,mac=zz:54:00:12:34:56",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vsock_cid_range() {
        let v: VsockConfig = "cid=3,uds_path=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert!("cid=2,uds_path=/x".parse::<VsockConfig>().is_err());
        assert!("cid=4294967295,uds_path=/x".parse::<VsockConfig>().is_err());
        assert_eq!(
            "cid=5".parse::<VsockConfig>().unwrap_err(),
            Error::Missing("uds_path")
        );
    }
}
