//! The virtio-pci modern transport (virtio 1.2 §4.1): one 64-bit BAR holding the common
//! configuration, ISR, device configuration, notification area and the MSI-X table and PBA,
//! announced by vendor capabilities.
//!
//! Queue notifications reach the device through KVM ioeventfds registered on the notify
//! addresses (re-registered when the guest moves the BAR); a write that reaches this code instead
//! is forwarded and counted as `vmm_notifications`, which should stay at zero. Interrupts go
//! through irqfds bound to MSI-X vectors (see `outboard_pci::msix`).
//!
//! Guest mistakes (a queue size that is not a power of two or above the maximum, ring addresses
//! outside guest memory, an MSI-X vector beyond the table, a BAR placed over another device)
//! put the device in DEVICE_NEEDS_RESET with a config-change interrupt; nothing else happens
//! until the driver resets it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use outboard_devices::{Counter, Lifecycle};
use outboard_pci::config::{BarKind, BarRange, BarSpec, ConfigSpace, PciIds};
use outboard_pci::msix::{Msix, MsixState};
use outboard_pci::{IoEventRegistrar, MsiRouter, PciDevice};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActiveQueue, QueueConfig, VirtioDevice, VIRTIO_F_VERSION_1};

mod common_cfg;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
pub const NO_VECTOR: u16 = 0xffff;

/// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_SIZE: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const BAR_INDEX: usize = 0;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offset of `pci_cfg_data` in the PCI configuration access capability.
const PCI_CFG_DATA: usize = 16;

/// Features the transport can't honour, taken out of whatever the device offers: packed
/// rings, IOMMU platform access, notification data, queue reset, and vhost's own bits.
const TRANSPORT_MASKED_FEATURES: u64 =
    (1 << 34) | (1 << 33) | (1 << 38) | (1 << 39) | (1 << 40) | (1 << 30) | (1 << 26);

/// Per-queue kick and call eventfds, handed from a predecessor VMM.
pub type QueueEventFds = (Vec<Arc<EventFd>>, Vec<Arc<EventFd>>);

/// One queue's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The transport's guest-visible state (what a successor VMM restores).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub msix_config: u16,
    pub config_generation: u8,
    pub isr: u8,
    pub queues: Vec<QueueRegs>,
    pub config: ConfigSpace,
    pub msix: MsixState,
    pub bar_addr: Option<u64>,
}

/// Transport counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub vmm_notifications: Counter,
    pub config_accesses: Counter,
    pub needs_reset: Counter,
    pub activations: Counter,
    pub resets: Counter,
    pub bad_accesses: Counter,
    /// ioeventfd (un)registrations KVM refused: those kicks then exit to the VMM.
    pub notifier_errors: Counter,
}

struct Inner {
    state: TransportState,
    msix: Msix,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
}

/// A virtio device on PCI.
pub struct VirtioPciTransport<M> {
    /// Shared (weakly) with the device's config notifier.
    inner: Arc<Mutex<Inner>>,
    device: Arc<dyn VirtioDevice>,
    memory: M,
    ioevents: Arc<dyn IoEventRegistrar>,
    name: &'static str,
    /// Offset of the PCI configuration access capability (0: none).
    pci_cfg_cap: usize,
    pub counters: TransportCounters,
}

