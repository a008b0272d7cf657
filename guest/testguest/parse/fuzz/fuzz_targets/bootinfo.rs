//! boot_params and hvm_start_info decoding over an arbitrary memory image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_testguest_parse::bootinfo::{decode, Protocol};
use outboard_testguest_parse::{cmdline::Cmdline, FlatMem};

fuzz_target!(|data: &[u8]| {
    let mem = FlatMem { base: 0x1000, bytes: data };
    for protocol in [Protocol::Linux, Protocol::Pvh] {
        if let Ok(info) = decode(&mem, protocol, 0x1000) {
            let _ = info.memmap.ram_bytes();
            let _ = info.memmap.is_ram(0x8000, 0x1000);
            let _ = Cmdline::new(info.cmdline).map(|c| c.params().count());
        }
    }
});
