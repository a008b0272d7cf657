//! PCI configuration-space decoding: the capability list, BARs, the MSI-X capability, the virtio
//! vendor capabilities (virtio 1.2, 4.1.4) and the ACPI MCFG table (where ECAM lives).
//!
//! The guest snapshots a function's first 256 configuration bytes and decodes them here. The
//! device is hostile: a capability list may loop, point outside the header or below 0x40, and a
//! capability may claim lengths that run past the snapshot; each of those is an [`Error`].

use crate::bytes::{u16_at, u32_at, u64_at, u8_at};

/// Bytes of the conventional configuration space the guest snapshots.
pub const CONFIG_LEN: usize = 256;
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const CLASS_REV: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0E;
pub const BAR0: usize = 0x10;
pub const CAP_PTR: usize = 0x34;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capabilities live above the standard header.
const FIRST_CAP: usize = 0x40;
/// More capabilities than fit in the space (4 bytes each) means a loop.
const MAX_CAPS: usize = (CONFIG_LEN - FIRST_CAP) / 4;
/// BARs of a type-0 header.
pub const BARS: usize = 6;

/// Errors decoding configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Capability pointer {ptr:#x} is outside 0x40..0x100")]
    CapPointer { ptr: u8 },
    #[error("Capability list loops at {ptr:#x}")]
    CapLoop { ptr: u8 },
    #[error("Capability at {offset:#x} is truncated")]
    CapTruncated { offset: u8 },
    #[error("Capability at {offset:#x} names BAR {bar}")]
    CapBar { offset: u8, bar: u8 },
    #[error("MCFG table is malformed")]
    Mcfg,
}

/// One entry of the capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub id: u8,
    pub offset: u8,
}

/// Walks the capability list of a configuration snapshot; stops at the first bad pointer or loop
/// (yielding it as an error).
pub fn capabilities(cfg: &[u8]) -> Caps<'_> {
    let has_list = u16_at(cfg, STATUS).is_some_and(|s| s & STATUS_CAP_LIST != 0);
    let next = if has_list {
        u8_at(cfg, CAP_PTR).unwrap_or(0)
    } else {
        0
    };
    Caps {
        cfg,
        next,
        seen: [0; 4],
        count: 0,
    }
}

/// Iterator returned by [`capabilities`].
#[derive(Debug, Clone)]
pub struct Caps<'a> {
    cfg: &'a [u8],
    next: u8,
    /// One bit per dword of configuration space already visited.
    seen: [u16; 4],
    count: usize,
}

impl Iterator for Caps<'_> {
    type Item = Result<Cap, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        // The low two bits are reserved (PCI 3.0, 6.7): software masks them.
        let ptr = self.next & !3;
        if ptr == 0 {
            return None;
        }
        self.next = 0;
        if usize::from(ptr) < FIRST_CAP || usize::from(ptr) + 2 > self.cfg.len() {
            return Some(Err(Error::CapPointer { ptr }));
        }
        let dword = usize::from(ptr) / 4 - FIRST_CAP / 4;
        let (word, bit) = (dword / 16, dword % 16);
        if self.seen[word] & (1 << bit) != 0 || self.count >= MAX_CAPS {
            return Some(Err(Error::CapLoop { ptr }));
        }
        self.seen[word] |= 1 << bit;
        self.count += 1;
        let id = self.cfg[usize::from(ptr)];
        self.next = self.cfg[usize::from(ptr) + 1];
        Some(Ok(Cap { id, offset: ptr }))
    }
}

/// What a BAR register says about its space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    /// The next BAR holds the upper 32 bits.
    Mem64,
    /// Reserved type bits (0b01, 0b11): not decoded.
    Reserved,
}

/// The kind of a BAR from its low bits.
pub fn bar_kind(raw: u32) -> BarKind {
    if raw & 1 != 0 {
        return BarKind::Io;
    }
    match (raw >> 1) & 3 {
        0 => BarKind::Mem32,
        2 => BarKind::Mem64,
        _ => BarKind::Reserved,
    }
}

/// The base address of a memory BAR (`hi` is 0 for a 32-bit BAR).
pub fn mem_bar_base(lo: u32, hi: u32) -> u64 {
    u64::from(hi) << 32 | u64::from(lo & !0xF)
}

/// The size of a memory BAR from what it reads back after all-ones were written (`hi_mask` is
/// `None` for a 32-bit BAR); `None` when it decodes nothing or the mask is not a contiguous run of
/// ones (a broken device).
pub fn mem_bar_size(lo_mask: u32, hi_mask: Option<u32>) -> Option<u64> {
    let lo = lo_mask & !0xF;
    let mask = match hi_mask {
        None if lo == 0 => return None,
        None => 0xFFFF_FFFF_0000_0000 | u64::from(lo),
        Some(hi) => u64::from(hi) << 32 | u64::from(lo),
    };
    if mask == 0 {
        return None;
    }
    let size = (!mask).wrapping_add(1);
    // A well-formed mask is ones from the top down to the size bit: size is a power of two and
    // mask + size wraps to zero.
    (size.is_power_of_two() && mask.wrapping_add(size) == 0).then_some(size)
}

