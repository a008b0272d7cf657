//! Versioned VM state: the document a snapshot writes next to the guest memory file, and that a
//! successor VMM will receive on a live update.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//!   magic "OBVMSTAT" (8) | format_version u32 | payload length u64 | payload | CRC32C u32
//! ```
//!
//! The CRC covers everything before it. The payload is the JSON form of [`VmState`] (JSON for
//! now: readable and tolerant of added fields; a binary encoding can come with a later version).
//!
//! Versions: this build writes [`FORMAT_VERSION`] and reads every version from
//! [`OLDEST_READABLE_VERSION`] up to it. When the state changes incompatibly, the next release
//! bumps `FORMAT_VERSION`, freezes today's structures in a `v1` module and adds an upgrade
//! (`from_v1`) in `decode_payload`, so a snapshot (or live update) from the previous release
//! keeps loading. `tests/fixtures/vmstate-v1.obvm` is a real v1 document that must keep loading.
//!
//! - v1: machine, boot source, memory layout, vCPUs, PICs/IOAPIC/PIT, kvmclock, legacy devices.
//! - v2: adds `pci_devices` (virtio-pci transports with their MSI-X tables and the vhost-user
//!   vring state). A v1 document is a v2 document without devices; a v1 reader would ignore the
//!   new field and lose the devices, hence the bump.
//! - v3: a vsock device among `pci_devices` (its queues, connections and pending control
//!   packets). A v2 reader can't parse it. A document without a vsock device is written as v2,
//!   so the previous release still takes a VM without one (a live update back to it).

pub mod devices;
pub mod memory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outboard_api_types::BootSource;
use outboard_hypervisor::state::VcpuState;
use outboard_hypervisor::PlatformState;
use serde::{Deserialize, Serialize};

/// Marks an outboard-vmm state file.
pub const MAGIC: [u8; 8] = *b"OBVMSTAT";
/// The newest version this build writes (see [`encode`] for when it writes an older one).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest version this build reads (N−1).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Bigger state files are refused unread (a small VM's state is tens of KiB).
pub const MAX_PAYLOAD: u64 = 64 << 20;

const HEADER_LEN: usize = 8 + 4 + 8;

/// Errors of encoding, decoding, reading and writing VM state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Not an outboard-vmm state file (bad magic)")]
    BadMagic,
    #[error("State file is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("State format version {found} is newer than this VMM reads (up to {newest})")]
    TooNew { found: u32, newest: u32 },
    #[error("State format version {found} is older than this VMM reads (from {oldest})")]
    TooOld { found: u32, oldest: u32 },
    #[error("State payload of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("State file checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("Malformed state document")]
    Json(#[source] serde_json::Error),
    #[error("Inconsistent state document: {0}")]
    Inconsistent(String),
    #[error("Cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// vCPU count and memory size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
}

/// One guest RAM range and where it lies in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRangeState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Guest memory: its total size (the memory file's length) and layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    pub size: u64,
    pub ranges: Vec<RamRangeState>,
}

/// The whole VM at a pause point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The VMM version that wrote it (informational).
    pub vmm_version: String,
    pub machine: MachineState,
    /// Kept so a guest reset with `--reboot restart` can reload the kernel after a restore.
    pub boot: Option<BootSource>,
    pub memory: MemoryState,
    pub vcpus: Vec<VcpuState>,
    /// PICs, IOAPIC and PIT.
    pub platform: PlatformState,
    /// kvmclock at the pause, in ns: the restored clock continues from here.
    pub clock_ns: u64,
    /// [`outboard_devices::Lifecycle::save`] of each device, by its name.
    pub devices: BTreeMap<String, serde_json::Value>,
    /// Virtio devices on PCI, in slot order (format v2; empty in v1).
    #[serde(default)]
    pub pci_devices: Vec<PciDeviceState>,
}

/// What a virtio device on PCI was made from (`--disk`, `--net`, `--vsock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciDeviceConfig {
    Disk(outboard_virtio_devices::options::DiskConfig),
    Net(outboard_virtio_devices::options::NetConfig),
    /// Format v3.
    Vsock(outboard_virtio_devices::options::VsockConfig),
}

impl PciDeviceConfig {
    /// Checks a deserialized configuration as `--disk`/`--net`/`--vsock` check theirs (a state
    /// document may be hostile: a queue count out of range must not reach the devices).
    pub fn validate(&self) -> Result<(), Error> {
        use outboard_virtio_devices::options::{DiskConfig, NetConfig, VsockConfig};
        let path = |p: &Path| {
            p.to_str()
                .filter(|p| !p.contains([',', '=']))
                .map(str::to_owned)
                .ok_or_else(|| Error::Inconsistent(format!("device path {}", p.display())))
        };
        let same = match self {
            PciDeviceConfig::Disk(c) => format!(
                "socket={},num_queues={},queue_size={}",
                path(&c.socket)?,
                c.num_queues,
                c.queue_size
            )
            .parse::<DiskConfig>()
            .is_ok_and(|p| p == *c),
            PciDeviceConfig::Net(c) => {
                let mut opts = format!(
                    "socket={},num_queues={},queue_size={}",
                    path(&c.socket)?,
                    c.num_queues,
                    c.queue_size
                );
                if let Some(mac) = &c.mac {
                    opts.push_str(&format!(",mac={}", crate::pci::mac_string(mac)));
                }
                opts.parse::<NetConfig>().is_ok_and(|p| p == *c)
            }
            PciDeviceConfig::Vsock(c) => format!("cid={},uds_path={}", c.cid, path(&c.uds_path)?)
                .parse::<VsockConfig>()
                .is_ok_and(|p| p == *c),
        };
        if !same {
            return Err(Error::Inconsistent(format!(
                "device configuration {self:?}"
            )));
        }
        Ok(())
    }
}

