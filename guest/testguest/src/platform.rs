//! What the guest learns at boot about its machine: from the boot information (command line,
//! memory map, RSDP hint) and the ACPI tables (CPUs, local APIC, power-off registers, PM timer).
//! Decoded once by the boot CPU into a [`Platform`]; problems are printed as
//! `outboard-testguest: …` lines and leave the affected facts empty.

use crate::println;
use crate::sync::Once;
use outboard_testguest_parse::acpi::{self, Gas, Madt};
use outboard_testguest_parse::aml::{self, SleepType};
use outboard_testguest_parse::bootinfo::{self, Protocol};
use outboard_testguest_parse::cmdline::{self, Cmdline};
use outboard_testguest_parse::pci::{self, Ecam};
use outboard_testguest_parse::PhysMem;

/// End of the identity map built at boot.
pub const MAPPED_END: u64 = 4 << 30;
/// Most CPUs whose APIC IDs are kept (the `smp` command starts at most this many).
pub const MAX_CPUS: usize = 64;
/// Page the `smp` command copies its real-mode trampoline to (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// Memory the drivers give to devices (virtqueues, buffers): above the image, below 16 MiB.
pub const DMA_BASE: u64 = 0x20_0000;
pub const DMA_LEN: u64 = 0x60_0000;

static PLATFORM: Once<Platform> = Once::new();

/// Discovers the platform (first call only) and keeps it for the life of the guest.
pub fn init(protocol: Protocol, info: u64) -> &'static Platform {
    match PLATFORM.get() {
        Some(p) => p,
        None => PLATFORM
            .set(Platform::discover(protocol, info))
            .unwrap_or_else(|_| PLATFORM.get().expect("set")),
    }
}

/// The platform, once [`init`] ran.
pub fn get() -> Option<&'static Platform> {
    PLATFORM.get()
}

/// Guest-physical memory through the boot identity map.
#[derive(Debug, Clone, Copy)]
pub struct IdentityMem;

impl PhysMem for IdentityMem {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        if addr == 0 || end > MAPPED_END {
            return None;
        }
        // SAFETY: [addr, end) is inside the identity map of 0-4 GiB, which stays mapped for the
        // life of the guest, and is not address zero. The bytes are tables and boot data the VMM
        // wrote before entry; the guest never writes them while such a slice is alive.
        Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
    }
}

/// How to enter soft-off (S5).
#[derive(Debug, Clone, Copy, Default)]
pub struct PowerRegs {
    pub pm1a_cnt: Option<Gas>,
    pub pm1b_cnt: Option<Gas>,
    pub sleep_control: Option<Gas>,
    pub hw_reduced: bool,
    pub s5: Option<SleepType>,
}

/// The boot CPU's findings.
#[derive(Debug)]
pub struct Platform {
    pub protocol: Protocol,
    cmdline_buf: [u8; cmdline::MAX_LEN],
    cmdline_len: usize,
    /// Total e820 RAM.
    pub ram_bytes: u64,
    /// Enabled CPUs in the MADT (type 0 and type 9 with flag bit 0).
    pub cpus: u32,
    /// APIC IDs of the first [`MAX_CPUS`] enabled CPUs.
    apic_ids: [u32; MAX_CPUS],
    pub lapic_addr: u64,
    pub power: PowerRegs,
    pub pm_timer: Option<Gas>,
    /// The e820 map says the trampoline page is RAM.
    pub trampoline_is_ram: bool,
    /// The e820 map says the drivers' DMA area is RAM.
    pub dma_is_ram: bool,
    /// PCI ECAM from the MCFG table.
    pub ecam: Option<Ecam>,
    /// The boot information could not be read: the guest reports it and powers off.
    pub boot_error: Option<bootinfo::Error>,
}

