//! Parsers for the marker lines guests print on the serial console: `MARKER key=value ...`.
//!
//! | marker | printed by | fields |
//! |---|---|---|
//! | `OUTBOARD_GUEST_READY` | both guests, once booted | `uptime` (s), `cpus`, `mem_kib` |
//! | `OUTBOARD_RUN_DONE` | both guests, after `outboard.run=<name>` | `name`, `status` |
//! | `OUTBOARD_FIO_RESULT` | Linux `fio-verify.sh` | `status`, `rc`, `errors`, ... |
//!
//! Lines come from a guest, so they are untrusted: anything malformed is an `Error`.

use std::collections::BTreeMap;

pub const READY: &str = "OUTBOARD_GUEST_READY";
pub const RUN_DONE: &str = "OUTBOARD_RUN_DONE";
pub const FIO_RESULT: &str = "OUTBOARD_FIO_RESULT";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("No {marker} marker in line {line:?}")]
    NoMarker { marker: String, line: String },
    #[error("Marker line {line:?} lacks field {field}")]
    MissingField { field: String, line: String },
    #[error("Marker field {field}={value:?} is not a valid {expected}")]
    BadField {
        field: String,
        value: String,
        expected: &'static str,
    },
}

/// The `key=value` words after `marker` in `line` (text before the marker is ignored: a
/// kernel message may share the line). Words without `=` are skipped.
pub fn fields(line: &str, marker: &str) -> Result<BTreeMap<String, String>, Error> {
    let rest = line
        .find(marker)
        .map(|at| &line[at + marker.len()..])
        .filter(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
        .ok_or_else(|| Error::NoMarker {
            marker: marker.to_string(),
            line: line.to_string(),
        })?;
    Ok(rest
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn field<T: std::str::FromStr>(
    map: &BTreeMap<String, String>,
    line: &str,
    name: &str,
    expected: &'static str,
) -> Result<T, Error> {
    let value = map.get(name).ok_or_else(|| Error::MissingField {
        field: name.to_string(),
        line: line.to_string(),
    })?;
    value.parse().map_err(|_| Error::BadField {
        field: name.to_string(),
        value: value.clone(),
        expected,
    })
}

/// `OUTBOARD_GUEST_READY uptime=<seconds> cpus=<n> mem_kib=<KiB>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyMarker {
    pub uptime_s: f64,
    pub cpus: u32,
    pub mem_kib: u64,
}

impl ReadyMarker {
    pub fn parse(line: &str) -> Result<Self, Error> {
        let map = fields(line, READY)?;
        let uptime_s: f64 = field(&map, line, "uptime", "number of seconds")?;
        if !uptime_s.is_finite() || uptime_s < 0.0 {
            return Err(Error::BadField {
                field: "uptime".into(),
                value: map["uptime"].clone(),
                expected: "number of seconds",
            });
        }
        Ok(Self {
            uptime_s,
            cpus: field(&map, line, "cpus", "CPU count")?,
            mem_kib: field(&map, line, "mem_kib", "KiB count")?,
        })
    }
}

/// `OUTBOARD_RUN_DONE name=<script or command> status=<exit code>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDone {
    pub name: String,
    pub status: i32,
}

impl RunDone {
    pub fn parse(line: &str) -> Result<Self, Error> {
        let map = fields(line, RUN_DONE)?;
        Ok(Self {
            name: field(&map, line, "name", "name")?,
            status: field(&map, line, "status", "exit code")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_marker() {
        let m =
            ReadyMarker::parse("OUTBOARD_GUEST_READY uptime=2.44 cpus=2 mem_kib=481052").unwrap();
        assert_eq!(
            m,
            ReadyMarker {
                uptime_s: 2.44,
                cpus: 2,
                mem_kib: 481_052
            }
        );
        // Kernel output may precede the marker on the same line; unknown fields are ignored.
        let m =
            ReadyMarker::parse("[ 1.0] x OUTBOARD_GUEST_READY cpus=1 mem_kib=5 uptime=0 extra=1")
                .unwrap();
        assert_eq!((m.cpus, m.mem_kib), (1, 5));
    }

    #[test]
    fn rejects_malformed_ready_markers() {
        let cases = [
            "no marker here",
            "OUTBOARD_GUEST_READYX uptime=1 cpus=1 mem_kib=1",
            "OUTBOARD_GUEST_READY cpus=2 mem_kib=1",
            "OUTBOARD_GUEST_READY uptime=1 cpus=-2 mem_kib=1",
            "OUTBOARD_GUEST_READY uptime=1 cpus=2 mem_kib=99999999999999999999999",
            "OUTBOARD_GUEST_READY uptime=NaN cpus=2 mem_kib=1",
            "OUTBOARD_GUEST_READY uptime=-1 cpus=2 mem_kib=1",
            "OUTBOARD_GUEST_READY uptime= cpus=2 mem_kib=1",
        ];
        for line in cases {
            assert!(ReadyMarker::parse(line).is_err(), "{line}");
        }
        assert_eq!(
            ReadyMarker::parse("OUTBOARD_GUEST_READY cpus=2 mem_kib=1")
                .unwrap_err()
                .to_string(),
            "Marker line \"OUTBOARD_GUEST_READY cpus=2 mem_kib=1\" lacks field uptime"
        );
    }

    #[test]
    fn parses_run_done_and_generic_fields() {
        let done = RunDone::parse("OUTBOARD_RUN_DONE name=fio-verify status=127").unwrap();
        assert_eq!(
            done,
            RunDone {
                name: "fio-verify".into(),
                status: 127
            }
        );
        assert!(RunDone::parse("OUTBOARD_RUN_DONE name=x status=ok").is_err());
        let fio = fields(
            "OUTBOARD_FIO_RESULT status=ok rc=0 dev=/dev/vda",
            FIO_RESULT,
        )
        .unwrap();
        assert_eq!(fio["status"], "ok");
        assert_eq!(fio["dev"], "/dev/vda");
    }
}
