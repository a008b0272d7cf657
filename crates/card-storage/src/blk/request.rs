//! Parsing virtio-blk requests out of descriptor chains.
//!
//! A request is a chain of device-readable descriptors (16-byte header, then data for writes,
//! discards and write-zeroes) followed by device-writable ones (data for reads and GET_ID, then
//! one status byte). Everything here comes from the guest and is hostile: each descriptor is
//! checked against the guest memory map, the header and segment lists are read with bounds
//! checks, and every sector range is checked against the volume before a [`Request`] exists.
//! A chain without a writable byte has nowhere to put a status: it is returned as
//! [`Parsed::NoStatus`] and completed with a used length of 0.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// virtio-blk request types and status codes (virtio 1.2, 5.2.6).
pub mod defs {
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const T_DISCARD: u32 = 11;
    pub const T_WRITE_ZEROES: u32 = 13;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
    /// Length of the GET_ID answer.
    pub const ID_BYTES: usize = 20;
    /// Flag of a discard/write-zeroes segment: the device may unmap.
    pub const F_UNMAP: u32 = 1;
}

use defs::*;

/// virtio-blk sector numbers are always in 512-byte units, whatever the block size.
pub const VIRTIO_SECTOR: u64 = 512;
/// Logical block size of our volumes; every data range must be aligned to it.
pub const BLOCK: u64 = 4096;
/// Largest data transfer of one request (advertised through seg_max × size_max).
pub const MAX_TRANSFER: u64 = 4 << 20;
/// Segments accepted in one discard or write-zeroes request.
pub const MAX_RANGES: usize = 16;
/// Largest range of one discard segment, in bytes.
pub const MAX_DISCARD_BYTES: u64 = 1 << 20;
/// Largest range of one write-zeroes segment, in bytes. The engine serves any size in bounded
/// pieces (fallocate per extent piece, zero writes and encrypted zeros in chunks), so this
/// only caps how long one request may keep the volume busy; what a device advertises may be
/// smaller ([`crate::vhost::BlkConfig`]).
pub const MAX_WRITE_ZEROES_BYTES: u64 = 1 << 30;

/// One guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What a well-formed request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `range` into `data` (guest-writable).
    Read {
        range: Range,
        data: Vec<Segment>,
    },
    /// Write `data` (guest-readable) at `range`.
    Write {
        range: Range,
        data: Vec<Segment>,
    },
    Flush,
    /// Write the device id into `data`, at most `len` bytes.
    GetId {
        data: Vec<Segment>,
        len: u32,
    },
    Discard(Vec<Range>),
    /// Zero `ranges`; `unmap`: every segment allowed the device to deallocate them (reads must
    /// still return zeros).
    WriteZeroes {
        ranges: Vec<Range>,
        unmap: bool,
    },
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The outcome of parsing one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Ok(Request),
    /// Answer with `code` at `status` without doing anything.
    Fail {
        status: GuestAddress,
        code: u8,
    },
    /// No place for a status byte: complete with used length 0.
    NoStatus,
}

/// A raw descriptor as the chain gives it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// Parses the descriptors of one chain for a volume of `capacity` bytes.
pub fn parse<M: GuestMemory>(
    descs: impl IntoIterator<Item = Desc>,
    mem: &M,
    capacity: u64,
) -> Parsed {
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut bad_layout = false;
    for d in descs {
        if d.len == 0 {
            continue;
        }
        // The device writes into writable descriptors and reads the others.
        let access = if d.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr, d.len as usize, access) {
            bad_layout = true;
            continue;
        }
        if d.writable {
            writable.push(Segment {
                addr: d.addr,
                len: d.len,
            });
        } else {
            if !writable.is_empty() {
                bad_layout = true; // readable after writable: not a virtio-blk layout
            }
            readable.push(Segment {
                addr: d.addr,
                len: d.len,
            });
        }
    }
    // The status byte is the last byte of the last writable descriptor.
    let Some(last) = writable.last_mut() else {
        return Parsed::NoStatus;
    };
    let status = GuestAddress(last.addr.0 + (last.len as u64 - 1));
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let fail = |code| Parsed::Fail { status, code };
    if bad_layout {
        return fail(S_IOERR);
    }
    let Some((header, rest)) = split_at(&readable, 16) else {
        return fail(S_IOERR);
    };
    let mut hdr = [0u8; 16];
    if gather(mem, &header, &mut hdr).is_err() {
        return fail(S_IOERR);
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let data_out = total(&rest);
    let data_in = total(&writable);
    let op = match kind {
        T_IN | T_OUT => {
            let (len, data) = if kind == T_IN {
                (data_in, writable)
            } else {
                (data_out, rest)
            };
            let other = if kind == T_IN { data_out } else { data_in };
            if other != 0 {
                return fail(S_IOERR);
            }
            let Some(range) = data_range(sector, len, capacity) else {
                return fail(S_IOERR);
            };
            if kind == T_IN {
                Op::Read { range, data }
            } else {
                Op::Write { range, data }
            }
        }
        T_FLUSH => {
            if data_in != 0 || data_out != 0 {
                return fail(S_IOERR);
            }
            Op::Flush
        }
        T_GET_ID => {
            if data_out != 0 || data_in == 0 {
                return fail(S_IOERR);
            }
            Op::GetId {
                len: data_in.min(ID_BYTES as u64) as u32,
                data: writable,
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if data_in != 0 {
                return fail(S_IOERR);
            }
            match parse_ranges(mem, &rest, data_out, capacity, kind == T_DISCARD) {
                Ok((r, _)) if kind == T_DISCARD => Op::Discard(r),
                Ok((ranges, unmap)) => Op::WriteZeroes { ranges, unmap },
                Err(code) => return fail(code),
            }
        }
        _ => return fail(S_UNSUPP),
    };
    Parsed::Ok(Request { op, status })
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len as u64).sum()
}

