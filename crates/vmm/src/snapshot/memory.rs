//! The guest memory file of a snapshot: the memfd's bytes at the same offsets, written and read
//! sparsely. Only the memfd's data extents (SEEK_DATA/SEEK_HOLE) are visited, and all-zero
//! blocks are skipped, so a 1 GiB guest that touched 20 MiB costs 20 MiB of copying and disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Copy unit: large enough to amortise the syscalls, small enough to stay in cache.
const CHUNK: usize = 1 << 20;

/// Errors of writing and reading a memory file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create memory file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open memory file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Memory file {path} holds {found} bytes, the state says {expected}")]
    Size {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("Cannot copy guest memory")]
    Copy(#[source] std::io::Error),
}

/// Bytes actually copied (data, not holes or zero blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub bytes_copied: u64,
}

/// Next data extent at or after `offset` in `file`: `(start, end)`, or `None` past the last.
fn next_extent(file: &File, offset: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |from: u64, whence| -> std::io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on an fd we own; it only moves the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(r as u64))
    };
    if offset >= size {
        return Ok(None);
    }
    let Some(start) = seek(offset, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    if start >= size {
        return Ok(None);
    }
    let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
    Ok(Some((start, end)))
}

/// Copies the data of `src[0..size]` to the same offsets of `dst`, skipping holes and zero blocks.
fn copy_sparse(src: &File, dst: &File, size: u64) -> std::io::Result<CopyStats> {
    let mut buf = vec![0u8; CHUNK];
    let mut stats = CopyStats::default();
    let mut offset = 0;
    while let Some((start, end)) = next_extent(src, offset, size)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], pos)?;
                stats.bytes_copied += n as u64;
            }
            pos += n as u64;
        }
        offset = end;
    }
    Ok(stats)
}

/// Writes guest RAM (`memfd`, `size` bytes) to a new file at `path`.
pub fn save(memfd: &File, size: u64, path: &Path) -> Result<CopyStats, Error> {
    let create = |source| Error::Create {
        path: path.to_owned(),
        source,
    };
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(create)?;
    dst.set_len(size).map_err(create)?;
    let stats = copy_sparse(memfd, &dst, size).map_err(Error::Copy)?;
    dst.sync_data().map_err(Error::Copy)?;
    Ok(stats)
}

/// Fills guest RAM (`memfd`, freshly created, so all zero) from the memory file at `path`,
/// which must be exactly `size` bytes long.
pub fn load(path: &Path, memfd: &File, size: u64) -> Result<CopyStats, Error> {
    let open = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let src = File::open(path).map_err(open)?;
    let found = src.metadata().map_err(open)?.len();
    if found != size {
        return Err(Error::Size {
            path: path.to_owned(),
            found,
            expected: size,
        });
    }
    copy_sparse(&src, memfd, size).map_err(Error::Copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_sparse_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64u64 << 20;
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(size).unwrap();
        ram.write_all_at(b"first page", 0).unwrap();
        ram.write_all_at(&[0xab; 4096], 40 << 20).unwrap();
        ram.write_all_at(b"last", size - 4).unwrap();
        // A written but all-zero block: data for SEEK_DATA, but nothing to copy.
        ram.write_all_at(&[0; 8192], 20 << 20).unwrap();

        let path = dir.path().join("mem");
        let saved = save(&ram, size, &path).unwrap();
        assert!(saved.bytes_copied <= 3 * CHUNK as u64, "{saved:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let restored = tempfile::tempfile().unwrap();
        restored.set_len(size).unwrap();
        load(&path, &restored, size).unwrap();
        let mut buf = vec![0u8; 4096];
        restored.read_exact_at(&mut buf[..10], 0).unwrap();
        assert_eq!(&buf[..10], b"first page");
        restored.read_exact_at(&mut buf, 40 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        restored.read_exact_at(&mut buf[..4], size - 4).unwrap();
        assert_eq!(&buf[..4], b"last");

        let err = load(&path, &restored, size * 2).unwrap_err();
        assert!(matches!(err, Error::Size { .. }), "{err}");
        assert!(matches!(
            load(&dir.path().join("missing"), &restored, size),
            Err(Error::Open { .. })
        ));
    }
}
