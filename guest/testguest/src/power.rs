//! Leaving the guest: ACPI soft-off (S5) through the FADT's PM1 control registers, or its
//! SLEEP_CONTROL_REG on hardware-reduced ACPI; reset through the i8042; and the fatal path shared
//! by exceptions and panics.
//!
//! ```text
//! poweroff: OUTBOARD_GUEST_POWEROFF → S5 write → (still running after ~100 ms) → i8042 reset
//!           → (still running) → cli; hlt forever
//! reset:    OUTBOARD_GUEST_RESET → i8042 reset → (still running) → triple fault
//! ```

use crate::arch::{self, inb, outb, outw};
use crate::platform::{self, PowerRegs, MAPPED_END};
use crate::println;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};
use outboard_testguest_parse::acpi::{Gas, SPACE_IO, SPACE_MEMORY};

const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// SLEEP_CONTROL_REG: SLP_TYPx in bits 2-4, SLP_EN in bit 5.
const SLEEP_CONTROL_SLP_EN: u16 = 1 << 5;
const I8042_STATUS: u16 = 0x64;
const I8042_INPUT_FULL: u8 = 1 << 1;
const I8042_RESET: u8 = 0xFE;
/// How long a power-off or reset request may take to stop the VM before the next fallback.
const SETTLE_NS: u64 = 100_000_000;
const SETTLE_SPINS: u32 = 1_000_000;
/// Polls of the i8042 status before sending anyway (each poll is a VM exit).
const I8042_POLLS: u32 = 1_000;

/// Enters S5; falls back to a reset, then to halting.
pub fn poweroff() -> ! {
    println!("OUTBOARD_GUEST_POWEROFF");
    if let Some(p) = platform::get() {
        enter_s5(&p.power);
    }
    settle();
    println!("outboard-testguest: ACPI power-off did not take: resetting");
    i8042_reset();
    settle();
    arch::halt_forever()
}

/// Resets through the i8042; falls back to a triple fault.
pub fn reset() -> ! {
    println!("OUTBOARD_GUEST_RESET");
    i8042_reset();
    settle();
    arch::triple_fault()
}

/// Prints `line` and powers off. A second fatal error (say, a fault while powering off) halts
/// the CPU instead, so the guest never loops.
pub fn fatal(line: fmt::Arguments<'_>) -> ! {
    static DYING: AtomicU32 = AtomicU32::new(0);
    if DYING.swap(1, Ordering::AcqRel) != 0 {
        arch::halt_forever();
    }
    println!("{line}");
    poweroff()
}

fn enter_s5(regs: &PowerRegs) {
    let Some(s5) = regs.s5 else { return };
    match (regs.hw_reduced, regs.pm1a_cnt, regs.sleep_control) {
        (false, Some(pm1a), _) => {
            write_register(&pm1a, u16::from(s5.a) << SLP_TYP_SHIFT | SLP_EN);
            if let Some(pm1b) = regs.pm1b_cnt {
                write_register(&pm1b, u16::from(s5.b) << SLP_TYP_SHIFT | SLP_EN);
            }
        }
        (_, _, Some(control)) => {
            write_register(&control, (u16::from(s5.a) & 7) << 2 | SLEEP_CONTROL_SLP_EN)
        }
        _ => println!("outboard-testguest: no ACPI sleep register"),
    }
}

/// Writes a FADT register: a byte where it is 8 bits wide, else a word.
fn write_register(reg: &Gas, value: u16) {
    let byte = reg.bit_width != 0 && reg.bit_width <= 8;
    match reg.space {
        SPACE_IO => {
            let Ok(port) = u16::try_from(reg.address) else {
                return;
            };
            if byte {
                outb(port, value as u8);
            } else {
                outw(port, value);
            }
        }
        SPACE_MEMORY if reg.address != 0 && reg.address < MAPPED_END - 1 => {
            if byte {
                // SAFETY: the FADT names this identity-mapped address as the sleep register; a
                // wrong one can only hurt a guest that is powering off anyway.
                unsafe { (reg.address as *mut u8).write_volatile(value as u8) };
            } else {
                // SAFETY: as above.
                unsafe { (reg.address as *mut u16).write_volatile(value) };
            }
        }
        _ => {}
    }
}

fn i8042_reset() {
    for _ in 0..I8042_POLLS {
        if inb(I8042_STATUS) & I8042_INPUT_FULL == 0 {
            break;
        }
    }
    outb(I8042_STATUS, I8042_RESET);
}

/// Gives the VMM time to act on a power-off or reset request.
fn settle() {
    if crate::clock::get().is_some_and(|c| c.delay_ns(SETTLE_NS)) {
        return;
    }
    for _ in 0..SETTLE_SPINS {
        arch::pause();
    }
}
