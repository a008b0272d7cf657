//! The only place with raw x86 instructions: port I/O, MSRs, CPUID, the TSC, halting, and the boot
//! and exception assembly. Each wrapper is one instruction with the reason it is sound.
//!
//! PVM emulates every ring-0 instruction and ends the VM on some (popcnt, fwait, cmpxchg16b,
//! xsave/xrstor, int3, the `0f ae` fence/flush group): none of them may appear here; `cargo xtask
//! guest` checks the disassembly.

pub mod idt;

use core::arch::{asm, global_asm};

global_asm!(
    include_str!("entry.s"),
    rust_main = sym crate::rust_main,
    ap_main = sym crate::commands::smp::ap_main,
    options(att_syntax)
);

/// Reads an I/O port byte.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads have no memory effects; devices here are the UART, PIT, i8042 and ACPI.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes an I/O port byte.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes don't touch guest memory the compiler knows about.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes an I/O port word (ACPI PM1 control is a 16-bit register).
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes an I/O port dword (PCI configuration address and data).
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads an I/O port dword.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU (else #GP, which ends the guest through the exception handler).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; reading it changes nothing.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist, and the value must not break memory safety (e.g. kvmclock: the address must
/// be memory the guest reserves for the hypervisor to write).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter (CR4.TSD is clear: we never set it).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Spin-wait hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// The page-fault address.
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Takes pending interrupts and halts until the next one: `sti; hlt` (no interrupt is taken
/// between the two: `sti` delays delivery by one instruction), then interrupts off again.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT has a gate for every vector that may arrive (the interrupt sources are the
    // guest's own MSI-X and timer programming); the handlers preserve every register.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Halts this CPU for good: interrupts off, `hlt` in a loop (an NMI would only loop back).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt stops this CPU and touches no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Forces a triple fault: an IDT with limit 0 makes the next exception unrecoverable.
pub fn triple_fault() -> ! {
    let null_idt = [0u16; 5];
    // SAFETY: loading an empty IDT is the intent; `ud2` then raises #UD, which can't be delivered,
    // nor can the #GP or #DF that follow, so the CPU shuts down and never returns here.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) null_idt.as_ptr(), options(noreturn, nostack)) }
}

/// Loads the IDT register from a 10-byte descriptor.
///
/// # Safety
/// `idtr` must describe an IDT that stays valid for as long as it is loaded.
pub unsafe fn lidt(idtr: &[u16; 5]) {
    // SAFETY: the caller guarantees the table outlives its use.
    unsafe {
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(readonly, nostack, preserves_flags))
    };
}
