//! The VM's PCI side: the root complex on bus 0 (ECAM on the MMIO bus, ports 0xCF8–0xCFF), its
//! ACPI description (MCFG, the `\_SB_.PCI0` host bridge), and the virtio devices the
//! configuration asks for (`--disk`, `--net`, `--vsock`), each behind a virtio-pci transport.
//!
//! The root complex is always there (cheap: no KVM call until a device is added). Disks and
//! NICs are vhost-user frontends: kicks go from the guest to the backend through KVM
//! ioeventfds and completions come back through irqfds on MSI-X routes, so no VMM thread is on
//! their data path. All GSI routing goes through one [`KvmInterrupts`], because
//! KVM_SET_GSI_ROUTING replaces the whole table.
//!
//! On a live update the devices move to the successor without a reconnection: the vhost-user
//! sockets, the vsock listener and connections, and the queues' kick and call eventfds are
//! handed over and adopted beside the transport state; a snapshot file restores them on fresh
//! connections (both in [`crate::snapshot::devices`]).

use std::sync::Arc;

use outboard_boot::acpi::{AcpiExtras, OEM_ID};
use outboard_boot::layout;
use outboard_devices::{Bus, Lifecycle};
use outboard_pci::acpi::{mcfg, HostBridgeAml};
use outboard_pci::interrupt::AsVmFd;
use outboard_pci::root::{self, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_BUS_SIZE};
use outboard_pci::{KvmInterrupts, PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindows};
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
    #[error("The vsock device has {0} connections, more than a live update can hand over")]
    TooManyConnections(usize),
    #[error("Cannot hand over the {label} device")]
    HandoverFds {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The {label} device is not connected to its backend")]
    HandoverDisconnected { label: String },
    #[error("Handed-over state of the {label} device is malformed: {reason}")]
    BadHandover { label: String, reason: String },
    #[error("Cannot adopt the {label} device")]
    Adopt {
        label: String,
        #[source]
        source: outboard_virtio_devices::Error,
    },
    #[error("Saved state of the {label} device does not fit its backend: {reason}")]
    BadSaved { label: String, reason: String },
    #[error("Cannot restore the {label} device")]
    Restore {
        label: String,
        #[source]
        source: outboard_devices::Error,
    },
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

pub(crate) type Transport = VirtioPciTransport<GuestMemoryMmap>;

/// What serves a device's queues.
#[derive(Clone)]
pub(crate) enum Backend {
    VhostUser(Arc<VhostUserDevice>),
    Vsock(Arc<VsockDevice>),
}

/// One device on bus 0.
pub(crate) struct Plugged {
    /// Metrics label (`virtio-blk0`, …).
    pub(crate) label: String,
    pub(crate) slot: u8,
    pub(crate) transport: Arc<Transport>,
    /// What it was made from.
    pub(crate) config: PciDeviceConfig,
    pub(crate) backend: Backend,
}

/// The root complex and the devices on it. Their saving, handing over and restoring is in
/// [`crate::snapshot::devices`].
pub struct PciDevices {
    pub(crate) root: Arc<PciRoot>,
    pub(crate) devices: Vec<Plugged>,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self.devices.iter().map(|d| d.label.as_str()).collect();
        f.debug_struct("PciDevices")
            .field("devices", &labels)
            .finish_non_exhaustive()
    }
}

pub use crate::snapshot::{PciDeviceConfig, PciDeviceState};

/// The metrics label of the `index`th device of its kind.
pub(crate) fn device_label(config: &PciDeviceConfig, index: usize) -> String {
    match config {
        PciDeviceConfig::Disk(_) => format!("virtio-blk{index}"),
        PciDeviceConfig::Net(_) => format!("virtio-net{index}"),
        PciDeviceConfig::Vsock(_) => format!("virtio-vsock{index}"),
    }
}

impl PciDevices {
    /// Places the root complex on `mmio` and `pio` (nothing on it yet).
    pub(crate) fn root_only(mmio: &Arc<Bus>, pio: &Bus, mem_bytes: u64) -> Result<Self, Error> {
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
        Ok(PciDevices {
            root,
            devices: Vec::new(),
        })
    }

