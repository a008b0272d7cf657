//! The VM's PCI side: the root complex on bus 0 (ECAM on the MMIO bus, ports 0xCF8–0xCFF), its
//! ACPI description (MCFG, the `\_SB_.PCI0` host bridge), and the virtio devices the
//! configuration asks for (`--disk`, `--net`, `--vsock`), each behind a virtio-pci transport.
//!
//! The root complex is always there (cheap: no KVM call until a device is added). Disks and
//! NICs are vhost-user frontends: kicks go from the guest to the backend through KVM
//! ioeventfds and completions come back through irqfds on MSI-X routes, so no VMM thread is on
//! their data path. All GSI routing goes through one [`KvmInterrupts`], because
//! KVM_SET_GSI_ROUTING replaces the whole table.

use std::sync::Arc;

use outboard_boot::acpi::{AcpiExtras, OEM_ID};
use outboard_boot::layout;
use outboard_devices::{Bus, Lifecycle};
use outboard_pci::acpi::{mcfg, HostBridgeAml};
use outboard_pci::interrupt::AsVmFd;
use outboard_pci::root::{self, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_BUS_SIZE};
use outboard_pci::{KvmInterrupts, PciConfigIo, PciEcam, PciRoot, PciWindows};
pub use outboard_virtio_devices::options::{DiskConfig, NetConfig, VsockConfig};
use outboard_virtio_devices::vhost_user::{StartError, VhostUserDevice};
use outboard_virtio_devices::vsock::{self, VsockDevice};
use outboard_virtio_devices::{VirtioDevice, VirtioPciTransport};
use vm_memory::GuestMemoryMmap;

/// Errors of building the PCI side of a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] StartError),
    #[error(transparent)]
    Vsock(#[from] vsock::StartError),
    #[error("Cannot create the {name} device")]
    Transport {
        name: &'static str,
        #[source]
        source: outboard_virtio_devices::Error,
    },
    #[error("Cannot put the {name} device on PCI bus 0")]
    Plug {
        name: &'static str,
        #[source]
        source: root::Error,
    },
    #[error("Cannot place the PCI root complex")]
    Bus(#[source] outboard_devices::bus::Error),
}

/// The virtio devices of a VM, in the order they get PCI slots (disks, NICs, vsock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
}

impl DeviceConfig {
    /// True when the VM has no virtio device (what snapshots and live update support so far).
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && self.nets.is_empty() && self.vsock.is_none()
    }

    /// Adds a disk given through the API, validated exactly as `--disk` is.
    pub fn add_disk(&mut self, api: &outboard_api_types::DiskConfig) -> Result<(), String> {
        let mut opts = option_string(&api.socket)?;
        push_opt(&mut opts, "num_queues", api.num_queues);
        push_opt(&mut opts, "queue_size", api.queue_size);
        self.disks
            .push(opts.parse().map_err(|e| format!("Invalid disk: {e}"))?);
        Ok(())
    }

    /// Adds a NIC given through the API, validated exactly as `--net` is.
    pub fn add_net(&mut self, api: &outboard_api_types::NetConfig) -> Result<(), String> {
        let mut opts = option_string(&api.socket)?;
        push_opt(&mut opts, "mac", api.mac.as_deref());
        push_opt(&mut opts, "num_queues", api.num_queues);
        push_opt(&mut opts, "queue_size", api.queue_size);
        self.nets.push(
            opts.parse()
                .map_err(|e| format!("Invalid network interface: {e}"))?,
        );
        Ok(())
    }

    /// Sets the vsock device given through the API, validated exactly as `--vsock` is.
    pub fn set_vsock(&mut self, api: &outboard_api_types::VsockConfig) -> Result<(), String> {
        let mut opts = format!("cid={}", api.cid);
        let path = api.uds_path.to_str().filter(|p| !p.contains([',', '=']));
        let path = path.ok_or("Vsock paths must be UTF-8 without ',' or '='")?;
        opts.push_str(&format!(",uds_path={path}"));
        self.vsock = Some(opts.parse().map_err(|e| format!("Invalid vsock: {e}"))?);
        Ok(())
    }
}

/// A MAC as `aa:bb:cc:dd:ee:ff`, the form `--net mac=` and the API take.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `socket=PATH` for the option parsers, which split on ',' and '='.
fn option_string(socket: &std::path::Path) -> Result<String, String> {
    match socket.to_str() {
        Some(p) if !p.contains([',', '=']) => Ok(format!("socket={p}")),
        _ => Err("Socket paths must be UTF-8 without ',' or '='".into()),
    }
}

fn push_opt(opts: &mut String, key: &str, value: Option<impl std::fmt::Display>) {
    if let Some(v) = value {
        opts.push_str(&format!(",{key}={v}"));
    }
}

/// The table id of our MCFG.
const MCFG_TABLE_ID: [u8; 8] = *b"OBVMMCFG";

/// The MMIO windows BARs come from, for `mem_bytes` of RAM.
pub fn windows(mem_bytes: u64) -> PciWindows {
    outboard_pci::layout_windows(layout::mmio64_start(mem_bytes), layout::MMIO64_SIZE)
}

