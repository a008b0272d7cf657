//! The interrupt table: the 32 CPU exceptions, each ending the guest with
//! `OUTBOARD_GUEST_EXCEPTION vector=<n> rip=<hex>` and a power-off, and vectors 32..79 for the
//! interrupts the virtio commands take when asked to (`crate::irq`); the guest runs with
//! interrupts off otherwise.

use core::arch::global_asm;
use core::cell::UnsafeCell;

global_asm!(
    include_str!("idt.s"),
    handler = sym exception,
    irq = sym crate::irq::handle,
    options(att_syntax)
);

extern "C" {
    static outboard_isr_stubs: u8;
}

/// Exceptions and the interrupt vectors of `crate::irq`.
const VECTORS: usize = 80;
const STUB_SIZE: u64 = 16;
const KERNEL_CS: u64 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate.
const GATE_ATTRS: u64 = 0x8E00;
const PAGE_FAULT: u64 = 14;

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; VECTORS * 2]>);

// SAFETY: written once by the boot CPU in `init` before any other CPU runs; read-only afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; VECTORS * 2]));

/// Fills the IDT and loads it on this CPU (the boot CPU; see [`load`] for the others).
pub fn init() {
    let stubs = core::ptr::addr_of!(outboard_isr_stubs) as u64;
    let mut gates = [0u64; VECTORS * 2];
    for (vector, gate) in gates.chunks_exact_mut(2).enumerate() {
        let handler = stubs + STUB_SIZE * vector as u64;
        gate[0] = (handler & 0xffff)
            | KERNEL_CS << 16
            | GATE_ATTRS << 32
            | ((handler >> 16) & 0xffff) << 48;
        gate[1] = handler >> 32;
    }
    // SAFETY: only the boot CPU runs yet and no IDT pointing at this table is loaded, so nothing
    // reads it while it is written.
    unsafe { *IDT.0.get() = gates };
    load();
}

/// Loads the (already filled) IDT on the calling CPU.
pub fn load() {
    let base = IDT.0.get() as u64;
    let limit = (VECTORS * 16 - 1) as u16;
    let idtr = [
        limit,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ];
    // SAFETY: the table is a static, valid for the life of the guest.
    unsafe { super::lidt(&idtr) };
}

/// Called by the stubs with the vector, the error code and the faulting RIP.
extern "C" fn exception(vector: u64, error: u64, rip: u64) -> ! {
    if vector == PAGE_FAULT {
        crate::println!(
            "outboard-testguest: page fault at {:#x} error={error:#x}",
            super::cr2()
        );
    }
    crate::power::fatal(format_args!(
        "OUTBOARD_GUEST_EXCEPTION vector={vector} rip={rip:#x}"
    ))
}
