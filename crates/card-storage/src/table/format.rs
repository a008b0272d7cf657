//! Encoding and validation of one copy of the volume table (layout in the parent module's docs).
//!
//! [`decode`] takes bytes from the backing store, which may be torn, stale or hostile: every
//! length and offset is checked before use and every failure is an [`Error`], never a panic.

use super::{Extent, Volume, VolumeTable, DATA_START, EXTENT_ALIGN, MAX_NAME, SECTOR};

/// Magic at byte 0 of each copy.
pub const MAGIC: [u8; 8] = *b"OBCARDVT";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Size of a volume record, not counting its extents.
pub const VOLUME_LEN: usize = 96;
/// Size of an extent record.
pub const EXTENT_LEN: usize = 16;
/// Bytes reserved for each of the two copies.
pub const COPY_SIZE: usize = 512 * 1024;

const CRC_OFFSET: usize = 56;

/// Why a copy of the table was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Table copy is shorter than its header")]
    Short,
    #[error("No volume table magic")]
    Magic,
    #[error("Unsupported table version {0}")]
    Version(u32),
    #[error("Bad header length {0}")]
    HeaderLen(u32),
    #[error("Body length {0} exceeds the copy")]
    BodyLen(u32),
    #[error("Checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("Reserved field is not zero")]
    Reserved,
    #[error("Device size {0} is not a multiple of 1 MiB or smaller than the table area")]
    DeviceSize(u64),
    #[error("Volume record {index} is truncated")]
    TruncatedVolume { index: usize },
    #[error("Volume {index} has an invalid name")]
    Name { index: usize },
    #[error("Duplicate volume name {0}")]
    DuplicateName(String),
    #[error("Duplicate volume id in volume {0}")]
    DuplicateId(String),
    #[error("Volume {0} has size zero or not a multiple of 4 KiB")]
    VolumeSize(String),
    #[error("Volume {name}: extent {index} is unaligned or empty")]
    ExtentAlign { name: String, index: usize },
    #[error("Volume {name}: extent {index} lies outside the data area")]
    ExtentRange { name: String, index: usize },
    #[error("Volume {name}: extents hold {held} bytes, the volume needs {needed}")]
    ExtentTotal {
        name: String,
        held: u64,
        needed: u64,
    },
    #[error("Extents of volumes {a} and {b} overlap")]
    Overlap { a: String, b: String },
    #[error("{0} trailing bytes after the last volume")]
    Trailing(usize),
    #[error("Table too large for its copy ({0} bytes)")]
    TooLarge(usize),
}

/// Serialises `table` into one copy's bytes (header + body, unpadded).
pub fn encode(table: &VolumeTable) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    for v in &table.volumes {
        let mut rec = [0u8; VOLUME_LEN];
        rec[0..16].copy_from_slice(&v.id);
        rec[16..16 + v.name.len()].copy_from_slice(v.name.as_bytes());
        rec[80..88].copy_from_slice(&v.size.to_le_bytes());
        rec[88..92].copy_from_slice(&(v.extents.len() as u32).to_le_bytes());
        body.extend_from_slice(&rec);
        for e in &v.extents {
            body.extend_from_slice(&e.physical.to_le_bytes());
            body.extend_from_slice(&e.length.to_le_bytes());
        }
    }
    let total = HEADER_LEN + body.len();
    if total > COPY_SIZE {
        return Err(Error::TooLarge(total));
    }
    let mut out = vec![0u8; HEADER_LEN];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out[16..24].copy_from_slice(&table.generation.to_le_bytes());
    out[24..32].copy_from_slice(&table.device_size.to_le_bytes());
    out[32..48].copy_from_slice(&table.device_id);
    out[48..52].copy_from_slice(&(table.volumes.len() as u32).to_le_bytes());
    out[52..56].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = checksum(&out);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// crc32c over header and body with the checksum field read as zero.
