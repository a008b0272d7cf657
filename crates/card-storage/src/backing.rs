//! The backing store: a block device or a regular file standing in for the card's physical NVMe.
//!
//! It is opened with O_DIRECT so that the host page cache never holds volume data (plaintext or
//! not) and so that FLUSH semantics are those of the device: a write is in the device once it
//! completes, and [`Backing::sync`] (fdatasync) makes it stable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::aligned::{AlignedBuf, ALIGN};

/// Errors from the backing store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open backing store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot get the size of backing store {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Unaligned I/O at offset {offset} length {len}")]
    Unaligned { offset: u64, len: usize },
    #[error("I/O past the end of the backing store: offset {offset} length {len}, size {size}")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("Read at offset {offset} failed")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("Write at offset {offset} failed")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot sync the backing store")]
    Sync(#[source] io::Error),
}

/// An open backing store.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
    mem_align: usize,
}

impl Backing {
    /// Opens `path` read-write with O_DIRECT. The usable size is rounded down to 4 KiB.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let size = device_size(&file).map_err(|source| Error::Size {
            path: path.to_owned(),
            source,
        })?;
        let mem_align = dio_mem_align(&file).unwrap_or(ALIGN);
        Ok(Self {
            file,
            path: path.to_owned(),
            size: size / ALIGN as u64 * ALIGN as u64,
            mem_align,
        })
    }

    /// Alignment O_DIRECT needs of memory addresses and lengths on this store (at most
    /// [`ALIGN`]; [`ALIGN`] where the kernel does not say).
    pub fn mem_align(&self) -> usize {
        self.mem_align
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Usable size in bytes (a multiple of 4 KiB).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file, for io_uring submission.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), Error> {
        if !offset.is_multiple_of(ALIGN as u64) || !len.is_multiple_of(ALIGN) {
            return Err(Error::Unaligned { offset, len });
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (both 4 KiB aligned); a short file reads as zeros.
    pub fn read_at(&self, buf: &mut AlignedBuf, offset: u64) -> Result<(), Error> {
        self.read_into(&mut buf.as_mut_slice()[..], offset)
    }

    /// Reads the first `len` bytes of `buf` (a multiple of 4 KiB).
    pub fn read_prefix(&self, buf: &mut AlignedBuf, len: usize, offset: u64) -> Result<(), Error> {
        self.read_into(&mut buf.as_mut_slice()[..len], offset)
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(Error::Read { offset, source }),
            }
        }
        Ok(())
    }

    /// Writes the first `len` bytes of `buf` (a multiple of 4 KiB) at `offset`.
    pub fn write_at(&self, buf: &AlignedBuf, len: usize, offset: u64) -> Result<(), Error> {
        let data = &buf.as_slice()[..len];
        self.check(offset, len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| Error::Write { offset, source })
    }

    /// Makes every completed write stable (fdatasync).
    pub fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(Error::Sync)
    }
}

/// The store's O_DIRECT memory alignment from statx (STATX_DIOALIGN, Linux 6.1+), if it is a
/// power of two no larger than [`ALIGN`].
fn dio_mem_align(file: &File) -> Option<usize> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call, the path is a valid empty C string (AT_EMPTY_PATH
    // means the fd itself), and `st` is a valid statx the kernel writes into.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let a = st.stx_dio_mem_align as usize;
    (a.is_power_of_two() && a <= ALIGN).then_some(a)
}

/// Size of a regular file, or of a block device (BLKGETSIZE64).
fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the fd is open for the lifetime of the call and `size` is a valid u64 the ioctl
    // writes exactly 8 bytes to.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_round_trip_and_bounds() {
        let dir = crate::testutil::TempDir::new("backing");
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let b = Backing::open(&path).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert!(b.mem_align().is_power_of_two() && b.mem_align() <= ALIGN);
        let mut buf = AlignedBuf::new(8192);
        buf.as_mut_slice().fill(0xa5);
        b.write_at(&buf, 8192, 4096).unwrap();
        b.sync().unwrap();
        let mut back = AlignedBuf::new(8192);
        b.read_at(&mut back, 4096).unwrap();
        assert_eq!(back.as_slice(), buf.as_slice());
        assert!(matches!(
            b.write_at(&buf, 8192, 1),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            b.read_at(&mut back, (1 << 20) - 4096),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read_at(&mut back, u64::MAX - 4095),
            Err(Error::OutOfRange { .. })
        ));
    }
}
