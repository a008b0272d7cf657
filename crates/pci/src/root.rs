//! The PCI root complex: bus 0, its two configuration mechanisms (ECAM and ports
//! 0xCF8/0xCFC) and BAR placement on the MMIO bus.
//!
//! BARs are allocated at device creation in the 32-bit or 64-bit window, as firmware would, with
//! memory decoding on. After every configuration write the root compares what a function
//! decodes with what is on the MMIO bus and moves ranges to match (remove, then insert). A range
//! that would overlap another device is left unmapped and counted; the device is told.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use outboard_devices::{Bus, BusDevice, Counter};

use crate::config::{BarKind, BarRange, COMMAND_MEMORY};
use crate::device::{HostBridge, PciDevice};

/// Functions on bus 0 (one function per device).
pub const MAX_DEVICES: u8 = 32;
/// ECAM bytes per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;

/// Errors of adding devices to the root complex.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("No free slot on PCI bus 0")]
    NoSlot,
    #[error("No room for a BAR of {size:#x} bytes in the {window} MMIO window")]
    NoSpace { size: u64, window: &'static str },
    #[error("Cannot map BAR {index} of device {slot:#04x}")]
    Map {
        slot: u8,
        index: usize,
        #[source]
        source: outboard_devices::bus::Error,
    },
}

/// The MMIO windows the root complex allocates BARs from (and reports in ACPI `_CRS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32_start: u64,
    pub mmio32_size: u64,
    pub mmio64_start: u64,
    pub mmio64_size: u64,
}

/// A bump allocator over one window, honouring the natural alignment of BARs.
#[derive(Debug)]
struct Window {
    next: u64,
    end: u64,
}

impl Window {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let addr = self.next.checked_next_multiple_of(size)?;
        let end = addr.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            addr
        })
    }
}

struct Slot {
    device: Arc<dyn PciDevice>,
    mapped: BTreeMap<usize, BarRange>,
}

/// Root complex counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct RootCounters {
    pub config_reads: Counter,
    pub config_writes: Counter,
    pub bar_moves: Counter,
    pub bar_conflicts: Counter,
}

/// Bus 0 and BAR placement.
pub struct PciRoot {
    slots: Mutex<BTreeMap<u8, Slot>>,
    mmio: Arc<Bus>,
    mmio32: Mutex<Window>,
    mmio64: Mutex<Window>,
    pub counters: RootCounters,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot").finish_non_exhaustive()
    }
}

/// A BAR on the MMIO bus: forwards to the device with the BAR index.
struct BarRegion {
    device: Arc<dyn PciDevice>,
    index: usize,
}

impl BusDevice for BarRegion {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(self.index, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.device.bar_write(self.index, offset, data);
    }
}