impl Platform {
    /// Decodes the boot information at `info` (from `protocol`'s register) and the ACPI tables.
    pub fn discover(protocol: Protocol, info: u64) -> Platform {
        let mem = IdentityMem;
        let mut p = Platform {
            protocol,
            cmdline_buf: [0; cmdline::MAX_LEN],
            cmdline_len: 0,
            ram_bytes: 0,
            cpus: 0,
            apic_ids: [0; MAX_CPUS],
            lapic_addr: 0xFEE0_0000,
            power: PowerRegs::default(),
            pm_timer: None,
            trampoline_is_ram: false,
            dma_is_ram: false,
            ecam: None,
            boot_error: None,
        };
        let mut rsdp_hint = None;
        match bootinfo::decode(&mem, protocol, info) {
            Ok(boot) => {
                let text = Cmdline::new(boot.cmdline).unwrap_or_else(|e| {
                    println!("outboard-testguest: {e}: ignored");
                    Cmdline::default()
                });
                let bytes = text.as_str().as_bytes();
                p.cmdline_buf[..bytes.len()].copy_from_slice(bytes);
                p.cmdline_len = bytes.len();
                p.ram_bytes = boot.memmap.ram_bytes();
                p.trampoline_is_ram = boot.memmap.is_ram(TRAMPOLINE_ADDR, 4096);
                p.dma_is_ram = boot.memmap.is_ram(DMA_BASE, DMA_LEN);
                rsdp_hint = boot.rsdp;
            }
            Err(e) => p.boot_error = Some(e),
        }
        match acpi::locate_rsdp(&mem, rsdp_hint).and_then(|rsdp| acpi::walk(&mem, rsdp)) {
            Ok(tables) => {
                p.read_tables(&tables);
                p.ecam = match acpi::find(&mem, &tables.root, acpi::Sig(*b"MCFG")) {
                    Ok(t) => pci::parse_mcfg(t.body()).unwrap_or_else(|e| {
                        println!("outboard-testguest: ACPI: {e}");
                        None
                    }),
                    Err(_) => None,
                };
            }
            Err(e) => println!("outboard-testguest: ACPI: {e}"),
        }
        // A VMM without an MCFG table (QEMU's microvm with pcie=on puts ECAM at 0xe0000000) can
        // be named on the command line.
        match p.cmdline().get_u64("outboard.pci_ecam") {
            Ok(Some(base)) => {
                p.ecam = Some(Ecam {
                    base,
                    start_bus: 0,
                    end_bus: 0xFF,
                })
            }
            Ok(None) => {}
            Err(e) => println!("outboard-testguest: {e}"),
        }
        p
    }

    fn read_tables(&mut self, t: &acpi::Tables<'_>) {
        match &t.madt {
            Ok(madt) => self.read_madt(madt),
            Err(e) => println!("outboard-testguest: ACPI: {e}"),
        }
        match &t.fadt {
            Ok(fadt) => {
                self.pm_timer = fadt.pm_timer;
                self.power.pm1a_cnt = fadt.pm1a_cnt;
                self.power.pm1b_cnt = fadt.pm1b_cnt;
                self.power.sleep_control = fadt.sleep_control;
                self.power.hw_reduced = fadt.hw_reduced();
            }
            Err(e) => println!("outboard-testguest: ACPI: {e}"),
        }
        match t.dsdt.as_ref().map(|dsdt| aml::find_s5(dsdt.body())) {
            Ok(Ok(s5)) => self.power.s5 = Some(s5),
            Ok(Err(e)) => println!("outboard-testguest: ACPI: {e}"),
            Err(e) => println!("outboard-testguest: ACPI: {e}"),
        }
    }

    fn read_madt(&mut self, madt: &Madt<'_>) {
        self.lapic_addr = madt.lapic_addr();
        for cpu in madt.enabled_cpus() {
            if let Some(slot) = self.apic_ids.get_mut(self.cpus as usize) {
                *slot = cpu.apic_id;
            }
            self.cpus = self.cpus.saturating_add(1);
        }
        if let Some(Err(e)) = madt.entries().find(Result::is_err) {
            println!("outboard-testguest: ACPI: {e}");
        }
    }

    pub fn cmdline(&self) -> Cmdline<'_> {
        Cmdline::new(&self.cmdline_buf[..self.cmdline_len]).unwrap_or_default()
    }

    /// APIC IDs of the enabled CPUs (at most [`MAX_CPUS`]).
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..(self.cpus as usize).min(MAX_CPUS)]
    }
}
