//! The guest-physical memory map, in one place.
//!
//! ```text
//! 0x0000_0000  ┬ RAM (real-mode area; not used by the 64-bit entry)
//! 0x0000_0500  │ GDT (4 entries), IDT (empty) at 0x520
//! 0x0000_7000  │ zero page (boot_params)
//! 0x0000_8ff0  │ boot stack top
//! 0x0000_9000  │ page tables: PML4, PDPT at 0xa000, 4 PDs at 0xb000..0xf000 (identity, 4 GiB)
//! 0x0002_0000  │ kernel command line (up to 64 KiB)
//! 0x0009_fc00  ┼ reserved: EBDA and BIOS area
//! 0x000e_0000  │   RSDP and the ACPI tables (XSDT, FACS, FADT, DSDT, MADT)
//! 0x0010_0000  ┼ RAM: kernel at 1 MiB, initramfs at the top of low RAM
//!    low_end   ┴ (= min(memory, 3 GiB))
//! 0xc000_0000  ┬ 32-bit PCI MMIO window (512 MiB)
//! 0xe000_0000  ┼ PCI ECAM (256 buses, reserved in e820)
//! 0xf000_0000  ┼ unused
//! 0xfec0_0000  │ IOAPIC
//! 0xfee0_0000  │ local APICs
//! 0xfffb_c000  │ KVM identity-map page, then 3-page TSS (reserved in e820)
//! 0x1_0000_0000┼ RAM above 4 GiB: memory beyond 3 GiB
//!      ...     │
//! mmio64_start ┼ 64-bit PCI MMIO window (64 GiB), from max(64 GiB, end of RAM rounded up to 1 GiB)
//! ```
//!
//! The e820 map the guest sees reports as RAM exactly `[0, EBDA_START)`, `[1 MiB, low_end)` and
//! the high range; [`e820_ram_kib`] is that sum, which the test guest prints as `mem_kib`.

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Number of 2 MiB-page directories: 4 × 1 GiB identity-mapped.
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_SIZE: u64 = 0x2000_0000;
pub const ECAM_START: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_RESERVED_END: u64 = 0x1_0000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The 64-bit PCI MMIO window starts no lower than this and is this large.
pub const MMIO64_MIN_START: u64 = 64 << 30;
pub const MMIO64_SIZE: u64 = 64 << 30;

/// RAM can't be smaller than this: the boot structures, the kernel and a little room.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The e820 entry types used here.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// COM1 and its ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 ports (data, status/command).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI fixed hardware: PM1a event block (status + enable) and control block, and the SCI.
/// The debug console (QEMU's isa-debugcon port).
pub const DEBUGCON_PORT: u16 = 0x402;

pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_EVT_LEN: u8 = 4;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM1A_CNT_LEN: u8 = 2;
pub const SCI_IRQ: u32 = 9;
/// The SLP_TYP value of `\_S5_` (soft off) in our DSDT.
pub const S5_SLP_TYP: u8 = 5;

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    assert!(PD_START + PD_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ZERO_PAGE_START + 0x1000 < BOOT_STACK_TOP && BOOT_STACK_TOP < PML4_START);
    assert!(MMIO32_START + MMIO32_SIZE <= ECAM_START);
    assert!(ECAM_START + ECAM_SIZE <= IOAPIC_START);
    assert!(KVM_TSS_START + 3 * 0x1000 <= KVM_RESERVED_END);
};

/// One guest-physical RAM range and where it sits in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Splits `mem_size` bytes of RAM into below-3-GiB and above-4-GiB ranges, consecutive in the
/// memory file.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(MMIO32_START);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if mem_size > low {
        ranges.push(RamRange {
            guest_addr: HIGH_RAM_START,
            size: mem_size - low,
            file_offset: low,
        });
    }
    ranges
}

/// End of RAM below the 32-bit MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO32_START)
}

/// Start of the 64-bit PCI MMIO window for `mem_size` bytes of RAM: above the end of RAM,
/// 1 GiB-aligned, and at a fixed address for every VM up to 63 GiB (stable `_CRS`).
pub fn mmio64_start(mem_size: u64) -> u64 {
    let ram_end = HIGH_RAM_START + mem_size.saturating_sub(MMIO32_START);
    ram_end
        .checked_next_multiple_of(1 << 30)
        .unwrap_or(u64::MAX)
        .max(MMIO64_MIN_START)
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM (which must be at least [`MIN_MEMORY`]).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ECAM_START,
            size: ECAM_SIZE,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: KVM_IDENTITY_MAP_START,
            size: KVM_RESERVED_END - KVM_IDENTITY_MAP_START,
            kind: E820_RESERVED,
        },
    ];
    if mem_size > low_end {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_size - low_end,
            kind: E820_RAM,
        });
    }
    map
}

/// The RAM the e820 map reports, in KiB: what a guest summing its e820 RAM entries sees.
pub fn e820_ram_kib(mem_size: u64) -> u64 {
    e820_map(mem_size)
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.size)
        .sum::<u64>()
        / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                guest_addr: 0,
                size: 128 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].size, 3 << 30);
        assert_eq!(ranges[1].guest_addr, 4 << 30);
        assert_eq!(ranges[1].size, 1 << 30);
        assert_eq!(ranges[1].file_offset, 3 << 30);
    }

    #[test]
    fn mmio64_window_lies_above_ram() {
        assert_eq!(mmio64_start(128 << 20), 64 << 30);
        assert_eq!(mmio64_start(3 << 30), 64 << 30);
        // 100 GiB: 3 GiB low, 97 GiB from 4 GiB, so RAM ends at 101 GiB.
        assert_eq!(mmio64_start(100 << 30), 101 << 30);
        assert_eq!(mmio64_start((100 << 30) + 1), 102 << 30);
        assert_eq!(mmio64_start((101 << 30) + (1 << 20)), 103 << 30);
    }

    #[test]
    fn e820_for_128_mib() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9_fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert!(map.iter().all(|e| e.addr < 4 << 30));
        // 639 KiB below the EBDA plus 127 MiB from 1 MiB.
        assert_eq!(e820_ram_kib(128 << 20), 639 + 127 * 1024);
        assert_eq!(e820_ram_kib(1 << 30), 639 + 1023 * 1024);
    }

    #[test]
    fn e820_ranges_do_not_overlap_and_are_sorted() {
        for mem in [MIN_MEMORY, 128 << 20, 3 << 30, 5 << 30] {
            let map = e820_map(mem);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
            }
            let ram: u64 = map
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        }
    }
}
