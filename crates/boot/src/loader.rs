//! Loading what the guest boots: an ELF vmlinux (PVH note recognised) or a bzImage, an initramfs
//! and the command line. Files are hostile input: every size and address is checked and a bad
//! file gets an error naming it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout::{self, CMDLINE_START, HIMEM_START};

/// Linux's x86 `COMMAND_LINE_SIZE` (with the NUL), used when the kernel doesn't state its own.
pub const DEFAULT_CMDLINE_MAX: usize = 2048;

/// Offset of the 64-bit entry (`startup_64`) from a bzImage's protected-mode load address.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// setup_header.xloadflags: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;

/// Errors of loading the kernel, initramfs and command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF kernel nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("Cannot load kernel {path} (truncated or malformed?)")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Kernel {path} has no 64-bit entry point")]
    No64BitEntry { path: PathBuf },
    #[error("Initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("Cannot copy initramfs {path} into guest memory")]
    InitrdCopy {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("Kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("Kernel command line may contain only printable ASCII")]
    CmdlineCharacters,
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Cannot write the kernel command line")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
}

/// Which boot protocol image the kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// Guest address the file's loaded bytes are placed relative to (what attestation reads
    /// back): the bzImage's protected-mode kernel (`kernel_load`); 0 for ELF, whose segments go
    /// to their physical addresses.
    pub image_base: u64,
    /// First byte after the kernel image (initramfs goes above it).
    pub end: u64,
    /// The bzImage's setup header, to be copied into boot_params.
    pub setup_header: Option<setup_header>,
    /// The 32-bit PVH entry from the ELF note, if the kernel has one (we enter at 64 bits).
    pub pvh_entry: Option<u64>,
}

impl LoadedKernel {
    /// Longest command line (with its NUL) the kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        match self.setup_header {
            // Boot protocol 2.06 added cmdline_size; older kernels take 255 characters.
            Some(hdr) if hdr.version >= 0x206 && hdr.cmdline_size > 0 => {
                (hdr.cmdline_size as usize + 1).min(layout::CMDLINE_MAX_SIZE)
            }
            Some(_) => 256,
            None => DEFAULT_CMDLINE_MAX,
        }
    }

    /// Highest address the initramfs may end at (exclusive), as the kernel states it.
    pub fn initrd_limit(&self) -> u64 {
        match self.setup_header {
            Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max) + 1,
            Some(_) => 0x3800_0000,
            None => u64::MAX,
        }
    }
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, Error> {
    let read_err = |source| Error::Read {
        what: "kernel",
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    let len = file.metadata().map_err(read_err)?.len();
    if len >= 4 {
        file.read_exact(&mut magic).map_err(read_err)?;
        if &magic == b"\x7fELF" {
            return Ok(KernelFormat::Elf);
        }
    }
    if len >= 0x206 {
        file.seek(SeekFrom::Start(0x202)).map_err(read_err)?;
        file.read_exact(&mut magic).map_err(read_err)?;
        if &magic == b"HdrS" {
            return Ok(KernelFormat::BzImage);
        }
    }
    Err(Error::NotAKernel {
        path: path.to_owned(),
    })
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let mut file = File::open(path).map_err(|source| Error::Open {
        what: "kernel",
        path: path.to_owned(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    let load_err = |source| Error::Load {
        path: path.to_owned(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.0,
                image_base: 0,
                end: result.kernel_end,
                setup_header: None,
                pvh_entry,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let hdr = result.setup_header.ok_or_else(|| Error::NotAKernel {
                path: path.to_owned(),
            })?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry {
                    path: path.to_owned(),
                });
            }
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET,
                image_base: result.kernel_load.0,
                end: result.kernel_end,
                setup_header: Some(hdr),
                pvh_entry: None,
            })
        }
    }
}

/// Where the initramfs went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Picks the highest page-aligned address for `size` bytes below `min(low_end, limit)` and above
/// `kernel_end`.
pub fn place_initrd(size: u64, kernel_end: u64, low_end: u64, limit: u64) -> Option<u64> {
    let top = low_end.min(limit);
    let addr = top.checked_sub(size)? & !0xfff;
    let floor = kernel_end.checked_add(0xfff)? & !0xfff;
    (addr >= floor.max(HIMEM_START)).then_some(addr)
}

