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
//! On a live update the disks and NICs move to the successor without a reconnection: their
//! vhost-user sockets and the queues' kick and call eventfds are handed over
//! ([`PciDevices::handover`]) and adopted ([`PciDevices::adopt`]) beside the transport state.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use outboard_boot::acpi::{AcpiExtras, OEM_ID};
use outboard_boot::layout;
use outboard_devices::{Bus, Lifecycle};
use outboard_pci::acpi::{mcfg, HostBridgeAml};
use outboard_pci::interrupt::AsVmFd;
use outboard_pci::root::{self, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_BUS_SIZE};
use outboard_pci::{KvmInterrupts, PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindows};
pub use outboard_virtio_devices::options::{DiskConfig, NetConfig, VsockConfig};
use outboard_virtio_devices::vhost_user::{Kind, StartError, VhostUserDevice, VhostUserState};
use outboard_virtio_devices::vsock::{self, VsockDevice};
use outboard_virtio_devices::{VirtioDevice, VirtioPciTransport};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

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
    #[error("Live update of VMs with a vsock device is not supported yet")]
    VsockHandover,
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

type Transport = VirtioPciTransport<GuestMemoryMmap>;

/// One device on bus 0.
struct Plugged {
    /// Metrics label (`virtio-blk0`, …).
    label: String,
    slot: u8,
    transport: Arc<Transport>,
    /// What it was made from (`None` for vsock, which is not handed over).
    config: Option<PciDeviceConfig>,
    vhost: Option<Arc<VhostUserDevice>>,
}

/// The root complex and the devices on it.
pub struct PciDevices {
    root: Arc<PciRoot>,
    devices: Vec<Plugged>,
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
fn device_label(config: &PciDeviceConfig, index: usize) -> String {
    match config {
        PciDeviceConfig::Disk(_) => format!("virtio-blk{index}"),
        PciDeviceConfig::Net(_) => format!("virtio-net{index}"),
    }
}

impl PciDevices {
    /// Places the root complex on `mmio` and `pio` (nothing on it yet).
    fn root_only(mmio: &Arc<Bus>, pio: &Bus, mem_bytes: u64) -> Result<Self, Error> {
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
    fn plug(
        &mut self,
        label: String,
        transport: Transport,
        config: Option<PciDeviceConfig>,
        vhost: Option<Arc<VhostUserDevice>>,
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
            vhost,
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
            pci.plug(format!("virtio-blk{i}"), t, Some(cfg), Some(dev))?;
        }
        for (i, net) in config.nets.iter().enumerate() {
            let dev = VhostUserDevice::net(net, memory.clone())?;
            let t = transport("virtio-net", dev.clone())?;
            let cfg = PciDeviceConfig::Net(net.clone());
            pci.plug(format!("virtio-net{i}"), t, Some(cfg), Some(dev))?;
        }
        if let Some(vsock) = &config.vsock {
            let dev = VsockDevice::new(vsock.cid, vsock.uds_path.clone(), memory.clone())?;
            let t = transport("virtio-vsock", Arc::new(dev))?;
            pci.plug("virtio-vsock0".into(), t, None, None)?;
        }
        Ok(pci)
    }

