//! Measuring straight from guest memory, after the loader placed the boot items there.
//!
//! "What is measured is what runs": outboard-vmm loads the kernel, initrd and command line into
//! guest memory, then (vCPUs not started) reads them back through these helpers, so a loader bug
//! or a tampered copy shows in the PCRs. Generic over vm-memory's [`GuestMemory`]; reads go in
//! 1 MiB chunks, so no second copy of a large initrd is held.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::kernel::KernelLayout;
use crate::measure::{Measurements, PendingEvent};
use crate::pcr::PcrIndex;

/// A command line longer than this is refused (Linux allows 2 KiB on x86; leave room).
pub const MAX_CMDLINE: u64 = 64 * 1024;
const CHUNK: usize = 1 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Guest range {addr:#x}+{len:#x} overflows the address space")]
    Overflow { addr: u64, len: u64 },
    #[error("Cannot read guest memory at {addr:#x}")]
    Read {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("Command line of {0} bytes exceeds {MAX_CMDLINE}")]
    CmdlineTooLong(u64),
}

/// Feeds guest memory `[addr, addr + len)` into `event`.
pub fn hash_guest_range<M: GuestMemory + ?Sized>(
    event: &mut PendingEvent,
    mem: &M,
    addr: GuestAddress,
    len: u64,
) -> Result<(), Error> {
    addr.0
        .checked_add(len)
        .ok_or(Error::Overflow { addr: addr.0, len })?;
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let at = addr.0 + done;
        mem.read_slice(&mut buf[..n], GuestAddress(at))
            .map_err(|source| Error::Read { addr: at, source })?;
        event.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

impl Measurements {
    /// PCR2 from guest memory: the regions of `layout` (parsed from the kernel file that was
    /// loaded) at `base` + their guest offset. `base` is the loader's `kernel_load` for bzImage
    /// and raw images, and its `kernel_offset` (or 0) for ELF.
    pub fn measure_kernel_in_guest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &KernelLayout,
        base: GuestAddress,
    ) -> Result<(), Error> {
        let e = self.kernel_event(mem, layout, base)?;
        self.record(e);
        Ok(())
    }

    /// PCR3 from guest memory: the initrd at `addr`, `len` bytes (the file size).
    pub fn measure_initrd_in_guest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), Error> {
        let e = self.initrd_event(mem, addr, len)?;
        self.record(e);
        Ok(())
    }

    /// PCR2 and PCR3 at once: the initrd is hashed on a second thread while this one hashes
    /// the kernel (SHA-384 is serial, so two items are the parallelism there is; with a stock
    /// kernel and initramfs this takes the time of the larger one instead of their sum). The
    /// events are recorded kernel first, so the log is the same as measuring one after the other.
    pub fn measure_kernel_and_initrd_in_guest<M: GuestMemory + Sync + ?Sized>(
        &mut self,
        mem: &M,
        layout: &KernelLayout,
        base: GuestAddress,
        initrd: Option<(GuestAddress, u64)>,
    ) -> Result<(), Error> {
        let (kernel, initrd) = std::thread::scope(|scope| {
            let this = &*self;
            let initrd =
                initrd.map(|(addr, len)| scope.spawn(move || this.initrd_event(mem, addr, len)));
            let kernel = this.kernel_event(mem, layout, base);
            // A panic while hashing is a bug; surface it on this thread.
            let initrd = initrd.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (kernel, initrd)
        });
        let kernel = kernel?;
        let initrd = initrd.transpose()?;
        self.record(kernel);
        if let Some(e) = initrd {
            self.record(e);
        }
        Ok(())
    }

    fn kernel_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        layout: &KernelLayout,
        base: GuestAddress,
    ) -> Result<PendingEvent, Error> {
        let mut e = self.begin(PcrIndex::Kernel, "kernel");
        for r in &layout.regions {
            let addr = base.0.checked_add(r.guest_offset).ok_or(Error::Overflow {
                addr: base.0,
                len: r.guest_offset,
            })?;
            hash_guest_range(&mut e, mem, GuestAddress(addr), r.len)?;
        }
        Ok(e)
    }

    fn initrd_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: u64,
    ) -> Result<PendingEvent, Error> {
        let mut e = self.begin(PcrIndex::Initrd, "initrd");
        hash_guest_range(&mut e, mem, addr, len)?;
        Ok(e)
    }

    /// PCR4 from guest memory: `len` bytes at `addr`, a trailing NUL excluded.
    pub fn measure_cmdline_in_guest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), Error> {
        if len > MAX_CMDLINE {
            return Err(Error::CmdlineTooLong(len));
        }
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, addr)
            .map_err(|source| Error::Read {
                addr: addr.0,
                source,
            })?;
        self.measure_cmdline(&buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn chunked_guest_reads_equal_the_bytes_and_bad_ranges_fail() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let data: Vec<u8> = (0..(2 << 20) + 17).map(|i| (i % 253) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
        let mut a = Measurements::new();
        a.measure_initrd_in_guest(&mem, GuestAddress(0x1000), data.len() as u64)
            .unwrap();
        let mut b = Measurements::new();
        b.measure_initrd(&data);
        assert_eq!(a.pcrs(), b.pcrs());

        mem.write_slice(b"console=ttyS0\0", GuestAddress(0x20000))
            .unwrap();
        a.measure_cmdline_in_guest(&mem, GuestAddress(0x20000), 14)
            .unwrap();
        b.measure_cmdline(b"console=ttyS0");
        assert_eq!(a.pcrs(), b.pcrs());

        let mut m = Measurements::new();
        assert!(matches!(
            m.measure_initrd_in_guest(&mem, GuestAddress(4 << 20), 1),
            Err(Error::Read { .. })
        ));
        assert!(matches!(
            m.measure_initrd_in_guest(&mem, GuestAddress(u64::MAX), 2),
            Err(Error::Overflow { .. })
        ));
        assert!(m
            .measure_cmdline_in_guest(&mem, GuestAddress(0), 1 << 20)
            .is_err());
        // Failed measurements extend nothing.
        assert!(m.event_log().events.is_empty());
        assert!(matches!(
            m.measure_kernel_and_initrd_in_guest(
                &mem,
                &KernelLayout {
                    format: crate::kernel::KernelFormat::Raw,
                    regions: Vec::new(),
                },
                GuestAddress(0),
                Some((GuestAddress(4 << 20), 1))
            ),
            Err(Error::Read { .. })
        ));
        assert!(m.event_log().events.is_empty());
    }

    #[test]
    fn parallel_kernel_and_initrd_equal_one_after_the_other() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let kernel: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 241) as u8).collect();
        let initrd: Vec<u8> = (0..(2 << 20) + 9).map(|i| (i % 239) as u8).collect();
        mem.write_slice(&kernel, GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&initrd, GuestAddress(0x50_0000)).unwrap();
        let layout = KernelLayout {
            format: crate::kernel::KernelFormat::Raw,
            regions: vec![crate::kernel::KernelRegion {
                file_offset: 0,
                guest_offset: 0,
                len: kernel.len() as u64,
            }],
        };
        let initrd_at = Some((GuestAddress(0x50_0000), initrd.len() as u64));
        let mut serial = Measurements::new();
        serial
            .measure_kernel_in_guest(&mem, &layout, GuestAddress(0x10_0000))
            .unwrap();
        serial
            .measure_initrd_in_guest(&mem, GuestAddress(0x50_0000), initrd.len() as u64)
            .unwrap();
        let mut parallel = Measurements::new();
        parallel
            .measure_kernel_and_initrd_in_guest(&mem, &layout, GuestAddress(0x10_0000), initrd_at)
            .unwrap();
        assert_eq!(serial.pcrs(), parallel.pcrs());
        assert_eq!(serial.event_log(), parallel.event_log());
    }
}
