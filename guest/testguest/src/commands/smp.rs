//! `smp`: starts every other enabled CPU of the MADT with INIT-SIPI-SIPI, one at a time. Each AP
//! runs the real-mode trampoline (16 → 32 → 64-bit), loads the IDT, prints
//! `OUTBOARD_AP_ONLINE apic_id=<n>` and halts; then the boot CPU prints
//! `OUTBOARD_SMP_OK online=<n>` (CPUs online, itself included) and powers off.
//!
//! ```text
//! BSP, per AP:  patch stack -> INIT -> 10 ms -> SIPI -> 200 us -> (not arrived) SIPI -> wait ≤ 5 s
//! AP:           trampoline -> outboard_ap_entry64 -> ap_main: print, ARRIVED := apic_id + 1, halt
//! ```
//!
//! The local APIC is driven through MSRs when it is (or must be, for IDs above 254, or is asked
//! to be with `outboard.x2apic`) in x2APIC mode, else through its MMIO page.

use super::Env;
use crate::arch::{self, cpuid, rdmsr, wrmsr};
use crate::platform::{MAX_CPUS, TRAMPOLINE_ADDR};
use crate::println;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

const NAME: &str = "smp";
const AP_STACK_SIZE: usize = 4096;

global_asm!(
    include_str!("../arch/trampoline.s"),
    ap_stacks_size = const AP_STACK_SIZE * MAX_CPUS,
    options(att_syntax)
);

extern "C" {
    static outboard_trampoline_start: u8;
    static outboard_trampoline_end: u8;
    static outboard_tramp_stack: u8;
    static outboard_ap_stacks: u8;
}

/// APIC ID + 1 of the last AP to arrive (0: none yet). Written with `xchg`, read by the BSP.
static ARRIVED: AtomicU32 = AtomicU32::new(0);

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_EXTD: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;
const REG_SVR: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const SVR_ENABLE: u32 = 0x1FF;
const ICR_INIT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600;
const ICR_PENDING: u32 = 1 << 12;
const SIPI_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;
const ARRIVAL_TIMEOUT_NS: u64 = 5_000_000_000;
/// Without a clock, waits are counted in polls.
const ARRIVAL_POLLS: u64 = 200_000_000;

/// The local APIC of the boot CPU.
#[derive(Debug, Clone, Copy)]
enum Lapic {
    X2Apic,
    XApic { base: u64 },
}

impl Lapic {
    fn write(self, reg: u32, value: u32) {
        match self {
            // SAFETY: in x2APIC mode the APIC registers are MSRs 0x800 + reg / 16.
            Lapic::X2Apic => unsafe { wrmsr(X2APIC_MSR_BASE + reg / 16, value.into()) },
            // SAFETY: `base` is the MADT's APIC page, below 4 GiB (checked in `run`), mapped
            // uncached; registers are 32-bit and 16-byte aligned.
            Lapic::XApic { base } => unsafe {
                ((base + u64::from(reg)) as *mut u32).write_volatile(value)
            },
        }
    }

    fn read(self, reg: u32) -> u32 {
        match self {
            // SAFETY: as in `write`.
            Lapic::X2Apic => unsafe { rdmsr(X2APIC_MSR_BASE + reg / 16) as u32 },
            // SAFETY: as in `write`.
            Lapic::XApic { base } => unsafe {
                ((base + u64::from(reg)) as *const u32).read_volatile()
            },
        }
    }

    fn send_ipi(self, apic_id: u32, icr: u32) {
        match self {
            // SAFETY: the x2APIC ICR is one 64-bit MSR with the destination in the high half.
            Lapic::X2Apic => unsafe {
                wrmsr(
                    X2APIC_MSR_BASE + REG_ICR_LOW / 16,
                    u64::from(apic_id) << 32 | u64::from(icr),
                )
            },
            Lapic::XApic { .. } => {
                self.write(REG_ICR_HIGH, apic_id << 24);
                self.write(REG_ICR_LOW, icr);
                for _ in 0..1_000_000 {
                    if self.read(REG_ICR_LOW) & ICR_PENDING == 0 {
                        break;
                    }
                    arch::pause();
                }
            }
        }
    }
}

/// This CPU's APIC ID (the x2APIC ID from leaf 0xB where there is one).
fn my_apic_id() -> u32 {
    if cpuid(0, 0).0 >= 0xB {
        let (_, ebx, _, edx) = cpuid(0xB, 0);
        if ebx != 0 {
            return edx;
        }
    }
    cpuid(1, 0).1 >> 24
}

/// Entry of every AP after the trampoline (from `outboard_ap_entry64`).
pub extern "C" fn ap_main() -> ! {
    arch::idt::load();
    let id = my_apic_id();
    println!("OUTBOARD_AP_ONLINE apic_id={id}");
    ARRIVED.swap(id.wrapping_add(1), Ordering::SeqCst);
    arch::halt_forever()
}

