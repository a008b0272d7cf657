//! The virtio devices' part of a snapshot and of a live update: their saved state
//! ([`PciDeviceState`]), the descriptors a successor VMM takes over, and building the devices
//! again from either.
//!
//! ```text
//!   live update:   handover() ──Prepare + fds──► prepare_adopt()   (guest still runs)
//!                  states() at the pause ──────► finish_adopt()     + vsock connection sockets
//!   snapshot file: states() ─── state file ────► restore()          (fresh backend connections)
//! ```
//!
//! Per device the descriptors are, in order:
//! - disk or NIC: the vhost-user socket, the inflight region when [`PciDeviceState::inflight`],
//!   each queue's kick eventfd, each queue's call eventfd;
//! - vsock: its listening socket, then the kick and call eventfds. Its open connections move
//!   at the pause (they come and go while the guest runs), as the descriptors of the handover
//!   message, in the order of the saved state's `connections`.
//!
//! A snapshot file restores a vsock device on a new listening socket at the same path; the
//! host ends of its connections died with the old process, so the guest is told each was
//! reset.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use outboard_devices::{Bus, Lifecycle};
use outboard_pci::interrupt::AsVmFd;
use outboard_pci::KvmInterrupts;
use outboard_virtio_devices::vhost_user::{Kind, VhostUserDevice, VhostUserState};
use outboard_virtio_devices::vsock::VsockDevice;
use outboard_virtio_devices::{VirtioDevice, VirtioPciTransport, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{PciDeviceConfig, PciDeviceState};
use crate::pci::{device_label, Backend, Error, PciDevices};

/// Most connections a vsock device hands over (one handover message carries them all, next
/// to the API listener; the kernel allows 253 descriptors per message).
pub const MAX_VSOCK_CONNECTIONS: usize = 240;

/// Labels for `states` in order (`virtio-blk0`, `virtio-net0`, …, counted per kind).
fn labels(states: &[PciDeviceState]) -> Vec<String> {
    let mut counts = [0usize; 3];
    states
        .iter()
        .map(|s| {
            let kind = match s.config {
                PciDeviceConfig::Disk(_) => 0,
                PciDeviceConfig::Net(_) => 1,
                PciDeviceConfig::Vsock(_) => 2,
            };
            counts[kind] += 1;
            device_label(&s.config, counts[kind] - 1)
        })
        .collect()
}

/// The vhost-user part of a saved transport (`{"device": …}`).
fn vhost_state(saved: &PciDeviceState) -> Option<VhostUserState> {
    serde_json::from_value(saved.state.get("device")?.clone()).ok()
}

/// The device part of a saved transport (null when absent).
fn device_part(saved: &PciDeviceState) -> serde_json::Value {
    saved.state.get("device").cloned().unwrap_or_default()
}

/// The number of connections a saved vsock device has.
fn connection_count(saved: &PciDeviceState) -> usize {
    saved
        .state
        .get("device")
        .and_then(|d| d.get("connections"))
        .and_then(|c| c.as_array())
        .map_or(0, Vec::len)
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

impl PciDevices {
    /// The state and descriptors (see the module docs) a successor needs for every device, in
    /// slot order, taken while the guest runs. The descriptors are duplicates: this VMM keeps
    /// working (a rollback) until it exits.
    pub fn handover(&self) -> Result<(Vec<PciDeviceState>, Vec<OwnedFd>), Error> {
        let mut fds = Vec::new();
        for d in &self.devices {
            let fd_err = |source| Error::HandoverFds {
                label: d.label.clone(),
                source,
            };
            match &d.backend {
                Backend::VhostUser(vhost) => {
                    let (socket, inflight) = vhost.handover_fds().map_err(fd_err)?;
                    let socket = socket.ok_or_else(|| Error::HandoverDisconnected {
                        label: d.label.clone(),
                    })?;
                    fds.push(socket);
                    fds.extend(inflight);
                }
                Backend::Vsock(vsock) => {
                    let listener = vsock.listener_fd().map_err(fd_err)?;
                    fds.push(listener.ok_or_else(|| Error::HandoverDisconnected {
                        label: d.label.clone(),
                    })?);
                }
            }
            for evt in d.transport.kick_fds().iter().chain(&d.transport.call_fds()) {
                fds.push(dup_fd(evt).map_err(fd_err)?);
            }
        }
        Ok((self.states()?, fds))
    }

    /// The devices' saved state (a snapshot, or a live update at the pause).
    pub fn states(&self) -> Result<Vec<PciDeviceState>, Error> {
        let mut states = Vec::new();
        for d in &self.devices {
            let state = d.transport.save().map_err(|source| Error::Restore {
                label: d.label.clone(),
                source,
            })?;
            let inflight = match &d.backend {
                Backend::VhostUser(vhost) => vhost.state().inflight.is_some(),
                Backend::Vsock(_) => false,
            };
            states.push(PciDeviceState {
                label: d.label.clone(),
                slot: d.slot,
                config: d.config.clone(),
                inflight,
                state,
            });
        }
        Ok(states)
    }

    /// Duplicates of the vsock connections' sockets, in the order of [`PciDevices::states`]
    /// (taken in the same pause).
    pub fn vsock_streams(&self) -> Result<Vec<OwnedFd>, Error> {
        let mut fds = Vec::new();
        for d in &self.devices {
            if let Backend::Vsock(vsock) = &d.backend {
                let streams = vsock.streams().map_err(|source| Error::HandoverFds {
                    label: d.label.clone(),
                    source,
                })?;
                if streams.len() > MAX_VSOCK_CONNECTIONS {
                    return Err(Error::TooManyConnections(streams.len()));
                }
                fds.extend(streams);
            }
        }
        Ok(fds)
    }

    /// The devices a snapshot describes (`saved`, in slot order), each connected afresh to its
    /// backend (a vsock device listens again on its path) and plugged in its old slot, with
    /// the transport (registers, MSI-X table and routes, BAR) and queues as saved. They stay
    /// paused until [`PciDevices::resume`], which gives each vhost-user backend a new session
    /// with the rings at the guest's used indices.
    pub fn restore(
        vm: Arc<dyn AsVmFd>,
        mmio: &Arc<Bus>,
        pio: &Bus,
        memory: &GuestMemoryMmap,
        mem_bytes: u64,
        saved: &[PciDeviceState],
    ) -> Result<Self, Error> {
        let mut pci = Self::root_only(mmio, pio, mem_bytes)?;
        if saved.is_empty() {
            return Ok(pci);
        }
        let irqs = Arc::new(KvmInterrupts::new(vm));
        for (s, label) in saved.iter().zip(labels(saved)) {
            let bad = |reason: &str| Error::BadSaved {
                label: label.clone(),
                reason: reason.into(),
            };
            let (name, device, backend): (_, Arc<dyn VirtioDevice>, _) = match &s.config {
                PciDeviceConfig::Disk(c) => {
                    let dev = VhostUserDevice::disk(c, memory.clone())?;
                    ("virtio-blk", dev.clone(), Backend::VhostUser(dev))
                }
                PciDeviceConfig::Net(c) => {
                    let dev = VhostUserDevice::net(c, memory.clone())?;
                    ("virtio-net", dev.clone(), Backend::VhostUser(dev))
                }
                PciDeviceConfig::Vsock(c) => {
                    let dev =
                        Arc::new(VsockDevice::new(c.cid, c.uds_path.clone(), memory.clone())?);
                    ("virtio-vsock", dev.clone(), Backend::Vsock(dev))
                }
            };
            let transport =
                VirtioPciTransport::new(name, device, memory.clone(), irqs.clone(), irqs.clone())
                    .map_err(|source| Error::Transport { name, source })?;
            let (kicks, calls) = (transport.kick_fds(), transport.call_fds());
            if let Backend::VhostUser(dev) = &backend {
                let state = vhost_state(s).ok_or_else(|| bad("malformed vhost-user state"))?;
                let offered = dev.features() | VIRTIO_F_VERSION_1;
                if state.acked_features & !offered != 0 {
                    return Err(bad(
                        "the backend no longer offers the features the guest uses",
                    ));
                }
                dev.load_snapshot_state(state, &kicks, &calls)
                    .map_err(|source| Error::Adopt {
                        label: label.clone(),
                        source,
                    })?;
            }
            let slot = pci.plug(label.clone(), transport, s.config.clone(), backend.clone())?;
            if slot != s.slot {
                return Err(bad("device slots differ from the snapshot's"));
            }
            // Plugged fresh (nothing decoded), then the saved registers and the BAR placed.
            pci.load_transport(slot, &label, s, None)?;
        }
        Ok(pci)
    }

    /// Restores the transport in `slot` from `saved`, then a vsock device's queues (with the
    /// connections' `streams` of a live update), then maps the BAR.
    fn load_transport(
        &self,
        slot: u8,
        label: &str,
        saved: &PciDeviceState,
        streams: Option<Vec<OwnedFd>>,
    ) -> Result<(), Error> {
        let Some(d) = self.devices.iter().find(|d| d.slot == slot) else {
            return Ok(());
        };
        d.transport
            .restore(&saved.state)
            .map_err(|source| Error::Restore {
                label: label.to_owned(),
                source,
            })?;
        let device = device_part(saved);
        // (A null device part: the driver never started it; nothing to load.)
        if let (Backend::Vsock(vsock), false) = (&d.backend, device.is_null()) {
            let bad = |reason: String| Error::BadSaved {
                label: label.to_owned(),
                reason,
            };
            let queues = d.transport.active_queues().map_err(bad)?;
            vsock.load_state(&device, queues, streams)?;
        }
        self.root.sync_bars(slot);
        Ok(())
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
        for (saved, label) in early.iter().zip(labels(early)) {
            let bad = |reason: &str| Error::BadHandover {
                label: label.clone(),
                reason: reason.into(),
            };
            saved
                .config
                .validate()
                .map_err(|_| bad("device configuration"))?;
            let first = fds.next().ok_or_else(|| bad("socket missing"))?;
            let inflight = match saved.inflight {
                true => Some(fds.next().ok_or_else(|| bad("inflight region missing"))?),
                false => None,
            };
            let nq = match &saved.config {
                PciDeviceConfig::Disk(c) => usize::from(c.num_queues),
                PciDeviceConfig::Net(c) => usize::from(c.num_queues),
                PciDeviceConfig::Vsock(_) => 3,
            };
            let mut eventfds = Vec::with_capacity(2 * nq);
            for _ in 0..2 * nq {
                let fd = fds.next().ok_or_else(|| bad("queue eventfd missing"))?;
                // SAFETY: the predecessor sent this descriptor as a queue eventfd, and it is
                // owned here: EventFd takes it over.
                eventfds.push(Arc::new(unsafe { eventfd_from(fd) }));
            }
            let calls = eventfds.split_off(nq);
            let kicks = eventfds;
            let adopt_err = |source| Error::Adopt {
                label: label.clone(),
                source,
            };
            let (name, device, backend): (_, Arc<dyn VirtioDevice>, _) = match &saved.config {
                PciDeviceConfig::Disk(_) | PciDeviceConfig::Net(_) => {
                    let (kind, name, socket, qsize) = match &saved.config {
                        PciDeviceConfig::Net(c) => (
                            Kind::Net { mac: c.mac },
                            "virtio-net",
                            &c.socket,
                            c.queue_size,
                        ),
                        PciDeviceConfig::Disk(c) => {
                            (Kind::Block, "virtio-blk", &c.socket, c.queue_size)
                        }
                        PciDeviceConfig::Vsock(_) => return Err(bad("device kind")),
                    };
                    let mut state = vhost_state(saved).ok_or_else(|| bad("vhost-user state"))?;
                    // The predecessor still runs these rings: stay silent until the state at
                    // its pause.
                    state.paused = true;
                    let dev = VhostUserDevice::adopt(
                        kind,
                        socket.clone(),
                        nq as u16,
                        qsize,
                        memory.clone(),
                        state,
                        first,
                        inflight,
                        &kicks,
                        &calls,
                    )
                    .map_err(adopt_err)?;
                    (
                        name,
                        dev.clone() as Arc<dyn VirtioDevice>,
                        Backend::VhostUser(dev),
                    )
                }
                PciDeviceConfig::Vsock(c) => {
                    let dev = Arc::new(VsockDevice::adopt(
                        c.cid,
                        c.uds_path.clone(),
                        memory.clone(),
                        first,
                    )?);
                    ("virtio-vsock", dev.clone() as Arc<_>, Backend::Vsock(dev))
                }
            };
            let transport = VirtioPciTransport::with_eventfds(
                name,
                device,
                memory.clone(),
                irqs.clone(),
                irqs.clone(),
                Some((kicks, calls)),
            )
            .map_err(|source| Error::Transport { name, source })?;
            let slot = pci.plug(label.clone(), transport, saved.config.clone(), backend)?;
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
    /// [`PciDevices::prepare_adopt`]: vrings, vsock queues and connections (`streams`, see the
    /// module docs), transport registers, MSI-X routes and irqfds, BAR mapping. The devices
    /// stay paused until [`PciDevices::resume`].
    pub fn finish_adopt(
        &self,
        states: &[PciDeviceState],
        streams: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if states.len() != self.devices.len() {
            return Err(Error::BadHandover {
                label: "pci".into(),
                reason: "the device list changed during the handover".into(),
            });
        }
        let mut streams = streams.into_iter();
        for (d, saved) in self.devices.iter().zip(states) {
            let bad = |reason: &str| Error::BadHandover {
                label: d.label.clone(),
                reason: reason.into(),
            };
            if d.config != saved.config || d.slot != saved.slot {
                return Err(bad("the device changed during the handover"));
            }
            let mut own = None;
            match &d.backend {
                Backend::VhostUser(vhost) => {
                    let state = vhost_state(saved).ok_or_else(|| bad("vhost-user state"))?;
                    vhost
                        .load_handover_state(
                            state,
                            &d.transport.kick_fds(),
                            &d.transport.call_fds(),
                        )
                        .map_err(|source| Error::Adopt {
                            label: d.label.clone(),
                            source,
                        })?;
                }
                Backend::Vsock(_) => {
                    let n = connection_count(saved);
                    let taken: Vec<OwnedFd> = streams.by_ref().take(n).collect();
                    if taken.len() != n {
                        return Err(bad("connection sockets missing"));
                    }
                    own = Some(taken);
                }
            }
            self.load_transport(d.slot, &d.label, saved, own)?;
        }
        if streams.next().is_some() {
            return Err(Error::BadHandover {
                label: "pci".into(),
                reason: "more connection sockets than connections".into(),
            });
        }
        Ok(())
    }
}
