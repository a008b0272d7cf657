//! WRITE_ZEROES: how an engine zeroes volume ranges.
//!
//! - Plain volumes ask the store to do it, per physical extent piece, with an io_uring
//!   fallocate: `PUNCH_HOLE|KEEP_SIZE` when every segment allowed UNMAP (the store deallocates,
//!   reads still return zeros), otherwise `ZERO_RANGE|KEEP_SIZE` (zeroed, still allocated). A
//!   store that refuses a mode (EOPNOTSUPP or EINVAL: tmpfs has no ZERO_RANGE, some block devices
//!   neither) is remembered in the device ([`ZeroSupport`], shared by the workers serving its
//!   queues), and the request is redone with the next method; the last one writes zeros from
//!   one shared, never-written zero buffer, [`PLAIN_ROUND`] bytes at a time (a segment may be
//!   up to 1 GiB: its writes go in rounds rather than flooding the ring).
//! - Encrypted volumes write encrypted zeros (a hole would decrypt to garbage), in chunks of at
//!   most [`ZERO_CHUNK`] bytes one after the other, so one request never holds more than one
//!   chunk of bounce buffer however large its ranges.
//!
//! ```text
//!   Punch ──refused──► ZeroRange ──refused──► Write (plain,       Write (encrypted): chunk by
//!     │                   │                     │ round by round) chunk until no range is left
//!     └──────── done ─────┴──────── done ───────┴──► finish
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

use io_uring::{opcode, types};
use vm_memory::GuestMemory;

use super::{Engine, ZERO_CHUNK};
use crate::aligned::AlignedBuf;
use crate::blk::request::{Op, Range};
use crate::xts::SECTOR;

/// How a WRITE_ZEROES request is being carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// fallocate PUNCH_HOLE|KEEP_SIZE.
    Punch,
    /// fallocate ZERO_RANGE|KEEP_SIZE.
    ZeroRange,
    /// Writes of zeros (plain) or of encrypted zeros.
    Write,
}

/// Most bytes of plain zero writes one request has in flight (16 writes of the shared
/// [`ZERO_CHUNK`] zero buffer).
pub const PLAIN_ROUND: u64 = 16 * ZERO_CHUNK as u64;

const NO_PUNCH: u8 = 1;
const NO_ZERO_RANGE: u8 = 2;

/// The fallocate modes a device's store refused, learned once and shared by its workers (a
/// field of the device, so a new attachment learns afresh).
#[derive(Debug, Default)]
pub(crate) struct ZeroSupport(AtomicU8);

impl ZeroSupport {
    fn refused(&self, bit: u8) -> bool {
        self.0.load(Ordering::Relaxed) & bit != 0
    }

    /// Records a refusal; true if it is news.
    fn refuse(&self, bit: u8) -> bool {
        self.0.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    /// The method for a plain-volume request, given what the store accepts.
    fn method(&self, unmap: bool) -> Method {
        if unmap && !self.refused(NO_PUNCH) {
            Method::Punch
        } else if !self.refused(NO_ZERO_RANGE) {
            Method::ZeroRange
        } else {
            Method::Write
        }
    }

    /// Whether a plain volume's request is done by the store (fallocate) rather than written.
    pub(crate) fn offloaded(&self, unmap: bool) -> bool {
        self.method(unmap) != Method::Write
    }

    /// Records that `m` was refused; true if it is news.
    fn refuse_method(&self, m: Method) -> bool {
        match m {
            Method::Punch => self.refuse(NO_PUNCH),
            Method::ZeroRange => self.refuse(NO_ZERO_RANGE),
            Method::Write => false,
        }
    }

    /// Makes the store look as if it refused every fallocate mode (tests of the fallback).
    #[cfg(test)]
    pub fn refuse_all(&self) {
        self.refuse(NO_PUNCH | NO_ZERO_RANGE);
    }

    /// Whether the store was found to refuse ZERO_RANGE.
    #[cfg(test)]
    pub fn refused_zero_range(&self) -> bool {
        self.refused(NO_ZERO_RANGE)
    }
}

/// A WRITE_ZEROES request in progress.
#[derive(Debug)]
pub struct ZeroJob {
    method: Method,
    /// Ranges not pushed yet.
    left: Vec<Range>,
    /// The current method was refused by some piece: redo the request with the next one.
    refused: bool,
}

impl ZeroJob {
    /// Takes a failed piece's result: true if it is the store refusing the fallocate mode
    /// (the request goes on with another method), false if it is a real failure.
    pub fn refusal(&mut self, res: i32) -> bool {
        let refusal = matches!(self.method, Method::Punch | Method::ZeroRange)
            && (res == -libc::EOPNOTSUPP || res == -libc::EINVAL);
        self.refused |= refusal;
        refusal
    }
}

/// The ranges of a WRITE_ZEROES request.
fn ranges_of(op: &Op) -> &[Range] {
    match op {
        Op::WriteZeroes { ranges, .. } => ranges,
        _ => &[],
    }
}

/// Takes up to `budget` bytes of ranges from the front of `left`, splitting a range if needed.
fn take_chunk(left: &mut Vec<Range>, budget: u64) -> Vec<Range> {
    let mut out = Vec::new();
    let mut room = budget;
    while room > 0 && !left.is_empty() {
        let r = left[0];
        if r.len <= room {
            out.push(r);
            room -= r.len;
            left.remove(0);
        } else {
            out.push(Range {
                offset: r.offset,
                len: room,
            });
            left[0] = Range {
                offset: r.offset + room,
                len: r.len - room,
            };
            room = 0;
        }
    }
    out
}

impl Engine {
    /// Starts a WRITE_ZEROES request (slot `idx` holds it).
    pub(super) fn dispatch_zeroes<M: GuestMemory>(&mut self, mem: &M, idx: usize) {
        let encrypted = self.xts.is_some();
        let support = self.dev.zero_support();
        let Some(slot) = self.slots[idx].as_mut() else {
            return;
        };
        let Op::WriteZeroes { ranges, unmap } = &slot.req.op else {
            return;
        };
        let method = if encrypted {
            Method::Write
        } else {
            support.method(*unmap)
        };
        slot.zeroing = Some(ZeroJob {
            method,
            left: ranges.clone(),
            refused: false,
        });
        self.zeroes_progress(mem, idx);
    }