/// The MCFG table and the host bridge's AML, for the ACPI tables of a VM with `mem_bytes`.
pub fn acpi_extras(mem_bytes: u64) -> AcpiExtras {
    let bridge = HostBridgeAml {
        ecam_base: layout::ECAM_START,
        last_bus: 0,
        windows: windows(mem_bytes),
    };
    AcpiExtras {
        dsdt_aml: bridge.to_bytes(),
        tables: vec![mcfg(layout::ECAM_START, 0, OEM_ID, MCFG_TABLE_ID)],
    }
}

/// The root complex and the devices on it.
pub struct PciDevices {
    root: Arc<PciRoot>,
    /// Metrics label (`virtio-blk0`, …) and the transport's lifecycle.
    devices: Vec<(String, Arc<dyn Lifecycle>)>,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self.devices.iter().map(|(l, _)| l.as_str()).collect();
        f.debug_struct("PciDevices")
            .field("devices", &labels)
            .finish_non_exhaustive()
    }
}

impl PciDevices {
    /// Places the root complex on `mmio` and `pio` and plugs in the devices of `config`
    /// (connecting to their backends). Needs the in-kernel irqchip to exist already.
    pub fn build(
        vm: Arc<dyn AsVmFd>,
        mmio: &Arc<Bus>,
        pio: &Bus,
        memory: &GuestMemoryMmap,
        mem_bytes: u64,
        config: &DeviceConfig,
    ) -> Result<Self, Error> {
        let root = PciRoot::new(mmio.clone(), windows(mem_bytes));
        mmio.insert(
            layout::ECAM_START,
            ECAM_BUS_SIZE,
            Arc::new(PciEcam::new(root.clone())),
        )
        .map_err(Error::Bus)?;
        pio.insert(
            u64::from(CONFIG_ADDRESS_PORT),
            CONFIG_IO_LEN,
            Arc::new(PciConfigIo::new(root.clone())),
        )
        .map_err(Error::Bus)?;
        let mut pci = PciDevices {
            root,
            devices: Vec::new(),
        };
        if config.disks.is_empty() && config.nets.is_empty() && config.vsock.is_none() {
            return Ok(pci);
        }
        let irqs = Arc::new(KvmInterrupts::new(vm));
        let mut plug = |name: &'static str, index: usize, device: Arc<dyn VirtioDevice>| {
            let transport =
                VirtioPciTransport::new(name, device, memory.clone(), irqs.clone(), irqs.clone())
                    .map_err(|source| Error::Transport { name, source })?;
            let transport = Arc::new(transport);
            let slot = pci
                .root
                .add_device(transport.clone())
                .map_err(|source| Error::Plug { name, source })?;
            log::debug!("{name}{index} at 00:{slot:02x}.0");
            pci.devices.push((format!("{name}{index}"), transport));
            Ok::<(), Error>(())
        };
        for (i, disk) in config.disks.iter().enumerate() {
            plug(
                "virtio-blk",
                i,
                VhostUserDevice::disk(disk, memory.clone())?,
            )?;
        }
        for (i, net) in config.nets.iter().enumerate() {
            plug("virtio-net", i, VhostUserDevice::net(net, memory.clone())?)?;
        }
        if let Some(vsock) = &config.vsock {
            let dev = VsockDevice::new(vsock.cid, vsock.uds_path.clone(), memory.clone())?;
            plug("virtio-vsock", 0, Arc::new(dev))?;
        }
        Ok(pci)
    }

    /// Stops every device's queues at a consistent point (vhost-user: GET_VRING_BASE).
    pub fn pause(&self) {
        for (label, device) in &self.devices {
            if let Err(e) = device.pause() {
                log::warn!("Pausing {label}: {e}");
            }
        }
    }

    pub fn resume(&self) {
        for (label, device) in &self.devices {
            if let Err(e) = device.resume() {
                log::warn!("Resuming {label}: {e}");
            }
        }
    }

    /// Back to power-on state (VM restart): the guest driver sets the devices up again.
    pub fn reset(&self) {
        for (_, device) in &self.devices {
            device.reset();
        }
    }

    /// Counters of the root complex and of each device, keyed by label.
    pub fn metrics(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        let mut out = vec![("pci-root".to_owned(), self.root.counters())];
        out.extend(
            self.devices
                .iter()
                .map(|(label, device)| (label.clone(), device.counters())),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_extras_describe_ecam_and_windows() {
        let extras = acpi_extras(128 << 20);
        assert_eq!(extras.tables.len(), 1);
        assert_eq!(&extras.tables[0][0..4], b"MCFG");
        let base = u64::from_le_bytes(extras.tables[0][44..52].try_into().unwrap());
        assert_eq!(base, layout::ECAM_START);
        let w = windows(128 << 20);
        assert_eq!(w.mmio32_start, layout::MMIO32_START);
        assert_eq!(w.mmio64_start, layout::MMIO64_MIN_START);
        assert!(extras.dsdt_aml.windows(4).any(|n| n == b"PCI0"));
    }
}