fn checksum(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &bytes[CRC_OFFSET + 4..])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and fully validates one copy. `bytes` may be longer than the table (padding).
pub fn decode(bytes: &[u8]) -> Result<VolumeTable, Error> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::Short);
    }
    if bytes[0..8] != MAGIC {
        return Err(Error::Magic);
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let header_len = u32_at(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(Error::HeaderLen(header_len));
    }
    let body_len = u32_at(bytes, 52);
    let end = HEADER_LEN
        .checked_add(body_len as usize)
        .filter(|&e| e <= COPY_SIZE && e <= bytes.len())
        .ok_or(Error::BodyLen(body_len))?;
    let bytes = &bytes[..end];
    let stored = u32_at(bytes, CRC_OFFSET);
    let computed = checksum(bytes);
    if stored != computed {
        return Err(Error::Checksum { stored, computed });
    }
    if u32_at(bytes, 60) != 0 {
        return Err(Error::Reserved);
    }
    let generation = u64_at(bytes, 16);
    let device_size = u64_at(bytes, 24);
    if !device_size.is_multiple_of(EXTENT_ALIGN) || device_size < DATA_START {
        return Err(Error::DeviceSize(device_size));
    }
    let mut device_id = [0u8; 16];
    device_id.copy_from_slice(&bytes[32..48]);
    let count = u32_at(bytes, 48) as usize;

    let body = &bytes[HEADER_LEN..];
    let mut at = 0usize;
    // The count is bounded by the body length, so a hostile count cannot make us allocate.
    let mut volumes = Vec::with_capacity(count.min(body.len() / VOLUME_LEN));
    for index in 0..count {
        let rec = body
            .get(at..at + VOLUME_LEN)
            .ok_or(Error::TruncatedVolume { index })?;
        at += VOLUME_LEN;
        let name = parse_name(&rec[16..80]).ok_or(Error::Name { index })?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&rec[0..16]);
        let size = u64_at(rec, 80);
        let n_extents = u32_at(rec, 88) as usize;
        if u32_at(rec, 92) != 0 {
            return Err(Error::Reserved);
        }
        let ext_bytes = n_extents
            .checked_mul(EXTENT_LEN)
            .and_then(|l| body.get(at..at.checked_add(l)?))
            .ok_or(Error::TruncatedVolume { index })?;
        at += ext_bytes.len();
        let extents = ext_bytes
            .chunks_exact(EXTENT_LEN)
            .map(|c| Extent {
                physical: u64_at(c, 0),
                length: u64_at(c, 8),
            })
            .collect();
        volumes.push(Volume {
            name,
            id,
            size,
            extents,
        });
    }
    if at != body.len() {
        return Err(Error::Trailing(body.len() - at));
    }
    let table = VolumeTable {
        generation,
        device_size,
        device_id,
        volumes,
    };
    validate(&table)?;
    Ok(table)
}

fn parse_name(field: &[u8]) -> Option<String> {
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if field[len..].iter().any(|&b| b != 0) {
        return None;
    }
    let name = std::str::from_utf8(&field[..len]).ok()?;
    valid_name(name).then(|| name.to_owned())
}

/// A volume name: 1..=63 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks the invariants that the allocator maintains and the data path relies on: every
/// extent inside the data area, aligned, disjoint from all others, and exactly covering its
/// volume (rounded up to [`EXTENT_ALIGN`]).
pub fn validate(table: &VolumeTable) -> Result<(), Error> {
    if !table.device_size.is_multiple_of(EXTENT_ALIGN) || table.device_size < DATA_START {
        return Err(Error::DeviceSize(table.device_size));
    }
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    for (vi, v) in table.volumes.iter().enumerate() {
        if !valid_name(&v.name) {
            return Err(Error::Name { index: vi });
        }
        if table.volumes[..vi].iter().any(|o| o.name == v.name) {
            return Err(Error::DuplicateName(v.name.clone()));
        }
        if table.volumes[..vi].iter().any(|o| o.id == v.id) {
            return Err(Error::DuplicateId(v.name.clone()));
        }
        if v.size == 0 || v.size % SECTOR != 0 {
            return Err(Error::VolumeSize(v.name.clone()));
        }
        let mut held: u64 = 0;
        for (index, e) in v.extents.iter().enumerate() {
            if e.length == 0 || e.length % EXTENT_ALIGN != 0 || e.physical % EXTENT_ALIGN != 0 {
                return Err(Error::ExtentAlign {
                    name: v.name.clone(),
                    index,
                });
            }
            let end = e.physical.checked_add(e.length);
            if e.physical < DATA_START || end.is_none_or(|end| end > table.device_size) {
                return Err(Error::ExtentRange {
                    name: v.name.clone(),
                    index,
                });
            }
            // Cannot overflow: each extent lies inside the device.
            held += e.length;
            spans.push((e.physical, e.physical + e.length, vi));
        }
        let needed = v.size.next_multiple_of(EXTENT_ALIGN);
        if held != needed {
            return Err(Error::ExtentTotal {
                name: v.name.clone(),
                held,
                needed,
            });
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            let a = table.volumes[w[0].2].name.clone();
            let b = table.volumes[w[1].2].name.clone();
            return Err(Error::Overlap { a, b });
        }
    }
    Ok(())
}