    /// Moves a WRITE_ZEROES request on once its pieces so far are done: retries with the next
    /// method after a refusal, pushes the next chunk, or finishes.
    pub(super) fn zeroes_progress<M: GuestMemory>(&mut self, mem: &M, idx: usize) {
        loop {
            let encrypted = self.xts.is_some();
            let Some(slot) = self.slots[idx].as_mut() else {
                return;
            };
            let Some(job) = slot.zeroing.as_mut() else {
                return self.finish(mem, idx);
            };
            if slot.failed {
                return self.finish(mem, idx);
            }
            if job.refused {
                let support = self.dev.zero_support();
                let news = support.refuse_method(job.method);
                let unmap = matches!(slot.req.op, Op::WriteZeroes { unmap: true, .. });
                let next = support.method(unmap);
                if news {
                    log::info!(
                        "{:?}: the store refuses {:?} for WRITE_ZEROES, using {next:?}",
                        self.dev,
                        job.method
                    );
                }
                job.method = next;
                job.refused = false;
                job.left = ranges_of(&slot.req.op).to_vec();
            }
            if job.left.is_empty() {
                return self.finish(mem, idx);
            }
            let method = job.method;
            // fallocate is one SQE per extent piece whatever the length: all at once. Plain
            // zero writes share one read-only buffer, so a round holds several; an encrypted
            // chunk needs its own ciphertext.
            let chunk = match method {
                Method::Punch | Method::ZeroRange => std::mem::take(&mut job.left),
                Method::Write if encrypted => take_chunk(&mut job.left, ZERO_CHUNK as u64),
                Method::Write => take_chunk(&mut job.left, PLAIN_ROUND),
            };
            let pushed = match method {
                Method::Punch | Method::ZeroRange => self.push_fallocate(idx, &chunk, method),
                Method::Write if encrypted => self.push_encrypted_zeros(idx, &chunk),
                Method::Write => self.push_plain_zeros(idx, &chunk),
            };
            if !pushed {
                if let Some(slot) = self.slots[idx].as_mut() {
                    slot.failed = true;
                }
            }
            if self.slots[idx].as_ref().is_some_and(|s| s.pending > 0) {
                return;
            }
        }
    }

    /// The physical pieces of `ranges`, or None if one is not mapped (the parser checked them
    /// against the volume, whose extents cover it; a miss fails the request).
    fn pieces_of(&self, ranges: &[Range]) -> Option<Vec<(u64, u64)>> {
        let mut pieces = Vec::new();
        for r in ranges {
            pieces.extend(self.dev.volume().map(r.offset, r.len)?);
        }
        Some(pieces)
    }