impl PciRoot {
    /// A root complex with the host bridge at 00:00.0; BARs go on `mmio`.
    pub fn new(mmio: Arc<Bus>, windows: PciWindows) -> Arc<Self> {
        let root = PciRoot {
            slots: Mutex::new(BTreeMap::new()),
            mmio,
            mmio32: Mutex::new(Window {
                next: windows.mmio32_start,
                end: windows.mmio32_start + windows.mmio32_size,
            }),
            mmio64: Mutex::new(Window {
                next: windows.mmio64_start,
                end: windows.mmio64_start + windows.mmio64_size,
            }),
            counters: RootCounters::default(),
        };
        root.lock().insert(
            0,
            Slot {
                device: Arc::new(HostBridge::default()),
                mapped: BTreeMap::new(),
            },
        );
        Arc::new(root)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u8, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plugs `device` into the first free slot, allocates and maps its BARs, turns memory
    /// decoding on. Returns the device number.
    pub fn add_device(&self, device: Arc<dyn PciDevice>) -> Result<u8, Error> {
        let mut slots = self.lock();
        let slot = (1..MAX_DEVICES)
            .find(|s| !slots.contains_key(s))
            .ok_or(Error::NoSlot)?;
        // Largest first keeps the bump allocator's alignment padding small.
        let mut specs = device.bar_specs();
        specs.sort_by_key(|(_, s)| std::cmp::Reverse(s.size));
        for (index, spec) in specs {
            // A 64-bit BAR goes below 4 GiB while there is room, as firmware does: guests that
            // map only the low 4 GiB (early boot, the test guest) can then reach it.
            let low = self
                .mmio32
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .allocate(spec.size);
            let addr = match (low, spec.kind) {
                (Some(addr), _) => addr,
                (None, BarKind::Mem32) => {
                    return Err(Error::NoSpace {
                        size: spec.size,
                        window: "32-bit",
                    })
                }
                (None, BarKind::Mem64) => self
                    .mmio64
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .allocate(spec.size)
                    .ok_or(Error::NoSpace {
                        size: spec.size,
                        window: "64-bit",
                    })?,
            };
            device.set_bar_address(index, addr);
        }
        let mut command = [0u8; 2];
        device.config_read(4, &mut command);
        let command = u16::from_le_bytes(command) | COMMAND_MEMORY;
        device.config_write(4, &command.to_le_bytes());
        let mut mapped = BTreeMap::new();
        for bar in device.decoded_bars() {
            let region = Arc::new(BarRegion {
                device: device.clone(),
                index: bar.index,
            });
            self.mmio
                .insert(bar.addr, bar.size, region)
                .map_err(|source| Error::Map {
                    slot,
                    index: bar.index,
                    source,
                })?;
            device.bar_placed(bar.index, Some(bar.addr), false);
            mapped.insert(bar.index, bar);
        }
        slots.insert(slot, Slot { device, mapped });
        Ok(slot)
    }

    /// Configuration read of bus 0, `slot`, function `func` at `offset`.
    pub fn config_read(&self, slot: u8, func: u8, offset: u64, data: &mut [u8]) {
        self.counters.config_reads.inc();
        let device = self.lock().get(&slot).map(|s| s.device.clone());
        match device {
            Some(device) if func == 0 => device.config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// Configuration write; BARs move on the MMIO bus to follow it.
    pub fn config_write(&self, slot: u8, func: u8, offset: u64, data: &[u8]) {
        self.counters.config_writes.inc();
        if func != 0 {
            return;
        }
        let mut slots = self.lock();
        let Some(entry) = slots.get_mut(&slot) else {
            return;
        };
        entry.device.config_write(offset, data);
        self.reconcile(slot, entry);
    }

    /// Maps the BARs of `slot` where its configuration space says, e.g. after its state was
    /// restored in a successor VMM (restore, then call this).
    pub fn sync_bars(&self, slot: u8) {
        let mut slots = self.lock();
        if let Some(entry) = slots.get_mut(&slot) {
            self.reconcile(slot, entry);
        }
    }

    /// Moves BAR ranges on the MMIO bus to what the function decodes now.
    fn reconcile(&self, slot: u8, entry: &mut Slot) {
        let wanted: BTreeMap<usize, BarRange> = entry
            .device
            .decoded_bars()
            .into_iter()
            .map(|b| (b.index, b))
            .collect();
        if wanted == entry.mapped {
            return;
        }
        let stale: Vec<usize> = entry
            .mapped
            .iter()
            .filter(|(i, b)| wanted.get(i) != Some(b))
            .map(|(i, _)| *i)
            .collect();
        for index in stale {
            if let Some(old) = entry.mapped.remove(&index) {
                self.mmio.remove(old.addr);
                if !wanted.contains_key(&index) {
                    entry.device.bar_placed(index, None, false);
                }
            }
        }
        for (index, bar) in wanted {
            if entry.mapped.contains_key(&index) {
                continue;
            }
            let region = Arc::new(BarRegion {
                device: entry.device.clone(),
                index,
            });
            match self.mmio.insert(bar.addr, bar.size, region) {
                Ok(()) => {
                    self.counters.bar_moves.inc();
                    entry.device.bar_placed(index, Some(bar.addr), false);
                    entry.mapped.insert(index, bar);
                }
                Err(e) => {
                    log::warn!("PCI {slot:#04x} BAR {index} left unmapped: {e}");
                    self.counters.bar_conflicts.inc();
                    entry.device.bar_placed(index, None, true);
                }
            }
        }
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("config_reads", self.counters.config_reads.get()),
            ("config_writes", self.counters.config_writes.get()),
            ("bar_moves", self.counters.bar_moves.get()),
            ("bar_conflicts", self.counters.bar_conflicts.get()),
        ]
    }
}

/// ECAM for bus 0: `offset = device << 15 | function << 12 | register`.
#[derive(Debug)]
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }

    /// (slot, function, register) for an access of `len` bytes, if it is on bus 0 and stays
    /// inside one aligned dword.
    fn decode(offset: u64, len: usize) -> Option<(u8, u8, u64)> {
        let aligned = matches!(len, 1 | 2 | 4) && offset & (len as u64 - 1) == 0;
        (offset < ECAM_BUS_SIZE && aligned).then_some((
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            offset & 0xfff,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((slot, func, reg)) => self.root.config_read(slot, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some((slot, func, reg)) = Self::decode(offset, data.len()) {
            self.root.config_write(slot, func, reg, data);
        }
    }
}

/// Configuration mechanism #1: address at 0xCF8 (dword only), data at 0xCFC–0xCFF. Placed on
/// the I/O bus at [`CONFIG_ADDRESS_PORT`] for [`CONFIG_IO_LEN`] bytes.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: Mutex<u32>,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo {
            root,
            address: Mutex::new(0),
        }
    }

    /// The address register, for save/restore.
    pub fn address(&self) -> u32 {
        *self.address.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_address(&self, value: u32) {
        *self.address.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }

    /// (slot, function, register) selected by the address register for a data access at
    /// `byte` (0..4) of `len` bytes; `None` if disabled, not bus 0 or crossing the dword.
    fn target(&self, byte: u64, len: usize) -> Option<(u8, u8, u64)> {
        let a = self.address();
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        (enabled && bus == 0 && byte + len as u64 <= 4).then(|| {
            (
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 0x7) as u8,
                u64::from(a & 0xfc) + byte,
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address().to_le_bytes());
            return;
        }
        match offset
            .checked_sub(4)
            .and_then(|b| self.target(b, data.len()))
        {
            Some((slot, func, reg)) => self.root.config_read(slot, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(value) = <[u8; 4]>::try_from(data) {
                self.set_address(u32::from_le_bytes(value) & 0x80ff_fffc);
            }
            return;
        }
        if let Some((slot, func, reg)) = offset
            .checked_sub(4)
            .and_then(|b| self.target(b, data.len()))
        {
            self.root.config_write(slot, func, reg, data);
        }
    }
}
