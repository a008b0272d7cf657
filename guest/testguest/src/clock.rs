//! Guest time in nanoseconds, for the READY line's uptime and for commands that need timestamps
//! or intervals (heartbeat, SMP start-up delays).
//!
//! Sources, in order of preference:
//! 1. kvmclock, when CPUID 0x40000000 says KVM and 0x40000001 offers clocksource2: nanoseconds
//!    since the VM was created, kept across pause, snapshot and live update by the VMM;
//! 2. the TSC at a frequency from CPUID (leaf 0x15, 0x16, or the hypervisor's 0x40000010);
//! 3. the TSC measured for 10 ms against the ACPI PM timer, else the PIT;
//! 4. none: uptime prints as 0.000 and commands that need time say so.

use crate::arch::{cpuid, inb, inl, outb, rdtsc, wrmsr};
use crate::platform::Platform;
use crate::sync::Once;
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, Ordering};
use outboard_testguest_parse::acpi::{Gas, SPACE_IO};
use outboard_testguest_parse::pvclock::{self, PvclockTime, PVCLOCK_LEN};

const HV_BASE: u32 = 0x4000_0000;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Reads of a pvclock whose version stays odd (being updated) before giving up.
const PVCLOCK_RETRIES: u32 = 1_000_000;
const PM_TIMER_HZ: u64 = 3_579_545;
const PIT_HZ: u64 = 1_193_182;
/// Polls of a calibration timer before deciding it does not tick.
const CALIBRATION_POLLS: u32 = 10_000_000;
/// A TSC frequency outside this range is a measurement gone wrong.
const TSC_HZ_RANGE: core::ops::RangeInclusive<u64> = 50_000_000..=50_000_000_000;

/// Where the time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    KvmClock,
    Tsc { hz: u64, how: &'static str },
    None,
}

/// The guest clock (set up once by the boot CPU; other CPUs don't read it).
#[derive(Debug)]
pub struct Clock {
    pub source: Source,
}

/// The page kvmclock writes, one 32-byte record for the boot CPU.
#[repr(C, align(64))]
struct PvclockArea(UnsafeCell<[u8; PVCLOCK_LEN]>);

// SAFETY: only the hypervisor writes it; the guest reads it with volatile loads under the
// version protocol and never forms a reference to it.
unsafe impl Sync for PvclockArea {}

static PVCLOCK: PvclockArea = PvclockArea(UnsafeCell::new([0; PVCLOCK_LEN]));
static CLOCK: Once<Clock> = Once::new();

/// Chooses and starts the clock; later calls return the first one.
pub fn init(platform: &Platform) -> &'static Clock {
    if let Some(c) = CLOCK.get() {
        return c;
    }
    let source = if start_kvmclock() {
        Source::KvmClock
    } else if let Some(hz) = tsc_hz_from_cpuid() {
        Source::Tsc { hz, how: "cpuid" }
    } else if let Some(hz) = platform.pm_timer.as_ref().and_then(calibrate_pm_timer) {
        Source::Tsc {
            hz,
            how: "pm-timer",
        }
    } else if let Some(hz) = calibrate_pit() {
        Source::Tsc { hz, how: "pit" }
    } else {
        Source::None
    };
    CLOCK
        .set(Clock { source })
        .unwrap_or_else(|_| CLOCK.get().expect("set"))
}

/// The clock, if [`init`] ran.
pub fn get() -> Option<&'static Clock> {
    CLOCK.get()
}

impl Clock {
    /// Nanoseconds since the clock's origin (VM creation for kvmclock, TSC reset otherwise).
    pub fn now_ns(&self) -> Option<u64> {
        match self.source {
            Source::KvmClock => read_kvmclock(),
            Source::Tsc { hz, .. } => Some(pvclock::ticks_to_ns(rdtsc(), hz)),
            Source::None => None,
        }
    }

    /// Busy-waits `ns` nanoseconds; false (at once) without a clock.
    pub fn delay_ns(&self, ns: u64) -> bool {
        let Some(start) = self.now_ns() else {
            return false;
        };
        while self
            .now_ns()
            .is_some_and(|now| now.saturating_sub(start) < ns)
        {
            crate::arch::pause();
        }
        true
    }

    pub fn name(&self) -> &'static str {
        match self.source {
            Source::KvmClock => "kvmclock",
            Source::Tsc { how: "cpuid", .. } => "tsc(cpuid)",
            Source::Tsc {
                how: "pm-timer", ..
            } => "tsc(pm-timer)",
            Source::Tsc { .. } => "tsc(pit)",
            Source::None => "none",
        }
    }
}

/// The base of the KVM CPUID leaves, if this is KVM.
fn kvm_leaves() -> Option<u32> {
    const HYPERVISOR_BIT: u32 = 1 << 31;
    if cpuid(1, 0).2 & HYPERVISOR_BIT == 0 {
        return None;
    }
    // KVM sits at 0x40000000, or at 0x40000100 when Hyper-V leaves come first.
    [HV_BASE, HV_BASE + 0x100].into_iter().find(|base| {
        let (_, b, c, d) = cpuid(*base, 0);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..].copy_from_slice(&d.to_le_bytes());
        &sig == KVM_SIGNATURE
    })
}

