//! Architectural vCPU state for the 64-bit boot entry: segment descriptors, control registers,
//! boot MSRs, FPU and local-APIC LVT set-up.
//!
//! Pure functions over KVM's structures, so the values are unit tested without `/dev/kvm`.
//! The GDT is encoded here and decoded into `kvm_segment`s from the same descriptors, so the
//! in-memory GDT the guest sees and the hidden segment state KVM holds cannot disagree.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_MP: u64 = 1 << 1;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NE: u64 = 1 << 5;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// KVM paravirtual MSRs that make KVM write into guest memory (kvmclock, async page faults,
/// steal time, PV EOI): zeroed at boot so that a restarted guest's fresh memory is not written.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// IA32_MISC_ENABLE bit 0: fast-string `rep movs/stos`.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
pub const MTRR_DEF_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and LVT delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT descriptor flags (the 12 bits of byte 5 and the high nibble of byte 6).
pub const GDT_CODE64: u16 = 0xa09b;
pub const GDT_DATA: u16 = 0xc093;
pub const GDT_TSS: u16 = 0x808b;

/// Encodes a segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes descriptor `entry` at GDT index `index` into KVM's hidden segment state.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Where and how the bootstrap processor enters the guest in 64-bit mode (Linux boot protocol:
/// paging on with an identity map, flat segments, `rsi` = boot_params).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeEntry {
    pub rip: u64,
    pub rsi: u64,
    pub rsp: u64,
    pub pml4: u64,
    pub gdt_base: u64,
    /// Null, 64-bit code, data, TSS: in this order, as written to guest memory at `gdt_base`.
    pub gdt: [u64; 4],
    pub idt_base: u64,
}

impl LongModeEntry {
    pub fn regs(&self) -> kvm_regs {
        kvm_regs {
            rflags: 0x2,
            rip: self.rip,
            rsi: self.rsi,
            rsp: self.rsp,
            rbp: self.rsp,
            ..Default::default()
        }
    }

    /// Applies the 64-bit entry state onto `sregs` read from the vCPU (so KVM-owned fields such
    /// as `apic_base` keep their values).
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        let code = segment_from_gdt(self.gdt[1], 1);
        let data = segment_from_gdt(self.gdt[2], 2);
        let tss = segment_from_gdt(self.gdt[3], 3);
        sregs.gdt.base = self.gdt_base;
        sregs.gdt.limit = (self.gdt.len() * 8 - 1) as u16;
        sregs.idt.base = self.idt_base;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
        sregs.cr3 = self.pml4;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }
}

/// x87/SSE state at reset: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE_WB),
        (MSR_KVM_SYSTEM_TIME_NEW, 0),
        (MSR_KVM_SYSTEM_TIME, 0),
        (MSR_KVM_ASYNC_PF_EN, 0),
        (MSR_KVM_STEAL_TIME, 0),
        (MSR_KVM_PV_EOI_EN, 0),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as i8;
    }
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware leaves them on a PC.
pub fn setup_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT0,
        (lint0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT1,
        (lint1 & !0x700) | (APIC_MODE_NMI << 8),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip_code64() {
        let entry = gdt_entry(GDT_CODE64, 0, 0xfffff);
        assert_eq!(entry, 0x00af_9b00_0000_ffff);
        let seg = segment_from_gdt(entry, 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn gdt_round_trip_base_and_small_limit() {
        let entry = gdt_entry(GDT_TSS & !0x8000, 0x1234_5678, 0x67);
        let seg = segment_from_gdt(entry, 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.selector, 24);
        assert_eq!(seg.type_, 0xb);
    }

    #[test]
    fn long_mode_sregs() {
        let entry = LongModeEntry {
            rip: 0x100_0000,
            rsi: 0x7000,
            rsp: 0x8ff0,
            pml4: 0x9000,
            gdt_base: 0x500,
            gdt: [
                0,
                gdt_entry(GDT_CODE64, 0, 0xfffff),
                gdt_entry(GDT_DATA, 0, 0xfffff),
                gdt_entry(GDT_TSS, 0, 0xfffff),
            ],
            idt_base: 0x520,
        };
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        entry.apply_sregs(&mut sregs);
        assert_eq!(sregs.apic_base, 0xfee0_0900);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        let regs = entry.regs();
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, 0x7000, 2));
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x1_0000);
        setup_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_wb_mtrr() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&(MSR_IA32_MISC_ENABLE, 1)));
        assert!(msrs.contains(&(MSR_MTRR_DEF_TYPE, 0x806)));
    }
}
