use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const CAP: u64 = 16 << 20;

fn mem() -> GuestMemoryMmap {
    // Two regions with a hole between them, to test descriptors that stray into it.
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
        .unwrap()
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) -> Desc {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
    Desc {
        addr: GuestAddress(at),
        len: 16,
        writable: false,
    }
}

fn r(at: u64, len: u32) -> Desc {
    Desc {
        addr: GuestAddress(at),
        len,
        writable: false,
    }
}

fn w(at: u64, len: u32) -> Desc {
    Desc {
        addr: GuestAddress(at),
        len,
        writable: true,
    }
}

fn seg(at: u64, len: u32) -> Segment {
    Segment {
        addr: GuestAddress(at),
        len,
    }
}

#[test]
fn read_write_flush_getid() {
    let m = mem();
    let p = parse(
        [header(&m, 0, T_IN, 8), w(0x1000, 8192), w(0x9000, 1)],
        &m,
        CAP,
    );
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::Read {
                range: Range {
                    offset: 4096,
                    len: 8192
                },
                data: vec![seg(0x1000, 8192)]
            },
            status: GuestAddress(0x9000)
        })
    );
    // Data and status in one descriptor; header split across two.
    let h = header(&m, 0x100, T_OUT, 16);
    let p = parse(
        [r(0x100, 10), r(0x10a, 6), r(0x2000, 4096), w(0x9000, 1)],
        &m,
        CAP,
    );
    let _ = h;
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::Write {
                range: Range {
                    offset: 8192,
                    len: 4096
                },
                data: vec![seg(0x2000, 4096)]
            },
            status: GuestAddress(0x9000)
        })
    );
    // Header and data in one readable descriptor.
    let _ = header(&m, 0x3000 - 16, T_OUT, 0);
    let p = parse([r(0x3000 - 16, 16 + 4096), w(0x9000, 1)], &m, CAP);
    assert!(
        matches!(p, Parsed::Ok(Request { op: Op::Write { data, .. }, .. }) if data == vec![seg(0x3000, 4096)])
    );
    // Read data and status in one writable descriptor.
    let p = parse([header(&m, 0, T_IN, 0), w(0x4000, 4097)], &m, CAP);
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::Read {
                range: Range {
                    offset: 0,
                    len: 4096
                },
                data: vec![seg(0x4000, 4096)]
            },
            status: GuestAddress(0x5000)
        })
    );
    let p = parse([header(&m, 0, T_FLUSH, 0), w(0x9000, 1)], &m, CAP);
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::Flush,
            status: GuestAddress(0x9000)
        })
    );
    let p = parse(
        [header(&m, 0, T_GET_ID, 0), w(0x5000, 64), w(0x9000, 1)],
        &m,
        CAP,
    );
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::GetId {
                data: vec![seg(0x5000, 64)],
                len: 20
            },
            status: GuestAddress(0x9000)
        })
    );
}

fn fail(code: u8) -> Parsed {
    Parsed::Fail {
        status: GuestAddress(0x9000),
        code,
    }
}

