use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::backing::Backing;
use crate::blk::request::{parse, Desc};
use crate::table::{VolumeStore, DATA_START};
use crate::testutil::{Rng, TempDir};
use crate::throttle::{Limit, Limits};
use crate::xts::{XtsKey, KEY_LEN};

const MIB: u64 = 1 << 20;
const STATUS: u64 = 0xf000;
const HDR: u64 = 0xe000;
const DATA: u64 = 0x10_0000;

struct Rig {
    _dir: TempDir,
    path: std::path::PathBuf,
    store: VolumeStore,
    mem: GuestMemoryMmap,
}

fn rig(size: u64) -> Rig {
    let dir = TempDir::new("engine");
    let path = dir.path().join("store");
    File::create(&path).unwrap().set_len(size).unwrap();
    let store = VolumeStore::format(&path).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    Rig {
        _dir: dir,
        path,
        store,
        mem,
    }
}

fn key(seed: u64) -> XtsKey {
    let mut k = [0u8; KEY_LEN];
    Rng(seed).fill(&mut k);
    XtsKey::from_bytes(&k).unwrap()
}

fn device(r: &Rig, name: &str, key: Option<XtsKey>, limits: Limits) -> Arc<VolumeDevice> {
    let vol = r.store.table().volume(name).unwrap().clone();
    let backing = Arc::new(Backing::open(&r.path).unwrap());
    Arc::new(VolumeDevice::new(vol, backing, key, limits).unwrap())
}

fn hdr(m: &GuestMemoryMmap, kind: u32, sector: u64) -> Desc {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR)).unwrap();
    Desc {
        addr: GuestAddress(HDR),
        len: 16,
        writable: false,
    }
}

fn status_desc() -> Desc {
    Desc {
        addr: GuestAddress(STATUS),
        len: 1,
        writable: true,
    }
}

/// Runs one request to completion and returns (status byte, used length).
fn run(e: &mut Engine, m: &GuestMemoryMmap, descs: Vec<Desc>) -> (u8, u32) {
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let p = parse(descs, m, e.device().capacity());
    e.enqueue(m, 7, p);
    let mut done = Vec::new();
    loop {
        done.extend(e.reap(m));
        if !done.is_empty() {
            break;
        }
        if let Some(ns) = e.next_wakeup() {
            std::thread::sleep(Duration::from_nanos(ns));
            e.pump(m);
        }
        e.submit_and_wait().unwrap();
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].head, 7);
    (m.read_obj(GuestAddress(STATUS)).unwrap(), done[0].used_len)
}

fn write(e: &mut Engine, m: &GuestMemoryMmap, offset: u64, data: &[u8]) -> u8 {
    m.write_slice(data, GuestAddress(DATA)).unwrap();
    let d = Desc {
        addr: GuestAddress(DATA),
        len: data.len() as u32,
        writable: false,
    };
    let (st, used) = run(e, m, vec![hdr(m, T_OUT, offset / 512), d, status_desc()]);
    assert_eq!(used, 1);
    st
}

fn read(e: &mut Engine, m: &GuestMemoryMmap, offset: u64, len: usize) -> (u8, Vec<u8>) {
    let d = Desc {
        addr: GuestAddress(DATA),
        len: len as u32,
        writable: true,
    };
    let (st, used) = run(e, m, vec![hdr(m, T_IN, offset / 512), d, status_desc()]);
    let mut out = vec![0u8; len];
    m.read_slice(&mut out, GuestAddress(DATA)).unwrap();
    if st == S_OK {
        assert_eq!(used as usize, len + 1);
    }
    (st, out)
}

