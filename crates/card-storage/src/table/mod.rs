//! The volume table: which byte ranges (extents) of the backing store belong to which volume.
//!
//! It owns the on-disk format, its validation, the extent allocator (first-fit, 1 MiB
//! aligned) and crash-safe updates. The data path never reads it: an attached volume gets a
//! copy of its extent list ([`Volume`]) and maps guest sectors through it.
//!
//! # Layout of the backing store
//!
//! ```text
//!  0           512 KiB        1 MiB                                       device_size
//!  +-------------+-------------+---------------------------------------------+
//!  | table copy 0| table copy 1| data area: extents of volumes, 1 MiB aligned |
//!  +-------------+-------------+---------------------------------------------+
//! ```
//!
//! # One copy (all integers little-endian)
//!
//! ```text
//!  header, 64 bytes
//!   0..8    magic "OBCARDVT"
//!   8..12   version (1)
//!  12..16   header length (64)
//!  16..24   generation: +1 on every update; the valid copy with the highest one is current
//!  24..32   device size in bytes covered by the table (multiple of 1 MiB)
//!  32..48   device id (random at format time)
//!  48..52   number of volumes
//!  52..56   body length in bytes (header + body <= 512 KiB)
//!  56..60   crc32c of header and body, computed with these 4 bytes as zero
//!  60..64   reserved, zero
//!  body: per volume, a 96-byte record followed by its extents
//!   0..16   volume id (random at creation)
//!  16..80   name, UTF-8, 1..=63 bytes of [A-Za-z0-9._-], zero padded
//!  80..88   size in bytes (multiple of 4 KiB)
//!  88..92   number of extents
//!  92..96   flags, zero
//!  then per extent, 16 bytes: physical offset u64, length u64 (both multiples of 1 MiB)
//! ```
//!
//! A volume's extents, concatenated in order, are its address space; they add up to its size
//! rounded up to 1 MiB. No two extents overlap and all lie in the data area. The volume table
//! never holds key material: keys are given at attach time and live in memory only.
//!
//! # Updates
//!
//! ```text
//!   current = copy A (gen g)          copy B: older gen, or garbage
//!        | update(new table)
//!        v
//!   write gen g+1 into copy B  --crash-->  A still valid and newest: recovery picks A
//!        | fdatasync
//!        v
//!   current = copy B (gen g+1)  --crash-->  B valid and newest: recovery picks B
//! ```
//!
//! Recovery reads both copies, drops any that fail validation (torn write, bad checksum,
//! hostile contents) and uses the newest remaining one; if neither is valid it refuses to open.

mod format;
mod store;

pub use format::{decode, encode, valid_name, validate, Error as FormatError, COPY_SIZE};
pub use store::{Error, VolumeStore};

/// Granularity and alignment of extents.
pub const EXTENT_ALIGN: u64 = 1 << 20;
/// Logical block size of every volume.
pub const SECTOR: u64 = 4096;
/// Start of the data area: the two table copies sit below.
pub const DATA_START: u64 = 2 * COPY_SIZE as u64;
/// Longest volume name in bytes.
pub const MAX_NAME: usize = 63;

/// A contiguous byte range of the backing store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset on the backing store.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
}

/// One volume: a name, a size, and the extents that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub id: [u8; 16],
    pub size: u64,
    pub extents: Vec<Extent>,
}

impl Volume {
    /// Maps `len` bytes at volume offset `offset` to physical ranges, or None if any byte lies
    /// outside the volume. Ranges are returned in order, split at extent boundaries.
    pub fn map(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = offset.checked_add(len)?;
        if end > self.size {
            return None;
        }
        let mut out = Vec::new();
        let mut base = 0u64;
        let mut pos = offset;
        for e in &self.extents {
            if pos >= end {
                break;
            }
            let e_end = base + e.length;
            if pos < e_end {
                let take = (end.min(e_end)) - pos;
                out.push((e.physical + (pos - base), take));
                pos += take;
            }
            base = e_end;
        }
        (pos == end).then_some(out)
    }
}

/// The whole table as held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeTable {
    pub generation: u64,
    pub device_size: u64,
    pub device_id: [u8; 16],
    pub volumes: Vec<Volume>,
}

/// Errors from editing the in-memory table.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("Invalid volume name {0:?}")]
    Name(String),
    #[error("Volume {0} already exists")]
    Exists(String),
    #[error("No volume named {0}")]
    NotFound(String),
    #[error("Size {0} is zero or not a multiple of 4 KiB")]
    Size(u64),
    #[error("Volume {name} is {current} bytes; cannot grow to {requested}")]
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },
    #[error("Not enough free space: need {needed} bytes, {free} free")]
    NoSpace { needed: u64, free: u64 },
    #[error("Volume table is full")]
    Full(#[source] format::Error),
}

