//! XTS between guest memory and bounce buffers, out of place: a write is encrypted straight from
//! the guest's buffers into the bounce buffer the store gets, a read is decrypted straight from
//! the bounce buffer into the guest's buffers, so each encrypted I/O touches its data once.
//!
//! The data unit is one 4 KiB sector. A unit inside one host mapping goes straight through the
//! cipher; a unit that a guest segment or memory-region boundary splits is gathered into (or
//! scattered from) a one-unit scratch buffer, which is wiped afterwards because it held
//! plaintext.
//!
//! Guest memory is shared with a guest that may change it at any moment. It is reached only
//! through vm-memory volatile slices (copies) and the cipher's raw-pointer entry points
//! ([`Xts::encrypt_from_volatile`], [`Xts::decrypt_into_volatile`]), never through a Rust
//! reference, so the worst a guest can do is change which bytes get encrypted. The bounce buffer
//! only ever receives cipher output: plaintext never reaches a buffer the store sees.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemory, GuestMemoryError, Permissions, VolatileSlice};
use zeroize::Zeroize;

use super::request::Segment;
use crate::xts::{self, Xts, SECTOR};

/// Errors moving data between guest memory and a bounce buffer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Guest buffer is not mapped")]
    Guest(#[source] GuestMemoryError),
    #[error("Guest buffer cannot be cut into data units")]
    Slice(#[source] vm_memory::VolatileMemoryError),
    #[error("Guest buffers hold {got} of the {want} bytes of the request")]
    Short { want: usize, got: usize },
    #[error("XTS failed")]
    Xts(#[source] xts::Error),
}

/// One unit's scratch buffer, for units split across guest buffers.
pub type Scratch = Box<[u8; SECTOR]>;

/// A new scratch buffer.
pub fn scratch() -> Scratch {
    Box::new([0u8; SECTOR])
}

/// Encrypts the first `dst.len()` bytes of guest `segs` into `dst`; `first` is the volume sector
/// number of `dst[0]`.
pub fn encrypt_from_guest<M: GuestMemory>(
    xts: &mut Xts,
    mem: &M,
    segs: &[Segment],
    first: u64,
    dst: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), Error> {
    let mut op = Encrypt {
        xts,
        first,
        dst,
        scratch,
        used: false,
    };
    let total = op.dst.len();
    let r = walk(mem, segs, total, Permissions::Read, &mut op);
    if op.used {
        op.scratch.zeroize();
    }
    r
}

/// Decrypts `src` into the first `src.len()` bytes of guest `segs`; `first` is the volume sector
/// number of `src[0]`.
pub fn decrypt_to_guest<M: GuestMemory>(
    xts: &mut Xts,
    mem: &M,
    segs: &[Segment],
    first: u64,
    src: &[u8],
    scratch: &mut Scratch,
) -> Result<(), Error> {
    let mut op = Decrypt {
        xts,
        first,
        src,
        scratch,
        used: false,
    };
    let r = walk(mem, segs, src.len(), Permissions::Write, &mut op);
    if op.used {
        op.scratch.zeroize();
    }
    r
}

/// What to do with each guest piece of a request, in order. A piece lies inside one data unit:
/// it is the whole unit when `at` is unit-aligned and it is [`SECTOR`] long.
trait UnitOp {
    fn piece<B: BitmapSlice>(&mut self, at: usize, s: &VolatileSlice<'_, B>) -> Result<(), Error>;
}

/// Cuts the first `total` bytes (a multiple of [`SECTOR`]) of guest `segs` into pieces, none of
/// which crosses a data unit or a host mapping, and hands them to `op` with their offset in the
/// request.
fn walk<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    total: usize,
    access: Permissions,
    op: &mut impl UnitOp,
) -> Result<(), Error> {
    let mut at = 0usize;
    for s in segs {
        let want = (s.len as usize).min(total - at);
        if want == 0 {
            break;
        }
        for slice in mem.get_slices(s.addr, want, access).map_err(Error::Guest)? {
            let slice = slice.map_err(Error::Guest)?;
            let mut off = 0usize;
            while off < slice.len() {
                let n = (SECTOR - at % SECTOR).min(slice.len() - off);
                let piece = slice.subslice(off, n).map_err(Error::Slice)?;
                op.piece(at, &piece)?;
                off += n;
                at += n;
            }
        }
    }
    if at != total {
        return Err(Error::Short {
            want: total,
            got: at,
        });
    }
    Ok(())
}

struct Encrypt<'a> {
    xts: &'a mut Xts,
    first: u64,
    dst: &'a mut [u8],
    scratch: &'a mut Scratch,
    used: bool,
}

impl UnitOp for Encrypt<'_> {
    fn piece<B: BitmapSlice>(&mut self, at: usize, s: &VolatileSlice<'_, B>) -> Result<(), Error> {
        let in_unit = at % SECTOR;
        let start = at - in_unit;
        let unit = self.first.wrapping_add((at / SECTOR) as u64);
        let out = &mut self.dst[start..start + SECTOR];
        if in_unit == 0 && s.len() == SECTOR {
            return self
                .xts
                .encrypt_from_volatile(unit, s, out)
                .map_err(Error::Xts);
        }
        self.used = true;
        s.copy_to(&mut self.scratch[in_unit..in_unit + s.len()]);
        if in_unit + s.len() == SECTOR {
            self.xts
                .encrypt_to(unit, &self.scratch[..], out)
                .map_err(Error::Xts)?;
        }
        Ok(())
    }
}

