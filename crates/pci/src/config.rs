//! The configuration space of one PCI function: a type 0 header, BARs and a capability list.
//!
//! Every byte has a write mask, so read-only fields (IDs, class, BAR type bits, capability
//! headers) stay what the device model set whatever the guest writes; status bits are
//! write-1-to-clear. BAR sizing needs no special case: the address bits below the BAR's size are
//! read-only zeros, so writing all ones reads back `!(size - 1)` plus the type bits.
//!
//! The whole struct is plain data (serde), the state a successor VMM restores.

use serde::{Deserialize, Serialize};

/// Size of the conventional configuration space; the extended space (ECAM only) reads as zero,
/// which a PCIe-aware guest takes as "no extended capabilities".
pub const CONFIG_SPACE_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAP_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAP: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | (1 << 10);
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Parity, abort and SERR status bits: write 1 to clear.
const STATUS_W1C: u16 = 0xf900;

/// Errors of building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("BAR {index} is out of range or already used")]
    BarSlot { index: usize },
    #[error(
        "BAR size {size:#x} is not a power of two of at least 16 bytes (or 4 GiB for a 32-bit BAR)"
    )]
    BarSize { size: u64 },
    #[error("No room for a capability of {len} bytes")]
    CapabilitySpace { len: usize },
}

/// The kind of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Mem32,
    Mem64,
}

/// A BAR as the device model declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

/// The identity of a function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// Base class, subclass and programming interface (0xCCSSPP).
    pub class: u32,
    pub revision: u8,
}

/// A BAR's decoded range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarRange {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

/// One function's configuration space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpace {
    regs: Vec<u8>,
    writable: Vec<u8>,
    w1c: Vec<u8>,
    bars: [Option<BarSpec>; NUM_BARS],
    /// Offset of the last capability in the list (0: none yet).
    last_cap: u8,
    next_free: u8,
}

impl ConfigSpace {
    pub fn new(ids: PciIds) -> Self {
        let mut space = ConfigSpace {
            regs: vec![0; CONFIG_SPACE_SIZE],
            writable: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_free: FIRST_CAP as u8,
        };
        space.put(0x00, &ids.vendor.to_le_bytes());
        space.put(0x02, &ids.device.to_le_bytes());
        space.put(0x08, &[ids.revision]);
        space.put(0x09, &ids.class.to_le_bytes()[..3]);
        space.put(0x2c, &ids.subsystem_vendor.to_le_bytes());
        space.put(0x2e, &ids.subsystem.to_le_bytes());
        space.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        space.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        // Cache line size, latency timer and interrupt line are plain storage for the guest.
        space.writable[0x0c] = 0xff;
        space.writable[0x0d] = 0xff;
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// Sets bytes regardless of the write masks (device-model side).
    pub fn put(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(dst) = self.regs.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Sets the write mask of bytes (device-model side).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset as u64, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Declares BAR `index` (a 64-bit BAR also takes `index + 1`).
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), Error> {
        let slots = if spec.kind == BarKind::Mem64 { 2 } else { 1 };
        if index + slots > NUM_BARS || (index..index + slots).any(|i| self.bar_slot_used(i)) {
            return Err(Error::BarSlot { index });
        }
        let too_big = spec.kind == BarKind::Mem32 && spec.size > 1 << 31;
        if !spec.size.is_power_of_two() || spec.size < 16 || too_big {
            return Err(Error::BarSize { size: spec.size });
        }
        let mut flags = 0u32;
        if spec.kind == BarKind::Mem64 {
            flags |= 0b100;
        }
        if spec.prefetchable {
            flags |= 0b1000;
        }
        let mask = !(spec.size - 1);
        let off = BAR0 + 4 * index;
        self.put(off, &flags.to_le_bytes());
        self.set_writable(off, &((mask as u32) & !0xf).to_le_bytes());
        if spec.kind == BarKind::Mem64 {
            self.put(off + 4, &[0; 4]);
            self.set_writable(off + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn bar_slot_used(&self, index: usize) -> bool {
        self.bars[index].is_some()
            || (index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind == BarKind::Mem64))
    }

    /// The declared BARs, by index.
    pub fn bar_specs(&self) -> impl Iterator<Item = (usize, BarSpec)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// The address programmed in BAR `index` (type bits stripped), if the BAR exists.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = (*self.bars.get(index)?)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(off) & !0xf);
        let high = match spec.kind {
            BarKind::Mem64 => u64::from(self.read_u32(off + 4)) << 32,
            BarKind::Mem32 => 0,
        };
        Some(high | low)
    }

    /// Programs BAR `index` (the VMM's initial allocation, as firmware would).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(Some(spec)) = self.bars.get(index).copied() else {
            return;
        };
        let off = BAR0 + 4 * index;
        let flags = self.read_u32(off) & 0xf;
        self.put(off, &((addr as u32 & !0xf) | flags).to_le_bytes());
        if spec.kind == BarKind::Mem64 {
            self.put(off + 4, &((addr >> 32) as u32).to_le_bytes());
        }
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// The BAR ranges the function decodes now: memory decoding on and a non-zero address
    /// whose range doesn't wrap.
    pub fn decoded_bars(&self) -> Vec<BarRange> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        self.bar_specs()
            .filter_map(|(index, spec)| {
                let addr = self.bar_address(index)?;
                (addr != 0 && addr.checked_add(spec.size).is_some()).then_some(BarRange {
                    index,
                    addr,
                    size: spec.size,
                })
            })
            .collect()
    }

