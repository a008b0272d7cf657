//! WRITE_ZEROES through the engine (plain: fallocate or its fallback; encrypted: chunked
//! encrypted zeros), and encrypted I/O out of place with split data units and a hostile guest.

use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use super::*;
use crate::blk::engine::ZERO_CHUNK;

/// Runs a WRITE_ZEROES request of `(volume byte offset, bytes)` ranges.
fn zeroes(e: &mut Engine, m: &GuestMemoryMmap, ranges: &[(u64, u64)], flags: u32) -> u8 {
    let mut b = Vec::new();
    for &(offset, len) in ranges {
        b.extend_from_slice(&(offset / 512).to_le_bytes());
        b.extend_from_slice(&((len / 512) as u32).to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
    }
    m.write_slice(&b, GuestAddress(DATA)).unwrap();
    let d = Desc {
        addr: GuestAddress(DATA),
        len: b.len() as u32,
        writable: false,
    };
    let (st, used) = run(e, m, vec![hdr(m, T_WRITE_ZEROES, 0), d, status_desc()]);
    assert_eq!(used, 1);
    st
}

/// Reads `len` bytes at `offset` through the engine, 4 MiB at a time.
fn read_big(e: &mut Engine, m: &GuestMemoryMmap, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(4 << 20);
        let (st, b) = read(e, m, offset + out.len() as u64, n);
        assert_eq!(st, S_OK);
        out.extend_from_slice(&b);
    }
    out
}

/// The next hole at or after `offset` in the store (SEEK_HOLE).
fn next_hole(path: &std::path::Path, offset: u64) -> u64 {
    let f = File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own only moves its file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    assert!(r >= 0, "{}", std::io::Error::last_os_error());
    r as u64
}