struct Decrypt<'a> {
    xts: &'a mut Xts,
    first: u64,
    src: &'a [u8],
    scratch: &'a mut Scratch,
    used: bool,
}

impl UnitOp for Decrypt<'_> {
    fn piece<B: BitmapSlice>(&mut self, at: usize, s: &VolatileSlice<'_, B>) -> Result<(), Error> {
        let in_unit = at % SECTOR;
        let start = at - in_unit;
        let unit = self.first.wrapping_add((at / SECTOR) as u64);
        let input = &self.src[start..start + SECTOR];
        if in_unit == 0 && s.len() == SECTOR {
            return self
                .xts
                .decrypt_into_volatile(unit, input, s)
                .map_err(Error::Xts);
        }
        // The first piece of a split unit decrypts it whole; the others copy their part.
        if in_unit == 0 {
            self.used = true;
            self.xts
                .decrypt_to(unit, input, &mut self.scratch[..])
                .map_err(Error::Xts)?;
        }
        s.copy_from(&self.scratch[in_unit..in_unit + s.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use crate::xts::{XtsKey, KEY_LEN};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn xts(seed: u64) -> Xts {
        let mut k = [0u8; KEY_LEN];
        Rng(seed).fill(&mut k);
        Xts::new(&XtsKey::from_bytes(&k).unwrap()).unwrap()
    }

    /// Two adjacent regions (separate mappings), so a buffer can cross a mapping boundary.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(64 << 10), 64 << 10),
        ])
        .unwrap()
    }

    fn layouts() -> Vec<Vec<Segment>> {
        vec![
            // Whole units in one mapping.
            vec![seg(0x1000, 16384)],
            // Crosses the region boundary mid-unit (60 KiB + 0x800).
            vec![seg(0xf800, 16384)],
            // Odd segment lengths, so units are split between segments.
            vec![
                seg(0x2000, 512),
                seg(0x5000, 7680),
                seg(0x9123, 100),
                seg(0x12000, 8092),
            ],
        ]
    }

    #[test]
    fn encrypts_from_and_decrypts_into_any_segment_layout() {
        let mut x = xts(3);
        let mut scratch = scratch();
        for (i, segs) in layouts().into_iter().enumerate() {
            let m = mem();
            let total: usize = segs.iter().map(|s| s.len as usize).sum();
            let mut plain = vec![0u8; total];
            Rng(i as u64 + 10).fill(&mut plain);
            let mut at = 0;
            for s in &segs {
                m.write_slice(&plain[at..at + s.len as usize], s.addr)
                    .unwrap();
                at += s.len as usize;
            }
            let first = 1000 + i as u64;
            let mut bounce = vec![0u8; total];
            encrypt_from_guest(&mut x, &m, &segs, first, &mut bounce, &mut scratch).unwrap();
            let mut expect = plain.clone();
            x.encrypt(first, &mut expect).unwrap();
            assert_eq!(bounce, expect, "layout {i}");
            assert!(scratch.iter().all(|&b| b == 0), "scratch wiped");

            // Decrypt into other guest memory: back to the plaintext, guest bytes around the
            // buffers untouched.
            let m = mem();
            m.write_slice(&[0xee; 128 << 10], GuestAddress(0)).unwrap();
            decrypt_to_guest(&mut x, &m, &segs, first, &bounce, &mut scratch).unwrap();
            let mut at = 0;
            for s in &segs {
                let mut got = vec![0u8; s.len as usize];
                m.read_slice(&mut got, s.addr).unwrap();
                assert_eq!(got, plain[at..at + s.len as usize], "layout {i}");
                at += s.len as usize;
                let mut after = [0u8; 1];
                m.read_slice(&mut after, GuestAddress(s.addr.0 + u64::from(s.len)))
                    .unwrap();
                assert_eq!(after[0], 0xee);
            }
            assert!(scratch.iter().all(|&b| b == 0), "scratch wiped");
        }
    }

    #[test]
    fn short_or_unmapped_guest_buffers_are_errors() {
        let m = mem();
        let mut x = xts(4);
        let mut s = scratch();
        let mut out = vec![0u8; 8192];
        assert!(matches!(
            encrypt_from_guest(&mut x, &m, &[seg(0, 4096)], 0, &mut out, &mut s),
            Err(Error::Short {
                want: 8192,
                got: 4096
            })
        ));
        assert!(matches!(
            decrypt_to_guest(&mut x, &m, &[seg(1 << 30, 8192)], 0, &out, &mut s),
            Err(Error::Guest(_))
        ));
        // Half a unit written into the scratch, then the buffer ends: still wiped.
        assert!(encrypt_from_guest(&mut x, &m, &[seg(0, 6000)], 0, &mut out, &mut s).is_err());
        assert!(s.iter().all(|&b| b == 0));
    }
}
