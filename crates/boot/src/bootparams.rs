//! The zero page (`struct boot_params`) of the Linux x86 boot protocol: setup header, command
//! line and initramfs pointers, the e820 map and the RSDP address.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, CMDLINE_START, ZERO_PAGE_START};
use crate::loader::InitrdPlacement;

/// Errors of writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("The e820 map has {0} entries; the zero page holds at most 128")]
    TooManyE820Entries(usize),
    #[error("Cannot write the zero page")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID: we have none assigned.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// loadflags.LOADED_HIGH: protected-mode code is at 1 MiB.
const LOADED_HIGH: u8 = 0x1;
/// Boot protocol version we present to ELF kernels (2.15).
const ELF_PROTOCOL_VERSION: u16 = 0x20f;

/// What goes into the zero page.
#[derive(Clone, Copy, Debug)]
pub struct ZeroPage {
    pub mem_size: u64,
    pub setup_header: Option<setup_header>,
    pub cmdline_len: usize,
    pub initrd: Option<InitrdPlacement>,
    pub rsdp_addr: u64,
}

/// Builds boot_params.
pub fn build(page: &ZeroPage) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    let mut hdr = page.setup_header.unwrap_or(setup_header {
        version: ELF_PROTOCOL_VERSION,
        kernel_alignment: 0x100_0000,
        ..Default::default()
    });
    hdr.boot_flag = BOOT_FLAG_MAGIC;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = page.cmdline_len as u32;
    if let Some(initrd) = page.initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = page.rsdp_addr;

    let map = layout::e820_map(page.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Builds boot_params and writes it at [`ZERO_PAGE_START`].
pub fn write(mem: &GuestMemoryMmap, page: &ZeroPage) -> Result<(), Error> {
    let params = build(page)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{E820_RAM, E820_RESERVED};

    fn page(mem_size: u64) -> ZeroPage {
        ZeroPage {
            mem_size,
            setup_header: None,
            cmdline_len: 13,
            initrd: Some(InitrdPlacement {
                addr: 0x7f0_0000,
                size: 0x1234,
            }),
            rsdp_addr: 0xe_0000,
        }
    }

    #[test]
    fn header_fields() {
        let params = build(&page(128 << 20)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let mut p = page(128 << 20);
        p.setup_header = Some(setup_header {
            version: 0x20f,
            setup_sects: 27,
            xloadflags: 0x7f,
            ..Default::default()
        });
        let params = build(&p).unwrap();
        assert_eq!({ params.hdr.setup_sects }, 27);
        assert_eq!({ params.hdr.xloadflags }, 0x7f);
    }

    #[test]
    fn e820_in_zero_page() {
        let params = build(&page(5 << 30)).unwrap();
        let n = params.e820_entries as usize;
        assert_eq!(n, 6);
        let table = params.e820_table;
        let ram: u64 = table[..n]
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - 0x6_0400);
        assert_eq!({ table[1].r#type }, E820_RESERVED);
        assert_eq!({ table[5].addr }, 4 << 30);
        assert_eq!({ table[5].size }, 2 << 30);
    }

    #[test]
    fn written_at_zero_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, &page(128 << 20)).unwrap();
        let magic: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(magic, 0xaa55);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 5);
        let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x70)).unwrap();
        assert_eq!(rsdp, 0xe_0000);
    }
}