    fn push_fallocate(&mut self, idx: usize, ranges: &[Range], method: Method) -> bool {
        let Some(pieces) = self.pieces_of(ranges) else {
            return false;
        };
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if method == Method::Punch {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
        for (phys, len) in pieces {
            let sqe = opcode::Fallocate::new(types::Fd(self.fd), len)
                .offset(phys)
                .mode(mode)
                .build();
            self.push(idx, 0, sqe);
        }
        true
    }

    /// The engine's zero buffer: [`ZERO_CHUNK`] zero bytes, never written after allocation.
    fn zero_buf(&mut self) -> *const u8 {
        self.zero_buf
            .get_or_insert_with(|| AlignedBuf::new(ZERO_CHUNK))
            .as_slice()
            .as_ptr()
    }

    fn push_plain_zeros(&mut self, idx: usize, ranges: &[Range]) -> bool {
        let Some(pieces) = self.pieces_of(ranges) else {
            return false;
        };
        let zeros = self.zero_buf();
        for (phys, len) in pieces {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(ZERO_CHUNK as u64) as u32;
                // The kernel only reads the zero buffer, which lives as long as the engine (and
                // so past every piece: Drop waits for them).
                let sqe = opcode::Write::new(types::Fd(self.fd), zeros, n)
                    .offset(phys + done)
                    .build();
                self.push(idx, n, sqe);
                done += u64::from(n);
            }
        }
        true
    }

    /// Encrypts zeros for `ranges` (at most [`ZERO_CHUNK`] bytes) into the slot's bounce buffer
    /// and pushes their writes.
    fn push_encrypted_zeros(&mut self, idx: usize, ranges: &[Range]) -> bool {
        let Some(pieces) = self.pieces_of(ranges) else {
            return false;
        };
        let total: usize = ranges.iter().map(|r| r.len as usize).sum();
        self.zero_buf();
        let mut buf = match self.slots[idx].as_mut().and_then(|s| s.buf.take()) {
            Some(b) => b,
            None => self.pool.get(ZERO_CHUNK),
        };
        let (Some(x), Some(zeros)) = (self.xts.as_mut(), self.zero_buf.as_ref()) else {
            self.pool.put(buf);
            return false;
        };
        let mut at = 0usize;
        for r in ranges {
            let n = r.len as usize;
            let src = &zeros.as_slice()[..n];
            let dst = &mut buf.as_mut_slice()[at..at + n];
            if x.encrypt_to(r.offset / SECTOR as u64, src, dst).is_err() {
                self.pool.put(buf);
                return false;
            }
            at += n;
        }
        debug_assert_eq!(at, total);
        let base = buf.as_mut_ptr();
        if let Some(slot) = self.slots[idx].as_mut() {
            slot.buf = Some(buf);
        }
        let mut at = 0usize;
        for (phys, len) in pieces {
            let sqe = opcode::Write::new(types::Fd(self.fd), base.wrapping_add(at), len as u32)
                .offset(phys)
                .build();
            self.push(idx, len as u32, sqe);
            at += len as usize;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_ranges_at_the_budget() {
        let r = |offset, len| Range { offset, len };
        let mut left = vec![r(0, 4096), r(1 << 20, 3 << 20)];
        assert_eq!(
            take_chunk(&mut left, 1 << 20),
            vec![r(0, 4096), r(1 << 20, (1 << 20) - 4096)]
        );
        assert_eq!(left, vec![r((2 << 20) - 4096, (2 << 20) + 4096)]);
        assert_eq!(
            take_chunk(&mut left, 8 << 20),
            vec![r((2 << 20) - 4096, (2 << 20) + 4096)]
        );
        assert!(left.is_empty());
    }

    #[test]
    fn refusals_move_to_the_next_method_and_are_remembered() {
        let s = ZeroSupport::default();
        assert_eq!(s.method(true), Method::Punch);
        assert_eq!(s.method(false), Method::ZeroRange);
        assert!(s.refuse_method(Method::Punch));
        assert!(!s.refuse_method(Method::Punch), "news once");
        assert_eq!(s.method(true), Method::ZeroRange);
        assert!(s.refuse_method(Method::ZeroRange));
        assert_eq!(s.method(true), Method::Write);
        let mut job = ZeroJob {
            method: Method::ZeroRange,
            left: Vec::new(),
            refused: false,
        };
        assert!(!job.refusal(-libc::EIO));
        assert!(job.refusal(-libc::EOPNOTSUPP) && job.refused);
        job.method = Method::Write;
        assert!(!job.refusal(-libc::EINVAL));
    }
}
