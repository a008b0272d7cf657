//! What the VMM tells the guest at entry: a Linux `boot_params` ("zero page", 64-bit boot protocol)
//! or a PVH `hvm_start_info`. Both give the command line, the memory map and maybe the RSDP.

use crate::bytes::{u32_at, u64_at, u8_at};
use crate::e820::MemMap;
use crate::{cmdline, PhysMem};

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries read (the zero page has room for 128).
pub const MAX_MEMMAP_ENTRIES: usize = 128;

const ZERO_PAGE_LEN: usize = 4096;
const BP_ACPI_RSDP_ADDR: usize = 0x070;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_CMD_LINE_PTR: usize = 0x228;
const BP_CMDLINE_SIZE: usize = 0x238;
const BP_E820_TABLE: usize = 0x2d0;
const START_INFO_LEN: usize = 56;

/// Errors decoding the boot information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the {what} at {addr:#x}")]
    Unreadable { what: &'static str, addr: u64 },
    #[error("Bad hvm_start_info magic {found:#x}")]
    BadMagic { found: u32 },
    #[error("No e820 map in the boot_params at {addr:#x}")]
    NoE820 { addr: u64 },
}

/// How the guest was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// 64-bit Linux boot protocol: RSI held the physical address of `boot_params`.
    Linux,
    /// PVH 32-bit entry: EBX held the physical address of `hvm_start_info`.
    Pvh,
}

/// The decoded boot information; the slices point into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo<'a> {
    pub protocol: Protocol,
    /// Raw command-line bytes (up to [`cmdline::MAX_LEN`]; may run past the NUL), empty if none.
    pub cmdline: &'a [u8],
    /// The RSDP address the VMM gave, if any.
    pub rsdp: Option<u64>,
    pub memmap: MemMap<'a>,
}

/// Decodes the boot information at `addr`.
pub fn decode<M: PhysMem>(mem: &M, protocol: Protocol, addr: u64) -> Result<BootInfo<'_>, Error> {
    match protocol {
        Protocol::Linux => decode_zero_page(mem, addr),
        Protocol::Pvh => decode_start_info(mem, addr),
    }
}

fn decode_zero_page<M: PhysMem>(mem: &M, addr: u64) -> Result<BootInfo<'_>, Error> {
    let zp = mem.read(addr, ZERO_PAGE_LEN).ok_or(Error::Unreadable {
        what: "boot_params",
        addr,
    })?;
    let field32 = |off| u32_at(zp, off).unwrap_or(0);
    let cmdline_addr =
        u64::from(field32(BP_CMD_LINE_PTR)) | (u64::from(field32(BP_EXT_CMD_LINE_PTR)) << 32);
    let size = match field32(BP_CMDLINE_SIZE) as usize {
        0 => cmdline::MAX_LEN,
        n => n.min(cmdline::MAX_LEN),
    };
    // Every VMM gives a memory map; a page without one is not boot_params (a wrong RSI).
    let count = usize::from(u8_at(zp, BP_E820_ENTRIES).unwrap_or(0)).min(MAX_MEMMAP_ENTRIES);
    if count == 0 {
        return Err(Error::NoE820 { addr });
    }
    let table = &zp[BP_E820_TABLE..BP_E820_TABLE + count * MemMap::BOOT_PARAMS_STRIDE];
    Ok(BootInfo {
        protocol: Protocol::Linux,
        cmdline: read_cmdline(mem, cmdline_addr, size)?,
        rsdp: u64_at(zp, BP_ACPI_RSDP_ADDR).filter(|a| *a != 0),
        memmap: MemMap::new(table, MemMap::BOOT_PARAMS_STRIDE),
    })
}

fn decode_start_info<M: PhysMem>(mem: &M, addr: u64) -> Result<BootInfo<'_>, Error> {
    let si = mem.read(addr, START_INFO_LEN).ok_or(Error::Unreadable {
        what: "hvm_start_info",
        addr,
    })?;
    let field32 = |off| u32_at(si, off).unwrap_or(0);
    let field64 = |off| u64_at(si, off).unwrap_or(0);
    let magic = field32(0);
    if magic != PVH_MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    // Version 0 has no memory map: the guest then knows of no RAM and says so (mem_kib=0).
    let memmap = if field32(4) >= 1 && field64(40) != 0 {
        let count = (field32(48) as usize).min(MAX_MEMMAP_ENTRIES);
        let map_addr = field64(40);
        let bytes = mem
            .read(map_addr, count * MemMap::PVH_STRIDE)
            .ok_or(Error::Unreadable {
                what: "PVH memory map",
                addr: map_addr,
            })?;
        MemMap::new(bytes, MemMap::PVH_STRIDE)
    } else {
        MemMap::default()
    };
    Ok(BootInfo {
        protocol: Protocol::Pvh,
        cmdline: read_cmdline(mem, field64(24), cmdline::MAX_LEN)?,
        rsdp: Some(field64(32)).filter(|a| *a != 0),
        memmap,
    })
}

