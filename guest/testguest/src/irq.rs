//! Interrupts for the virtio commands, off unless `outboard.virtio_irq=1`: then the local APIC
//! is enabled, and a command waiting for a device halts (`sti; hlt; cli`) until an interrupt
//! arrives instead of spinning. MSI-X messages (vectors [`DEVICE_FIRST`]..) are counted per
//! vector, which shows that a VMM's irqfd routing delivers them; a one-shot APIC timer
//! ([`TIMER_VECTOR`]) bounds every halt, so a device that never interrupts costs time, not a
//! hang.

use crate::arch::{self, rdmsr, wrmsr};
use crate::mem::Mmio;
use crate::platform;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// First vector MSI-X entries use (entry `n` → `DEVICE_FIRST + n`).
pub const DEVICE_FIRST: u8 = 0x40;
pub const DEVICE_COUNT: usize = 14;
pub const TIMER_VECTOR: u8 = 0x4E;
/// Spurious-interrupt vector (low nibble all ones, as old APICs require).
pub const SPURIOUS_VECTOR: u8 = 0x4F;
const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const SVR_ENABLE: u32 = 1 << 8;
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xA1;
/// Timer ticks per halt (divide by 1: about 1 ms on a 1 GHz APIC bus, QEMU's and KVM's).
const HALT_TICKS: u32 = 1_000_000;

static ENABLED: AtomicBool = AtomicBool::new(false);
static X2APIC: AtomicBool = AtomicBool::new(false);
static COUNTS: [AtomicU32; DEVICE_COUNT] = [const { AtomicU32::new(0) }; DEVICE_COUNT];
static TIMER: AtomicU32 = AtomicU32::new(0);
static HALTS: AtomicU32 = AtomicU32::new(0);

fn lapic_write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on (checked in `enable`), so these MSRs exist.
        unsafe { wrmsr(X2APIC_MSR_BASE + reg / 16, value.into()) };
    } else if let Some(w) = platform::get().and_then(|p| Mmio::new(p.lapic_addr, 0x400)) {
        w.write32(reg.into(), value);
    }
}

/// Enables the local APIC and interrupt waiting when the command line asks for it; returns
/// whether it did.
pub fn enable_if_asked() -> bool {
    let Some(p) = platform::get() else {
        return false;
    };
    if p.cmdline().get("outboard.virtio_irq") != Some("1") {
        return false;
    }
    // The 8259s may still deliver the PIT's IRQ 0 at vector 8 (the BIOS's mapping), which would
    // look like a double fault: mask them all.
    arch::outb(PIC1_DATA, 0xFF);
    arch::outb(PIC2_DATA, 0xFF);
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC, which x86-64 has.
    let base = unsafe { rdmsr(MSR_APIC_BASE) };
    X2APIC.store(base & APIC_BASE_X2APIC != 0, Ordering::Relaxed);
    lapic_write(REG_TPR, 0);
    lapic_write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    lapic_write(REG_TIMER_DIVIDE, 0xB);
    ENABLED.store(true, Ordering::Relaxed);
    true
}

/// Called from the interrupt stubs with the vector.
pub extern "C" fn handle(vector: u64) {
    let v = vector as usize;
    if let Some(c) = v
        .checked_sub(usize::from(DEVICE_FIRST))
        .and_then(|i| COUNTS.get(i))
    {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
    if vector == u64::from(TIMER_VECTOR) {
        TIMER.store(
            TIMER.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
    if vector != u64::from(SPURIOUS_VECTOR) {
        lapic_write(REG_EOI, 0);
    }
}

/// Waits a little for a device: halts until an interrupt (at most one timer period) when
/// interrupts are enabled, else one spin-loop hint.
pub fn wait() {
    if !ENABLED.load(Ordering::Relaxed) {
        arch::pause();
        return;
    }
    lapic_write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(REG_TIMER_INIT, HALT_TICKS);
    HALTS.store(
        HALTS.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
    arch::wait_for_interrupt();
}

/// Takes the interrupts still pending (a device that completed while the guest was polling has
/// one pending per vector): halts until the timer fires, at most once per vector. A halt, not
/// `sti; nop; cli`: PVM only injects interrupts when the vCPU exits, which `hlt` does.
fn drain() {
    for _ in 0..=DEVICE_COUNT {
        let timer = TIMER.load(Ordering::Relaxed);
        wait();
        if TIMER.load(Ordering::Relaxed) != timer {
            break;
        }
    }
}

/// Device interrupts taken so far (all MSI-X vectors), pending ones included.
pub fn device_interrupts() -> u32 {
    if ENABLED.load(Ordering::Relaxed) {
        drain();
    }
    COUNTS.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Whether interrupts are on (`outboard.virtio_irq=1`).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Interrupts taken so far on MSI-X entry `entry` (0 beyond the entries counted).
pub fn entry_interrupts(entry: usize) -> u32 {
    COUNTS.get(entry).map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Prints the interrupt counts (when interrupts are on): per MSI-X vector, timer, halts.
pub fn report() {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    drain();
    let c = |i: usize| COUNTS[i].load(Ordering::Relaxed);
    crate::println!(
        "outboard-testguest: irq: vectors 0x40..0x45={},{},{},{},{},{} timer={} halts={}",
        c(0),
        c(1),
        c(2),
        c(3),
        c(4),
        c(5),
        TIMER.load(Ordering::Relaxed),
        HALTS.load(Ordering::Relaxed)
    );
}