    /// Puts `transport` in the next slot.
    pub(crate) fn plug(
        &mut self,
        label: String,
        transport: Transport,
        config: PciDeviceConfig,
        backend: Backend,
    ) -> Result<u8, Error> {
        let name = Lifecycle::name(&transport);
        let transport = Arc::new(transport);
        let slot = self
            .root
            .add_device(transport.clone())
            .map_err(|source| Error::Plug { name, source })?;
        log::debug!("{label} at 00:{slot:02x}.0");
        self.devices.push(Plugged {
            label,
            slot,
            transport,
            config,
            backend,
        });
        Ok(slot)
    }

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
        let mut pci = Self::root_only(mmio, pio, mem_bytes)?;
        if config.is_empty() {
            return Ok(pci);
        }
        let irqs = Arc::new(KvmInterrupts::new(vm));
        let transport = |name: &'static str, device: Arc<dyn VirtioDevice>| {
            VirtioPciTransport::new(name, device, memory.clone(), irqs.clone(), irqs.clone())
                .map_err(|source| Error::Transport { name, source })
        };
        for (i, disk) in config.disks.iter().enumerate() {
            let dev = VhostUserDevice::disk(disk, memory.clone())?;
            let t = transport("virtio-blk", dev.clone())?;
            let cfg = PciDeviceConfig::Disk(disk.clone());
            pci.plug(format!("virtio-blk{i}"), t, cfg, Backend::VhostUser(dev))?;
        }
        for (i, net) in config.nets.iter().enumerate() {
            let dev = VhostUserDevice::net(net, memory.clone())?;
            let t = transport("virtio-net", dev.clone())?;
            let cfg = PciDeviceConfig::Net(net.clone());
            pci.plug(format!("virtio-net{i}"), t, cfg, Backend::VhostUser(dev))?;
        }
        if let Some(vsock) = &config.vsock {
            let dev = Arc::new(VsockDevice::new(
                vsock.cid,
                vsock.uds_path.clone(),
                memory.clone(),
            )?);
            let t = transport("virtio-vsock", dev.clone())?;
            let cfg = PciDeviceConfig::Vsock(vsock.clone());
            pci.plug("virtio-vsock0".into(), t, cfg, Backend::Vsock(dev))?;
        }
        Ok(pci)
    }

    /// Masks every device's MSI-X function so this VM lets go of the queues' irqfds: KVM binds
    /// an eventfd to the irqfd of one VM at a time, and the successor's VM needs them. A call
    /// signalled meanwhile stays in its eventfd and is injected when an irqfd is bound again.
    /// Returns the MSI-X control words to give back with [`PciDevices::restore_interrupts`].
    pub fn release_interrupts(&self) -> Vec<Option<u16>> {
        self.devices
            .iter()
            .map(|d| {
                let at = msix_control_offset(d.transport.as_ref())?;
                let mut control = [0u8; 2];
                d.transport.config_read(at, &mut control);
                let control = u16::from_le_bytes(control);
                let masked = control | MSIX_FUNCTION_MASK;
                d.transport.config_write(at, &masked.to_le_bytes());
                Some(control)
            })
            .collect()
    }

    /// After a live update's commit: the successor speaks for the devices now, so this VMM
    /// stops watching their connections (a backend restarting in the moments before this
    /// process exits must be reconnected by the successor alone).
    pub fn detach(&self) {
        for d in &self.devices {
            if let Backend::VhostUser(vhost) = &d.backend {
                vhost.shutdown();
            }
        }
    }

    /// Undoes [`PciDevices::release_interrupts`] (a rolled-back live update).
    pub fn restore_interrupts(&self, controls: &[Option<u16>]) {
        for (d, control) in self.devices.iter().zip(controls) {
            if let (Some(at), Some(control)) = (msix_control_offset(d.transport.as_ref()), control)
            {
                d.transport.config_write(at, &control.to_le_bytes());
            }
        }
    }

    /// The virtio devices this VM has, as `--disk`/`--net` would give them.
    pub fn device_config(&self) -> DeviceConfig {
        let mut out = DeviceConfig::default();
        for d in &self.devices {
            match &d.config {
                PciDeviceConfig::Disk(c) => out.disks.push(c.clone()),
                PciDeviceConfig::Net(c) => out.nets.push(c.clone()),
                PciDeviceConfig::Vsock(c) => out.vsock = Some(c.clone()),
            }
        }
        out
    }

    /// Signals every enabled queue's call eventfd once: an interrupt the backend raised while
    /// no VM had the irqfd (between the predecessor's pause and this VM's restore) would be
    /// lost; a spurious one only makes the driver look at the used ring.
    pub fn replay_interrupts(&self) {
        for d in &self.devices {
            let state = d.transport.state();
            if state.status & outboard_virtio_devices::transport::STATUS_DRIVER_OK == 0 {
                continue;
            }
            let calls = d.transport.call_fds();
            for (q, call) in state.queues.iter().zip(calls.iter()) {
                if q.enabled {
                    let _ = call.write(1);
                }
            }
        }
    }

    /// Stops every device's queues at a consistent point (vhost-user: GET_VRING_BASE).
    pub fn pause(&self) {
        for d in &self.devices {
            if let Err(e) = d.transport.pause() {
                log::warn!("Pausing {}: {e}", d.label);
            }
        }
    }

    pub fn resume(&self) {
        for d in &self.devices {
            if let Err(e) = d.transport.resume() {
                log::warn!("Resuming {}: {e}", d.label);
            }
        }
    }

    /// Back to power-on state (VM restart): the guest driver sets the devices up again.
    pub fn reset(&self) {
        for d in &self.devices {
            d.transport.reset();
        }
    }

    /// Counters of the root complex and of each device, keyed by label.
    pub fn metrics(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        let mut out = vec![("pci-root".to_owned(), self.root.counters())];
        out.extend(
            self.devices
                .iter()
                .map(|d| (d.label.clone(), d.transport.counters())),
        );
        out
    }
}

/// MSI-X Message Control: Function Mask.
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// Offset of the MSI-X Message Control word in `device`'s configuration space, found by
/// walking its capability list.
fn msix_control_offset(device: &dyn PciDevice) -> Option<u64> {
    let read8 = |at: u64| {
        let mut b = [0u8; 1];
        device.config_read(at, &mut b);
        b[0]
    };
    let mut ptr = read8(0x34);
    for _ in 0..48 {
        if ptr == 0 {
            return None;
        }
        if read8(u64::from(ptr)) == outboard_pci::msix::MSIX_CAP_ID {
            return Some(u64::from(ptr) + 2);
        }
        ptr = read8(u64::from(ptr) + 1);
    }
    None
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