impl<M> std::fmt::Debug for VirtioPciTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn reset_queue(max: u16) -> QueueRegs {
    QueueRegs {
        size: max,
        msix_vector: NO_VECTOR,
        enabled: false,
        desc: 0,
        avail: 0,
        used: 0,
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len() as u8;
    let mut cap = vec![0x09, 0, len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl<M: GuestMemoryBackend + Send + Sync> VirtioPciTransport<M> {
    /// Wraps `device`: MSI-X gets one vector per queue plus one for config changes.
    pub fn new(
        name: &'static str,
        device: Arc<dyn VirtioDevice>,
        memory: M,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> Result<Self, crate::Error> {
        Self::with_eventfds(name, device, memory, router, ioevents, None)
    }

    /// Like [`Self::new`], with the kick and call eventfds of a predecessor VMM (one per queue
    /// each), so backends holding them carry on.
    pub fn with_eventfds(
        name: &'static str,
        device: Arc<dyn VirtioDevice>,
        memory: M,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistrar>,
        eventfds: Option<QueueEventFds>,
    ) -> Result<Self, crate::Error> {
        let nq = device.num_queues();
        let msix = Msix::new(nq as u16 + 1, router).map_err(crate::Error::Interrupts)?;
        let dtype = device.device_type();
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + dtype as u16,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            class: match dtype {
                crate::TYPE_NET => 0x02_00_00,
                crate::TYPE_BLOCK => 0x01_80_00,
                _ => 0xff_00_00,
            },
            revision: 1,
        });
        let bar = BarSpec {
            kind: BarKind::Mem64,
            size: BAR_SIZE,
            prefetchable: false,
        };
        // The layout is fixed and fits: these cannot fail.
        let _ = config.add_bar(BAR_INDEX, bar);
        let caps = [
            virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            virtio_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CAP_ISR, ISR_OFFSET, 1, &[]),
            virtio_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, &[]),
        ];
        for cap in caps {
            let _ = config.add_capability(&cap, &[]);
        }
        let (msix_cap, msix_mask) = msix.capability(
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let _ = config.add_capability(&msix_cap, &msix_mask);
        // The alternative access path (virtio 1.2 §4.1.4.9): bar, offset and length writable,
        // then `pci_cfg_data` reads and writes go to the BAR.
        let mut pci_cfg_mask = vec![0u8; 4];
        pci_cfg_mask.extend_from_slice(&[0xff, 0, 0, 0]);
        pci_cfg_mask.extend_from_slice(&[0xff; 8]);
        let pci_cfg_cap = config
            .add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]), &pci_cfg_mask)
            .unwrap_or(0);
        let mk = || {
            EventFd::new(libc::EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(crate::Error::EventFd)
        };
        let (kicks, calls) = match eventfds {
            Some((k, c)) if k.len() == nq && c.len() == nq => (k, c),
            Some(_) => return Err(crate::Error::EventfdCount { queues: nq }),
            None => (
                (0..nq).map(|_| mk()).collect::<Result<Vec<_>, _>>()?,
                (0..nq).map(|_| mk()).collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let max = device.queue_max_size();
        let inner = Arc::new(Mutex::new(Inner {
            state: TransportState {
                status: 0,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                queue_select: 0,
                msix_config: NO_VECTOR,
                config_generation: 0,
                isr: 0,
                queues: vec![reset_queue(max); nq],
                config,
                msix: msix.state().clone(),
                bar_addr: None,
            },
            msix,
            kicks,
            calls,
        }));
        let weak = Arc::downgrade(&inner);
        device.set_config_notifier(Arc::new(move || {
            if let Some(inner) = weak.upgrade() {
                let mut inner = inner.lock().unwrap_or_else(PoisonError::into_inner);
                config_changed(&mut inner);
            }
        }));
        Ok(VirtioPciTransport {
            inner,
            device,
            memory,
            ioevents,
            name,
            pci_cfg_cap,
            counters: TransportCounters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The per-queue kick eventfds (registered as ioeventfds by the transport itself).
    pub fn kick_fds(&self) -> Vec<Arc<EventFd>> {
        self.lock().kicks.clone()
    }

    /// The per-queue call eventfds (bound as irqfds to the queues' MSI-X vectors).
    pub fn call_fds(&self) -> Vec<Arc<EventFd>> {
        self.lock().calls.clone()
    }

    /// Guest-physical notify address of `queue`, once the BAR is mapped.
    pub fn notify_address(&self, queue: usize) -> Option<u64> {
        let base = self.lock().state.bar_addr?;
        Some(base + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * queue as u64)
    }

    pub fn status(&self) -> u8 {
        self.lock().state.status
    }

    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    fn offered_features(&self) -> u64 {
        (self.device.features() & !TRANSPORT_MASKED_FEATURES) | VIRTIO_F_VERSION_1
    }

    /// Puts the device in DEVICE_NEEDS_RESET and raises the config-change interrupt.
    fn needs_reset(&self, inner: &mut Inner, why: &str) {
        log::warn!("{}: device needs reset: {why}", self.name);
        if inner.state.status & STATUS_NEEDS_RESET == 0 {
            self.counters.needs_reset.inc();
        }
        inner.state.status |= STATUS_NEEDS_RESET;
        config_changed(inner);
    }

    /// The device changed its configuration (e.g. a resized disk): tell the driver.
    pub fn signal_config_change(&self) {
        config_changed(&mut self.lock());
    }

    /// The queues a restored device runs on: the enabled ones of the state loaded by
    /// [`Self::restore_state`], checked as on DRIVER_OK (a saved state may be hostile).
    pub fn active_queues(&self) -> Result<Vec<ActiveQueue>, String> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (index, q) in inner.state.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let max = self.device.queue_max_size();
            if q.size == 0 || q.size > max || !q.size.is_power_of_two() {
                return Err(format!("queue {index}: size {} is invalid", q.size));
            }
            self.queue_valid(q)
                .map_err(|why| format!("queue {index}: {why}"))?;
            out.push(ActiveQueue {
                index,
                config: QueueConfig {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                },
                kick: inner.kicks[index].clone(),
                call: inner.calls[index].clone(),
            });
        }
        Ok(out)
    }

    fn queue_valid(&self, q: &QueueRegs) -> Result<(), String> {
        let n = u64::from(q.size);
        let rings = [
            ("descriptor table", q.desc, 16 * n, 16),
            ("available ring", q.avail, 6 + 2 * n, 2),
            ("used ring", q.used, 6 + 8 * n, 4),
        ];
        for (what, addr, len, align) in rings {
            let fits = usize::try_from(len)
                .is_ok_and(|len| self.memory.check_range(GuestAddress(addr), len));
            if !fits || addr % align != 0 {
                return Err(format!(
                    "{what} at {addr:#x} ({len} bytes) is outside guest memory or misaligned"
                ));
            }
        }
        Ok(())
    }

    fn reset_device(&self, inner: &mut Inner) {
        self.counters.resets.inc();
        if inner.state.status & STATUS_DRIVER_OK != 0 {
            self.device.reset();
        }
        for call in &inner.calls {
            inner.msix.unbind(call);
            // Stale signals must not become interrupts of the next driver instance.
            let _ = call.read();
        }
        let max = self.device.queue_max_size();
        let st = &mut inner.state;
        st.status = 0;
        st.device_feature_select = 0;
        st.driver_feature_select = 0;
        st.driver_features = 0;
        st.queue_select = 0;
        st.msix_config = NO_VECTOR;
        st.isr = 0;
        st.queues.iter_mut().for_each(|q| *q = reset_queue(max));
    }

    fn write_status(&self, inner: &mut Inner, value: u8) {
        if value == 0 {
            self.reset_device(inner);
            return;
        }
        let old = inner.state.status;
        let mut new = value | (old & STATUS_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let f = inner.state.driver_features;
            if f & !self.offered_features() != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                new &= !STATUS_FEATURES_OK;
            }
        }
        inner.state.status = new;
        let going_live = new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0;
        if going_live && new & STATUS_NEEDS_RESET == 0 {
            self.activate(inner);
        }
    }

    fn activate(&self, inner: &mut Inner) {
        if inner.state.status & STATUS_FEATURES_OK == 0 {
            self.needs_reset(inner, "DRIVER_OK without FEATURES_OK");
            return;
        }
        let mut queues = Vec::new();
        for (index, q) in inner.state.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            if let Err(why) = self.queue_valid(q) {
                let why = format!("queue {index}: {why}");
                self.needs_reset(inner, &why);
                return;
            }
            queues.push(ActiveQueue {
                index,
                config: QueueConfig {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                },
                kick: inner.kicks[index].clone(),
                call: inner.calls[index].clone(),
            });
        }
        self.counters.activations.inc();
        if let Err(e) = self.device.activate(inner.state.driver_features, queues) {
            let why = format!("activation failed: {e}");
            self.needs_reset(inner, &why);
        }
    }

    fn register_notifiers(&self, inner: &Inner, base: u64) {
        for (i, kick) in inner.kicks.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64;
            if let Err(e) = self.ioevents.register_ioevent(kick, addr) {
                self.counters.notifier_errors.inc();
                log::warn!(
                    "{}: queue {i} notifications will exit to the VMM: {e}",
                    self.name
                );
            }
        }
    }

    fn unregister_notifiers(&self, inner: &Inner, base: u64) {
        for (i, kick) in inner.kicks.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64;
            if self.ioevents.unregister_ioevent(kick, addr).is_err() {
                self.counters.notifier_errors.inc();
            }
        }
    }

    /// The whole transport state, with the MSI-X table.
    pub fn state(&self) -> TransportState {
        let inner = self.lock();
        let mut state = inner.state.clone();
        state.msix = inner.msix.state().clone();
        state
    }

    /// Loads state saved by [`VirtioPciTransport::state`] (same device kind and queue count);
    /// routes, irqfds and ioeventfds are reinstalled. The device itself is restored separately.
    pub fn restore_state(&self, state: TransportState) -> Result<(), outboard_devices::Error> {
        let bad = |reason: &str| outboard_devices::Error::BadState {
            device: "virtio-pci",
            reason: reason.to_string(),
        };
        let mut inner = self.lock();
        if state.queues.len() != inner.state.queues.len() {
            return Err(bad("queue count differs"));
        }
        if !inner.msix.restore(state.msix.clone()) {
            return Err(bad("MSI-X table size differs"));
        }
        // Notifiers already at the saved address stay (each KVM_IOEVENTFD change waits for an
        // SRCU grace period: milliseconds in a live update's pause).
        let moved = inner.state.bar_addr != state.bar_addr;
        if let (true, Some(old)) = (moved, inner.state.bar_addr) {
            self.unregister_notifiers(&inner, old);
        }
        for (i, q) in state.queues.iter().enumerate() {
            if q.msix_vector != NO_VECTOR {
                let call = inner.calls[i].clone();
                inner.msix.bind(q.msix_vector, call);
            }
        }
        if let (true, Some(base)) = (moved, state.bar_addr) {
            self.register_notifiers(&inner, base);
        }
        inner.state = state;
        Ok(())
    }
}

