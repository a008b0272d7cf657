//! The driver side of a split virtqueue, in memory shared with the backend.
//!
//! Each request slot owns three fixed descriptors (header, data, status), so a chain's head
//! index identifies its slot; the queue needs `3 × depth` descriptors.

use std::sync::atomic::Ordering;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// virtqueue descriptor flags.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Addresses of one queue's rings in guest-physical space.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingLayout {
    /// Rings for a queue of `size` entries starting at `base` (bytes needed: [`Self::bytes`]).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = desc.unchecked_add(16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size)).next_multiple_of(4));
        Self {
            size,
            desc,
            avail,
            used,
        }
    }

    /// Total bytes of the three rings.
    pub fn bytes(size: u16) -> u64 {
        let avail_end = 16 * u64::from(size) + 6 + 2 * u64::from(size);
        avail_end.next_multiple_of(4) + 6 + 8 * u64::from(size)
    }
}

/// One request's buffers, posted as a three-descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    pub slot: u16,
    pub hdr: GuestAddress,
    pub data: GuestAddress,
    pub len: u32,
    pub read: bool,
    pub status: GuestAddress,
}

/// Driver state of one virtqueue.
#[derive(Debug)]
pub struct DriverRing {
    pub layout: RingLayout,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverRing {
    pub fn new(layout: RingLayout) -> Self {
        Self {
            layout,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.layout.desc.unchecked_add(16 * u64::from(index));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, at)
            .expect("descriptor table lies in guest memory");
    }

    /// Publishes a slot's chain: header, data (device-writable for reads), status.
    pub fn post(&mut self, mem: &GuestMemoryMmap, c: &Chain) {
        let Chain {
            slot,
            hdr,
            data,
            len,
            read,
            status,
        } = *c;
        let head = slot * 3;
        self.write_desc(mem, head, hdr.0, 16, F_NEXT, head + 1);
        let data_flags = F_NEXT | if read { F_WRITE } else { 0 };
        self.write_desc(mem, head + 1, data.0, len, data_flags, head + 2);
        self.write_desc(mem, head + 2, status.0, 1, F_WRITE, 0);
        let entry = self
            .layout
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.layout.size));
        mem.write_obj(head.to_le(), entry)
            .expect("avail ring lies in guest memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index store publishes the entry: Release orders it after the writes above.
        mem.store(
            self.avail_idx.to_le(),
            self.layout.avail.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail ring lies in guest memory");
    }

    /// Completed slots since the last call, with the used lengths.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<(u16, u32)>) {
        let idx: u16 = u16::from_le(
            mem.load(self.layout.used.unchecked_add(2), Ordering::Acquire)
                .expect("used ring lies in guest memory"),
        );
        while self.used_seen != idx {
            let at = self
                .layout
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % self.layout.size));
            let id: u32 = u32::from_le(mem.read_obj(at).expect("used ring lies in guest memory"));
            let len: u32 = u32::from_le(
                mem.read_obj(at.unchecked_add(4))
                    .expect("used ring lies in guest memory"),
            );
            out.push(((id / 3) as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }
}
