//! A split virtqueue (virtio 1.2, 2.7) in guest DMA memory. Requests use fixed descriptor chains:
//! slot `s` owns descriptors `s * chain ..`, so the used ring's id maps back to its slot and a
//! bogus id is caught by `virtq::Slots`. Ordering against the device: descriptors and the ring
//! entry are written before the avail index (compiler fence; x86 stores are not reordered), the
//! used index is read before the used element it covers.

use crate::mem;
use core::sync::atomic::{compiler_fence, Ordering};
use outboard_testguest_parse::virtq::{self, Slots, DESC_F_NEXT, DESC_F_WRITE, DESC_LEN};

/// One buffer of a chain: address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A queue the driver set up.
#[derive(Debug)]
pub struct Queue {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub notify_addr: u64,
    chain: u16,
    next_avail: u16,
    last_used: u16,
    slots: Slots,
}

impl Queue {
    /// Allocates the rings (one page-aligned block each) for `size` entries.
    pub fn allocate(
        index: u16,
        size: u16,
        chain: u16,
        max_slots: u16,
        notify_addr: u64,
    ) -> Result<Queue, mem::Error> {
        let (d, a, u) = virtq::ring_bytes(size);
        let pages = |bytes: u64| bytes.div_ceil(4096);
        let desc = mem::alloc(pages(d))?;
        let avail = mem::alloc(pages(a))?;
        let used = mem::alloc(pages(u))?;
        let chain = chain.max(1);
        Ok(Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify_addr,
            chain,
            next_avail: 0,
            last_used: 0,
            slots: Slots::new((size / chain).min(max_slots), chain),
        })
    }

    pub fn slots(&self) -> u16 {
        self.slots.count()
    }

    /// The slot the next [`submit`](Self::submit) takes.
    pub fn peek_free(&self) -> Option<u16> {
        self.slots.peek()
    }

    pub fn in_flight(&self) -> u16 {
        self.slots.in_flight()
    }

    /// Writes descriptor `i` as is (also for the bad-input commands).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + u64::from(i % self.size) * DESC_LEN;
        mem::write64(at, addr);
        mem::write32(at + 8, len);
        mem::write16(at + 12, flags);
        mem::write16(at + 14, next);
    }

    /// Takes a free slot for a chain the caller writes itself ([`write_desc`](Self::write_desc),
    /// then [`publish`](Self::publish)); returns its head descriptor.
    pub fn claim(&mut self) -> Option<u16> {
        let slot = self.slots.take()?;
        Some(self.slots.head(slot))
    }

    /// Makes chain `head` available (no notification).
    pub fn publish(&mut self, head: u16) {
        let slot = virtq::slot(self.next_avail, self.size);
        mem::write16(self.avail + 4 + 2 * u64::from(slot), head);
        compiler_fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(1);
        mem::write16(self.avail + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
    }

    /// Takes a free slot and makes `bufs` (at most the chain length) available as its chain;
    /// `None` when every slot is in flight.
    pub fn submit(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.chain) {
            return None;
        }
        let slot = self.slots.take()?;
        let head = self.slots.head(slot);
        for (k, b) in bufs.iter().enumerate() {
            let i = head + k as u16;
            let last = k + 1 == bufs.len();
            let flags = if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.write_desc(i, b.addr, b.len, flags, if last { 0 } else { i + 1 });
        }
        self.publish(head);
        Some(slot)
    }

    /// Tells the device to look at the queue: a 16-bit write of the queue index to its notify
    /// address (no VIRTIO_F_NOTIFICATION_DATA).
    pub fn notify(&self) {
        compiler_fence(Ordering::SeqCst);
        // The notify address was checked against the notify window when the queue was set up.
        if let Some(w) = crate::mem::Mmio::new(self.notify_addr, 2) {
            w.write16(0, self.index);
        }
    }

    /// The next completion: (slot, bytes written by the device).
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>, virtq::Error> {
        let used_idx = mem::read16(self.used + 2);
        compiler_fence(Ordering::Acquire);
        if virtq::new_used(self.last_used, used_idx, self.size)? == 0 {
            return Ok(None);
        }
        let at = self.used + 4 + 8 * u64::from(virtq::slot(self.last_used, self.size));
        let id = mem::read32(at);
        let len = mem::read32(at + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let slot = self.slots.complete(id)?;
        Ok(Some((slot, len)))
    }
}