impl<M: GuestMemoryBackend + Send + Sync> PciDevice for VirtioPciTransport<M> {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        if let Some((bar_offset, len)) = self.pci_cfg_window(offset, data.len()) {
            let mut buf = [0u8; 4];
            self.bar_read(BAR_INDEX, bar_offset, &mut buf[..len]);
            let n = data.len().min(4);
            data[..n].copy_from_slice(&buf[..n]);
            return;
        }
        self.lock().state.config.read(offset, data);
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        if let Some((bar_offset, len)) = self.pci_cfg_window(offset, data.len()) {
            self.bar_write(BAR_INDEX, bar_offset, &data[..len]);
            return;
        }
        let mut inner = self.lock();
        inner.state.config.write(offset, data);
        // The MSI-X capability is the last one; its control word sits 2 bytes in.
        let msix_ctrl_at = msix_cap_offset(&inner.state.config) + 2;
        let end = offset + data.len() as u64;
        if offset < msix_ctrl_at as u64 + 2 && end > msix_ctrl_at as u64 {
            let control = inner.state.config.read_u16(msix_ctrl_at);
            inner.msix.set_control(control);
        }
    }

    fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        self.lock().state.config.bar_specs().collect()
    }

    fn set_bar_address(&self, index: usize, addr: u64) {
        self.lock().state.config.set_bar_address(index, addr);
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        self.lock().state.config.decoded_bars()
    }

    fn bar_read(&self, _index: usize, offset: u64, data: &mut [u8]) {
        let mut inner = self.lock();
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(&mut inner, o, data),
            o if o == ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = std::mem::take(&mut inner.state.isr);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                drop(inner);
                self.counters.config_accesses.inc();
                self.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + inner.msix.table_size()).contains(&o) => {
                inner.msix.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + inner.msix.pba_size()).contains(&o) => {
                inner.msix.read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&self, _index: usize, offset: u64, data: &[u8]) {
        let mut inner = self.lock();
        let notify_end = NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * inner.kicks.len() as u64;
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(&mut inner, o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                drop(inner);
                self.counters.config_accesses.inc();
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..notify_end).contains(&o) => {
                // Only reached without an ioeventfd: forward, and count it.
                self.counters.vmm_notifications.inc();
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                let _ = inner.kicks[q].write(1);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + inner.msix.table_size()).contains(&o) => {
                inner.msix.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => self.counters.bad_accesses.inc(),
        }
    }

    fn bar_placed(&self, _index: usize, addr: Option<u64>, conflict: bool) {
        let mut inner = self.lock();
        if let Some(old) = inner.state.bar_addr.take() {
            self.unregister_notifiers(&inner, old);
        }
        if let Some(new) = addr {
            self.register_notifiers(&inner, new);
            inner.state.bar_addr = Some(new);
        }
        if conflict && inner.state.status & STATUS_DRIVER_OK != 0 {
            self.needs_reset(&mut inner, "BAR placed over another device");
        }
    }
}

