//! The state the 64-bit entry needs in guest memory: an identity map of the first 4 GiB with
//! 2 MiB pages, a flat GDT and an empty IDT.

use outboard_hypervisor::regs::{self, LongModeEntry};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_TOP, GDT_START, IDT_START, PDPT_START, PD_COUNT, PD_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors of writing the entry state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot write the boot page tables")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("Cannot write the boot GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_PAGE_SIZE: u64 = 0x80;
const PAGE_2M: u64 = 2 << 20;

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        regs::gdt_entry(regs::GDT_CODE64, 0, 0xfffff),
        regs::gdt_entry(regs::GDT_DATA, 0, 0xfffff),
        regs::gdt_entry(regs::GDT_TSS, 0, 0xfffff),
    ]
}

/// Writes the page tables (identity map of `PD_COUNT` GiB).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(PDPT_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(Error::PageTables)?;
    for gib in 0..PD_COUNT {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPT_START + gib * 8))
            .map_err(Error::PageTables)?;
        let mut entries = [0u8; 4096];
        for (i, chunk) in entries.chunks_exact_mut(8).enumerate() {
            let phys = (gib * 512 + i as u64) * PAGE_2M;
            chunk.copy_from_slice(&(phys | PTE_PRESENT_RW | PDE_PAGE_SIZE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(Error::PageTables)?;
    }
    Ok(())
}

/// Writes the GDT and IDT and returns the entry state for the bootstrap processor.
pub fn write_entry_state(mem: &GuestMemoryMmap, entry_rip: u64) -> Result<LongModeEntry, Error> {
    write_page_tables(mem)?;
    let gdt = boot_gdt();
    for (i, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(Error::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(Error::Gdt)?;
    Ok(LongModeEntry {
        rip: entry_rip,
        rsi: ZERO_PAGE_START,
        rsp: BOOT_STACK_TOP,
        pml4: PML4_START,
        gdt_base: GDT_START,
        gdt,
        idt_base: IDT_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(mem: &GuestMemoryMmap, vaddr: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(PML4_START + ((vaddr >> 39) & 511) * 8))
            .unwrap();
        assert_eq!(pml4e & 1, 1);
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((vaddr >> 30) & 511) * 8))
            .unwrap();
        assert_eq!(pdpte & 1, 1);
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((vaddr >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81, "2 MiB page present");
        (pde & !0x1f_ffff & !(1 << 63)) | (vaddr & 0x1f_ffff)
    }

    #[test]
    fn identity_maps_first_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = write_entry_state(&mem, 0x100_0000).unwrap();
        for addr in [
            0,
            0x7000,
            0x10_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, addr), addr);
        }
        assert_eq!(entry.pml4, PML4_START);
        assert_eq!(entry.rsi, ZERO_PAGE_START);
        let code: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(code, entry.gdt[1]);
    }
}
