//! The e820 memory map: from `boot_params` (20-byte entries) or from PVH's `hvm_memmap_table_entry`
//! (24-byte entries; the same first three fields).

use crate::bytes::{u32_at, u64_at};

/// Entry type of usable RAM.
pub const RAM: u32 = 1;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl Entry {
    /// Whether this RAM entry covers all of `[start, start + len)`.
    pub fn covers(&self, start: u64, len: u64) -> bool {
        let (Some(end), Some(own_end)) = (start.checked_add(len), self.addr.checked_add(self.size))
        else {
            return false;
        };
        self.kind == RAM && self.addr <= start && end <= own_end
    }
}

/// A memory map held as raw bytes: `count` entries of `stride` bytes each.
#[derive(Debug, Clone, Copy)]
pub struct MemMap<'a> {
    bytes: &'a [u8],
    stride: usize,
}

impl Default for MemMap<'_> {
    /// An empty map.
    fn default() -> Self {
        MemMap::new(&[], MemMap::BOOT_PARAMS_STRIDE)
    }
}

impl<'a> MemMap<'a> {
    /// Stride of a `boot_params.e820_table` entry.
    pub const BOOT_PARAMS_STRIDE: usize = 20;
    /// Stride of a PVH `hvm_memmap_table_entry`.
    pub const PVH_STRIDE: usize = 24;

    /// The entries in `bytes`; a partial entry at the end is ignored. `stride` is at least 20.
    pub fn new(bytes: &'a [u8], stride: usize) -> Self {
        MemMap {
            bytes,
            stride: stride.max(Self::BOOT_PARAMS_STRIDE),
        }
    }

    /// Every entry, in table order.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + 'a {
        self.bytes.chunks_exact(self.stride).filter_map(|e| {
            Some(Entry {
                addr: u64_at(e, 0)?,
                size: u64_at(e, 8)?,
                kind: u32_at(e, 16)?,
            })
        })
    }

    /// Total size of the RAM entries in bytes, saturating (a hostile map can't overflow it).
    pub fn ram_bytes(&self) -> u64 {
        self.entries()
            .filter(|e| e.kind == RAM)
            .fold(0u64, |sum, e| sum.saturating_add(e.size))
    }

    /// Whether one RAM entry covers all of `[start, start + len)`.
    pub fn is_ram(&self, start: u64, len: u64) -> bool {
        self.entries().any(|e| e.covers(start, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: u64, size: u64, kind: u32, stride: usize) -> [u8; 24] {
        let mut e = [0u8; 24];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&kind.to_le_bytes());
        if stride == 24 {
            e[20..24].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        }
        e
    }

    fn table(entries: &[(u64, u64, u32)], stride: usize) -> ([u8; 240], usize) {
        let mut buf = [0u8; 240];
        for (i, (a, s, k)) in entries.iter().enumerate() {
            buf[i * stride..(i + 1) * stride].copy_from_slice(&entry(*a, *s, *k, stride)[..stride]);
        }
        (buf, entries.len() * stride)
    }

    #[test]
    fn sums_only_ram() {
        for stride in [20, 24] {
            let (buf, len) = table(
                &[
                    (0, 0x9fc00, 1),
                    (0x9fc00, 0x400, 2),
                    (0x100000, 0x7f00000, 1),
                ],
                stride,
            );
            let map = MemMap::new(&buf[..len], stride);
            assert_eq!(map.entries().count(), 3);
            assert_eq!(map.ram_bytes(), 0x9fc00 + 0x7f00000);
            assert!(map.is_ram(0x8000, 0x1000));
            assert!(!map.is_ram(0x9f000, 0x1000));
        }
    }

    #[test]
    fn hostile_sizes_saturate() {
        let (buf, len) = table(&[(0, u64::MAX, 1), (u64::MAX, u64::MAX, 1)], 20);
        let map = MemMap::new(&buf[..len], 20);
        assert_eq!(map.ram_bytes(), u64::MAX);
        assert!(!map.is_ram(u64::MAX, 2));
    }

    #[test]
    fn truncated_entry_is_ignored() {
        let (buf, _) = table(&[(0, 0x1000, 1), (0x1000, 0x1000, 1)], 20);
        assert_eq!(MemMap::new(&buf[..39], 20).ram_bytes(), 0x1000);
        assert_eq!(MemMap::new(&[], 20).ram_bytes(), 0);
        // A nonsense stride is raised to the smallest real one rather than panicking.
        assert_eq!(MemMap::new(&buf[..40], 0).ram_bytes(), 0x2000);
    }
}