impl<M: GuestMemoryBackend + Send + Sync> VirtioPciTransport<M> {
    /// For an access to `pci_cfg_data`: the BAR offset and width the capability selects, if
    /// it is a valid access (BAR 0, width 1, 2 or 4 and the same as the access, in the BAR).
    fn pci_cfg_window(&self, offset: u64, len: usize) -> Option<(u64, usize)> {
        let data_at = (self.pci_cfg_cap + PCI_CFG_DATA) as u64;
        if self.pci_cfg_cap == 0 || offset != data_at {
            return None;
        }
        let inner = self.lock();
        let c = &inner.state.config;
        let bar = c.read_u16(self.pci_cfg_cap + 4) as u8;
        let bar_offset = u64::from(c.read_u32(self.pci_cfg_cap + 8));
        let width = c.read_u32(self.pci_cfg_cap + 12) as usize;
        let valid = bar == BAR_INDEX as u8
            && matches!(width, 1 | 2 | 4)
            && width == len
            && bar_offset + width as u64 <= BAR_SIZE;
        if !valid {
            self.counters.bad_accesses.inc();
        }
        // An invalid selection still must not reach the stored capability bytes as data.
        Some((
            if valid { bar_offset } else { BAR_SIZE },
            width.min(len).min(4),
        ))
    }
}

