//! End to end: WRITE_ZEROES and DISCARD from a Linux guest (QEMU TCG) on a plain and an
//! encrypted volume served by `outboard-card serve`.
//!
//! The guest writes random data to each disk, zeroes three ranges (two without, one with
//! UNMAP) and discards a fourth, reads the disk back and compares: the zeroed ranges read as
//! zeros, everything else is the data. The card's counters (`GET /volumes/{name}/stats`) show
//! that the zeroing arrived as WRITE_ZEROES requests (as many as the advertised limit allows:
//! one per range on the plain volume, one per 16 MiB on the encrypted one) and the discard as
//! DISCARD, with no write at all; the store's allocated blocks show UNMAP honoured exactly
//! where it was asked for on the plain volume, and never on the encrypted one.
//!
//! The guest's tools: util-linux `fallocate` on the block device, which Linux turns into
//! WRITE_ZEROES with no fallback to writes: `-z` (ZERO_RANGE) without UNMAP, like BLKZEROOUT,
//! and `-p` (PUNCH_HOLE) with it; busybox `blkdiscard` is BLKDISCARD.
//!
//! Drives the guest's console shell. Needs qemu-system-x86_64 and the guest image
//! (`cargo xtask guest`); prints `SKIP:` where either is missing.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use outboard_guest_harness::GuestVm;
use serde_json::Value;

mod common;

use common::{call, create_volume, linux_on_disks, qemu_prerequisites, shell, start, Daemon};

const MIB: u64 = 1 << 20;
const TEST: &str = "write_zeroes_and_discard_reach_the_card_as_such";
/// The pattern covers the first `AREA` bytes of each disk.
const AREA: u64 = 8 * MIB;
/// Zeroed in the pattern (offset, length, fallocate mode): 3 MiB without UNMAP and two blocks
/// with it.
const ZEROED: [(u64, u64, &str); 2] = [(MIB, 3 * MIB, "-z"), (6 * MIB + 4096, 8192, "-p")];
/// Filled with random data behind the pattern, then zeroed without UNMAP: one request on the
/// plain volume (1 GiB limit), three on the encrypted one (16 MiB limit).
const BIG: (u64, u64) = (AREA, 34 * MIB);
/// Discarded: reads of it may return anything.
const DISCARDED: (u64, u64) = (4 * MIB, 2 * MIB);
/// What must still hold the pattern.
const INTACT: [(u64, u64); 3] = [
    (0, MIB),
    (6 * MIB, 4096),
    (6 * MIB + 12288, 2 * MIB - 12288),
];
const KEY_HEX: &str = "3c5a0f1e2d4b69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\
                       a1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff00";

fn stats(d: &Daemon, name: &str) -> Value {
    let (st, v) = call(d, "GET", &format!("/volumes/{name}/stats"), "");
    assert_eq!(st, 200, "{v}");
    v
}