    /// The state and descriptors a successor needs for every device, in slot order; the
    /// devices must be paused. Per device the descriptors are: the vhost-user socket, the
    /// inflight region when [`PciDeviceState::inflight`], then each queue's kick eventfd, then
    /// each queue's call eventfd. The descriptors are duplicates: this VMM keeps working (a
    /// rollback) until it exits.
    pub fn handover(&self) -> Result<(Vec<PciDeviceState>, Vec<OwnedFd>), Error> {
        let mut states = Vec::new();
        let mut fds = Vec::new();
        for d in &self.devices {
            let (Some(config), Some(vhost)) = (&d.config, &d.vhost) else {
                return Err(Error::VsockHandover);
            };
            let fd_err = |source| Error::HandoverFds {
                label: d.label.clone(),
                source,
            };
            let (socket, inflight) = vhost.handover_fds().map_err(fd_err)?;
            let socket = socket.ok_or_else(|| Error::HandoverDisconnected {
                label: d.label.clone(),
            })?;
            let state = d.transport.save().map_err(|source| Error::Restore {
                label: d.label.clone(),
                source,
            })?;
            fds.push(socket);
            let has_inflight = inflight.is_some();
            fds.extend(inflight);
            for evt in d.transport.kick_fds().iter().chain(&d.transport.call_fds()) {
                fds.push(dup_fd(evt).map_err(fd_err)?);
            }
            states.push(PciDeviceState {
                label: d.label.clone(),
                slot: d.slot,
                config: config.clone(),
                inflight: has_inflight,
                state,
            });
        }
        Ok((states, fds))
    }

    /// The devices' saved state alone (see [`PciDevices::handover`]).
    pub fn states(&self) -> Result<Vec<PciDeviceState>, Error> {
        let mut states = Vec::new();
        for d in &self.devices {
            let (Some(config), Some(vhost)) = (&d.config, &d.vhost) else {
                return Err(Error::VsockHandover);
            };
            let state = d.transport.save().map_err(|source| Error::Restore {
                label: d.label.clone(),
                source,
            })?;
            states.push(PciDeviceState {
                label: d.label.clone(),
                slot: d.slot,
                config: config.clone(),
                inflight: vhost.state().inflight.is_some(),
                state,
            });
        }
        Ok(states)
    }

    /// A successor's devices, made before the predecessor pauses: the same devices in the same
    /// slots on the descriptors of [`PciDevices::handover`] (`early` is the state that came
    /// with them, taken while the guest ran), BARs placed and their ioeventfds registered
    /// (slow: an SRCU grace period each). Nothing is said to the backends and no interrupt is
    /// routed until [`PciDevices::finish_adopt`] loads the state at the pause.
    pub fn prepare_adopt(
        vm: Arc<dyn AsVmFd>,
        mmio: &Arc<Bus>,
        pio: &Bus,
        memory: &GuestMemoryMmap,
        mem_bytes: u64,
        early: &[PciDeviceState],
        fds: Vec<OwnedFd>,
    ) -> Result<Self, Error> {
        let mut pci = Self::root_only(mmio, pio, mem_bytes)?;
        if early.is_empty() {
            return Ok(pci);
        }
        let irqs = Arc::new(KvmInterrupts::new(vm));
        let mut fds = fds.into_iter();
        let (mut disks, mut nets) = (0, 0);
        for saved in early {
            let label = match &saved.config {
                PciDeviceConfig::Disk(_) => {
                    disks += 1;
                    device_label(&saved.config, disks - 1)
                }
                PciDeviceConfig::Net(_) => {
                    nets += 1;
                    device_label(&saved.config, nets - 1)
                }
            };
            let bad = |reason: &str| Error::BadHandover {
                label: label.clone(),
                reason: reason.into(),
            };
            let (kind, name, socket, nq, qsize) = match &saved.config {
                PciDeviceConfig::Disk(c) => (
                    Kind::Block,
                    "virtio-blk",
                    c.socket.clone(),
                    c.num_queues,
                    c.queue_size,
                ),
                PciDeviceConfig::Net(c) => (
                    Kind::Net { mac: c.mac },
                    "virtio-net",
                    c.socket.clone(),
                    c.num_queues,
                    c.queue_size,
                ),
            };
            let mut vhost_state = vhost_state(saved).ok_or_else(|| bad("vhost-user state"))?;
            // The predecessor still runs these rings: stay silent until the state at its pause.
            vhost_state.paused = true;
            let socket_fd = fds.next().ok_or_else(|| bad("socket missing"))?;
            let inflight = match saved.inflight {
                true => Some(fds.next().ok_or_else(|| bad("inflight region missing"))?),
                false => None,
            };
            let mut eventfds = Vec::with_capacity(2 * usize::from(nq));
            for _ in 0..2 * usize::from(nq) {
                let fd = fds.next().ok_or_else(|| bad("queue eventfd missing"))?;
                // SAFETY: the predecessor sent this descriptor as a queue eventfd, and it is
                // owned here: EventFd takes it over.
                eventfds.push(Arc::new(unsafe { eventfd_from(fd) }));
            }
            let calls = eventfds.split_off(usize::from(nq));
            let kicks = eventfds;
            let dev = VhostUserDevice::adopt(
                kind,
                socket,
                nq,
                qsize,
                memory.clone(),
                vhost_state,
                socket_fd,
                inflight,
                &kicks,
                &calls,
            )
            .map_err(|source| Error::Adopt {
                label: label.clone(),
                source,
            })?;
            let transport = VirtioPciTransport::with_eventfds(
                name,
                dev.clone(),
                memory.clone(),
                irqs.clone(),
                irqs.clone(),
                Some((kicks, calls)),
            )
            .map_err(|source| Error::Transport { name, source })?;
            let slot = pci.plug(
                label.clone(),
                transport,
                Some(saved.config.clone()),
                Some(dev),
            )?;
            if slot != saved.slot {
                return Err(bad("device slots differ from the predecessor's"));
            }
        }
        if fds.next().is_some() {
            return Err(Error::BadHandover {
                label: "pci".into(),
                reason: "more descriptors than devices".into(),
            });
        }
        Ok(pci)
    }

