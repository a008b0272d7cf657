//! Parsers for everything the Outboard test guest reads from its VMM: the boot information (Linux
//! `boot_params` or PVH `hvm_start_info`), the e820 memory map, the kernel command line, the ACPI
//! tables and the `_S5_` object of the DSDT, and the kvmclock (pvclock) arithmetic; and the pure
//! logic of the PCI and virtio drivers (configuration space, ring indices, block patterns, frames,
//! vsock headers).
//!
//! All of it is plain code over byte slices, `no_std` and free of `unsafe`, so that the host can
//! unit-test and fuzz it: the guest supplies the bytes through [`PhysMem`]. The VMM is hostile
//! input: every length and count is bounded, nothing reads past a table, and bad input is an
//! [`Error`](acpi::Error) value, never a panic.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod acpi;
pub mod aml;
pub mod bootinfo;
mod bytes;
pub mod cmdline;
pub mod e820;
pub mod netframe;
pub mod pattern;
pub mod pci;
pub mod pvclock;
pub mod virtq;
pub mod vsock;

/// Read access to guest-physical memory.
pub trait PhysMem {
    /// The bytes at guest-physical `[addr, addr + len)`, or `None` where that range cannot be read
    /// (outside the mapped range, address zero, overflow).
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// A flat memory image starting at a base address: the host-side [`PhysMem`] for tests and fuzzing.
#[derive(Debug)]
pub struct FlatMem<'a> {
    /// Guest-physical address of `bytes[0]`.
    pub base: u64,
    /// The memory contents.
    pub bytes: &'a [u8],
}

impl PhysMem for FlatMem<'_> {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        if addr == 0 {
            return None;
        }
        let start = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }
}
