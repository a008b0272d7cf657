//! Zero-copy I/O plans for plain (unencrypted) volumes: io_uring reads and writes that go
//! straight between the backing store and guest memory, with no bounce buffer.
//!
//! A plan exists only when the whole request can be done that way: every guest segment is mapped
//! with the access the I/O needs (the parser already checked it against the guest memory table),
//! and each host piece of it (one per memory region it spans) meets the backing store's O_DIRECT
//! memory alignment in address and length. Otherwise the
//! engine falls back to a bounce buffer. Encrypted volumes never use this: ciphertext is made in
//! bounce buffers, never in guest memory.
//!
//! The request's volume range is split at extent boundaries into pieces (one SQE each); a
//! piece's iovecs are the guest segments, cut where the piece ends.

use vm_memory::{GuestMemory, Permissions};

use super::request::Segment;

/// Most iovecs one SQE may carry (the kernel's UIO_MAXIOV).
const MAX_IOVS: usize = 1024;

/// One SQE of a plan: where on the store, and which iovecs of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub phys: u64,
    pub len: u32,
    pub first: usize,
    pub count: usize,
}

/// Iovecs over guest memory, grouped into pieces.
#[derive(Debug, Default)]
pub struct Plan {
    pub iovs: Vec<libc::iovec>,
    pub pieces: Vec<Piece>,
}

// SAFETY: a plan only carries addresses (of guest memory kept mapped by the engine's slot) and
// is never dereferenced by Rust code; moving it between threads moves plain integers.
unsafe impl Send for Plan {}

/// Builds the plan for guest `segs` (holding at least the pieces' total length) and store
/// `pieces` `(physical offset, length)`, or None if some segment is unmapped or misaligned.
/// `access` is what the device does to guest memory: Write for reads from the store.
pub fn plan<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    pieces: &[(u64, u64)],
    align: usize,
    access: Permissions,
) -> Option<Plan> {
    let mut hosts = Vec::with_capacity(segs.len());
    for s in segs {
        let mut got = 0usize;
        for slice in mem.get_slices(s.addr, s.len as usize, access).ok()? {
            let slice = slice.ok()?;
            let ptr = slice.ptr_guard_mut().as_ptr() as usize;
            if !ptr.is_multiple_of(align) || !slice.len().is_multiple_of(align) {
                return None;
            }
            got += slice.len();
            hosts.push((ptr, slice.len()));
        }
        if got != s.len as usize {
            return None;
        }
    }
    let mut out = Plan {
        iovs: Vec::with_capacity(hosts.len() + pieces.len()),
        pieces: Vec::with_capacity(pieces.len()),
    };
    let mut seg = 0usize;
    let mut used = 0usize; // bytes of hosts[seg] already planned
    for &(phys, len) in pieces {
        if len == 0 {
            return None; // every SQE carries at least one iovec
        }
        let first = out.iovs.len();
        let mut left = usize::try_from(len).ok()?;
        while left > 0 {
            let &(ptr, slen) = hosts.get(seg)?;
            let n = (slen - used).min(left);
            out.iovs.push(libc::iovec {
                iov_base: (ptr + used) as *mut libc::c_void,
                iov_len: n,
            });
            used += n;
            left -= n;
            if used == slen {
                seg += 1;
                used = 0;
            }
        }
        let count = out.iovs.len() - first;
        if count > MAX_IOVS {
            return None;
        }
        out.pieces.push(Piece {
            phys,
            len: u32::try_from(len).ok()?,
            first,
            count,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const W: Permissions = Permissions::Write;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn splits_segments_at_piece_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        // 12 KiB in two segments (8 + 4), over pieces of 4 + 8 KiB.
        let p = plan(
            &mem,
            &[seg(0x2000, 8192), seg(0x8000, 4096)],
            &[(1 << 20, 4096), (5 << 20, 8192)],
            4096,
            W,
        )
        .unwrap();
        let iovs: Vec<(usize, usize)> = p
            .iovs
            .iter()
            .map(|v| (v.iov_base as usize - base, v.iov_len))
            .collect();
        assert_eq!(iovs, vec![(0x2000, 4096), (0x3000, 4096), (0x8000, 4096)]);
        assert_eq!(p.pieces[0].count, 1);
        assert_eq!((p.pieces[1].first, p.pieces[1].count), (1, 2));
        assert_eq!(p.pieces[1].phys, 5 << 20);
    }

    #[test]
    fn refuses_misaligned_or_unmapped_segments_and_splits_at_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(64 << 10), 64 << 10),
        ])
        .unwrap();
        let one = [(0u64, 4096u64)];
        assert!(plan(&mem, &[seg(0x1200, 4096)], &one, 4096, W).is_none());
        assert!(plan(&mem, &[seg(0x1200, 4096)], &one, 512, W).is_some());
        assert!(plan(&mem, &[seg(1 << 30, 4096)], &one, 512, W).is_none());
        // An empty piece would be an SQE without a buffer.
        assert!(plan(&mem, &[seg(0, 4096)], &[(0, 0), (0, 4096)], 4096, W).is_none());
        // Fewer guest bytes than the pieces need.
        assert!(plan(&mem, &[seg(0, 4096)], &[(0, 8192)], 4096, W).is_none());
        // Crosses from the first region into the second: one iovec in each.
        let p = plan(&mem, &[seg(60 << 10, 8192)], &[(0, 8192)], 4096, W).unwrap();
        assert_eq!(p.iovs.len(), 2);
        assert_eq!(p.pieces[0].count, 2);
    }
}