fn counter(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// Allocated 512-byte blocks of the store.
fn blocks(store: &Path) -> u64 {
    std::fs::metadata(store).unwrap().blocks()
}

/// The guest's commands for one disk; `dev` is its name in /dev.
fn exercise(vm: &GuestVm, d: &Daemon, store: &Path, volume: &str, dev: &str, encrypted: bool) {
    let long = Duration::from_secs(300);
    let wrote = shell(
        vm,
        "WRITE",
        &format!(
            "dd if=/tmp/pat of=/dev/{dev} bs=1M count={} oflag=direct conv=fsync 2>/dev/null; \
             out=$?",
            AREA / MIB
        ),
        long,
    );
    assert_eq!(wrote, "0", "{volume}: writing the pattern");
    let filled = shell(
        vm,
        "FILL",
        &format!(
            "dd if=/dev/urandom of=/dev/{dev} bs=1M seek={} count={} oflag=direct conv=fsync \
             2>/dev/null; out=$?",
            BIG.0 / MIB,
            BIG.1 / MIB
        ),
        long,
    );
    assert_eq!(filled, "0", "{volume}: filling the big range");
    let before = stats(d, volume);
    let blocks_before = blocks(store);

    let mut cmd = String::from("rc=0; ");
    for (offset, len, mode) in ZEROED {
        cmd += &format!("/usr/bin/fallocate {mode} -o {offset} -l {len} /dev/{dev} || rc=1; ");
    }
    cmd += &format!(
        "/usr/bin/fallocate -z -o {} -l {} /dev/{dev} || rc=1; ",
        BIG.0, BIG.1
    );
    cmd += &format!(
        "blkdiscard -o {} -l {} /dev/{dev} || rc=2; out=$rc",
        DISCARDED.0, DISCARDED.1
    );
    assert_eq!(shell(vm, "ZERO", &cmd, long), "0", "{volume}: zeroing");
    let after = stats(d, volume);
    let freed = blocks_before.saturating_sub(blocks(store));

    let mut cmd = format!(
        "dd if=/dev/{dev} of=/tmp/back bs=1M count={} iflag=direct 2>/dev/null; bad=; ",
        AREA / MIB
    );
    for (offset, len, _) in ZEROED {
        cmd += &format!(
            "cmp -s -n {len} /tmp/back /dev/zero {offset} 0 || bad=\"$bad zero@{offset}\"; "
        );
    }
    for (offset, len) in INTACT {
        cmd += &format!(
            "cmp -s -n {len} /tmp/back /tmp/pat {offset} {offset} || bad=\"$bad data@{offset}\"; "
        );
    }
    cmd += &format!(
        "cmp -s -n {} /dev/{dev} /dev/zero {} 0 || bad=\"$bad zero@{}\"; ",
        BIG.1, BIG.0, BIG.0
    );
    cmd += &format!(
        "cmp -s -n {} /tmp/back /dev/zero {} 0 && d=zeros || d=other; out=\"checked$bad \
         discarded=$d\"",
        DISCARDED.1, DISCARDED.0
    );
    let checked = shell(vm, "CHECK", &cmd, long);
    assert!(
        checked.starts_with("checked discarded="),
        "{volume}: {checked}"
    );

    // Each zeroed range is one WRITE_ZEROES on the plain volume (1 GiB limit); the encrypted
    // one advertises 16 MiB, so the guest split the 34 MiB range into three.
    let delta = |c: &str| counter(&after, c) - counter(&before, c);
    let expected_zeroes = if encrypted { 5 } else { 3 };
    assert_eq!(
        delta("write_zeroes"),
        expected_zeroes,
        "{volume}: {before} -> {after}"
    );
    // 2 MiB at 1 MiB per segment: one request of two segments, or two.
    assert!(
        (1..=2).contains(&delta("discards")),
        "{volume}: {before} -> {after}"
    );
    assert_eq!(delta("write_ops"), 0, "{volume}: zeroing became writes");
    assert_eq!(delta("write_bytes"), 0, "{volume}: zeroing became writes");
    assert_eq!(counter(&after, "errors"), 0, "{volume}: {after}");
    assert!(
        counter(&before, "write_bytes") >= AREA + BIG.1,
        "{volume}: {before}"
    );
    // The discard gives its blocks back on both volumes. Of the zeroed ranges only the one
    // with UNMAP on the plain volume does: ZERO_RANGE (the 3 MiB and the big range) keeps
    // blocks allocated, and encrypted zeros are written. (Slack: the file system may add or
    // drop extent-tree blocks.)
    let mut unmapped = DISCARDED.1;
    if !encrypted {
        unmapped += ZEROED[1].1;
    }
    let expected = unmapped / 512;
    assert!(
        freed.abs_diff(expected) <= 64,
        "{volume}: {freed} store blocks freed, {expected} expected"
    );
    eprintln!(
        "{TEST}: {volume}: {checked}, write_zeroes +{}, discards +{}, write_ops +0, \
         {freed} store blocks freed",
        delta("write_zeroes"),
        delta("discards")
    );
}

/// The first physical byte of a volume (as `POST /volumes` answered).
fn physical(created: &Value) -> u64 {
    created["extents"][0]["physical"].as_u64().unwrap()
}

/// The next hole at or after `offset` in `file` (SEEK_HOLE).
fn next_hole(file: &std::fs::File, offset: u64) -> u64 {
    // SAFETY: lseek on a descriptor we own only moves its file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    assert!(r >= 0, "{}", std::io::Error::last_os_error());
    r as u64
}

#[test]
fn write_zeroes_and_discard_reach_the_card_as_such() {
    if !qemu_prerequisites(TEST) {
        return;
    }
    let d = start("qemu-zeroes", 256);
    let store = d.dir.join("store");
    let plain = create_volume(&d, "plain", 64);
    let crypt = create_volume(&d, "crypt", 48);
    let (plain_sock, crypt_sock) = (d.dir.join("plain.sock"), d.dir.join("crypt.sock"));
    let attach = |name: &str, body: String| {
        let (st, v) = call(&d, "PUT", &format!("/volumes/{name}/attachment"), &body);
        assert_eq!(st, 201, "{v}");
    };
    attach(
        "plain",
        format!(r#"{{"socket":"{}","queues":2}}"#, plain_sock.display()),
    );
    attach(
        "crypt",
        format!(
            r#"{{"socket":"{}","queues":2,"key_hex":"{}"}}"#,
            crypt_sock.display(),
            KEY_HEX
        ),
    );

    let vm = linux_on_disks(&[&plain_sock, &crypt_sock]);
    // Which disk is which: GET_ID gives the volume name as the serial.
    let serials = shell(
        &vm,
        "SERIALS",
        "out=$(for b in vda vdb; do printf '%s=%s,' $b $(cat /sys/block/$b/serial); done)",
        Duration::from_secs(60),
    );
    let dev_of = |volume: &str| {
        serials
            .split(',')
            .find_map(|kv| kv.split_once('=').filter(|(_, v)| *v == volume))
            .map(|(dev, _)| dev.to_owned())
            .unwrap_or_else(|| panic!("no disk with serial {volume}: {serials}"))
    };
    // util-linux's fallocate, by its path: busybox's shell prefers its own applet (which has
    // no modes) to a command of the same name.
    let fallocate = shell(
        &vm,
        "FALLOCATE",
        "out=$(/usr/bin/fallocate -h 2>&1 | grep -c zero-range)",
        Duration::from_secs(60),
    );
    assert_eq!(
        fallocate,
        "1",
        "the guest's fallocate has no --zero-range: rebuild the image (`cargo xtask guest`)\n{}",
        vm.lines().join("\n")
    );
    let made = shell(
        &vm,
        "PATTERN",
        &format!(
            "dd if=/dev/urandom of=/tmp/pat bs=1M count={} 2>/dev/null; out=$?",
            AREA / MIB
        ),
        Duration::from_secs(120),
    );
    assert_eq!(made, "0");
    exercise(&vm, &d, &store, "plain", &dev_of("plain"), false);
    exercise(&vm, &d, &store, "crypt", &dev_of("crypt"), true);
    drop(vm);

    // On the store: the plain volume's UNMAP zeroing punched a hole; the encrypted volume's
    // zeros are ciphertext in both ranges, UNMAP or not (a hole or plain zeros would decrypt
    // to garbage).
    let f = std::fs::File::open(&store).unwrap();
    let p = physical(&plain) + ZEROED[1].0;
    assert_eq!(
        next_hole(&f, p),
        p,
        "no hole where the plain volume was unmapped"
    );
    for (offset, len, mode) in ZEROED {
        let mut zeroed = vec![0u8; len as usize];
        f.read_exact_at(&mut zeroed, physical(&crypt) + offset)
            .unwrap();
        let zero_blocks = zeroed
            .chunks_exact(4096)
            .filter(|b| b.iter().all(|&x| x == 0))
            .count();
        assert_eq!(
            zero_blocks, 0,
            "plain zeros in the encrypted store ({mode})"
        );
    }
}
