//! Arbitrary bytes as a kernel image (ELF or bzImage) and command line: loading must fail with an
//! error, never panic or write outside guest memory.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use outboard_boot::loader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let path = std::env::temp_dir().join(format!("outboard-fuzz-kernel-{}", std::process::id()));
    std::fs::File::create(&path).unwrap().write_all(data).unwrap();
    if let Ok(kernel) = loader::load_kernel(&mem, &path) {
        let _ = kernel.cmdline_max();
        let _ = kernel.initrd_limit();
    }
    let cmdline = String::from_utf8_lossy(&data[..data.len().min(4096)]);
    let _ = loader::write_cmdline(&mem, &cmdline, 2048);
});
