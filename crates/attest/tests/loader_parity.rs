//! PCR2 predicted from a kernel file (`KernelLayout`, used by `outboard attest measure`) equals
//! PCR2 measured from guest memory after the real loader (linux-loader, as outboard-vmm uses it)
//! placed the kernel: what is measured is what runs.

use std::io::Cursor;

use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use outboard_attest::kernel::{KernelFormat, KernelLayout};
use outboard_attest::Measurements;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 20;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

/// Measures the layout's regions by reading guest memory back, as the VMM does.
fn measure_from_memory(
    mem: &GuestMemoryMmap<()>,
    layout: &KernelLayout,
    base: u64,
) -> Measurements {
    let mut m = Measurements::new();
    m.measure_kernel_in_guest(mem, layout, GuestAddress(base))
        .unwrap();
    m
}

fn predicted(file: &[u8]) -> Measurements {
    let mut m = Measurements::new();
    m.measure_kernel_file(file).unwrap();
    m
}

fn elf_image() -> Vec<u8> {
    // Two PT_LOAD segments (the second with a zero-filled tail) and a PT_NOTE in between.
    let segs: [(u32, u64, u64, u64, u64); 3] = [
        (1, 0x1000, 0x100_0000, 0x3000, 0x3000),
        (4, 0x200, 0, 0x20, 0x20),
        (1, 0x4000, 0x140_0000, 0x1800, 0x8000),
    ];
    let mut f = vec![0u8; 0x6000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    for (i, (ty, off, paddr, filesz, memsz)) in segs.into_iter().enumerate() {
        let at = 64 + 56 * i;
        f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&paddr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
    }
    for (i, b) in f.iter_mut().enumerate().skip(0x1000) {
        *b = (i * 31 % 251) as u8;
    }
    f
}

fn bzimage() -> Vec<u8> {
    let mut f = vec![0u8; 0x40000];
    f[0x1f1] = 5; // setup_sects
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // boot protocol 2.15
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    for (i, b) in f.iter_mut().enumerate().skip(6 * 512) {
        *b = (i * 7 % 253) as u8;
    }
    f
}

#[test]
fn elf_prediction_equals_guest_memory() {
    let file = elf_image();
    let layout = KernelLayout::parse(&file).unwrap();
    assert_eq!(layout.format, KernelFormat::Elf64);
    for kernel_offset in [None, Some(0x20_0000u64)] {
        let mem = memory();
        Elf::load(
            &mem,
            kernel_offset.map(GuestAddress),
            &mut Cursor::new(&file),
            None,
        )
        .unwrap();
        let from_mem = measure_from_memory(&mem, &layout, kernel_offset.unwrap_or(0));
        assert_eq!(
            from_mem.pcrs(),
            predicted(&file).pcrs(),
            "kernel_offset {kernel_offset:?}"
        );
    }
}

#[test]
fn bzimage_prediction_equals_guest_memory() {
    let file = bzimage();
    let layout = KernelLayout::parse(&file).unwrap();
    assert_eq!(layout.format, KernelFormat::BzImage);
    let mem = memory();
    let res = BzImage::load(&mem, None, &mut Cursor::new(&file), None).unwrap();
    assert_eq!(res.kernel_end - res.kernel_load.0, layout.measured_len());
    let from_mem = measure_from_memory(&mem, &layout, res.kernel_load.0);
    assert_eq!(from_mem.pcrs(), predicted(&file).pcrs());

    // The loader placing different bytes (one flipped in guest memory) is caught.
    let at = GuestAddress(res.kernel_load.0 + 1000);
    let b: u8 = mem.read_obj(at).unwrap();
    mem.write_obj(b ^ 1, at).unwrap();
    assert_ne!(
        measure_from_memory(&mem, &layout, res.kernel_load.0).pcrs(),
        predicted(&file).pcrs()
    );
}

#[test]
fn stock_kernel_prediction_equals_guest_memory() {
    // The Debian kernel `cargo xtask guest` builds (or OUTBOARD_TEST_KERNEL).
    let path = std::env::var_os("OUTBOARD_TEST_KERNEL").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest/vmlinuz"),
        Into::into,
    );
    let Ok(file) = std::fs::read(&path) else {
        eprintln!(
            "SKIP: no stock kernel at {} (run `cargo xtask guest`)",
            path.display()
        );
        return;
    };
    let layout = KernelLayout::parse(&file).unwrap();
    let mem = memory();
    let res = match layout.format {
        KernelFormat::BzImage => BzImage::load(&mem, None, &mut Cursor::new(&file), None).unwrap(),
        KernelFormat::Elf64 => Elf::load(&mem, None, &mut Cursor::new(&file), None).unwrap(),
        KernelFormat::Raw => panic!("{} is neither bzImage nor ELF", path.display()),
    };
    let base = if layout.format == KernelFormat::BzImage {
        res.kernel_load.0
    } else {
        0
    };
    assert_eq!(
        measure_from_memory(&mem, &layout, base).pcrs(),
        predicted(&file).pcrs()
    );
}