fn blocks(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

/// Physical offset of volume byte `offset` of `dev`.
fn phys(dev: &VolumeDevice, offset: u64) -> u64 {
    dev.volume().map(offset, 4096).unwrap()[0].0
}

/// A plain volume of two extents: [8 MiB] + [4 MiB], a 1 MiB volume between them.
fn two_extents(r: &mut Rig) -> Arc<VolumeDevice> {
    r.store.create("a", 8 * MIB).unwrap();
    r.store.create("gap", MIB).unwrap();
    r.store.grow("a", 12 * MIB).unwrap();
    let dev = device(r, "a", None, Limits::default());
    assert_eq!(dev.volume().extents.len(), 2);
    dev
}

#[test]
fn plain_write_zeroes_leave_zero_ranges_and_holes() {
    let mut r = rig(64 * MIB);
    let dev = two_extents(&mut r);
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    let base = 7 * MIB; // 2 MiB of data across the extent boundary at 8 MiB
    let data = pattern(2 * MIB as usize, 7);
    assert_eq!(write(&mut e, m, base, &data), S_OK);
    let before = blocks(&r.path);

    // Without UNMAP: ZERO_RANGE per extent piece (7.25–8 MiB and 8–8.25 MiB).
    let zr = (base + 256 * 1024, MIB);
    assert_eq!(zeroes(&mut e, m, &[zr], 0), S_OK);
    // Zeroing allocates no data blocks; ext4 may add an extent-tree block to split the extent.
    let after = blocks(&r.path);
    assert!(after <= before + 16, "blocks {before} -> {after}");
    if e.zero_support().refused_zero_range() {
        eprintln!("note: this store has no FALLOC_FL_ZERO_RANGE; zeros were written");
    } else {
        // Still allocated (ext4: unwritten extents), but reported as holes: no zeros written.
        for at in [zr.0, 8 * MIB] {
            let p = phys(&dev, at);
            assert_eq!(next_hole(&r.path, p), p, "zero range at volume offset {at}");
        }
    }

    // With UNMAP: the first 256 KiB is punched out and gives its blocks back.
    assert_eq!(zeroes(&mut e, m, &[(base, 256 * 1024)], F_UNMAP), S_OK);
    let punched = blocks(&r.path);
    assert!(punched < after, "blocks {after} -> {punched} after a punch");
    let p = phys(&dev, base);
    assert_eq!(next_hole(&r.path, p), p);

    let back = read_big(&mut e, m, base, data.len());
    let end = (zr.0 + zr.1 - base) as usize;
    assert!(
        back[..end].iter().all(|&b| b == 0),
        "zeroed ranges read zeros"
    );
    assert_eq!(back[end..], data[end..], "data after the range untouched");
    let (_, before_range) = read(&mut e, m, base - 4096, 4096);
    assert!(before_range.iter().all(|&b| b == 0), "never written: zeros");
    let c = dev.counters.snapshot();
    assert_eq!((c.write_zeroes, c.errors), (2, 0));
}

#[test]
fn plain_write_zeroes_fall_back_to_writing_zeros() {
    let mut r = rig(64 * MIB);
    let dev = two_extents(&mut r);
    let mut e = Engine::new(dev.clone(), None).unwrap();
    // Every engine of the device shares what the store refused.
    let other = Engine::new(dev.clone(), None).unwrap();
    e.zero_support().refuse_all();
    assert!(other.zero_support().refused_zero_range());
    let m = &r.mem;
    let base = 7 * MIB;
    let data = pattern(2 * MIB as usize, 8);
    assert_eq!(write(&mut e, m, base, &data), S_OK);
    // Both flags, two ranges, across the extent boundary.
    let ranges = [(base + 4096, MIB), (base + MIB + 8192, 64 * 1024)];
    for flags in [0, F_UNMAP] {
        assert_eq!(zeroes(&mut e, m, &ranges, flags), S_OK);
    }
    // Written zeros are data, not holes.
    let p = phys(&dev, base + 4096);
    assert!(next_hole(&r.path, p) > p);
    let back = read_big(&mut e, m, base, data.len());
    let mut expect = data.clone();
    for (o, l) in ranges {
        let at = (o - base) as usize;
        expect[at..at + l as usize].fill(0);
    }
    assert_eq!(back, expect);
    assert_eq!(dev.counters.snapshot().errors, 0);
}

/// Segments far above the discard limit: a plain volume's zero writes go round by round, an
/// encrypted volume's chunk by chunk, and both leave exactly the ranges zeroed.
#[test]
fn large_write_zeroes_segments_are_served_in_rounds() {
    use super::super::zeroes::PLAIN_ROUND;
    let mut r = rig(128 * MIB);
    r.store.create("p", 40 * MIB).unwrap();
    r.store.create("e", 8 * MIB).unwrap();
    let m = &r.mem;
    let len = PLAIN_ROUND + 4 * MIB + 4096; // two full rounds and a partial one
    for (name, key) in [("p", None), ("e", Some(key(7)))] {
        let dev = device(&r, name, key, Limits::default());
        let mut e = Engine::new(dev.clone(), None).unwrap();
        e.zero_support().refuse_all(); // plain: the written-zeros fallback
        let size = dev.capacity();
        let (start, len) = if name == "p" {
            (4096, len)
        } else {
            (4096, 3 * MIB) // three encrypted chunks in one segment
        };
        let data = pattern(size as usize, 11);
        for at in (0..size).step_by(4 * MIB as usize) {
            let n = (size - at).min(4 * MIB) as usize;
            assert_eq!(write(&mut e, m, at, &data[at as usize..][..n]), S_OK);
        }
        assert_eq!(zeroes(&mut e, m, &[(start, len)], F_UNMAP), S_OK, "{name}");
        let back = read_big(&mut e, m, 0, size as usize);
        let mut expect = data.clone();
        expect[start as usize..(start + len) as usize].fill(0);
        assert!(back == expect, "{name}: exactly the range zeroed");
        let c = dev.counters.snapshot();
        assert_eq!((c.write_zeroes, c.errors), (1, 0), "{name}");
    }
}

/// A real store without ZERO_RANGE: tmpfs (punching holes works there).
#[test]
fn a_store_refusing_zero_range_is_remembered_and_served() {
    let shm = std::path::Path::new("/dev/shm");
    let dir = shm.join(format!("card-storage-zeroes-{}", std::process::id()));
    if !shm.is_dir() || std::fs::create_dir_all(&dir).is_err() {
        eprintln!("SKIP: no writable /dev/shm (tmpfs) for a store that refuses ZERO_RANGE");
        return;
    }
    let path = dir.join("store");
    File::create(&path).unwrap().set_len(32 * MIB).unwrap();
    let store = match VolumeStore::format(&path) {
        Ok(s) => s,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("SKIP: cannot open a store on /dev/shm with O_DIRECT: {err}");
            return;
        }
    };
    let mut r = Rig {
        _dir: TempDir::new("zeroes-shm"),
        path: path.clone(),
        store,
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    };
    let dev = two_extents(&mut r);
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    let data = pattern(2 * MIB as usize, 9);
    assert_eq!(write(&mut e, m, 7 * MIB, &data), S_OK);
    assert!(!e.zero_support().refused_zero_range());
    assert_eq!(
        zeroes(&mut e, m, &[(7 * MIB, MIB), (8 * MIB, 4096)], 0),
        S_OK
    );
    assert!(
        e.zero_support().refused_zero_range(),
        "tmpfs refused ZERO_RANGE and that was remembered"
    );
    let before = blocks(&path);
    assert_eq!(zeroes(&mut e, m, &[(8 * MIB + 8192, 8192)], 0), S_OK);
    assert_eq!(
        zeroes(&mut e, m, &[(8 * MIB + 65536, 65536)], F_UNMAP),
        S_OK
    );
    assert!(blocks(&path) < before, "UNMAP punched a hole");
    let back = read_big(&mut e, m, 7 * MIB, data.len());
    let mut expect = data.clone();
    expect[..(MIB + 4096) as usize].fill(0);
    expect[(MIB + 8192) as usize..(MIB + 16384) as usize].fill(0);
    expect[(MIB + 65536) as usize..(MIB + 131072) as usize].fill(0);
    assert_eq!(back, expect);
    assert_eq!(dev.counters.snapshot().errors, 0);
    drop(e);
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn encrypted_write_zeroes_write_ciphertext_in_bounded_chunks() {
    let mut r = rig(64 * MIB);
    r.store.create("e", 24 * MIB).unwrap();
    let dev = device(&r, "e", Some(key(4)), Limits::default());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    let head = pattern(8192, 1);
    let tail = pattern(8192, 2);
    assert_eq!(write(&mut e, m, 0, &head), S_OK);
    assert_eq!(write(&mut e, m, 16 * MIB, &tail), S_OK);
    // 16 ranges of 1 MiB (the most one request may carry), more than ZERO_CHUNK in all.
    let ranges: Vec<(u64, u64)> = (0..16).map(|i| (4096 + i * MIB, MIB)).collect();
    assert!(16 * MIB as usize > ZERO_CHUNK);
    for flags in [F_UNMAP, 0] {
        assert_eq!(zeroes(&mut e, m, &ranges, flags), S_OK);
        let back = read_big(&mut e, m, 0, (16 * MIB + 8192) as usize);
        assert_eq!(back[..4096], head[..4096]);
        assert!(back[4096..(16 * MIB + 4096) as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(back[(16 * MIB + 4096) as usize..], tail[4096..]);
        // On disk: the ciphertext of zeros, never a hole or plain zeros (even with UNMAP).
        for sector in [1u64, 2048, 4096] {
            let mut expect = vec![0u8; 4096];
            Xts::new(&key(4))
                .unwrap()
                .encrypt(sector, &mut expect)
                .unwrap();
            let p = phys(&dev, sector * 4096);
            assert_eq!(on_disk(&r.path, p, 4096), expect, "sector {sector}");
        }
    }
    let c = dev.counters.snapshot();
    assert_eq!((c.write_zeroes, c.errors), (2, 0));
}

/// Places `data` into guest buffers `segs` (address, length) and returns their descriptors.
fn place(m: &GuestMemoryMmap, segs: &[(u64, u32)], data: &[u8], writable: bool) -> Vec<Desc> {
    let mut at = 0usize;
    let mut out = Vec::new();
    for &(addr, len) in segs {
        if !writable {
            m.write_slice(&data[at..at + len as usize], GuestAddress(addr))
                .unwrap();
        }
        at += len as usize;
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        });
    }
    out
}

#[test]
fn encrypted_io_with_data_units_split_across_guest_buffers() {
    let mut r = rig(64 * MIB);
    r.store.create("e", 8 * MIB).unwrap();
    let dev = device(&r, "e", Some(key(5)), Limits::default());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    let data = pattern(5 * 4096, 0x33);
    // Units split at 512, 3584+100 and so on; one unit whole in the middle.
    let wsegs = [
        (DATA, 512u32),
        (DATA + 0x10_000, 3684),
        (DATA + 0x20_000, 4096 + 3996),
        (DATA + 0x30_123, 8192),
    ];
    let mut descs = vec![hdr(m, T_OUT, 8 * 4096 / 512)];
    descs.extend(place(m, &wsegs, &data, false));
    descs.push(status_desc());
    assert_eq!(run(&mut e, m, descs), (S_OK, 1));
    let mut expect = data.clone();
    Xts::new(&key(5)).unwrap().encrypt(8, &mut expect).unwrap();
    let p = phys(&dev, 8 * 4096);
    assert_eq!(on_disk(&r.path, p, data.len()), expect);

    let rsegs = [
        (DATA + 0x40_000, 4095u32),
        (DATA + 0x50_001, 1),
        (DATA + 0x60_000, 12288),
        (DATA + 0x70_007, 4096),
    ];
    m.write_slice(&[0xaa; 0x40_000], GuestAddress(DATA + 0x40_000))
        .unwrap();
    let mut descs = vec![hdr(m, T_IN, 8 * 4096 / 512)];
    descs.extend(place(m, &rsegs, &data, true));
    descs.push(status_desc());
    assert_eq!(run(&mut e, m, descs), (S_OK, data.len() as u32 + 1));
    let mut back = Vec::new();
    for &(addr, len) in &rsegs {
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        back.extend_from_slice(&b);
        let mut after = [0u8; 1];
        m.read_slice(&mut after, GuestAddress(addr + u64::from(len)))
            .unwrap();
        assert_eq!(after[0], 0xaa, "nothing written past a guest buffer");
    }
    assert_eq!(back, data);
    assert!(e.scratch.iter().all(|&b| b == 0), "plaintext wiped");
}

/// The guest rewrites its buffer while the card encrypts it: whatever the card read, the store
/// gets ciphertext, never the plaintext.
#[test]
fn a_guest_changing_its_buffer_mid_write_never_leaks_plaintext() {
    let mut r = rig(32 * MIB);
    r.store.create("e", 4 * MIB).unwrap();
    let dev = device(&r, "e", Some(key(6)), Limits::default());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let marker = *b"PLAINTEXT-MARKER";
    mem.write_slice(&marker.repeat(64 * 1024 / 16), GuestAddress(DATA))
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u8;
            let mut buf = marker.repeat(64 * 1024 / 16);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                buf[7] = n;
                n = n.wrapping_add(1);
                mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
            }
        })
    };
    let d = Desc {
        addr: GuestAddress(DATA),
        len: 64 * 1024,
        writable: false,
    };
    for i in 0..64u64 {
        let descs = vec![hdr(&mem, T_OUT, i * 128), d, status_desc()];
        assert_eq!(run(&mut e, &mem, descs).0, S_OK);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    guest.join().unwrap();
    let store = std::fs::read(&r.path).unwrap();
    assert!(
        !store.windows(8).any(|w| w == &marker[8..]),
        "plaintext reached the store"
    );
    // What was stored is the ciphertext of some bytes: it decrypts to marker-shaped data.
    let (st, back) = read(&mut e, &mem, 0, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back[8..16], marker[8..]);
}