/// One virtio device on PCI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PciDeviceState {
    /// Metrics label, e.g. `virtio-blk0`.
    pub label: String,
    /// Device number on bus 0.
    pub slot: u8,
    pub config: PciDeviceConfig,
    /// Whether an inflight region is among the handed-over descriptors.
    pub inflight: bool,
    /// The transport's saved state (`{"transport": …, "device": …}`).
    pub state: serde_json::Value,
}

impl VmState {
    /// Checks what a hostile or corrupt file could get wrong that serde can't see.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Inconsistent(m));
        if self.machine.vcpu_count as usize != self.vcpus.len() {
            return bad(format!(
                "{} vCPUs configured but {} saved",
                self.machine.vcpu_count,
                self.vcpus.len()
            ));
        }
        if self.machine.mem_size_mib.checked_shl(20) != Some(self.memory.size)
            || self.memory.size >> 20 != self.machine.mem_size_mib
        {
            return bad(format!(
                "memory size {} does not match {} MiB",
                self.memory.size, self.machine.mem_size_mib
            ));
        }
        let expected: Vec<RamRangeState> = outboard_boot::layout::ram_ranges(self.memory.size)
            .iter()
            .map(|r| RamRangeState {
                guest_addr: r.guest_addr,
                size: r.size,
                file_offset: r.file_offset,
            })
            .collect();
        if expected != self.memory.ranges {
            return bad("memory layout differs from this VMM's layout for that size".into());
        }
        for device in &self.pci_devices {
            device.config.validate()?;
        }
        Ok(())
    }
}

/// The oldest version that holds everything in `state`.
pub fn version_for(state: &VmState) -> u32 {
    let vsock = state
        .pci_devices
        .iter()
        .any(|d| matches!(d.config, PciDeviceConfig::Vsock(_)));
    if vsock {
        3
    } else {
        2
    }
}

/// The state file's bytes for `state`, as the oldest version that holds it
/// ([`version_for`]).
pub fn encode(state: &VmState) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(state).map_err(Error::Json)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version_for(state).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Parses and checks a state file's bytes, upgrading older versions.
pub fn decode(bytes: &[u8]) -> Result<VmState, Error> {
    if bytes.len() < HEADER_LEN + 4 {
        return Err(if bytes.len() >= 8 && bytes[..8] != MAGIC {
            Error::BadMagic
        } else {
            Error::Truncated(bytes.len())
        });
    }
    if bytes[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..HEADER_LEN]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    // Cannot overflow: len is at most MAX_PAYLOAD.
    let end = HEADER_LEN + len as usize;
    if bytes.len() != end + 4 {
        return Err(Error::Truncated(bytes.len()));
    }
    let stored = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
    let computed = crc32c::crc32c(&bytes[..end]);
    if stored != computed {
        return Err(Error::Checksum { stored, computed });
    }
    let state = decode_payload(version, &bytes[HEADER_LEN..end])?;
    state.validate()?;
    Ok(state)
}

/// The reader of every supported version. A new version adds an arm here that parses the old
/// structures and converts them (`v1::VmState` → `VmState` in `from_v1`).
fn decode_payload(version: u32, payload: &[u8]) -> Result<VmState, Error> {
    match version {
        v if v > FORMAT_VERSION => Err(Error::TooNew {
            found: v,
            newest: FORMAT_VERSION,
        }),
        // v1 lacks `pci_devices`, which defaults to none: the upgrade is the parse.
        1 => {
            let state: VmState = serde_json::from_slice(payload).map_err(Error::Json)?;
            if !state.pci_devices.is_empty() {
                return Err(Error::Inconsistent("a v1 document with PCI devices".into()));
            }
            Ok(state)
        }
        2 | 3 => {
            let state: VmState = serde_json::from_slice(payload).map_err(Error::Json)?;
            if version < version_for(&state) {
                return Err(Error::Inconsistent(format!(
                    "a v{version} document with a vsock device"
                )));
            }
            Ok(state)
        }
        v => Err(Error::TooOld {
            found: v,
            oldest: OLDEST_READABLE_VERSION,
        }),
    }
}

/// Writes `state` to `path` (created or truncated).
pub fn write_file(path: &Path, state: &VmState) -> Result<(), Error> {
    let bytes = encode(state)?;
    std::fs::write(path, bytes).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads, checks and upgrades the state file at `path`.
pub fn read_file(path: &Path) -> Result<VmState, Error> {
    let read = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let len = file.metadata().map_err(read)?.len();
    if len > MAX_PAYLOAD + (HEADER_LEN as u64) + 4 {
        return Err(Error::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, len + 1), &mut bytes)
        .map_err(read)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests;
