//! An address space (port I/O or MMIO) mapping non-overlapping ranges to devices.
//!
//! Lookups take a read lock, uncontended in steady state; inserts (device creation, and later PCI
//! BAR programming) take the write lock. An access no device claims reads as all ones and its
//! write is dropped, as on a PC bus; both are counted.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::{BusDevice, Counter};

/// Errors of changing a bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
    #[error("Range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct Slot {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A bus: `[base, base + len)` ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    slots: RwLock<BTreeMap<u64, Slot>>,
    unhandled_reads: Counter,
    unhandled_writes: Counter,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Bus")
            .field(
                "ranges",
                &slots.iter().map(|(b, s)| (*b, s.len)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`; overlapping an existing range is an error.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange { base, len })?;
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let before = slots.range(..end).next_back();
        if let Some((&other, slot)) = before {
            if other + slot.len > base {
                return Err(Error::Overlap {
                    base,
                    len,
                    other,
                    other_len: slot.len,
                });
            }
        }
        slots.insert(base, Slot { len, device });
        Ok(())
    }

    /// Takes the device at `base` off the bus (a PCI BAR being moved or disabled).
    pub fn remove(&self, base: u64) -> Option<Arc<dyn BusDevice>> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        slots.remove(&base).map(|slot| slot.device)
    }

    /// The device and offset for an access of `size` bytes at `addr`, if one range holds it all.
    fn resolve(&self, addr: u64, size: usize) -> Option<(Arc<dyn BusDevice>, u64)> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        let (&base, slot) = slots.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= slot.len).then(|| (slot.device.clone(), offset))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff) if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled_reads.inc();
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => {
                self.unhandled_writes.inc();
                false
            }
        }
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("unhandled_reads", self.unhandled_reads.get()),
            ("unhandled_writes", self.unhandled_writes.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(dev.0.lock().unwrap()[0], (0, vec![b'x']));
    }

    #[test]
    fn rejects_overlaps() {
        let bus = Bus::new();
        bus.insert(0x600, 6, Arc::new(Recorder::default())).unwrap();
        for (base, len) in [(0x600, 1), (0x5ff, 2), (0x605, 4), (0x5f0, 0x100)] {
            assert!(
                matches!(
                    bus.insert(base, len, Arc::new(Recorder::default())),
                    Err(Error::Overlap { .. })
                ),
                "{base:#x}+{len}"
            );
        }
        bus.insert(0x5fa, 6, Arc::new(Recorder::default())).unwrap();
        assert!(bus.remove(0x5fa).is_some());
        assert!(bus.remove(0x5fa).is_none());
        bus.insert(0x5f0, 0x10, Arc::new(Recorder::default()))
            .unwrap();
        bus.insert(0x606, 2, Arc::new(Recorder::default())).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX, 2, Arc::new(Recorder::default())),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0x1000, 0, Arc::new(Recorder::default())),
            Err(Error::BadRange { .. })
        ));
    }

    #[test]
    fn unclaimed_accesses_read_ones_and_count() {
        let bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Recorder::default())).unwrap();
        let mut data = [0u8; 4];
        // Straddles the end of the range: not claimed.
        assert!(!bus.read(0x63, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x70, &[1]));
        assert!(!bus.read(u64::MAX, &mut data));
        assert_eq!(
            bus.counters(),
            vec![("unhandled_reads", 2), ("unhandled_writes", 1)]
        );
    }
}