    /// Loads the predecessor's device state at its pause into devices made by
    /// [`PciDevices::prepare_adopt`]: vrings, transport registers, MSI-X routes and irqfds, BAR
    /// mapping. The devices stay paused until [`PciDevices::resume`].
    pub fn finish_adopt(&self, states: &[PciDeviceState]) -> Result<(), Error> {
        if states.len() != self.devices.len() {
            return Err(Error::BadHandover {
                label: "pci".into(),
                reason: "the device list changed during the handover".into(),
            });
        }
        for (d, saved) in self.devices.iter().zip(states) {
            let bad = |reason: &str| Error::BadHandover {
                label: d.label.clone(),
                reason: reason.into(),
            };
            if d.config.as_ref() != Some(&saved.config) || d.slot != saved.slot {
                return Err(bad("the device changed during the handover"));
            }
            let vhost = d
                .vhost
                .as_ref()
                .ok_or_else(|| bad("not a vhost-user device"))?;
            let state = vhost_state(saved).ok_or_else(|| bad("vhost-user state"))?;
            vhost
                .load_handover_state(state, &d.transport.kick_fds(), &d.transport.call_fds())
                .map_err(|source| Error::Adopt {
                    label: d.label.clone(),
                    source,
                })?;
            d.transport
                .restore(&saved.state)
                .map_err(|source| Error::Restore {
                    label: d.label.clone(),
                    source,
                })?;
            self.root.sync_bars(d.slot);
        }
        Ok(())
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
        for vhost in self.devices.iter().filter_map(|d| d.vhost.as_ref()) {
            vhost.shutdown();
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
                Some(PciDeviceConfig::Disk(c)) => out.disks.push(c.clone()),
                Some(PciDeviceConfig::Net(c)) => out.nets.push(c.clone()),
                None => {}
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

/// The vhost-user part of a saved transport (`{"device": …}`).
fn vhost_state(saved: &PciDeviceState) -> Option<VhostUserState> {
    serde_json::from_value(saved.state.get("device")?.clone()).ok()
}

/// A close-on-exec duplicate of `evt`'s descriptor.
fn dup_fd(evt: &EventFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: `evt` owns the descriptor and outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(evt.as_raw_fd()) };
    fd.try_clone_to_owned()
}

/// Wraps a received eventfd descriptor.
///
/// # Safety
///
/// `fd` must be an eventfd.
unsafe fn eventfd_from(fd: OwnedFd) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the caller guarantees an eventfd; ownership moves into the EventFd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
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