fn on_disk(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn pattern(len: usize, tag: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

#[test]
fn encrypted_round_trip_never_stores_plaintext() {
    let mut r = rig(64 * MIB);
    r.store.create("a", 8 * MIB).unwrap();
    let dev = device(&r, "a", Some(key(1)), Limits::default());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let data = pattern(64 * 1024, 0x5a);
    assert_eq!(write(&mut e, &r.mem, 4096 * 3, &data), S_OK);
    let (st, back) = read(&mut e, &r.mem, 4096 * 3, data.len());
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    // On disk: the XTS ciphertext of each sector, at the extent's physical offset.
    let phys = dev.volume().extents[0].physical + 4096 * 3;
    let stored = on_disk(&r.path, phys, data.len());
    assert_ne!(stored, data);
    let mut expect = data.clone();
    Xts::new(&key(1)).unwrap().encrypt(3, &mut expect).unwrap();
    assert_eq!(stored, expect);
    // The guest's buffer was not encrypted in place.
    let mut guest = vec![0u8; data.len()];
    r.mem.read_slice(&mut guest, GuestAddress(DATA)).unwrap();
    assert_eq!(guest, data);
    let c = dev.counters.snapshot();
    assert_eq!(
        (c.read_ops, c.write_ops, c.read_bytes, c.queue_depth),
        (1, 1, data.len() as u64, 0)
    );
}

#[test]
fn plain_volume_maps_across_extents_and_stays_isolated() {
    let mut r = rig(64 * MIB);
    r.store.create("a", MIB).unwrap();
    r.store.create("b", MIB).unwrap();
    r.store.grow("a", 2 * MIB).unwrap(); // a = [1 MiB @ D] + [1 MiB @ D+2MiB]
    let a = device(&r, "a", None, Limits::default());
    let b = device(&r, "b", None, Limits::default());
    assert_eq!(a.volume().extents.len(), 2);
    let mut ea = Engine::new(a.clone(), None).unwrap();
    let mut eb = Engine::new(b.clone(), None).unwrap();
    let data = pattern(8192, 1);
    // Straddles a's extent boundary.
    assert_eq!(write(&mut ea, &r.mem, MIB - 4096, &data), S_OK);
    assert_eq!(
        on_disk(&r.path, DATA_START + MIB - 4096, 4096),
        data[..4096]
    );
    assert_eq!(on_disk(&r.path, DATA_START + 2 * MIB, 4096), data[4096..]);
    // b (which sits between a's extents) still reads zeros, and its writes do not reach a.
    let (_, zeros) = read(&mut eb, &r.mem, 0, MIB as usize);
    assert!(zeros.iter().all(|&x| x == 0));
    assert_eq!(write(&mut eb, &r.mem, MIB - 4096, &pattern(4096, 9)), S_OK);
    let (_, back) = read(&mut ea, &r.mem, MIB - 4096, 8192);
    assert_eq!(back, data);
    // The last block of a is addressable; one past it is not.
    assert_eq!(write(&mut ea, &r.mem, 2 * MIB - 4096, &data[..4096]), S_OK);
    assert_eq!(write(&mut ea, &r.mem, 2 * MIB, &data[..4096]), S_IOERR);
}

#[test]
fn flush_get_id_zeroes_discard() {
    let mut r = rig(32 * MIB);
    r.store.create("volume-with-a-long-name", 4 * MIB).unwrap();
    let dev = device(
        &r,
        "volume-with-a-long-name",
        Some(key(2)),
        Limits::default(),
    );
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    assert_eq!(
        run(&mut e, m, vec![hdr(m, T_FLUSH, 0), status_desc()]),
        (S_OK, 1)
    );
    let id = Desc {
        addr: GuestAddress(DATA),
        len: 20,
        writable: true,
    };
    assert_eq!(
        run(&mut e, m, vec![hdr(m, T_GET_ID, 0), id, status_desc()]),
        (S_OK, 21)
    );
    let mut got = [0u8; 20];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got, b"volume-with-a-long-n");

    write(&mut e, m, 0, &pattern(16384, 3));
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&sector.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        m.write_slice(&b, GuestAddress(DATA)).unwrap();
        Desc {
            addr: GuestAddress(DATA),
            len: 16,
            writable: false,
        }
    };
    let d = seg(8, 16, 0);
    assert_eq!(
        run(&mut e, m, vec![hdr(m, T_WRITE_ZEROES, 0), d, status_desc()]),
        (S_OK, 1)
    );
    let (_, back) = read(&mut e, m, 0, 16384);
    assert_eq!(back[..4096], pattern(16384, 3)[..4096]);
    assert!(
        back[4096..12288].iter().all(|&x| x == 0),
        "write-zeroes reads back zeros"
    );
    assert_eq!(back[12288..], pattern(16384, 3)[12288..]);
    // Encrypted zeros on disk are not zeros.
    assert!(
        on_disk(&r.path, dev.volume().extents[0].physical + 4096, 4096)
            .iter()
            .any(|&x| x != 0)
    );
    let d = seg(0, 8, 0);
    assert_eq!(
        run(&mut e, m, vec![hdr(m, T_DISCARD, 0), d, status_desc()]),
        (S_OK, 1)
    );
    let c = dev.counters.snapshot();
    assert_eq!(
        (c.flushes, c.write_zeroes, c.discards, c.errors),
        (1, 1, 1, 0)
    );
    // Unsupported and malformed requests are answered, and counted.
    assert_eq!(
        run(&mut e, m, vec![hdr(m, 77, 0), status_desc()]),
        (S_UNSUPP, 1)
    );
    assert_eq!(dev.counters.snapshot().errors, 1);
}

