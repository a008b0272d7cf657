//! The Outboard test guest: a small freestanding kernel that outboard-vmm, QEMU and Firecracker
//! boot (64-bit Linux boot protocol entry, or PVH). It reads its boot information and the ACPI
//! tables, prints
//! `OUTBOARD_GUEST_READY uptime=<s.mmm> cpus=<MADT CPUs> mem_kib=<e820 RAM>` on COM1, runs the
//! command named by `outboard.run=` and powers off through ACPI.
//!
//! It must run under PVM, which emulates every ring-0 instruction and cannot emulate some (see
//! `arch`): it is built soft-float, and the build checks its disassembly.
//!
//! ```text
//! entry (arch/entry.s) -> rust_main: IDT, UART -> platform (boot info, ACPI) -> clock
//!   -> version line -> READY line -> commands::run -> power::poweroff
//! ```
#![no_std]
#![no_main]

mod arch;
mod clock;
mod commands;
mod irq;
mod mem;
mod pci;
mod platform;
mod power;
mod serial;
mod sync;
mod virtio;

use outboard_testguest_parse::bootinfo::Protocol;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const NS_PER_MS: u64 = 1_000_000;
/// The debug console port (QEMU's isa-debugcon, outboard-vmm's debug port): the boot benchmark
/// timestamps the entry mark there, before the guest does any work of its own.
const DEBUGCON_PORT: u16 = 0x402;

/// Called by the boot stub: `protocol` 0 = Linux (info = boot_params), 1 = PVH (hvm_start_info).
extern "C" fn rust_main(protocol: u32, info: u64) -> ! {
    for b in b"OUTBOARD_ENTRY\n" {
        arch::outb(DEBUGCON_PORT, *b);
    }
    arch::idt::init();
    serial::init();
    let protocol = if protocol == 1 {
        Protocol::Pvh
    } else {
        Protocol::Linux
    };
    let platform = platform::init(protocol, info);
    let clock = clock::init(platform);
    let boot = match platform.protocol {
        Protocol::Linux => "linux64",
        Protocol::Pvh => "pvh",
    };
    println!(
        "outboard-testguest {VERSION} boot={boot} clock={} cmdline=\"{}\"",
        clock.name(),
        platform.cmdline().as_str()
    );
    if let Some(e) = platform.boot_error {
        power::fatal(format_args!("OUTBOARD_GUEST_ERROR {e}"));
    }
    let ms = clock.now_ns().unwrap_or(0) / NS_PER_MS;
    println!(
        "OUTBOARD_GUEST_READY uptime={}.{:03} cpus={} mem_kib={}",
        ms / 1000,
        ms % 1000,
        platform.cpus,
        platform.ram_bytes / 1024
    );
    commands::run(&commands::Env { platform, clock })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(l) => power::fatal(format_args!(
            "OUTBOARD_GUEST_PANIC {} at {}:{}",
            info.message(),
            l.file(),
            l.line()
        )),
        None => power::fatal(format_args!("OUTBOARD_GUEST_PANIC {}", info.message())),
    }
}
