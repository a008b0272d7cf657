//! Physical memory the drivers touch: device registers (MMIO, through the boot identity map of
//! 0–4 GiB) and the DMA area the guest lends to devices (virtqueues and buffers, a bump allocator
//! over [`DMA_BASE`](crate::platform::DMA_BASE)). Every access is volatile: a device reads and
//! writes this memory behind the compiler's back. x86 is TSO, so ordering against the device only
//! needs compiler fences (no `mfence`, which PVM cannot emulate).

use crate::platform::{self, DMA_BASE, DMA_LEN, MAPPED_END};
use core::sync::atomic::{AtomicU64, Ordering};

const PAGE: u64 = 4096;

/// A window of device registers (part of a BAR), bounds-checked on every access.
#[derive(Debug, Clone, Copy)]
pub struct Mmio {
    pub base: u64,
    pub len: u64,
}

impl Mmio {
    /// A window inside the identity map; `None` above it.
    pub fn new(base: u64, len: u64) -> Option<Mmio> {
        let end = base.checked_add(len)?;
        (base != 0 && end <= MAPPED_END).then_some(Mmio { base, len })
    }

    fn addr(&self, off: u64, size: u64) -> u64 {
        match off.checked_add(size) {
            Some(end) if end <= self.len && off.is_multiple_of(size) => self.base + off,
            _ => panic!(
                "MMIO access {off:#x}+{size} outside {:#x}+{:#x}",
                self.base, self.len
            ),
        }
    }

    pub fn read8(&self, off: u64) -> u8 {
        let a = self.addr(off, 1);
        // SAFETY: `a` is inside a device window in the identity map (checked by `addr`); reading
        // a register has no effect on memory Rust knows about.
        unsafe { (a as *const u8).read_volatile() }
    }

    pub fn read16(&self, off: u64) -> u16 {
        let a = self.addr(off, 2);
        // SAFETY: as in `read8`; `addr` checked the alignment.
        unsafe { (a as *const u16).read_volatile() }
    }

    pub fn read32(&self, off: u64) -> u32 {
        let a = self.addr(off, 4);
        // SAFETY: as in `read16`.
        unsafe { (a as *const u32).read_volatile() }
    }

    pub fn write8(&self, off: u64, v: u8) {
        let a = self.addr(off, 1);
        // SAFETY: as in `read8`: a register write, not memory the program owns.
        unsafe { (a as *mut u8).write_volatile(v) }
    }

    pub fn write16(&self, off: u64, v: u16) {
        let a = self.addr(off, 2);
        // SAFETY: as in `write8`, aligned.
        unsafe { (a as *mut u16).write_volatile(v) }
    }

    pub fn write32(&self, off: u64, v: u32) {
        let a = self.addr(off, 4);
        // SAFETY: as in `write16`.
        unsafe { (a as *mut u32).write_volatile(v) }
    }

    /// A 64-bit register as two 32-bit halves, low first (virtio allows this for its 64-bit
    /// fields, and some VMMs only decode 32-bit accesses).
    pub fn write64(&self, off: u64, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(DMA_BASE);

extern "C" {
    /// End of the loaded image and its stacks (link.ld).
    static __image_end: u8;
}

/// Error when the DMA area is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("The DMA area {DMA_BASE:#x}+{DMA_LEN:#x} is not RAM in the e820 map")]
    NotRam,
    #[error("The guest image (ending at {end:#x}) overlaps the DMA area")]
    Overlap { end: u64 },
    #[error("The DMA area is exhausted")]
    Exhausted,
}

/// `pages` zeroed pages of DMA memory (the boot CPU only).
pub fn alloc(pages: u64) -> Result<u64, Error> {
    if !platform::get().is_some_and(|p| p.dma_is_ram) {
        return Err(Error::NotRam);
    }
    let end = core::ptr::addr_of!(__image_end) as u64;
    if end > DMA_BASE {
        return Err(Error::Overlap { end });
    }
    let len = pages.checked_mul(PAGE).ok_or(Error::Exhausted)?;
    let at = NEXT.load(Ordering::Relaxed);
    let end = at.checked_add(len).ok_or(Error::Exhausted)?;
    if end > DMA_BASE + DMA_LEN {
        return Err(Error::Exhausted);
    }
    NEXT.store(end, Ordering::Relaxed);
    bytes_mut(at, len as usize).fill(0);
    Ok(at)
}

fn dma_addr(addr: u64, size: u64, align: u64) -> u64 {
    match addr.checked_add(size) {
        Some(end)
            if addr >= DMA_BASE && end <= DMA_BASE + DMA_LEN && addr.is_multiple_of(align) =>
        {
            addr
        }
        _ => panic!("DMA access {addr:#x}+{size} outside the DMA area"),
    }
}

/// Reads a byte the device may write (a request's status).
pub fn read8(addr: u64) -> u8 {
    let a = dma_addr(addr, 1, 1);
    // SAFETY: as in `read16`.
    unsafe { (a as *const u8).read_volatile() }
}

pub fn write8(addr: u64, v: u8) {
    let a = dma_addr(addr, 1, 1);
    // SAFETY: as in `write16`.
    unsafe { (a as *mut u8).write_volatile(v) }
}

/// Reads a value the device may write (used ring, status byte).
pub fn read16(addr: u64) -> u16 {
    let a = dma_addr(addr, 2, 2);
    // SAFETY: `a` is inside the DMA area (checked), identity-mapped RAM reserved for devices;
    // volatile because the device writes it concurrently.
    unsafe { (a as *const u16).read_volatile() }
}

pub fn read32(addr: u64) -> u32 {
    let a = dma_addr(addr, 4, 4);
    // SAFETY: as in `read16`.
    unsafe { (a as *const u32).read_volatile() }
}

pub fn write16(addr: u64, v: u16) {
    let a = dma_addr(addr, 2, 2);
    // SAFETY: as in `read16`; no Rust reference to this memory is alive.
    unsafe { (a as *mut u16).write_volatile(v) }
}

pub fn write32(addr: u64, v: u32) {
    let a = dma_addr(addr, 4, 4);
    // SAFETY: as in `write16`.
    unsafe { (a as *mut u32).write_volatile(v) }
}

pub fn write64(addr: u64, v: u64) {
    let a = dma_addr(addr, 8, 8);
    // SAFETY: as in `write16`.
    unsafe { (a as *mut u64).write_volatile(v) }
}

/// A DMA buffer as bytes, for filling and checking data. Callers only take it while the device
/// does not own the buffer (before it is made available, after it is used).
pub fn bytes_mut(addr: u64, len: usize) -> &'static mut [u8] {
    let a = dma_addr(addr, len as u64, 1);
    // SAFETY: `[a, a + len)` is DMA-area RAM (checked); the device does not access a buffer it
    // does not own, and the drivers take one slice per buffer at a time.
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}