#[test]
fn store_errors_become_ioerr() {
    let mut r = rig(16 * MIB);
    r.store.create("a", 4 * MIB).unwrap();
    let dev = device(&r, "a", None, Limits::default());
    let mut e = Engine::new(dev, None).unwrap();
    // The store shrinks under the volume: reads come back short and must fail, not
    // return stale or partial data as success.
    File::options()
        .write(true)
        .open(&r.path)
        .unwrap()
        .set_len(DATA_START + MIB)
        .unwrap();
    let (st, _) = read(&mut e, &r.mem, 2 * MIB, 4096);
    assert_eq!(st, S_IOERR);
}

#[test]
fn throttled_requests_wait_and_complete() {
    let mut r = rig(16 * MIB);
    r.store.create("a", 4 * MIB).unwrap();
    let limits = Limits {
        iops_total: Some(Limit {
            rate: 200,
            burst: 1,
        }),
        ..Limits::default()
    };
    let dev = device(&r, "a", None, limits);
    let mut e = Engine::new(dev.clone(), None).unwrap();
    let m = &r.mem;
    // Ten reads at once: one passes, nine wait (5 ms apart), in order.
    for i in 0..10u16 {
        let h = 0x2000 + u64::from(i) * 16;
        let mut hb = [0u8; 16];
        hb[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
        m.write_slice(&hb, GuestAddress(h)).unwrap();
        let descs = vec![
            Desc {
                addr: GuestAddress(h),
                len: 16,
                writable: false,
            },
            Desc {
                addr: GuestAddress(DATA + u64::from(i) * 4096),
                len: 4096,
                writable: true,
            },
            Desc {
                addr: GuestAddress(STATUS + u64::from(i)),
                len: 1,
                writable: true,
            },
        ];
        let p = parse(descs, m, dev.capacity());
        e.enqueue(m, i, p);
    }
    assert_eq!(e.outstanding(), 10);
    assert!(e.next_wakeup().unwrap() > 0);
    let start = std::time::Instant::now();
    let mut order = Vec::new();
    while order.len() < 10 {
        order.extend(e.reap(m).into_iter().map(|c| c.head));
        if let Some(ns) = e.next_wakeup() {
            std::thread::sleep(Duration::from_nanos(ns));
            e.pump(m);
        }
        e.submit_and_wait().unwrap();
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>(), "FIFO");
    assert!(
        start.elapsed() >= Duration::from_millis(40),
        "{:?}",
        start.elapsed()
    );
    assert!(dev.counters.snapshot().throttled_ns > 0);
}

#[test]
fn inconsistent_volumes_are_refused_at_attach() {
    let r = rig(16 * MIB);
    let backing = Arc::new(Backing::open(&r.path).unwrap());
    let vol = |size: u64, extents: &[(u64, u64)]| crate::table::Volume {
        name: "x".into(),
        id: [1; 16],
        size,
        extents: extents
            .iter()
            .map(|&(physical, length)| crate::table::Extent { physical, length })
            .collect(),
    };
    let attach = |v| VolumeDevice::new(v, backing.clone(), None, Limits::default());
    assert!(matches!(
        attach(vol(8 * MIB, &[(DATA_START, MIB)])),
        Err(crate::blk::device::Error::Extents(_))
    ));
    assert!(matches!(
        attach(vol(0, &[])),
        Err(crate::blk::device::Error::Extents(_))
    ));
    assert!(matches!(
        attach(vol(MIB, &[(15 * MIB, 2 * MIB)])),
        Err(crate::blk::device::Error::PastStore { .. })
    ));
    let bad = Limits {
        iops_total: Some(Limit { rate: 0, burst: 1 }),
        ..Limits::default()
    };
    assert!(matches!(
        VolumeDevice::new(vol(MIB, &[(DATA_START, MIB)]), backing.clone(), None, bad),
        Err(crate::blk::device::Error::Limits(_))
    ));
    assert!(attach(vol(MIB, &[(DATA_START, MIB)])).is_ok());
}

#[test]
fn plain_volume_goes_zero_copy_when_lent_aligned_guest_memory() {
    let mut r = rig(64 * MIB);
    r.store.create("a", 8 * MIB).unwrap();
    // Two extents, so that one request spans both (two SQEs from one iovec list).
    r.store.create("gap", MIB).unwrap();
    r.store.grow("a", 12 * MIB).unwrap();
    let dev = device(&r, "a", None, Limits::default());
    let vol = dev.volume().clone();
    assert!(vol.extents.len() >= 2, "{:?}", vol.extents);
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    // Not lent: bounce buffers.
    let data = pattern(16384, 3);
    assert_eq!(write(&mut e, &mem, 0, &data), S_OK);
    assert_eq!(dev.counters.snapshot().zero_copy, 0);
    e.use_guest_memory(&mem);
    let across = 8 * MIB - 8192; // the last 8 KiB of the first extent and 8 KiB of the next
    let data = pattern(16384, 4);
    assert_eq!(write(&mut e, &mem, across, &data), S_OK);
    assert_eq!(dev.counters.snapshot().zero_copy, 1);
    mem.write_slice(&[0u8; 16384], GuestAddress(DATA)).unwrap();
    let (st, back) = read(&mut e, &mem, across, 16384);
    assert_eq!((st, back), (S_OK, data.clone()));
    assert_eq!(dev.counters.snapshot().zero_copy, 2);
    let second = vol.extents[1].physical;
    assert_eq!(on_disk(&r.path, second, 8192), data[8192..]);
    // A guest buffer off the O_DIRECT alignment falls back to a bounce buffer, same result.
    let odd = GuestAddress(DATA + 0x10_0000 + 8);
    mem.write_slice(&data, odd).unwrap();
    let d = Desc {
        addr: odd,
        len: 16384,
        writable: false,
    };
    let (st, _) = run(
        &mut e,
        &mem,
        vec![hdr(&mem, T_OUT, 4096 / 512), d, status_desc()],
    );
    assert_eq!(st, S_OK);
    assert_eq!(dev.counters.snapshot().zero_copy, 2);
    assert_eq!(
        on_disk(&r.path, vol.extents[0].physical + 4096, 16384),
        data
    );
    // Encrypted volumes never hand guest memory to the kernel.
    r.store.create("enc", MIB).unwrap();
    let dev = device(&r, "enc", Some(key(9)), Limits::default());
    let mut e = Engine::new(dev.clone(), None).unwrap();
    e.use_guest_memory(&mem);
    assert_eq!(write(&mut e, &mem, 0, &data), S_OK);
    assert_eq!(read(&mut e, &mem, 0, 16384), (S_OK, data));
    assert_eq!(dev.counters.snapshot().zero_copy, 0);
}

mod zeroes;