/// The MSI-X capability (PCI 3.0, 6.8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: u8,
    /// Entries in the table (1..=2048).
    pub table_size: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Message-control bits of the MSI-X capability.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes of one MSI-X table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_LEN: u32 = 16;

impl MsixCap {
    pub fn parse(cfg: &[u8], offset: u8) -> Result<MsixCap, Error> {
        let at = usize::from(offset);
        let truncated = Error::CapTruncated { offset };
        let control = u16_at(cfg, at + 2).ok_or(truncated)?;
        let table = u32_at(cfg, at + 4).ok_or(truncated)?;
        let pba = u32_at(cfg, at + 8).ok_or(truncated)?;
        let (table_bar, pba_bar) = ((table & 7) as u8, (pba & 7) as u8);
        for bar in [table_bar, pba_bar] {
            if usize::from(bar) >= BARS {
                return Err(Error::CapBar { offset, bar });
            }
        }
        Ok(MsixCap {
            offset,
            table_size: (control & 0x7FF) + 1,
            table_bar,
            table_offset: table & !7,
            pba_bar,
            pba_offset: pba & !7,
        })
    }
}

/// virtio-pci capability types (`cfg_type`).
pub const VIRTIO_CAP_COMMON: u8 = 1;
pub const VIRTIO_CAP_NOTIFY: u8 = 2;
pub const VIRTIO_CAP_ISR: u8 = 3;
pub const VIRTIO_CAP_DEVICE: u8 = 4;
pub const VIRTIO_CAP_PCI_CFG: u8 = 5;

/// A virtio vendor capability (`struct virtio_pci_cap`, plus the notify multiplier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    /// `notify_off_multiplier` of a notify capability.
    pub notify_multiplier: u32,
}

impl VirtioCap {
    /// Decodes the vendor capability at `offset`; `Ok(None)` for types the driver ignores
    /// (unknown types, the PCI configuration access capability, BAR numbers above 5, which the
    /// spec says to ignore).
    pub fn parse(cfg: &[u8], offset: u8) -> Result<Option<VirtioCap>, Error> {
        let at = usize::from(offset);
        let truncated = Error::CapTruncated { offset };
        let cap_len = u8_at(cfg, at + 2).ok_or(truncated)?;
        if cap_len < 16 || at + usize::from(cap_len) > cfg.len() {
            return Err(truncated);
        }
        let cfg_type = cfg[at + 3];
        let bar = cfg[at + 4];
        if !(VIRTIO_CAP_COMMON..=VIRTIO_CAP_DEVICE).contains(&cfg_type) || usize::from(bar) >= BARS
        {
            return Ok(None);
        }
        let notify_multiplier = if cfg_type == VIRTIO_CAP_NOTIFY {
            if cap_len < 20 {
                return Err(truncated);
            }
            u32_at(cfg, at + 16).ok_or(truncated)?
        } else {
            0
        };
        Ok(Some(VirtioCap {
            cfg_type,
            bar,
            offset: u32_at(cfg, at + 8).ok_or(truncated)?,
            length: u32_at(cfg, at + 12).ok_or(truncated)?,
            notify_multiplier,
        }))
    }

    /// Whether `[offset, offset + needed)` of this structure lies inside a BAR of `bar_size`
    /// bytes and inside the capability's own length.
    pub fn fits(&self, needed: u32, bar_size: u64) -> bool {
        needed <= self.length && u64::from(self.offset) + u64::from(self.length) <= bar_size
    }
}

/// The first ECAM region of the MCFG table (PCI Firmware 3.2, 4.1.2) covering segment 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecam {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

impl Ecam {
    /// Byte offset of a function's configuration space inside the region, `None` for a bus it
    /// does not cover.
    pub fn offset(&self, bus: u8, dev: u8, func: u8) -> Option<u64> {
        if bus < self.start_bus || bus > self.end_bus || dev >= 32 || func >= 8 {
            return None;
        }
        // The MCFG base addresses bus 0 even when the region starts at a later bus.
        Some(u64::from(bus) << 20 | u64::from(dev) << 15 | u64::from(func) << 12)
    }
}

/// Decodes the body (after the 36-byte header) of an MCFG table.
pub fn parse_mcfg(body: &[u8]) -> Result<Option<Ecam>, Error> {
    let entries = body.get(8..).ok_or(Error::Mcfg)?;
    if entries.len() % 16 != 0 {
        return Err(Error::Mcfg);
    }
    for e in entries.chunks_exact(16) {
        let base = u64_at(e, 0).ok_or(Error::Mcfg)?;
        let segment = u16_at(e, 8).ok_or(Error::Mcfg)?;
        let (start_bus, end_bus) = (e[10], e[11]);
        if segment == 0 && base != 0 && start_bus <= end_bus && base.is_multiple_of(1 << 20) {
            return Ok(Some(Ecam {
                base,
                start_bus,
                end_bus,
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
