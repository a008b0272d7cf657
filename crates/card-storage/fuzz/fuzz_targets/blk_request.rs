//! The virtio-blk request parser against hostile descriptor chains and guest memory: it must
//! never panic, and anything it accepts must lie inside the volume and guest memory; the
//! zero-copy plan built from an accepted read or write must only point into guest memory and
//! cover exactly the request's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_card_storage::blk::direct::plan;
use outboard_card_storage::blk::request::{parse, Desc, Op, Parsed};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Permissions};

const CAPACITY: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 8);
    if rest.len() < n * 13 {
        return;
    }
    let (raw_descs, contents) = rest.split_at(n * 13);
    // Two regions with a hole, so that descriptors can straddle or miss memory.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000), (GuestAddress(0x2_0000), 0x1_0000)])
        .expect("guest memory");
    let len = contents.len().min(0x1_0000);
    mem.write_slice(&contents[..len], GuestAddress(0)).expect("in range");
    let descs: Vec<Desc> = raw_descs
        .chunks_exact(13)
        .map(|c| Desc {
            addr: GuestAddress(u64::from_le_bytes(c[0..8].try_into().expect("8 bytes"))),
            len: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            writable: c[12] & 1 != 0,
        })
        .collect();
    if let Parsed::Ok(req) = parse(descs, &mem, CAPACITY) {
        match req.op {
            Op::Read { range, data } | Op::Write { range, data } => {
                assert!(range.offset + range.len <= CAPACITY);
                // Two store pieces, so that iovecs get cut at a piece boundary.
                let half = range.len / 2 / 4096 * 4096;
                let pieces: Vec<(u64, u64)> =
                    [(0, half), (1 << 30, range.len - half)].into_iter().filter(|p| p.1 > 0).collect();
                if let Some(p) = plan(&mem, &data, &pieces, 512, Permissions::Write) {
                    let hosts: Vec<(usize, usize)> = mem
                        .iter()
                        .map(|r| (r.as_ptr() as usize, r.len() as usize))
                        .collect();
                    let mut total = 0usize;
                    for v in &p.iovs {
                        let (b, l) = (v.iov_base as usize, v.iov_len);
                        assert!(hosts.iter().any(|&(hb, hl)| b >= hb && b + l <= hb + hl));
                        total += l;
                    }
                    assert_eq!(total as u64, range.len);
                    assert_eq!(p.pieces.iter().map(|x| u64::from(x.len)).sum::<u64>(), range.len);
                }
            }
            Op::Discard(rs) | Op::WriteZeroes { ranges: rs, .. } => assert!(rs.iter().all(|r| r.offset + r.len <= CAPACITY)),
            _ => {}
        }
    }
});