fn start_kvmclock() -> bool {
    let Some(base) = kvm_leaves() else {
        return false;
    };
    if cpuid(base + 1, 0).0 & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return false;
    }
    let addr = PVCLOCK.0.get() as u64;
    // SAFETY: CPUID advertised the MSR; the address is our static, 64-byte aligned so the record
    // can't cross a page, reserved for the hypervisor to write and only read volatilely.
    unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr | 1) };
    // A hypervisor that takes the MSR but never fills the record leaves a zero multiplier.
    read_pvclock().is_some_and(|(t, _)| t.tsc_to_system_mul != 0)
}

/// A consistent snapshot of the kvmclock record and the TSC read within it.
fn read_pvclock() -> Option<(PvclockTime, u64)> {
    let base = PVCLOCK.0.get() as *const u64;
    for _ in 0..PVCLOCK_RETRIES {
        let mut words = [0u64; PVCLOCK_LEN / 8];
        for (i, w) in words.iter_mut().enumerate() {
            let word = base.wrapping_add(i);
            // SAFETY: `word` stays inside the 32-byte aligned static; volatile because the
            // hypervisor writes it behind the compiler's back.
            *w = unsafe { word.read_volatile() };
        }
        compiler_fence(Ordering::Acquire);
        let tsc = rdtsc();
        compiler_fence(Ordering::Acquire);
        // SAFETY: as above; the version is the record's first u32.
        let version_again = unsafe { (base as *const u32).read_volatile() };
        let version = words[0] as u32;
        if version & 1 == 0 && version == version_again {
            let mut bytes = [0u8; PVCLOCK_LEN];
            for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            return Some((PvclockTime::parse(&bytes), tsc));
        }
        crate::arch::pause();
    }
    None
}

fn read_kvmclock() -> Option<u64> {
    read_pvclock().map(|(t, tsc)| t.ns_at(tsc))
}

fn tsc_hz_from_cpuid() -> Option<u64> {
    let max_basic = cpuid(0, 0).0;
    if max_basic >= 0x15 {
        let (a, b, c, _) = cpuid(0x15, 0);
        if let Some(hz) = pvclock::tsc_hz_from_leaf_15(a, b, c) {
            return Some(hz);
        }
    }
    if max_basic >= 0x16 {
        let mhz = u64::from(cpuid(0x16, 0).0 & 0xffff);
        if mhz != 0 {
            return Some(mhz * 1_000_000);
        }
    }
    let base = kvm_leaves().unwrap_or(HV_BASE);
    if cpuid(1, 0).2 & (1 << 31) != 0 && cpuid(base, 0).0 >= base + 0x10 {
        let khz = u64::from(cpuid(base + 0x10, 0).0);
        if khz != 0 {
            return Some(khz * 1000);
        }
    }
    None
}

/// TSC ticks per second over 10 ms of the ACPI PM timer (24-bit, 3.579545 MHz, I/O space only).
fn calibrate_pm_timer(timer: &Gas) -> Option<u64> {
    const MASK: u32 = 0x00ff_ffff;
    if timer.space != SPACE_IO {
        return None;
    }
    let port = u16::try_from(timer.address).ok()?;
    let start = inl(port) & MASK;
    measure_tsc(PM_TIMER_HZ, || {
        u64::from((inl(port) & MASK).wrapping_sub(start) & MASK)
    })
}

/// TSC ticks per second over 10 ms of PIT channel 0, read back with latch commands. Channel 0
/// because its gate is always on: channel 2's gate lives in port 0x61, which microvm lacks. The
/// guest never enables interrupts, so the IRQ 0 this programs is never taken.
fn calibrate_pit() -> Option<u64> {
    const CH0: u16 = 0x40;
    const MODE: u16 = 0x43;
    let read = || {
        outb(MODE, 0x00); // latch channel 0
        let lo = inb(CH0);
        u16::from_le_bytes([lo, inb(CH0)])
    };
    outb(MODE, 0x34); // channel 0, low then high byte, mode 2 (rate generator), binary
    outb(CH0, 0xff);
    outb(CH0, 0xff);
    let first = read();
    // The counter runs down from 0xffff, far slower than we poll: no wrap within 10 ms.
    measure_tsc(PIT_HZ, || u64::from(first.wrapping_sub(read())))
}

/// TSC ticks per second while `elapsed` (ticks of a `counter_hz` timer since the start) passes
/// 10 ms. A counter that reads the same many times in a row is no timer (an absent device):
/// each read is a VM exit, so giving up early matters.
fn measure_tsc(counter_hz: u64, mut elapsed: impl FnMut() -> u64) -> Option<u64> {
    const STUCK_READS: u32 = 10_000;
    let target = counter_hz / 100;
    let tsc0 = rdtsc();
    let (mut last, mut same) = (0, 0);
    for _ in 0..CALIBRATION_POLLS {
        let e = elapsed();
        if e >= target {
            let ticks = rdtsc().wrapping_sub(tsc0);
            let hz = (u128::from(ticks) * u128::from(counter_hz) / u128::from(e)) as u64;
            return Some(hz).filter(|hz| TSC_HZ_RANGE.contains(hz));
        }
        same = if e == last { same + 1 } else { 0 };
        if same >= STUCK_READS {
            return None;
        }
        last = e;
    }
    None
}