    /// Appends a capability: `body` starts with the capability ID; the next pointer (byte 1) is
    /// filled in here. `writable` is the guest write mask of the body (shorter means read-only).
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, Error> {
        let len = body.len().max(2);
        let offset = usize::from(self.next_free);
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(Error::CapabilitySpace { len });
        }
        self.put(offset, body);
        self.regs[offset + 1] = 0;
        let mask_len = writable.len().min(len);
        self.set_writable(offset, &writable[..mask_len]);
        // The ID and next pointer are never writable.
        self.writable[offset] = 0;
        self.writable[offset + 1] = 0;
        if self.last_cap == 0 {
            self.regs[CAP_POINTER] = offset as u8;
            let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
            self.put(STATUS, &status.to_le_bytes());
        } else {
            self.regs[usize::from(self.last_cap) + 1] = offset as u8;
        }
        self.last_cap = offset as u8;
        // Capabilities are dword aligned; `end` <= 256 so the cast holds (255 at most after align).
        self.next_free = (end.div_ceil(4) * 4).min(0xff) as u8;
        Ok(offset)
    }

    /// Guest read; bytes beyond the conventional space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write, through the write masks.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        for (i, value) in data.iter().enumerate() {
            let Some(pos) = offset.checked_add(i).filter(|p| *p < CONFIG_SPACE_SIZE) else {
                return;
            };
            let mask = self.writable[pos];
            let clear = self.w1c[pos] & value;
            self.regs[pos] = ((self.regs[pos] & !mask) | (value & mask)) & !clear;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x018000,
            ..Default::default()
        })
    }

    #[test]
    fn ids_are_read_only() {
        let mut s = space();
        s.write(0, &[0xff; 4]);
        assert_eq!(s.read_u32(0), 0x1042_1af4);
        s.write(8, &[0xff; 4]);
        assert_eq!(s.read_u32(8) >> 8, 0x018000);
    }

    #[test]
    fn bar_sizing_32_and_64() {
        let mut s = space();
        let spec32 = BarSpec {
            kind: BarKind::Mem32,
            size: 0x1000,
            prefetchable: false,
        };
        let spec64 = BarSpec {
            kind: BarKind::Mem64,
            size: 0x10_0000,
            prefetchable: true,
        };
        s.add_bar(0, spec32).unwrap();
        s.add_bar(2, spec64).unwrap();
        assert_eq!(s.add_bar(3, spec32), Err(Error::BarSlot { index: 3 }));
        assert_eq!(
            s.add_bar(
                4,
                BarSpec {
                    size: 0x1800,
                    ..spec32
                }
            ),
            Err(Error::BarSize { size: 0x1800 })
        );
        s.write(0x10, &[0xff; 4]);
        assert_eq!(s.read_u32(0x10), 0xffff_f000);
        s.write(0x18, &[0xff; 4]);
        s.write(0x1c, &[0xff; 4]);
        assert_eq!(
            s.read_u32(0x18),
            0xfff0_000c,
            "64-bit prefetchable type bits kept"
        );
        assert_eq!(s.read_u32(0x1c), 0xffff_ffff);
        s.write(0x18, &0x1234_5678u32.to_le_bytes());
        s.write(0x1c, &1u32.to_le_bytes());
        assert_eq!(s.bar_address(2), Some(0x1_1230_0000));
        // Unused BARs and the expansion ROM read zero even after sizing.
        s.write(0x14, &[0xff; 4]);
        s.write(0x30, &[0xff; 4]);
        assert_eq!(s.read_u32(0x14), 0);
        assert_eq!(s.read_u32(0x30), 0);
    }

    #[test]
    fn decode_follows_command_register() {
        let mut s = space();
        s.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: false,
            },
        )
        .unwrap();
        s.set_bar_address(0, 0xc000_0000);
        assert!(s.decoded_bars().is_empty());
        s.write(4, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            s.decoded_bars(),
            vec![BarRange {
                index: 0,
                addr: 0xc000_0000,
                size: 0x4000
            }]
        );
        s.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(s.command(), COMMAND_WRITABLE);
    }

    #[test]
    fn status_is_write_one_to_clear() {
        let mut s = space();
        s.put(STATUS, &0x8010u16.to_le_bytes());
        s.write(STATUS as u64, &0xffffu16.to_le_bytes());
        assert_eq!(s.read_u16(STATUS), 0x0010);
    }

    #[test]
    fn capability_walk() {
        let mut s = space();
        let a = s
            .add_capability(
                &[0x11, 0xaa, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0],
                &[0, 0, 0, 0xc0],
            )
            .unwrap();
        let b = s.add_capability(&[0x09, 0, 5, 6, 7], &[]).unwrap();
        assert_eq!((a, b), (0x40, 0x4c));
        assert_ne!(s.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        let mut walk = Vec::new();
        let mut ptr = usize::from(s.regs[CAP_POINTER]);
        while ptr != 0 {
            walk.push((ptr, s.regs[ptr]));
            ptr = usize::from(s.regs[ptr + 1]);
        }
        assert_eq!(walk, vec![(0x40, 0x11), (0x4c, 0x09)]);
        s.write(0x40, &[0xff; 4]);
        assert_eq!(s.read_u32(0x40), 0xc201_4c11, "only the masked bits change");
        assert!(matches!(
            s.add_capability(&[0; 200], &[]),
            Err(Error::CapabilitySpace { .. })
        ));
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut s = space();
        s.write(254, &[1, 2, 3, 4]);
        s.write(u64::MAX, &[1]);
        let mut b = [0xaa; 4];
        s.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