/// Splits segments after the first `n` bytes; None if they hold fewer.
fn split_at(segs: &[Segment], n: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = n;
    for s in segs {
        if left == 0 {
            tail.push(*s);
        } else if (s.len as u64) <= left {
            head.push(*s);
            left -= s.len as u64;
        } else {
            let take = left as u32;
            head.push(Segment {
                addr: s.addr,
                len: take,
            });
            tail.push(Segment {
                addr: GuestAddress(s.addr.0 + take as u64),
                len: s.len - take,
            });
            left = 0;
        }
    }
    (left == 0).then_some((head, tail))
}

/// Copies guest bytes from `segs` into `out` (exactly `out.len()` bytes).
pub fn gather<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for s in segs {
        let n = (s.len as usize).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], s.addr)?;
        at += n;
        if at == out.len() {
            break;
        }
    }
    Ok(())
}

/// Copies `data` into guest `segs` in order (at most their total length).
pub fn scatter<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for s in segs {
        if at == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], s.addr)?;
        at += n;
    }
    Ok(())
}

/// The byte range of a data request: 4 KiB aligned, non-empty, bounded, inside the volume.
fn data_range(sector: u64, len: u64, capacity: u64) -> Option<Range> {
    block_range(sector, len, capacity, MAX_TRANSFER)
}

/// A 4 KiB aligned, non-empty range of at most `max` bytes inside the volume.
fn block_range(sector: u64, len: u64, capacity: u64, max: u64) -> Option<Range> {
    let offset = sector.checked_mul(VIRTIO_SECTOR)?;
    let end = offset.checked_add(len)?;
    let ok = len > 0
        && len <= max
        && offset.is_multiple_of(BLOCK)
        && len.is_multiple_of(BLOCK)
        && end <= capacity;
    ok.then_some(Range { offset, len })
}

/// The ranges of a discard or write-zeroes request, and whether every one carries UNMAP.
fn parse_ranges<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    len: u64,
    capacity: u64,
    discard: bool,
) -> Result<(Vec<Range>, bool), u8> {
    if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_RANGES as u64 {
        return Err(S_IOERR);
    }
    let mut raw = vec![0u8; len as usize];
    gather(mem, segs, &mut raw).map_err(|_| S_IOERR)?;
    let mut out = Vec::with_capacity(raw.len() / 16);
    let mut unmap = true;
    for r in raw.chunks_exact(16) {
        let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
        // Unknown flags, or "unmap" on a discard, are not supported (virtio 1.2, 5.2.6.2).
        if flags & !F_UNMAP != 0 || (discard && flags & F_UNMAP != 0) {
            return Err(S_UNSUPP);
        }
        let bytes = sectors as u64 * VIRTIO_SECTOR;
        let max = if discard {
            MAX_DISCARD_BYTES
        } else {
            MAX_WRITE_ZEROES_BYTES
        };
        let range = block_range(sector, bytes, capacity, max).ok_or(S_IOERR)?;
        unmap &= flags & F_UNMAP != 0;
        out.push(range);
    }
    Ok((out, unmap))
}

#[cfg(test)]
mod tests;
