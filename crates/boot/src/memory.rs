//! Guest RAM: one memfd, mapped `MAP_SHARED | MAP_NORESERVE` once per RAM range of the layout.
//!
//! The memfd is kept (not just the mappings) because later stages hand it to vhost-user backends
//! and to a successor VMM, which map the same pages. Nothing here touches guest pages: the host
//! allocates them when the guest (or a loader) first writes them.
//!
//! A size the host can't provide is refused up front against `MemAvailable + SwapFree`, rather
//! than left to fail later as a SIGBUS in the guest or an OOM kill.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use outboard_hypervisor::{MemorySlot, Vm};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::layout::{self, RamRange};

/// Errors of creating and registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Guest memory of {requested_mib} MiB is below the minimum of {minimum_mib} MiB")]
    TooSmall {
        requested_mib: u64,
        minimum_mib: u64,
    },
    #[error("Guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error(
        "Guest memory of {requested_mib} MiB exceeds what the host can give ({available_mib} MiB available)"
    )]
    TooLarge {
        requested_mib: u64,
        available_mib: u64,
    },
    #[error("Cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("Cannot size the guest memory file to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot map guest memory at {guest_addr:#x} ({size} bytes)")]
    Mmap {
        guest_addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("Invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("Cannot register guest memory with KVM")]
    Register(#[source] outboard_hypervisor::vm::Error),
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    file: Arc<File>,
    size: u64,
    ranges: Vec<RamRange>,
    memory: GuestMemoryMmap,
}

/// Bytes the host can still give to a new guest: `MemAvailable + SwapFree` from /proc/meminfo.
pub fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_available(&meminfo)
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    let available = field("MemAvailable:")?;
    Some((available + field("SwapFree:").unwrap_or(0)) * 1024)
}

fn memfd_create(name: &CStr) -> Result<File, std::io::Error> {
    // SAFETY: `name` is a valid NUL-terminated string; the call creates a new fd or fails.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(File::from(owned))
}

impl GuestRam {
    /// Checks `size` against the host and maps it (lazily: no page is touched).
    pub fn new(size: u64) -> Result<Self, Error> {
        Self::with_available(size, host_available_bytes())
    }

    fn with_available(size: u64, available: Option<u64>) -> Result<Self, Error> {
        if size < layout::MIN_MEMORY {
            return Err(Error::TooSmall {
                requested_mib: size >> 20,
                minimum_mib: layout::MIN_MEMORY >> 20,
            });
        }
        if size & 0xfff != 0 {
            return Err(Error::Unaligned(size));
        }
        if let Some(available) = available {
            if size > available {
                return Err(Error::TooLarge {
                    requested_mib: size >> 20,
                    available_mib: available >> 20,
                });
            }
        }
        let file = memfd_create(c"outboard-guest-ram").map_err(Error::Memfd)?;
        file.set_len(size)
            .map_err(|source| Error::Truncate { size, source })?;
        Self::map(Arc::new(file), size)
    }

    /// Maps guest RAM that already lives in `memfd` (handed over by a predecessor VMM): the
    /// same pages, no copy. The file must be exactly `size` bytes.
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, Error> {
        if size < layout::MIN_MEMORY {
            return Err(Error::TooSmall {
                requested_mib: size >> 20,
                minimum_mib: layout::MIN_MEMORY >> 20,
            });
        }
        if size & 0xfff != 0 {
            return Err(Error::Unaligned(size));
        }
        let found = memfd.metadata().map_err(Error::Memfd)?.len();
        if found != size {
            return Err(Error::Truncate {
                size,
                source: std::io::Error::other(format!("the memory file holds {found} bytes")),
            });
        }
        Self::map(Arc::new(memfd), size)
    }

    fn map(file: Arc<File>, size: u64) -> Result<Self, Error> {
        let ranges = layout::ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for range in &ranges {
            let mapping: MmapRegion = MmapRegionBuilder::new(range.size as usize)
                .with_file_offset(FileOffset::from_arc(file.clone(), range.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| Error::Mmap {
                    guest_addr: range.guest_addr,
                    size: range.size,
                    source,
                })?;
            // Overflow is impossible: ranges end below 2^64 by construction of the layout.
            if let Some(region) = GuestRegionMmap::new(mapping, GuestAddress(range.guest_addr)) {
                regions.push(region);
            }
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)?;
        Ok(GuestRam {
            file,
            size,
            ranges,
            memory,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd holding all of guest RAM (ranges at the file offsets of [`GuestRam::ranges`]).
    pub fn memfd(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Makes every RAM range a KVM memory slot.
    pub fn register(&self, vm: &Vm) -> Result<(), Error> {
        for region in self.memory.iter() {
            let mapping = region.get_mmap();
            let slot = MemorySlot {
                guest_phys_addr: region.start_addr().0,
                size: region.len(),
                host_addr: mapping.as_ptr() as u64,
            };
            // SAFETY: the slot covers exactly the mapping `mapping` owns, and the VM keeps that
            // Arc (hence the mapping) alive for as long as it exists.
            unsafe { vm.add_memory_slot(slot, mapping) }.map_err(Error::Register)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn parses_meminfo() {
        let meminfo = "MemTotal: 100 kB\nMemAvailable:   2048 kB\nSwapFree: 1024 kB\n";
        assert_eq!(parse_available(meminfo), Some(3072 * 1024));
        assert_eq!(parse_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn refuses_sizes_the_host_cannot_give() {
        let err = GuestRam::with_available(64 << 40, Some(8 << 30)).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { requested_mib, available_mib: 8192 } if requested_mib == 64 << 20)
        );
        assert!(err.to_string().contains("exceeds what the host can give"));
        assert!(matches!(
            GuestRam::with_available(1 << 20, None),
            Err(Error::TooSmall { .. })
        ));
        assert!(matches!(
            GuestRam::with_available((16 << 20) + 1, None),
            Err(Error::Unaligned(_))
        ));
    }

    #[test]
    fn ram_is_shared_with_the_memfd() {
        let ram = GuestRam::with_available(32 << 20, None).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(ram.memfd(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memfd().metadata().unwrap().len(), 32 << 20);
    }

    #[test]
    fn a_handed_over_memfd_maps_the_same_pages() {
        let ram = GuestRam::with_available(32 << 20, None).unwrap();
        ram.memory()
            .write_obj(0x1234_5678_u32, GuestAddress(0x20_0000))
            .unwrap();
        let successor = GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), 32 << 20).unwrap();
        let value: u32 = successor
            .memory()
            .read_obj(GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(value, 0x1234_5678);
        // Writes by the successor are seen by the predecessor: one set of pages.
        successor
            .memory()
            .write_obj(7u32, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(
            ram.memory()
                .read_obj::<u32>(GuestAddress(0x30_0000))
                .unwrap(),
            7
        );
        let wrong = GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), 64 << 20);
        assert!(matches!(wrong, Err(Error::Truncate { .. })));
    }
}