/// Zeroing a plain volume is a fallocate: under a bandwidth limit it costs one operation, like
/// a discard, so a large zeroing does not stall the volume's next writes for size ÷ rate. Written
/// zeros (encrypted, or a store that refused fallocate) cost their bytes.
#[test]
fn write_zeroes_cost_bandwidth_only_when_zeros_are_written() {
    let limits = Limits {
        bw_write: Some(Limit {
            rate: MIB,
            burst: MIB,
        }),
        ..Limits::default()
    };
    // The wait a 4 KiB write sees right after zeroing 8 MiB.
    let wait_after_zeroing = |key: Option<XtsKey>, refuse: bool| {
        let mut r = rig(32 * MIB);
        r.store.create("a", 16 * MIB).unwrap();
        let dev = device(&r, "a", key, limits);
        if refuse {
            dev.zero_support().refuse_all();
        }
        let mut e = Engine::new(dev, None).unwrap();
        assert_eq!(zeroes(&mut e, &r.mem, &[(0, 8 * MIB)], 0), S_OK);
        let descs = vec![
            hdr(&r.mem, T_OUT, 8 * MIB / 512),
            Desc {
                addr: GuestAddress(DATA),
                len: 4096,
                writable: false,
            },
            status_desc(),
        ];
        let p = parse(descs, &r.mem, e.device().capacity());
        e.enqueue(&r.mem, 9, p);
        e.next_wakeup().unwrap_or(0)
    };
    let second = 1_000_000_000;
    assert_eq!(
        wait_after_zeroing(None, false),
        0,
        "fallocate was charged its bytes"
    );
    assert!(wait_after_zeroing(None, true) > 5 * second);
    assert!(wait_after_zeroing(Some(key(3)), false) > 5 * second);
}
