//! Commands that end the guest in each way a VMM must handle: idle (stopped from outside), reset,
//! an instruction PVM cannot emulate, and a triple fault.

use super::Env;
use crate::{arch, power, println};
use core::arch::global_asm;

// The only `popcnt` in the guest, in its own symbol: the build's instruction check allows
// forbidden instructions in symbols named `outboard_crash*` and nowhere else.
global_asm!(
    ".section .text.outboard_crash, \"ax\"",
    ".globl outboard_crash_popcnt",
    "outboard_crash_popcnt:",
    "    popcnt rax, rax",
    "    ret",
);

extern "C" {
    fn outboard_crash_popcnt();
}

/// No command: halt with interrupts off; the VMM pauses, resumes or stops the VM.
pub fn idle() -> ! {
    println!("outboard-testguest: idle");
    arch::halt_forever()
}

pub fn reset(_: &Env) {
    power::reset()
}

/// PVM ends the VM at `popcnt` (KVM_EXIT_INTERNAL_ERROR); elsewhere `popcnt` runs (or raises #UD
/// on a CPU without it) and the empty IDT turns the next exception into a triple fault, which a
/// VMM sees as a shutdown.
pub fn crash(_: &Env) {
    println!("OUTBOARD_GUEST_CRASHING");
    let null_idt = [0u16; 5];
    // SAFETY: loading an empty IDT is the intent: any exception from here on shuts the CPU down.
    unsafe { arch::lidt(&null_idt) };
    // SAFETY: the routine only clobbers rax, which the C ABI lets a callee clobber.
    unsafe { outboard_crash_popcnt() };
    arch::triple_fault()
}

pub fn triple_fault(_: &Env) {
    println!("OUTBOARD_GUEST_TRIPLE_FAULT");
    arch::triple_fault()
}
