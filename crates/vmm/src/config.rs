//! VM configuration, as the CLI and the API build it, and its validation.

use std::path::PathBuf;

use outboard_api_types::{BootSource, MachineConfig, SerialConfig, VmConfig};

/// Errors of configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Memory size {0:?} is not a number with an optional K, M, G or T suffix")]
    MemorySyntax(String),
    #[error("Memory size {0:?} is too large")]
    MemoryOverflow(String),
    #[error("Memory size must be a whole number of MiB")]
    MemoryNotMib,
    #[error("Memory size must be at least {min} MiB")]
    MemoryTooSmall { min: u64 },
    #[error("vCPU count must be at least 1")]
    NoVcpus,
    #[error("vCPU count {requested} exceeds the maximum of {max}")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("No boot source: give a kernel (--kernel or PUT /boot-source)")]
    NoBootSource,
    #[error("Unknown reboot policy {0:?} (expected exit or restart)")]
    RebootPolicy(String),
}

/// What a guest-initiated reset does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RebootPolicy {
    /// The VMM exits 0, like a power-off.
    #[default]
    Exit,
    /// The VM is restarted in the same process: vCPUs reset, kernel reloaded, memory reused.
    Restart,
}

impl std::str::FromStr for RebootPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "exit" => Ok(RebootPolicy::Exit),
            "restart" => Ok(RebootPolicy::Restart),
            other => Err(Error::RebootPolicy(other.to_owned())),
        }
    }
}

/// The kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmConfig {
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub serial: SerialConfig,
    pub reboot: RebootPolicy,
    /// virtio devices on PCI (CLI only for now).
    pub devices: crate::pci::DeviceConfig,
}

impl VmmConfig {
    /// The configuration in API form (`GET /vm/config`).
    pub fn to_api(&self) -> VmConfig {
        VmConfig {
            machine_config: self.machine.clone(),
            boot_source: self.boot.clone(),
            serial: self.serial.clone(),
            disks: self
                .devices
                .disks
                .iter()
                .map(|d| outboard_api_types::DiskConfig {
                    socket: d.socket.clone(),
                    num_queues: Some(d.num_queues),
                    queue_size: Some(d.queue_size),
                })
                .collect(),
            network_interfaces: self
                .devices
                .nets
                .iter()
                .map(|n| outboard_api_types::NetConfig {
                    socket: n.socket.clone(),
                    mac: n.mac.as_ref().map(crate::pci::mac_string),
                    num_queues: Some(n.num_queues),
                    queue_size: Some(n.queue_size),
                })
                .collect(),
            vsock: self
                .devices
                .vsock
                .as_ref()
                .map(|v| outboard_api_types::VsockConfig {
                    cid: v.cid,
                    uds_path: v.uds_path.clone(),
                }),
        }
    }

    pub fn mem_bytes(&self) -> u64 {
        self.machine.mem_size_mib << 20
    }

    pub fn kernel(&self) -> Result<&BootSource, Error> {
        self.boot.as_ref().ok_or(Error::NoBootSource)
    }

    pub fn cmdline(&self) -> &str {
        self.boot
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
            .unwrap_or(DEFAULT_CMDLINE)
    }

    pub fn serial_path(&self) -> Option<&PathBuf> {
        self.serial.output.as_ref()
    }
}

/// Smallest guest the VMM builds.
pub const MIN_MEM_MIB: u64 = outboard_boot::layout::MIN_MEMORY >> 20;

/// Checks vCPU count and memory size; `max_vcpus` is what KVM allows (capped at 255 by the
/// 8-bit APIC IDs of the MADT entries we write).
pub fn validate_machine(machine: &MachineConfig, max_vcpus: usize) -> Result<(), Error> {
    let max = max_vcpus.min(255) as u32;
    if machine.vcpu_count == 0 {
        return Err(Error::NoVcpus);
    }
    if machine.vcpu_count > max {
        return Err(Error::TooManyVcpus {
            requested: machine.vcpu_count,
            max,
        });
    }
    if machine.mem_size_mib < MIN_MEM_MIB {
        return Err(Error::MemoryTooSmall { min: MIN_MEM_MIB });
    }
    if machine.mem_size_mib.checked_shl(20).map(|b| b >> 20) != Some(machine.mem_size_mib) {
        return Err(Error::MemoryOverflow(format!(
            "{} MiB",
            machine.mem_size_mib
        )));
    }
    Ok(())
}

/// Parses a memory size: a number with an optional binary suffix `K`, `M`, `G` or `T`
/// (also `KiB`/`MiB`/...; case-insensitive). A bare number is MiB. Returns MiB.
pub fn parse_mem_size(text: &str) -> Result<u64, Error> {
    let syntax = || Error::MemorySyntax(text.to_owned());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(syntax());
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| Error::MemoryOverflow(text.to_owned()))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "k" | "kib" | "kb" => 10,
        "" | "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(syntax()),
    };
    let bytes = value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::MemoryOverflow(text.to_owned()))?;
    if bytes & ((1 << 20) - 1) != 0 {
        return Err(Error::MemoryNotMib);
    }
    Ok(bytes >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem_size("128M"), Ok(128));
        assert_eq!(parse_mem_size("1G"), Ok(1024));
        assert_eq!(parse_mem_size("1024"), Ok(1024));
        assert_eq!(parse_mem_size("2GiB"), Ok(2048));
        assert_eq!(parse_mem_size("64T"), Ok(64 << 20));
        assert_eq!(parse_mem_size("4096K"), Ok(4));
        assert_eq!(parse_mem_size("512m"), Ok(512));
        assert_eq!(parse_mem_size("1000K"), Err(Error::MemoryNotMib));
        for bad in ["", "M", "1.5G", "-1G", "12X", "0x100"] {
            assert!(
                matches!(parse_mem_size(bad), Err(Error::MemorySyntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_mem_size("99999999999999999999"),
            Err(Error::MemoryOverflow(_))
        ));
        assert!(matches!(
            parse_mem_size("20000000T"),
            Err(Error::MemoryOverflow(_))
        ));
    }

    #[test]
    fn machine_limits() {
        let ok = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 128,
        };
        assert_eq!(validate_machine(&ok, 1024), Ok(()));
        let zero = MachineConfig {
            vcpu_count: 0,
            ..ok.clone()
        };
        assert_eq!(validate_machine(&zero, 1024), Err(Error::NoVcpus));
        let many = MachineConfig {
            vcpu_count: 300,
            ..ok.clone()
        };
        assert_eq!(
            validate_machine(&many, 1024),
            Err(Error::TooManyVcpus {
                requested: 300,
                max: 255
            })
        );
        assert_eq!(
            validate_machine(&ok, 1),
            Err(Error::TooManyVcpus {
                requested: 2,
                max: 1
            })
        );
        let tiny = MachineConfig {
            mem_size_mib: 8,
            ..ok.clone()
        };
        assert_eq!(
            validate_machine(&tiny, 4),
            Err(Error::MemoryTooSmall { min: 16 })
        );
        let huge = MachineConfig {
            mem_size_mib: u64::MAX,
            ..ok
        };
        assert!(matches!(
            validate_machine(&huge, 4),
            Err(Error::MemoryOverflow(_))
        ));
    }

    #[test]
    fn reboot_policy_parses() {
        assert_eq!("restart".parse(), Ok(RebootPolicy::Restart));
        assert_eq!("exit".parse(), Ok(RebootPolicy::Exit));
        assert!("reboot".parse::<RebootPolicy>().is_err());
    }
}
