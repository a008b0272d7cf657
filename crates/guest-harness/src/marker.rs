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

/// The first word of every sector the test guest's blk commands write, followed by the sector
/// number and the seed (little-endian u64s).
pub const BLK_MAGIC: u64 = 0x0142_4C4B_424F_0000;

/// Checks that a disk image holds the test guest's pattern: `blocks` blocks spread evenly over
/// `capacity_sectors` 512-byte sectors, each starting with [`BLK_MAGIC`], its sector and `seed`.
/// Returns the first block that doesn't.
pub fn check_blk_pattern(
    image: &[u8],
    capacity_sectors: u64,
    blocks: u64,
    seed: u64,
) -> Result<(), String> {
    let stride = capacity_sectors / blocks.max(1);
    for i in 0..blocks {
        let sector = i * stride;
        let at = usize::try_from(sector * 512).map_err(|e| e.to_string())?;
        let word = |k: usize| {
            image
                .get(at + 8 * k..at + 8 * k + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        let found = (word(0), word(1), word(2));
        if found != (Some(BLK_MAGIC), Some(sector), Some(seed)) {
            return Err(format!(
                "block {i} (sector {sector}): found {found:x?}, want magic, sector {sector}, seed {seed}"
            ));
        }
    }
    Ok(())
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
    fn blk_pattern_check_finds_the_first_bad_block_and_never_reads_past_the_image() {
        let (sectors, blocks, seed) = (64u64, 4u64, 9u64);
        let mut image = vec![0u8; (sectors * 512) as usize];
        for i in 0..blocks {
            let sector = i * (sectors / blocks);
            let at = (sector * 512) as usize;
            for (k, w) in [BLK_MAGIC, sector, seed].iter().enumerate() {
                image[at + 8 * k..at + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
            }
        }
        assert_eq!(check_blk_pattern(&image, sectors, blocks, seed), Ok(()));
        assert!(check_blk_pattern(&image, sectors, blocks, seed + 1)
            .unwrap_err()
            .starts_with("block 0 "));
        image[16 * 512 + 8] ^= 1;
        assert!(check_blk_pattern(&image, sectors, blocks, seed)
            .unwrap_err()
            .starts_with("block 1 "));
        assert!(check_blk_pattern(&image[..100], sectors, blocks, seed).is_err());
    }

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