#[test]
fn bad_requests_get_ioerr_or_unsupp() {
    let m = mem();
    // Unknown type.
    assert_eq!(
        parse([header(&m, 0, 99, 0), w(0x9000, 1)], &m, CAP),
        fail(S_UNSUPP)
    );
    // Short header.
    assert_eq!(parse([r(0, 15), w(0x9000, 1)], &m, CAP), fail(S_IOERR));
    // Past the end of the volume, across it, and overflowing.
    let last = CAP / 512;
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, last), w(0x1000, 4096), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, last - 8), w(0x1000, 8192), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [
                header(&m, 0, T_IN, u64::MAX / 256),
                w(0x1000, 4096),
                w(0x9000, 1)
            ],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // Unaligned sector or length.
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 1), w(0x1000, 4096), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 0), w(0x1000, 512), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // Empty read, and a read with device-readable data.
    assert_eq!(
        parse([header(&m, 0, T_IN, 0), w(0x9000, 1)], &m, CAP),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [
                header(&m, 0, T_IN, 0),
                r(0x100, 8),
                w(0x1000, 4096),
                w(0x9000, 1)
            ],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // A write with writable data besides the status.
    assert_eq!(
        parse(
            [
                header(&m, 0, T_OUT, 0),
                r(0x1000, 4096),
                w(0x8000, 4096),
                w(0x9000, 1)
            ],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // Oversized transfer.
    let big = (MAX_TRANSFER + 4096) as u32;
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 0), w(0x1000, big), w(0x9000, 1)],
            &m,
            1 << 40
        ),
        fail(S_IOERR)
    );
    // Readable after writable.
    assert_eq!(
        parse(
            [
                header(&m, 0, T_IN, 0),
                w(0x1000, 4096),
                r(0x3000, 16),
                w(0x9000, 1)
            ],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // Descriptor in the hole between regions, or past the end of memory.
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 0), w(0x10_0000, 4096), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 0), w(0xff000, 8192), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse(
            [header(&m, 0, T_IN, 0), w(u64::MAX - 10, 4096), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    // Flush with data; GET_ID without room.
    assert_eq!(
        parse(
            [header(&m, 0, T_FLUSH, 0), r(0x1000, 4096), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse([header(&m, 0, T_GET_ID, 0), w(0x9000, 1)], &m, CAP),
        fail(S_IOERR)
    );
}

#[test]
fn chains_without_status_are_reported() {
    let m = mem();
    assert_eq!(parse([header(&m, 0, T_IN, 0)], &m, CAP), Parsed::NoStatus);
    assert_eq!(parse([], &m, CAP), Parsed::NoStatus);
    assert_eq!(
        parse([header(&m, 0, T_IN, 0), w(0x9000, 0)], &m, CAP),
        Parsed::NoStatus
    );
    // A writable descriptor outside memory is no place for a status either.
    assert_eq!(
        parse([header(&m, 0, T_IN, 0), w(0x1f_0000, 1)], &m, CAP),
        Parsed::NoStatus
    );
}

fn ranges(m: &GuestMemoryMmap, at: u64, rs: &[(u64, u32, u32)]) -> Desc {
    let mut b = Vec::new();
    for &(s, n, f) in rs {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&f.to_le_bytes());
    }
    m.write_slice(&b, GuestAddress(at)).unwrap();
    r(at, b.len() as u32)
}

#[test]
fn discard_and_write_zeroes() {
    let m = mem();
    let d = ranges(&m, 0x6000, &[(0, 8, 0), (64, 16, 0)]);
    let p = parse([header(&m, 0, T_DISCARD, 0), d, w(0x9000, 1)], &m, CAP);
    assert_eq!(
        p,
        Parsed::Ok(Request {
            op: Op::Discard(vec![
                Range {
                    offset: 0,
                    len: 4096
                },
                Range {
                    offset: 32768,
                    len: 8192
                }
            ]),
            status: GuestAddress(0x9000)
        })
    );
    let d = ranges(&m, 0x6000, &[(8, 8, F_UNMAP)]);
    let p = parse([header(&m, 0, T_WRITE_ZEROES, 0), d, w(0x9000, 1)], &m, CAP);
    assert!(matches!(
        p,
        Parsed::Ok(Request {
            op: Op::WriteZeroes { unmap: true, .. },
            ..
        })
    ));
    // UNMAP holds only if every segment allows it.
    let d = ranges(&m, 0x6000, &[(8, 8, F_UNMAP), (24, 8, 0)]);
    let p = parse([header(&m, 0, T_WRITE_ZEROES, 0), d, w(0x9000, 1)], &m, CAP);
    assert!(matches!(
        p,
        Parsed::Ok(Request {
            op: Op::WriteZeroes { unmap: false, .. },
            ..
        })
    ));
    // Unmap on discard and unknown flags: unsupported.
    let d = ranges(&m, 0x6000, &[(8, 8, F_UNMAP)]);
    assert_eq!(
        parse([header(&m, 0, T_DISCARD, 0), d, w(0x9000, 1)], &m, CAP),
        fail(S_UNSUPP)
    );
    let d = ranges(&m, 0x6000, &[(8, 8, 4)]);
    assert_eq!(
        parse([header(&m, 0, T_WRITE_ZEROES, 0), d, w(0x9000, 1)], &m, CAP),
        fail(S_UNSUPP)
    );
    // Out of range, unaligned, empty, too long, too many, ragged.
    for rs in [
        vec![(CAP / 512, 8, 0)],
        vec![(1, 8, 0)],
        vec![(0, 0, 0)],
        vec![(0, (MAX_DISCARD_BYTES / 512 + 8) as u32, 0)],
        vec![(0, 8, 0); MAX_RANGES + 1],
    ] {
        let d = ranges(&m, 0x6000, &rs);
        assert_eq!(
            parse([header(&m, 0, T_DISCARD, 0), d, w(0x9000, 1)], &m, CAP),
            fail(S_IOERR),
            "{rs:?}"
        );
    }
    // Write zeroes have their own, larger limit: a whole 16 MiB volume in one segment, but
    // never past MAX_WRITE_ZEROES_BYTES, whatever the volume's size.
    let whole = ranges(&m, 0x6000, &[(0, (CAP / 512) as u32, F_UNMAP)]);
    assert!(matches!(
        parse([header(&m, 0, T_WRITE_ZEROES, 0), whole, w(0x9000, 1)], &m, CAP),
        Parsed::Ok(Request { op: Op::WriteZeroes { ref ranges, unmap: true }, .. })
            if ranges == &[Range { offset: 0, len: CAP }]
    ));
    let huge = 4 * MAX_WRITE_ZEROES_BYTES;
    let over = ranges(
        &m,
        0x6000,
        &[(0, (MAX_WRITE_ZEROES_BYTES / 512 + 8) as u32, 0)],
    );
    assert_eq!(
        parse(
            [header(&m, 0, T_WRITE_ZEROES, 0), over, w(0x9000, 1)],
            &m,
            huge
        ),
        fail(S_IOERR)
    );
    let at_max = ranges(&m, 0x6000, &[(0, (MAX_WRITE_ZEROES_BYTES / 512) as u32, 0)]);
    assert!(matches!(
        parse(
            [header(&m, 0, T_WRITE_ZEROES, 0), at_max, w(0x9000, 1)],
            &m,
            huge
        ),
        Parsed::Ok(_)
    ));
    assert_eq!(
        parse(
            [header(&m, 0, T_DISCARD, 0), r(0x6000, 15), w(0x9000, 1)],
            &m,
            CAP
        ),
        fail(S_IOERR)
    );
    assert_eq!(
        parse([header(&m, 0, T_DISCARD, 0), w(0x9000, 1)], &m, CAP),
        fail(S_IOERR)
    );
}

#[test]
fn gather_and_scatter_follow_segments() {
    let m = mem();
    let segs = [seg(0x1000, 3), seg(0x2000, 5)];
    scatter(&m, &segs, b"abcdefgh").unwrap();
    let mut out = [0u8; 8];
    gather(&m, &segs, &mut out).unwrap();
    assert_eq!(&out, b"abcdefgh");
    let mut b = [0u8; 3];
    m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
    assert_eq!(&b, b"abc");
}

#[test]
fn random_chains_never_panic() {
    let m = mem();
    let mut rng = crate::testutil::Rng(0xfeed);
    for _ in 0..20_000 {
        let mut raw = [0u8; 64];
        rng.fill(&mut raw);
        m.write_slice(&raw, GuestAddress(0)).unwrap();
        let n = rng.below(6);
        let descs: Vec<Desc> = (0..n)
            .map(|_| {
                let addr = match rng.below(4) {
                    0 => rng.below(64),
                    1 => rng.below(4 << 20),
                    2 => u64::MAX - rng.below(1 << 20),
                    _ => 0x1000 * rng.below(512),
                };
                let len = match rng.below(3) {
                    0 => rng.below(32) as u32,
                    1 => 4096 * rng.below(4) as u32 + rng.below(2) as u32,
                    _ => rng.next_u64() as u32,
                };
                Desc {
                    addr: GuestAddress(addr),
                    len,
                    writable: rng.below(2) == 0,
                }
            })
            .collect();
        if let Parsed::Ok(req) = parse(descs, &m, CAP) {
            match req.op {
                Op::Read { range, .. } | Op::Write { range, .. } => {
                    assert!(range.offset + range.len <= CAP)
                }
                Op::Discard(rs) | Op::WriteZeroes { ranges: rs, .. } => {
                    assert!(rs.iter().all(|r| r.offset + r.len <= CAP))
                }
                _ => {}
            }
        }
    }
}
