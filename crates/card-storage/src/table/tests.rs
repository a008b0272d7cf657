use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use super::format::{self, COPY_SIZE, HEADER_LEN};
use super::*;
use crate::testutil::{Rng, TempDir};

const MIB: u64 = 1 << 20;

fn backing_file(dir: &TempDir, size: u64) -> std::path::PathBuf {
    let path = dir.path().join("store");
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Writes raw bytes into a table copy, bypassing O_DIRECT (as a crash or an attacker would).
fn poke(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_copy(path: &std::path::Path, copy: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; COPY_SIZE];
    f.read_exact_at(&mut buf, (copy * COPY_SIZE) as u64)
        .unwrap();
    buf
}

#[test]
fn create_grow_delete_list_persist() {
    let dir = TempDir::new("table");
    let path = backing_file(&dir, 64 * MIB);
    let mut s = VolumeStore::format(&path).unwrap();
    assert!(s.list().is_empty());
    let a = s.create("a", 3 * MIB + 4096).unwrap();
    assert_eq!(
        a.extents,
        vec![Extent {
            physical: DATA_START,
            length: 4 * MIB
        }]
    );
    let b = s.create("b", MIB).unwrap();
    assert_eq!(
        b.extents,
        vec![Extent {
            physical: DATA_START + 4 * MIB,
            length: MIB
        }]
    );
    // Growing `a` cannot extend in place (b follows), so it gets a second extent.
    let a = s.grow("a", 6 * MIB).unwrap();
    assert_eq!(a.extents.len(), 2);
    assert_eq!(
        a.extents[1],
        Extent {
            physical: DATA_START + 5 * MIB,
            length: 2 * MIB
        }
    );
    // Growing within the rounded-up size allocates nothing.
    let b = s.grow("b", MIB).unwrap();
    assert_eq!(b.extents.len(), 1);
    assert!(matches!(
        s.grow("a", MIB),
        Err(Error::Edit(EditError::Shrink { .. }))
    ));
    assert!(matches!(
        s.create("a", MIB),
        Err(Error::Edit(EditError::Exists(_)))
    ));
    assert!(matches!(
        s.create("bad/name", MIB),
        Err(Error::Edit(EditError::Name(_)))
    ));
    assert!(matches!(
        s.create("c", 100),
        Err(Error::Edit(EditError::Size(100)))
    ));
    assert!(matches!(
        s.create("c", 1 << 40),
        Err(Error::Edit(EditError::NoSpace { .. }))
    ));
    s.delete("b").unwrap();
    assert!(matches!(
        s.delete("b"),
        Err(Error::Edit(EditError::NotFound(_)))
    ));
    // First fit reuses b's hole.
    let c = s.create("c", MIB).unwrap();
    assert_eq!(c.extents[0].physical, DATA_START + 4 * MIB);
    let gen = s.table().generation;
    let before = s.table().clone();
    drop(s);

    let s = VolumeStore::open(&path).unwrap();
    assert_eq!(s.table(), &before);
    assert_eq!(s.table().generation, gen);
    assert_eq!(
        s.list().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
}

#[test]
fn fragmented_allocation_spans_gaps() {
    let mut t = VolumeTable::empty(DATA_START + 8 * MIB, [1; 16]);
    for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
        t.create(n, 2 * MIB, [i as u8; 16]).unwrap();
    }
    t.delete("a").unwrap();
    t.delete("c").unwrap();
    let v = t.create("e", 4 * MIB, [9; 16]).unwrap().clone();
    assert_eq!(
        v.extents,
        vec![
            Extent {
                physical: DATA_START,
                length: 2 * MIB
            },
            Extent {
                physical: DATA_START + 4 * MIB,
                length: 2 * MIB
            },
        ]
    );
    validate(&t).unwrap();
    assert_eq!(t.free_bytes(), 0);
    // Mapping across the extent boundary splits the range.
    assert_eq!(
        v.map(2 * MIB - 4096, 8192).unwrap(),
        vec![
            (DATA_START + 2 * MIB - 4096, 4096),
            (DATA_START + 4 * MIB, 4096),
        ]
    );
    assert!(v.map(4 * MIB - 4096, 8192).is_none());
    assert!(v.map(u64::MAX, 2).is_none());
    assert_eq!(v.map(0, 0).unwrap(), vec![]);
}

#[test]
fn one_corrupt_copy_falls_back_to_the_other() {
    let dir = TempDir::new("table");
    let path = backing_file(&dir, 16 * MIB);
    let mut s = VolumeStore::format(&path).unwrap();
    s.create("a", MIB).unwrap();
    let older = s.table().clone();
    s.create("b", MIB).unwrap();
    let cur = s.current_copy();
    drop(s);
    // Flip one bit inside the current copy's body: checksum fails, the older copy wins.
    let mut bytes = read_copy(&path, cur);
    bytes[HEADER_LEN + 20] ^= 1;
    poke(&path, (cur * COPY_SIZE) as u64, &bytes[..4096]);
    let s = VolumeStore::open(&path).unwrap();
    assert_eq!(s.table(), &older);
    // Both copies bad: refuse with a clear error.
    drop(s);
    poke(&path, ((1 - cur) * COPY_SIZE) as u64, b"garbage!");
    match VolumeStore::open(&path) {
        Err(Error::NoTable { copy0, copy1 }) => {
            let (bad_magic, bad_crc) = if cur == 0 {
                (copy1, copy0)
            } else {
                (copy0, copy1)
            };
            assert_eq!(bad_magic, format::Error::Magic);
            assert!(matches!(bad_crc, format::Error::Checksum { .. }));
        }
        other => panic!("expected NoTable, got {other:?}"),
    }
}

#[test]
fn torn_writes_recover_previous_generation() {
    let dir = TempDir::new("table");
    let path = backing_file(&dir, 256 * MIB);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s = VolumeStore::format(&path).unwrap();
    for i in 0..40 {
        s.create(&format!("v{i}"), (1 + rng.below(4)) * MIB)
            .unwrap();
    }
    for round in 0..100 {
        let previous = s.table().clone();
        // Build the next table, then tear its write: only a prefix reaches the disk, and the
        // rest of the copy is garbage or the stale older table.
        let mut next = previous.clone();
        next.generation += 1;
        next.create(&format!("n{round}"), MIB, [round as u8; 16])
            .unwrap();
        let bytes = format::encode(&next).unwrap();
        let cut = rng.below(bytes.len() as u64) as usize;
        let target = 1 - s.current_copy();
        let mut torn = read_copy(&path, target);
        torn[..cut].copy_from_slice(&bytes[..cut]);
        if round % 2 == 0 {
            let end = (cut + 1 + rng.below(512) as usize).min(torn.len());
            rng.fill(&mut torn[cut..end]);
        }
        poke(&path, (target * COPY_SIZE) as u64, &torn);
        drop(s);
        s = VolumeStore::open(&path).unwrap();
        // The stale bytes after the cut may happen to equal the new table's: then the write
        // was complete after all and the new table is the right answer.
        let expect = if torn[..bytes.len()] == bytes[..] {
            &next
        } else {
            &previous
        };
        assert_eq!(s.table(), expect, "round {round}, cut at {cut}");
        if expect == &next {
            continue;
        }
        // The store keeps working after recovery.
        s.create(&format!("n{round}"), MIB).unwrap();
        s.delete(&format!("n{round}")).unwrap();
    }
}

#[test]
fn truncated_device_is_rejected() {
    let dir = TempDir::new("table");
    let path = backing_file(&dir, 16 * MIB);
    VolumeStore::format(&path).unwrap();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    assert!(matches!(
        VolumeStore::open(&path),
        Err(Error::DeviceShrank { .. })
    ));
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert!(matches!(
        VolumeStore::open(&path),
        Err(Error::TooSmall(4096))
    ));
}

fn table_with(volumes: Vec<Volume>) -> VolumeTable {
    VolumeTable {
        generation: 3,
        device_size: DATA_START + 16 * MIB,
        device_id: [7; 16],
        volumes,
    }
}

fn vol(name: &str, id: u8, size: u64, extents: &[(u64, u64)]) -> Volume {
    Volume {
        name: name.into(),
        id: [id; 16],
        size,
        extents: extents
            .iter()
            .map(|&(physical, length)| Extent { physical, length })
            .collect(),
    }
}

/// Encodes without validation, as a hostile writer could.
fn encode_raw(t: &VolumeTable) -> Vec<u8> {
    format::encode(t).unwrap()
}

#[test]
fn hostile_tables_are_rejected() {
    let d = DATA_START;
    type Check = fn(&format::Error) -> bool;
    let cases: Vec<(VolumeTable, Check)> = vec![
        (
            table_with(vec![vol("a", 1, MIB, &[(d + 15 * MIB, 2 * MIB)])]),
            |e| {
                matches!(
                    e,
                    format::Error::ExtentRange { .. } | format::Error::ExtentTotal { .. }
                )
            },
        ),
        (
            table_with(vec![vol("a", 1, 2 * MIB, &[(d + 15 * MIB, 2 * MIB)])]),
            |e| matches!(e, format::Error::ExtentRange { .. }),
        ),
        (table_with(vec![vol("a", 1, MIB, &[(0, MIB)])]), |e| {
            matches!(e, format::Error::ExtentRange { .. })
        }),
        (
            table_with(vec![vol("a", 1, MIB, &[(u64::MAX - MIB + 1, MIB)])]),
            |e| {
                matches!(
                    e,
                    format::Error::ExtentAlign { .. } | format::Error::ExtentRange { .. }
                )
            },
        ),
        (
            table_with(vec![vol("a", 1, MIB, &[(d + 4096, MIB)])]),
            |e| matches!(e, format::Error::ExtentAlign { .. }),
        ),
        (
            table_with(vec![
                vol("a", 1, MIB, &[(d, MIB)]),
                vol("b", 2, 2 * MIB, &[(d + 1, 0), (d, 2 * MIB)]),
            ]),
            |e| matches!(e, format::Error::ExtentAlign { .. }),
        ),
        (
            table_with(vec![
                vol("a", 1, 2 * MIB, &[(d, 2 * MIB)]),
                vol("b", 2, MIB, &[(d + MIB, MIB)]),
            ]),
            |e| matches!(e, format::Error::Overlap { .. }),
        ),
        (
            table_with(vec![vol("a", 1, 2 * MIB, &[(d, MIB), (d, MIB)])]),
            |e| matches!(e, format::Error::Overlap { .. }),
        ),
        (
            table_with(vec![
                vol("a", 1, MIB, &[(d, MIB)]),
                vol("a", 2, MIB, &[(d + MIB, MIB)]),
            ]),
            |e| matches!(e, format::Error::DuplicateName(_)),
        ),
        (
            table_with(vec![
                vol("a", 1, MIB, &[(d, MIB)]),
                vol("b", 1, MIB, &[(d + MIB, MIB)]),
            ]),
            |e| matches!(e, format::Error::DuplicateId(_)),
        ),
        (table_with(vec![vol("a", 1, 100, &[(d, MIB)])]), |e| {
            matches!(e, format::Error::VolumeSize(_))
        }),
        (table_with(vec![vol("a", 1, 0, &[])]), |e| {
            matches!(e, format::Error::VolumeSize(_))
        }),
        (table_with(vec![vol("a", 1, 3 * MIB, &[(d, MIB)])]), |e| {
            matches!(e, format::Error::ExtentTotal { .. })
        }),
        (table_with(vec![vol("..", 1, MIB, &[(d, MIB)])]), |e| {
            matches!(e, format::Error::Name { .. })
        }),
    ];
    for (i, (t, want)) in cases.into_iter().enumerate() {
        let bytes = encode_raw(&t);
        let err = decode(&bytes).expect_err(&format!("case {i} must fail"));
        assert!(want(&err), "case {i}: unexpected {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

/// Rewrites header fields and fixes the checksum, so that only the field itself is wrong.
fn with_field(bytes: &[u8], at: usize, val: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + val.len()].copy_from_slice(val);
    b[56..60].fill(0);
    let body_len = u32::from_le_bytes(b[52..56].try_into().unwrap()) as usize;
    let end = HEADER_LEN.saturating_add(body_len).min(b.len());
    let crc = crc32c::crc32c(&b[..end]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn hostile_headers_are_rejected() {
    let t = table_with(vec![
        vol("a", 1, MIB, &[(DATA_START, MIB)]),
        vol("b", 2, MIB, &[(DATA_START + MIB, MIB)]),
    ]);
    let good = encode_raw(&t);
    assert_eq!(decode(&good).unwrap(), t);
    let mut padded = good.clone();
    padded.resize(COPY_SIZE, 0xff);
    assert_eq!(
        decode(&padded).unwrap(),
        t,
        "padding after the body is ignored"
    );
    assert_eq!(decode(&good[..10]), Err(format::Error::Short));
    assert_eq!(
        decode(&with_field(&good, 8, &2u32.to_le_bytes())),
        Err(format::Error::Version(2))
    );
    assert_eq!(
        decode(&with_field(&good, 12, &65u32.to_le_bytes())),
        Err(format::Error::HeaderLen(65))
    );
    assert!(matches!(
        decode(&with_field(&good, 52, &u32::MAX.to_le_bytes())),
        Err(format::Error::BodyLen(_))
    ));
    assert!(matches!(
        decode(&good[..good.len() - 1]),
        Err(format::Error::BodyLen(_))
    ));
    // Volume count larger than the body holds, and smaller (trailing bytes).
    assert!(matches!(
        decode(&with_field(&good, 48, &u32::MAX.to_le_bytes())),
        Err(format::Error::TruncatedVolume { index: 2 })
    ));
    assert!(matches!(
        decode(&with_field(&good, 48, &1u32.to_le_bytes())),
        Err(format::Error::Trailing(_))
    ));
    // Extent count past the end of the body.
    let ext_count_at = HEADER_LEN + 88;
    assert!(matches!(
        decode(&with_field(&good, ext_count_at, &u32::MAX.to_le_bytes())),
        Err(format::Error::TruncatedVolume { index: 0 })
    ));
    assert!(matches!(
        decode(&with_field(&good, 24, &(MIB - 1).to_le_bytes())),
        Err(format::Error::DeviceSize(_))
    ));
    assert!(matches!(
        decode(&with_field(&good, 60, &[1])),
        Err(format::Error::Reserved)
    ));
}

#[test]
fn random_mutations_never_panic() {
    let t = table_with(vec![
        vol("a", 1, MIB, &[(DATA_START, MIB)]),
        vol("b", 2, 2 * MIB, &[(DATA_START + MIB, 2 * MIB)]),
    ]);
    let good = encode_raw(&t);
    let mut rng = Rng(12345);
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = rng.next_u64() as u8;
        }
        if rng.below(2) == 0 {
            // Keep the checksum valid so that validation, not the CRC, must catch it.
            b[56..60].fill(0);
            let crc = crc32c::crc32c(&b);
            b[56..60].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(t) = decode(&b) {
            validate(&t).unwrap();
        }
    }
}
