//! The ACPI walk over an arbitrary BIOS-area image (the RSDP is found by scanning).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_testguest_parse::{acpi, aml, FlatMem};

fuzz_target!(|data: &[u8]| {
    let mem = FlatMem { base: 0xE_0000, bytes: data };
    let Ok(rsdp) = acpi::locate_rsdp(&mem, Some(0xE_0000)) else { return };
    let Ok(tables) = acpi::walk(&mem, rsdp) else { return };
    if let Ok(madt) = tables.madt {
        let _ = madt.entries().count();
        let _ = madt.enabled_cpus().count();
        let _ = madt.lapic_addr();
    }
    if let Ok(dsdt) = tables.dsdt {
        let _ = aml::find_s5(dsdt.body());
    }
});
