//! Split-virtqueue bookkeeping (virtio 1.2, 2.7) that needs no device memory: ring sizes, index
//! arithmetic over free-running 16-bit indices, and the set of requests in flight.
//!
//! The device writes the used ring and is hostile: a used index that runs ahead of what was made
//! available, or a used element naming a chain that is not in flight (twice, or never submitted),
//! is an [`Error`], never an out-of-bounds access.

/// Largest split queue (virtio 1.2, 4.1.4.3).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most request slots tracked per queue.
pub const MAX_SLOTS: usize = 256;
pub const DESC_LEN: u64 = 16;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Errors from the device's side of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "Used index {used} is {ahead} entries ahead of {last}, more than the {size} in flight"
    )]
    UsedAhead {
        used: u16,
        last: u16,
        ahead: u16,
        size: u16,
    },
    #[error("Used element names descriptor {id}, which is not in flight")]
    NotInFlight { id: u32 },
    #[error("Queue size {size} is not a power of two up to 32768")]
    BadSize { size: u16 },
}

/// Whether a split queue may have `size` entries.
pub fn valid_size(size: u16) -> bool {
    size.is_power_of_two() && size <= MAX_QUEUE_SIZE
}

/// The queue size the driver uses: the largest power of two up to both the device's maximum and
/// `wanted`.
pub fn choose_size(device_max: u16, wanted: u16) -> Result<u16, Error> {
    let limit = device_max.min(wanted).min(MAX_QUEUE_SIZE);
    if limit == 0 {
        return Err(Error::BadSize { size: device_max });
    }
    // The highest set bit of `limit`.
    Ok(1 << (15 - limit.leading_zeros()))
}

/// Bytes of the descriptor table, driver (avail) ring and device (used) ring, without
/// VIRTIO_F_EVENT_IDX.
pub fn ring_bytes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (DESC_LEN * n, 4 + 2 * n, 4 + 8 * n)
}

/// The ring slot a free-running index refers to (`size` a power of two).
pub fn slot(index: u16, size: u16) -> u16 {
    index & size.wrapping_sub(1)
}

/// How many used elements the device published since `last`; more than `size` is a device bug.
pub fn new_used(last: u16, used: u16, size: u16) -> Result<u16, Error> {
    let ahead = used.wrapping_sub(last);
    if ahead > size {
        return Err(Error::UsedAhead {
            used,
            last,
            ahead,
            size,
        });
    }
    Ok(ahead)
}

/// Request slots of a queue: each slot owns a fixed chain of `chain` descriptors starting at
/// `slot * chain`, so the used ring's id maps back to a slot with no free list in device memory.
#[derive(Debug, Clone)]
pub struct Slots {
    chain: u16,
    count: u16,
    busy: [u64; MAX_SLOTS / 64],
    in_flight: u16,
}

impl Slots {
    /// `count` slots (at most [`MAX_SLOTS`]) of `chain` descriptors each (at least one).
    pub fn new(count: u16, chain: u16) -> Slots {
        Slots {
            chain: chain.max(1),
            count: count.min(MAX_SLOTS as u16),
            busy: [0; MAX_SLOTS / 64],
            in_flight: 0,
        }
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The head descriptor of a slot.
    pub fn head(&self, slot: u16) -> u16 {
        slot * self.chain
    }

    /// The slot [`take`](Self::take) would hand out.
    pub fn peek(&self) -> Option<u16> {
        (0..self.count).find(|s| !self.is_busy(*s))
    }

    /// The lowest free slot, now marked in flight.
    pub fn take(&mut self) -> Option<u16> {
        let slot = self.peek()?;
        self.busy[usize::from(slot / 64)] |= 1 << (slot % 64);
        self.in_flight += 1;
        Some(slot)
    }

    fn is_busy(&self, slot: u16) -> bool {
        self.busy[usize::from(slot / 64)] & (1 << (slot % 64)) != 0
    }

    /// Marks the chain whose head the device returned as done; returns its slot.
    pub fn complete(&mut self, id: u32) -> Result<u16, Error> {
        let chain = u32::from(self.chain);
        let slot = id / chain;
        if !id.is_multiple_of(chain) || slot >= u32::from(self.count) || !self.is_busy(slot as u16)
        {
            return Err(Error::NotInFlight { id });
        }
        let slot = slot as u16;
        self.busy[usize::from(slot / 64)] &= !(1 << (slot % 64));
        self.in_flight -= 1;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(valid_size(1) && valid_size(256) && valid_size(32768));
        assert!(!valid_size(0) && !valid_size(3) && !valid_size(65535));
        assert_eq!(choose_size(256, 64), Ok(64));
        assert_eq!(choose_size(1024, 65535), Ok(1024));
        assert_eq!(choose_size(100, 256), Ok(64));
        assert_eq!(choose_size(65535, 65535), Ok(32768));
        assert_eq!(choose_size(1, 8), Ok(1));
        assert_eq!(choose_size(0, 8), Err(Error::BadSize { size: 0 }));
        assert_eq!(ring_bytes(256), (4096, 516, 2052));
    }

    #[test]
    fn used_index_wraps_and_is_bounded() {
        assert_eq!(slot(65535, 256), 255);
        assert_eq!(slot(65536u32 as u16, 256), 0);
        assert_eq!(new_used(65534, 2, 8), Ok(4));
        assert_eq!(new_used(7, 7, 8), Ok(0));
        assert!(new_used(0, 9, 8).is_err());
        assert!(new_used(10, 9, 8).is_err());
    }

    #[test]
    fn slots_reject_unknown_and_repeated_ids() {
        let mut s = Slots::new(4, 3);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert_eq!((a, b, s.head(b), s.in_flight()), (0, 1, 3, 2));
        assert_eq!(s.complete(3), Ok(1));
        assert_eq!(s.complete(3), Err(Error::NotInFlight { id: 3 }));
        assert_eq!(s.complete(1), Err(Error::NotInFlight { id: 1 }));
        assert_eq!(s.complete(9), Err(Error::NotInFlight { id: 9 }));
        assert_eq!(
            s.complete(u32::MAX),
            Err(Error::NotInFlight { id: u32::MAX })
        );
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), Some(2));
        assert_eq!(s.take(), Some(3));
        assert_eq!(s.take(), None);
        assert_eq!(s.in_flight(), 4);
        let capped = Slots::new(u16::MAX, 0);
        assert_eq!(capped.count(), MAX_SLOTS as u16);
    }
}