pub fn run(env: &Env) {
    let platform = env.platform;
    if !platform.trampoline_is_ram {
        println!(
            "OUTBOARD_GUEST_ERROR {NAME}: page {TRAMPOLINE_ADDR:#x} is not RAM in the e820 map"
        );
        return;
    }
    let force_x2apic = env.cmdline().has("outboard.x2apic");
    let Some(lapic) = choose_lapic(platform.lapic_addr, platform.apic_ids(), force_x2apic) else {
        return;
    };
    install_trampoline();
    lapic.write(REG_SVR, SVR_ENABLE);
    let me = my_apic_id();
    let mut online = 1u32;
    for (slot, &id) in platform
        .apic_ids()
        .iter()
        .enumerate()
        .filter(|(_, id)| **id != me)
    {
        if !start_ap(env, lapic, id, slot) {
            println!("OUTBOARD_GUEST_ERROR {NAME}: CPU apic_id={id} did not come online");
            break;
        }
        online += 1;
    }
    if online == platform.cpus {
        println!("OUTBOARD_SMP_OK online={online}");
    } else {
        println!(
            "OUTBOARD_GUEST_ERROR {NAME}: online={online} of {} CPUs",
            platform.cpus
        );
    }
}

fn choose_lapic(lapic_addr: u64, ids: &[u32], force_x2apic: bool) -> Option<Lapic> {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let apic_base = unsafe { rdmsr(IA32_APIC_BASE) };
    if apic_base & APIC_BASE_EXTD != 0 {
        return Some(Lapic::X2Apic);
    }
    if force_x2apic || ids.iter().any(|id| *id > 254) {
        if cpuid(1, 0).2 & (1 << 21) == 0 {
            println!("OUTBOARD_GUEST_ERROR {NAME}: x2APIC needed but the CPU has none");
            return None;
        }
        // SAFETY: CPUID offers x2APIC; switching from xAPIC mode (enabled) to x2APIC is legal.
        unsafe { wrmsr(IA32_APIC_BASE, apic_base | APIC_BASE_EXTD) };
        return Some(Lapic::X2Apic);
    }
    if lapic_addr == 0 || lapic_addr & 0xfff != 0 || lapic_addr >= crate::platform::MAPPED_END {
        println!("OUTBOARD_GUEST_ERROR {NAME}: bad local APIC address {lapic_addr:#x}");
        return None;
    }
    Some(Lapic::XApic { base: lapic_addr })
}

fn trampoline_bytes() -> &'static [u8] {
    let start = core::ptr::addr_of!(outboard_trampoline_start);
    let len = core::ptr::addr_of!(outboard_trampoline_end) as usize - start as usize;
    // SAFETY: both symbols delimit the trampoline in .rodata, which is never written.
    unsafe { core::slice::from_raw_parts(start, len) }
}

fn install_trampoline() {
    let code = trampoline_bytes();
    assert!(code.len() <= 4096, "trampoline larger than a page");
    // SAFETY: the e820 map says the page is RAM; the image lives at 1 MiB and up, and everything
    // the boot information held was copied out at boot, so nothing in use is overwritten.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_ADDR as *mut u8, code.len())
    };
}

/// Starts the AP `apic_id` on stack `slot`; true when it arrived.
fn start_ap(env: &Env, lapic: Lapic, apic_id: u32, slot: usize) -> bool {
    let stacks = core::ptr::addr_of!(outboard_ap_stacks) as u64;
    let stack_top = stacks + ((slot + 1) * AP_STACK_SIZE) as u64;
    let offset = core::ptr::addr_of!(outboard_tramp_stack) as u64
        - core::ptr::addr_of!(outboard_trampoline_start) as u64;
    // SAFETY: the patched quadword is inside the trampoline copy at TRAMPOLINE_ADDR, 8-aligned;
    // no AP is running the trampoline now (the previous one arrived before we got here).
    unsafe { ((TRAMPOLINE_ADDR + offset) as *mut u64).write_volatile(stack_top) };
    ARRIVED.swap(0, Ordering::SeqCst);
    lapic.send_ipi(apic_id, ICR_INIT);
    delay(env, 10_000_000);
    lapic.send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
    delay(env, 200_000);
    if !arrived(apic_id) {
        lapic.send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
    }
    match env.clock.now_ns() {
        Some(start) => {
            while !arrived(apic_id) {
                if env
                    .clock
                    .now_ns()
                    .is_some_and(|now| now.saturating_sub(start) > ARRIVAL_TIMEOUT_NS)
                {
                    return false;
                }
                arch::pause();
            }
            true
        }
        None => (0..ARRIVAL_POLLS).any(|_| {
            arch::pause();
            arrived(apic_id)
        }),
    }
}

fn arrived(apic_id: u32) -> bool {
    ARRIVED.load(Ordering::SeqCst) == apic_id.wrapping_add(1)
}

fn delay(env: &Env, ns: u64) {
    if !env.clock.delay_ns(ns) {
        for _ in 0..ns / 10 {
            arch::pause();
        }
    }
}
