//! The volume table on its backing store: format, recovery and crash-safe commits.

use std::path::Path;

use super::format::{self, COPY_SIZE};
use super::{EditError, Volume, VolumeTable, DATA_START};
use crate::aligned::{AlignedBuf, ALIGN};
use crate::backing::{self, Backing};

/// Errors from opening or updating a volume store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Backing store I/O failed")]
    Backing(#[from] backing::Error),
    #[error("Backing store of {0} bytes is too small for a volume table")]
    TooSmall(u64),
    #[error("No valid volume table (copy 0: {copy0}; copy 1: {copy1})")]
    NoTable {
        copy0: format::Error,
        copy1: format::Error,
    },
    #[error("Table covers {table} bytes but the backing store has only {device}")]
    DeviceShrank { table: u64, device: u64 },
    #[error("Cannot update the volume table")]
    Edit(#[from] EditError),
    #[error("Cannot encode the volume table")]
    Encode(#[source] format::Error),
    #[error("Cannot read random bytes")]
    Random(#[source] std::io::Error),
}

/// A backing store with its current volume table.
#[derive(Debug)]
pub struct VolumeStore {
    backing: Backing,
    table: VolumeTable,
    /// Which copy (0 or 1) holds `table`; the next commit writes the other one.
    current: usize,
}

fn copy_offset(copy: usize) -> u64 {
    (copy * COPY_SIZE) as u64
}

/// 16 random bytes from the kernel.
pub(crate) fn random_id() -> Result<[u8; 16], Error> {
    let mut id = [0u8; 16];
    let mut done = 0;
    while done < id.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `id`, which lives
        // across the call.
        let n = unsafe { libc::getrandom(id[done..].as_mut_ptr().cast(), id.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Random(e));
            }
            continue;
        }
        done += n as usize;
    }
    Ok(id)
}

impl VolumeStore {
    /// Writes an empty table over `path` (both copies), destroying any volumes on it.
    pub fn format(path: &Path) -> Result<Self, Error> {
        let backing = Backing::open(path)?;
        if backing.size() < DATA_START + super::EXTENT_ALIGN {
            return Err(Error::TooSmall(backing.size()));
        }
        let table = VolumeTable::empty(backing.size(), random_id()?);
        let mut store = Self {
            backing,
            table,
            current: 1,
        };
        // Invalidate copy 1 first, so an interrupted format leaves no old table behind it.
        let zero = AlignedBuf::new(ALIGN);
        store.backing.write_at(&zero, ALIGN, copy_offset(1))?;
        store.commit(store.table.clone())?;
        Ok(store)
    }

    /// Opens an existing store, recovering the newest valid copy of the table.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let backing = Backing::open(path)?;
        if backing.size() < DATA_START {
            return Err(Error::TooSmall(backing.size()));
        }
        let mut buf = AlignedBuf::new(COPY_SIZE);
        let mut copies = Vec::with_capacity(2);
        for copy in 0..2 {
            backing.read_at(&mut buf, copy_offset(copy))?;
            copies.push(format::decode(buf.as_slice()));
        }
        let mut copies = copies.into_iter();
        let (c0, c1) = (
            copies.next().expect("two copies"),
            copies.next().expect("two copies"),
        );
        let (table, current) = match (c0, c1) {
            (Ok(a), Ok(b)) if b.generation > a.generation => (b, 1),
            (Ok(a), _) => (a, 0),
            (Err(_), Ok(b)) => (b, 1),
            (Err(copy0), Err(copy1)) => return Err(Error::NoTable { copy0, copy1 }),
        };
        if table.device_size > backing.size() {
            return Err(Error::DeviceShrank {
                table: table.device_size,
                device: backing.size(),
            });
        }
        Ok(Self {
            backing,
            table,
            current,
        })
    }

    /// The current table.
    pub fn table(&self) -> &VolumeTable {
        &self.table
    }

    /// The backing store.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Which copy is current (for tests of recovery).
    pub fn current_copy(&self) -> usize {
        self.current
    }

    /// Makes `next` current: writes it with the next generation into the other copy, then
    /// fdatasyncs. Until the sync returns, the previous copy stays the newest valid one.
    fn commit(&mut self, mut next: VolumeTable) -> Result<(), Error> {
        next.generation = self.table.generation + 1;
        let bytes = format::encode(&next).map_err(Error::Encode)?;
        let target = 1 - self.current;
        let len = bytes.len().next_multiple_of(ALIGN);
        let mut buf = AlignedBuf::new(len);
        buf.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
        self.backing.write_at(&buf, len, copy_offset(target))?;
        self.backing.sync()?;
        self.table = next;
        self.current = target;
        Ok(())
    }

    fn edit<T>(
        &mut self,
        f: impl FnOnce(&mut VolumeTable) -> Result<T, EditError>,
    ) -> Result<T, Error> {
        let mut next = self.table.clone();
        let out = f(&mut next)?;
        self.commit(next)?;
        Ok(out)
    }

    /// Creates a volume of `size` bytes (a multiple of 4 KiB).
    pub fn create(&mut self, name: &str, size: u64) -> Result<Volume, Error> {
        let id = random_id()?;
        self.edit(|t| t.create(name, size, id).cloned())
    }

    /// Grows a volume to `size` bytes.
    pub fn grow(&mut self, name: &str, size: u64) -> Result<Volume, Error> {
        self.edit(|t| t.grow(name, size).cloned())
    }

    /// Deletes a volume; its extents become free.
    pub fn delete(&mut self, name: &str) -> Result<Volume, Error> {
        self.edit(|t| t.delete(name))
    }

    /// All volumes.
    pub fn list(&self) -> &[Volume] {
        &self.table.volumes
    }
}