/// A new config generation and the config-change interrupt (ISR bit 1, the config MSI-X vector).
fn config_changed(inner: &mut Inner) {
    inner.state.config_generation = inner.state.config_generation.wrapping_add(1);
    inner.state.isr |= 2;
    let vector = inner.state.msix_config;
    if vector != NO_VECTOR {
        inner.msix.trigger(vector);
    }
}

fn msix_cap_offset(config: &ConfigSpace) -> usize {
    let mut ptr = usize::from(config.read_u16(0x34) as u8);
    let mut hops = 0;
    while ptr != 0 && hops < 48 {
        if config.read_u16(ptr) as u8 == outboard_pci::msix::MSIX_CAP_ID {
            return ptr;
        }
        ptr = usize::from((config.read_u16(ptr) >> 8) as u8);
        hops += 1;
    }
    0
}

impl<M: GuestMemoryBackend + Send + Sync> Lifecycle for VirtioPciTransport<M> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn pause(&self) -> Result<(), outboard_devices::Error> {
        self.device
            .pause()
            .map_err(|e| outboard_devices::Error::BadState {
                device: self.name,
                reason: e.to_string(),
            })
    }

    fn resume(&self) -> Result<(), outboard_devices::Error> {
        self.device
            .resume()
            .map_err(|e| outboard_devices::Error::BadState {
                device: self.name,
                reason: e.to_string(),
            })
    }

    fn save(&self) -> Result<serde_json::Value, outboard_devices::Error> {
        let transport =
            serde_json::to_value(self.state()).map_err(|e| outboard_devices::Error::BadState {
                device: self.name,
                reason: e.to_string(),
            })?;
        Ok(serde_json::json!({
            "transport": transport,
            "device": self.device.save(),
        }))
    }

    fn restore(&self, state: &serde_json::Value) -> Result<(), outboard_devices::Error> {
        let transport = state
            .get("transport")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| outboard_devices::Error::BadState {
                device: self.name,
                reason: "transport state missing or malformed".into(),
            })?;
        self.restore_state(transport)
    }

    fn reset(&self) {
        let mut inner = self.lock();
        self.reset_device(&mut inner);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let mut out = vec![
            ("vmm_notifications", c.vmm_notifications.get()),
            ("config_accesses", c.config_accesses.get()),
            ("needs_reset", c.needs_reset.get()),
            ("activations", c.activations.get()),
            ("resets", c.resets.get()),
            ("bad_accesses", c.bad_accesses.get()),
            ("notifier_errors", c.notifier_errors.get()),
            ("msix_errors", self.lock().msix.errors()),
        ];
        out.extend(self.device.counters());
        out
    }
}