/// Copies the initramfs at `path` high into low RAM.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<InitrdPlacement, Error> {
    let mut file = File::open(path).map_err(|source| Error::Open {
        what: "initramfs",
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::Read {
            what: "initramfs",
            path: path.to_owned(),
            source,
        })?
        .len();
    let limit = layout::low_ram_end(mem_size).min(kernel.initrd_limit());
    let addr =
        place_initrd(size, kernel.end, layout::low_ram_end(mem_size), limit).ok_or_else(|| {
            Error::InitrdTooLarge {
                path: path.to_owned(),
                size,
                limit,
            }
        })?;
    copy_into(mem, &mut file, addr, size).map_err(|source| Error::InitrdCopy {
        path: path.to_owned(),
        source,
    })?;
    Ok(InitrdPlacement { addr, size })
}

fn copy_into<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    src: &mut F,
    addr: u64,
    size: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), src, size as usize)
}

/// Validates `cmdline` against the kernel's limit and writes it at [`CMDLINE_START`].
/// Returns its length without the NUL.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max_with_nul: usize,
) -> Result<usize, Error> {
    if cmdline.len() + 1 > max_with_nul {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: max_with_nul - 1,
        });
    }
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::CmdlineCharacters);
    }
    let parsed = Cmdline::try_from(cmdline, max_with_nul).map_err(Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &parsed).map_err(Error::CmdlineWrite)?;
    Ok(cmdline.len())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("outboard-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn cmdline_limits() {
        let mem = mem();
        assert_eq!(write_cmdline(&mem, "console=ttyS0", 2048).unwrap(), 13);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "a".repeat(2048);
        assert!(matches!(
            write_cmdline(&mem, &long, 2048),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(write_cmdline(&mem, &"a".repeat(2047), 2048).is_ok());
        assert!(matches!(
            write_cmdline(&mem, "bad\ncmdline", 2048),
            Err(Error::CmdlineCharacters)
        ));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        assert_eq!(
            place_initrd(0x1800, 0x20_0000, 128 << 20, u64::MAX),
            Some((128 << 20) - 0x2000)
        );
        assert_eq!(
            place_initrd(0x1000, 0x20_0000, 128 << 20, 64 << 20),
            Some((64 << 20) - 0x1000)
        );
        assert_eq!(
            place_initrd(127 << 20, 0x20_0000, 128 << 20, u64::MAX),
            None
        );
        assert_eq!(place_initrd(u64::MAX, 0, 128 << 20, u64::MAX), None);
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = mem();
        let text = temp_file("text", b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(
            load_kernel(&mem, &text),
            Err(Error::NotAKernel { .. })
        ));
        let empty = temp_file("empty", b"");
        assert!(matches!(
            load_kernel(&mem, &empty),
            Err(Error::NotAKernel { .. })
        ));
        let truncated_elf = temp_file("elf", b"\x7fELF\x02\x01\x01\0\0\0");
        assert!(matches!(
            load_kernel(&mem, &truncated_elf),
            Err(Error::Load { .. })
        ));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bogus_bz = temp_file("bz", &bz);
        assert!(matches!(
            load_kernel(&mem, &bogus_bz),
            Err(Error::Load { .. })
        ));
        let missing = Path::new("/nonexistent/outboard/kernel");
        assert!(matches!(
            load_kernel(&mem, missing),
            Err(Error::Open { .. })
        ));
        for p in [text, empty, truncated_elf, bogus_bz] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn cmdline_max_follows_the_setup_header() {
        let mut kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            image_base: 0,
            end: 0x200_0000,
            setup_header: None,
            pvh_entry: None,
        };
        assert_eq!(kernel.cmdline_max(), 2048);
        let hdr = setup_header {
            version: 0x20f,
            cmdline_size: 4095,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        kernel.setup_header = Some(hdr);
        assert_eq!(kernel.cmdline_max(), 4096);
        assert_eq!(kernel.initrd_limit(), 0x8000_0000);
    }
}