/// Up to `max` bytes at `addr`, fewer where memory ends sooner (the NUL is usually long before).
fn read_cmdline<M: PhysMem>(mem: &M, addr: u64, max: usize) -> Result<&[u8], Error> {
    if addr == 0 {
        return Ok(&[]);
    }
    let mut len = max;
    while len > 0 {
        if let Some(b) = mem.read(addr, len) {
            return Ok(b);
        }
        len /= 2;
    }
    Err(Error::Unreadable {
        what: "command line",
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::Cmdline;
    use crate::FlatMem;

    const BASE: u64 = 0x1000;

    fn put(mem: &mut [u8], addr: u64, bytes: &[u8]) {
        let off = (addr - BASE) as usize;
        mem[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn e820(addr: u64, size: u64, kind: u32) -> [u8; 20] {
        let mut e = [0u8; 20];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&kind.to_le_bytes());
        e
    }

    #[test]
    fn decodes_a_zero_page() {
        let mut mem = [0u8; 0x3000];
        let zp = 0x2000;
        put(&mut mem, zp + 0x70, &0xe0000u64.to_le_bytes());
        put(&mut mem, zp + 0x228, &0x1800u32.to_le_bytes());
        put(&mut mem, 0x1800, b"outboard.run=poweroff\0junk");
        put(&mut mem, zp + 0x1e8, &[2]);
        put(&mut mem, zp + 0x2d0, &e820(0, 0x9fc00, 1));
        put(&mut mem, zp + 0x2e4, &e820(0x100000, 0x7f00000, 1));
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        let info = decode(&flat, Protocol::Linux, zp).unwrap();
        assert_eq!(info.rsdp, Some(0xe0000));
        assert_eq!(info.memmap.ram_bytes(), 0x9fc00 + 0x7f00000);
        assert_eq!(
            Cmdline::new(info.cmdline).unwrap().get("outboard.run"),
            Some("poweroff")
        );
    }

    #[test]
    fn zero_page_count_is_clamped_and_cmdline_optional() {
        let mut mem = [0u8; 0x2000];
        put(&mut mem, 0x1000 + 0x1e8, &[255]);
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        let info = decode(&flat, Protocol::Linux, 0x1000).unwrap();
        assert_eq!(info.memmap.entries().count(), MAX_MEMMAP_ENTRIES);
        assert!(info.cmdline.is_empty());
        assert_eq!(info.rsdp, None);
    }

    #[test]
    fn zero_page_without_e820_is_not_boot_params() {
        let mem = [0u8; 0x2000];
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert_eq!(
            decode(&flat, Protocol::Linux, 0x1000).unwrap_err(),
            Error::NoE820 { addr: 0x1000 }
        );
    }

    #[test]
    fn zero_page_out_of_memory_is_an_error() {
        let mem = [0u8; 0x800];
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert!(matches!(
            decode(&flat, Protocol::Linux, 0x1000),
            Err(Error::Unreadable { .. })
        ));
        assert!(matches!(
            decode(&flat, Protocol::Linux, 0),
            Err(Error::Unreadable { .. })
        ));
    }

    #[test]
    fn cmdline_near_the_end_of_memory_is_shortened() {
        let mut mem = [0u8; 0x2000];
        put(&mut mem, 0x1000 + 0x1e8, &[1]);
        put(&mut mem, 0x1000 + 0x228, &0x2ff0u32.to_le_bytes());
        put(&mut mem, 0x2ff0, b"a=1\0");
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        let info = decode(&flat, Protocol::Linux, 0x1000).unwrap();
        assert_eq!(Cmdline::new(info.cmdline).unwrap().get("a"), Some("1"));
        put(&mut mem, 0x1000 + 0x228, &0x4000u32.to_le_bytes());
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert!(matches!(
            decode(&flat, Protocol::Linux, 0x1000),
            Err(Error::Unreadable { .. })
        ));
    }

    fn start_info(version: u32, cmdline: u64, rsdp: u64, map: u64, entries: u32) -> [u8; 56] {
        let mut si = [0u8; 56];
        si[0..4].copy_from_slice(&PVH_MAGIC.to_le_bytes());
        si[4..8].copy_from_slice(&version.to_le_bytes());
        si[24..32].copy_from_slice(&cmdline.to_le_bytes());
        si[32..40].copy_from_slice(&rsdp.to_le_bytes());
        si[40..48].copy_from_slice(&map.to_le_bytes());
        si[48..52].copy_from_slice(&entries.to_le_bytes());
        si
    }

    #[test]
    fn decodes_a_pvh_start_info() {
        let mut mem = [0u8; 0x1000];
        put(&mut mem, 0x1000, &start_info(1, 0x1400, 0xf0000, 0x1100, 2));
        let mut e = [0u8; 24];
        e[..20].copy_from_slice(&e820(0, 0xa0000, 1));
        put(&mut mem, 0x1100, &e);
        e[..20].copy_from_slice(&e820(0x100000, 0x100000, 1));
        put(&mut mem, 0x1118, &e);
        put(&mut mem, 0x1400, b"x=y\0");
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        let info = decode(&flat, Protocol::Pvh, 0x1000).unwrap();
        assert_eq!(info.rsdp, Some(0xf0000));
        assert_eq!(info.memmap.ram_bytes(), 0xa0000 + 0x100000);
        assert_eq!(Cmdline::new(info.cmdline).unwrap().get("x"), Some("y"));
    }

    #[test]
    fn pvh_rejects_bad_magic_and_unreadable_map() {
        let mut mem = [0u8; 0x1000];
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert_eq!(
            decode(&flat, Protocol::Pvh, 0x1000).unwrap_err(),
            Error::BadMagic { found: 0 }
        );
        put(&mut mem, 0x1000, &start_info(1, 0, 0, 0x1f00, 100));
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert!(matches!(
            decode(&flat, Protocol::Pvh, 0x1000),
            Err(Error::Unreadable { .. })
        ));
        // Version 0 has no map: no RAM known, not an error.
        put(&mut mem, 0x1000, &start_info(0, 0, 0, 0x1f00, 100));
        let flat = FlatMem {
            base: BASE,
            bytes: &mem,
        };
        assert_eq!(
            decode(&flat, Protocol::Pvh, 0x1000)
                .unwrap()
                .memmap
                .ram_bytes(),
            0
        );
    }
}