impl VolumeTable {
    /// An empty table for a device of `device_size` bytes (rounded down to 1 MiB).
    pub fn empty(device_size: u64, device_id: [u8; 16]) -> Self {
        Self {
            generation: 0,
            device_size: device_size / EXTENT_ALIGN * EXTENT_ALIGN,
            device_id,
            volumes: Vec::new(),
        }
    }

    /// Looks a volume up by name.
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Free ranges of the data area, in ascending order.
    pub fn free_ranges(&self) -> Vec<(u64, u64)> {
        let mut used: Vec<Extent> = self
            .volumes
            .iter()
            .flat_map(|v| v.extents.iter().copied())
            .collect();
        used.sort_unstable_by_key(|e| e.physical);
        let mut free = Vec::new();
        let mut pos = DATA_START;
        for e in used {
            if e.physical > pos {
                free.push((pos, e.physical - pos));
            }
            pos = pos.max(e.physical + e.length);
        }
        if self.device_size > pos {
            free.push((pos, self.device_size - pos));
        }
        free
    }

    /// Bytes free for new extents.
    pub fn free_bytes(&self) -> u64 {
        self.free_ranges().iter().map(|r| r.1).sum()
    }

    /// First-fit allocation of `bytes` (a multiple of [`EXTENT_ALIGN`]) as one or more extents.
    fn allocate(&self, bytes: u64) -> Result<Vec<Extent>, EditError> {
        let free = self.free_ranges();
        // Prefer one contiguous range (first fit); otherwise fill gaps in address order.
        if let Some(&(start, _)) = free.iter().find(|r| r.1 >= bytes) {
            return Ok(vec![Extent {
                physical: start,
                length: bytes,
            }]);
        }
        let total: u64 = free.iter().map(|r| r.1).sum();
        if total < bytes {
            return Err(EditError::NoSpace {
                needed: bytes,
                free: total,
            });
        }
        let mut out = Vec::new();
        let mut left = bytes;
        for (start, len) in free {
            let take = len.min(left);
            out.push(Extent {
                physical: start,
                length: take,
            });
            left -= take;
            if left == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn check_fits(&self) -> Result<(), EditError> {
        encode(self).map(|_| ()).map_err(EditError::Full)
    }

    /// Adds a volume of `size` bytes.
    pub fn create(&mut self, name: &str, size: u64, id: [u8; 16]) -> Result<&Volume, EditError> {
        if !valid_name(name) {
            return Err(EditError::Name(name.to_owned()));
        }
        if self.volume(name).is_some() {
            return Err(EditError::Exists(name.to_owned()));
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(EditError::Size(size));
        }
        let extents = self.allocate(size.next_multiple_of(EXTENT_ALIGN))?;
        self.volumes.push(Volume {
            name: name.to_owned(),
            id,
            size,
            extents,
        });
        if let Err(e) = self.check_fits() {
            self.volumes.pop();
            return Err(e);
        }
        Ok(self.volumes.last().expect("just pushed"))
    }

    /// Grows a volume to `size` bytes; new space comes from new or extended extents.
    pub fn grow(&mut self, name: &str, size: u64) -> Result<&Volume, EditError> {
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(EditError::Size(size));
        }
        let idx = self
            .volumes
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| EditError::NotFound(name.to_owned()))?;
        let current = self.volumes[idx].size;
        if size < current {
            return Err(EditError::Shrink {
                name: name.to_owned(),
                current,
                requested: size,
            });
        }
        let have = current.next_multiple_of(EXTENT_ALIGN);
        let need = size.next_multiple_of(EXTENT_ALIGN);
        let before = self.volumes[idx].clone();
        if need > have {
            let extra = self.allocate(need - have)?;
            let v = &mut self.volumes[idx];
            for e in extra {
                match v.extents.last_mut() {
                    Some(last) if last.physical + last.length == e.physical => {
                        last.length += e.length
                    }
                    _ => v.extents.push(e),
                }
            }
        }
        self.volumes[idx].size = size;
        if let Err(e) = self.check_fits() {
            self.volumes[idx] = before;
            return Err(e);
        }
        Ok(&self.volumes[idx])
    }

    /// Removes a volume, freeing its extents.
    pub fn delete(&mut self, name: &str) -> Result<Volume, EditError> {
        let idx = self
            .volumes
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| EditError::NotFound(name.to_owned()))?;
        Ok(self.volumes.remove(idx))
    }
}

#[cfg(test)]
mod tests;
