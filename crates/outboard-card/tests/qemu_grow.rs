//! End to end: a volume grown while a Linux guest (QEMU TCG) uses it. The card extends the
//! running device and sends CONFIG_CHANGE_MSG on the backend request channel; QEMU re-reads the
//! capacity and raises a config interrupt; the guest sees the new size without a reboot and
//! fio writes and verifies the new area, which lands in the volume's new extent on the store.
//!
//! Drives the guest's console shell (no `outboard.run=`), so no guest script is needed. Needs
//! qemu-system-x86_64 and the guest image (`cargo xtask guest`); prints `SKIP:` where missing.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use outboard_guest_harness::GuestVm;

mod common;

use common::{call, create_volume, linux_on_disks, qemu_prerequisites, shell, start};

const MIB: u64 = 1 << 20;

/// fio with verify on `size_mib` MiB at `offset_mib` of /dev/vda, output to /tmp/fio.`tag`.
fn fio_command(tag: &str, offset_mib: u64, size_mib: u64) -> String {
    format!(
        "fio --name=grown --filename=/dev/vda --offset={offset_mib}M --size={size_mib}M \
         --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c \
         --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse \
         --terse-version=3 >/tmp/fio.{tag} 2>&1"
    )
}

/// fio's exit code and error count, once `$rc` holds the former.
fn fio_result(tag: &str) -> String {
    format!("out=\"rc=$rc errors=$(grep '^3;' /tmp/fio.{tag} | cut -d';' -f5)\"")
}

fn fio(vm: &GuestVm, tag: &str, offset_mib: u64, size_mib: u64) {
    let cmd = format!(
        "{}; rc=$?; {}",
        fio_command(tag, offset_mib, size_mib),
        fio_result(tag)
    );
    check_fio(vm, tag, &cmd, offset_mib, size_mib);
}

fn check_fio(vm: &GuestVm, tag: &str, cmd: &str, offset_mib: u64, size_mib: u64) {
    let result = shell(vm, tag, cmd, Duration::from_secs(600));
    assert_eq!(
        result,
        "rc=0 errors=0",
        "fio at {offset_mib}M+{size_mib}M; serial:\n{}",
        vm.lines().join("\n")
    );
}

#[test]
fn a_linux_guest_sees_a_live_grow_and_uses_the_new_area() {
    if !qemu_prerequisites("a_linux_guest_sees_a_live_grow_and_uses_the_new_area") {
        return;
    }
    let d = start("qemu-grow", 256);
    let store = d.dir.join("store");
    create_volume(&d, "g", 64);
    // A neighbour right behind g, so that the grown area is a second extent elsewhere.
    create_volume(&d, "n", 8);
    let sock = d.dir.join("g.sock");
    let attach = format!(r#"{{"socket":"{}","queues":2}}"#, sock.display());
    assert_eq!(call(&d, "PUT", "/volumes/g/attachment", &attach).0, 201);

    let vm = linux_on_disks(&[&sock]);
    let before = shell(
        &vm,
        "SIZE",
        "out=$(cat /sys/block/vda/size)",
        Duration::from_secs(60),
    );
    assert_eq!(before, (64 * MIB / 512).to_string());
    // The grow lands while the guest has I/O in flight on the old area.
    let started = shell(
        &vm,
        "BG",
        &format!("{} & bg=$!; out=started", fio_command("FIO_OLD", 32, 32)),
        Duration::from_secs(60),
    );
    assert_eq!(started, "started");
    std::thread::sleep(Duration::from_secs(1));

    let (st, g) = call(
        &d,
        "PATCH",
        "/volumes/g",
        &format!(r#"{{"size":{}}}"#, 128 * MIB),
    );
    assert_eq!(st, 200, "{g}");
    assert_eq!(
        g["front_end_notified"], true,
        "QEMU did not acknowledge the config change: {g}"
    );
    let extents = g["extents"].as_array().unwrap().clone();
    assert_eq!(extents.len(), 2, "{g}");

    // No reboot, no rescan: the config interrupt alone brings the new size.
    let after = shell(
        &vm,
        "SIZE2",
        "i=0; while [ \"$(cat /sys/block/vda/size)\" = 131072 ] && [ $i -lt 60 ]; do \
         sleep 1; i=$((i+1)); done; out=$(cat /sys/block/vda/size)",
        Duration::from_secs(120),
    );
    assert_eq!(after, (128 * MIB / 512).to_string());
    let old = format!("wait $bg; rc=$?; {}", fio_result("FIO_OLD"));
    check_fio(&vm, "FIO_OLD", &old, 32, 32);
    // Across the old end and in the last megabytes of the new one.
    fio(&vm, "FIO_EDGE", 56, 16);
    fio(&vm, "FIO_END", 112, 16);
    let dmesg = vm
        .lines()
        .into_iter()
        .find(|l| l.contains("new size"))
        .unwrap_or_default();
    eprintln!("guest kernel: {dmesg}");
    drop(vm);

    // The grown area's writes are in the second extent: fio's verify headers (magic 0xacca)
    // fill its first 8 MiB (guest 64..72 MiB) and its last 16 MiB.
    let f = std::fs::File::open(&store).unwrap();
    let second = &extents[1];
    let (phys, len) = (
        second["physical"].as_u64().unwrap(),
        second["length"].as_u64().unwrap(),
    );
    assert_eq!(len, 64 * MIB);
    let headers = |at: u64, bytes: u64| {
        let mut buf = vec![0u8; bytes as usize];
        f.read_exact_at(&mut buf, at).unwrap();
        buf.chunks_exact(4096)
            .filter(|b| b[0] == 0xca && b[1] == 0xac)
            .count() as u64
    };
    assert_eq!(headers(phys, 8 * MIB), 8 * MIB / 4096);
    assert_eq!(headers(phys + 48 * MIB, 16 * MIB), 16 * MIB / 4096);
    let (_, stats) = call(&d, "GET", "/volumes/g/stats", "");
    assert_eq!(stats["errors"], 0, "{stats}");
}
