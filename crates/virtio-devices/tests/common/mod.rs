//! A guest stand-in for host-only tests: memfd guest RAM, a virtio-pci driver written against
//! the transport's register interface, and split virtqueues in guest memory.

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use outboard_pci::PciDevice;
use outboard_virtio_devices::transport::{
    VirtioPciTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const BAR: u64 = 0x10_0000_0000;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// The driver's side of one split virtqueue.
pub struct Vq {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Vq {
    /// A queue of `size` entries with its rings at `base` (needs 3 pages).
    pub fn new(index: u16, size: u16, base: u64) -> Self {
        Vq {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Puts a descriptor chain of (addr, len, device-writable) buffers and publishes it.
    pub fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            let next = (d + 1) % self.size;
            let mut flags = if *write { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc + 16 * u64::from(d);
            mem.write_obj(*addr, GuestAddress(at)).unwrap();
            mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            self.next_desc = next;
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Waits on the call eventfd until the used index reaches (or passes) `want`. Interrupts without new
    /// used entries are allowed (libvhost-user signals the call fd when it is (re)set).
    /// Returns the number of interrupts taken, or None on timeout.
    pub fn wait_used(&self, mem: &GuestMemoryMmap, call: &EventFd, want: u16) -> Option<u32> {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let mut interrupts = 0;
        // Reached or passed `want`, in wrapping 16-bit arithmetic.
        while (self.used_idx(mem).wrapping_sub(want) as i16) < 0 {
            let left = end.checked_duration_since(std::time::Instant::now())?;
            if wait_event(call, left) {
                interrupts += 1;
            }
        }
        Some(interrupts)
    }
}

/// Plays the virtio-pci driver through BAR 0.
pub struct Driver {
    pub t: Arc<VirtioPciTransport<GuestMemoryMmap>>,
}

impl Driver {
    pub fn new(t: Arc<VirtioPciTransport<GuestMemoryMmap>>) -> Self {
        t.set_bar_address(0, BAR);
        t.config_write(4, &2u16.to_le_bytes());
        t.bar_placed(0, Some(BAR), false);
        Driver { t }
    }

    pub fn w(&self, off: u64, v: u64, len: usize) {
        self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    pub fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn device_features(&self) -> u64 {
        self.w(0x00, 0, 4);
        let lo = self.r(0x04, 4);
        self.w(0x00, 1, 4);
        lo | (self.r(0x04, 4) << 32)
    }

    /// Acknowledge, accept `wanted & offered`, FEATURES_OK; returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> u64 {
        self.w(0x14, 0, 1);
        self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        let f = self.device_features() & wanted;
        self.w(0x08, 0, 4);
        self.w(0x0c, f & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, f >> 32, 4);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w(0x14, u64::from(s), 1);
        assert_eq!(self.r(0x14, 1) as u8, s, "FEATURES_OK accepted");
        f
    }

    pub fn setup_queue(&self, vq: &Vq, vector: u16) {
        self.w(0x16, u64::from(vq.index), 2);
        self.w(0x18, u64::from(vq.size), 2);
        self.w(0x1a, u64::from(vector), 2);
        self.w(0x20, vq.desc, 8);
        self.w(0x28, vq.avail, 8);
        self.w(0x30, vq.used, 8);
        self.w(0x1c, 1, 2);
    }

    pub fn driver_ok(&self) {
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.w(0x14, u64::from(s), 1);
    }

    pub fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }
}

/// Waits for `evt` to be signalled (what KVM's irqfd would consume); false on timeout.
pub fn wait_event(evt: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n == 1 && evt.read().is_ok()
}

/// Waits until `cond` holds, polling; false on timeout.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
