//! The Debian Linux guest image (`cargo xtask guest`) under QEMU with TCG: it boots with the
//! CPUs and memory it is given, runs named scripts, loads the virtio modules and runs fio with
//! verify on a virtio-blk disk. Each boot takes about 3 s on an idle 2-core host.

use outboard_guest_harness::{marker, wait_for_path, Daemon, GuestCommand, Runner};
use std::process::Command;
use std::time::Duration;

/// Generous: TCG boots slow down a lot when tests run in parallel on 2 cores.
const BOOT: Duration = Duration::from_secs(180);
const EXIT: Duration = Duration::from_secs(60);

fn assert_memory_close(mem_kib: u64, given_mib: u64) {
    let given_kib = given_mib * 1024;
    // MemTotal lacks the kernel image and early reservations: a few tens of MiB.
    assert!(
        mem_kib <= given_kib && mem_kib >= given_kib * 85 / 100,
        "mem_kib={mem_kib} for {given_mib} MiB"
    );
}

#[test]
fn boots_with_two_cpus_and_powers_off() {
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .cpus(2)
        .memory_mib(512)
        .cmdline("outboard.poweroff")
        .spawn()
        .unwrap();
    let ready = vm.wait_for_ready(BOOT).unwrap();
    assert_eq!(ready.cpus, 2);
    assert_memory_close(ready.mem_kib, 512);
    assert!(ready.uptime_s > 0.0);
    let status = vm.wait_exit(EXIT).unwrap();
    assert!(
        status.success(),
        "QEMU exited with {status}; stderr: {}",
        vm.stderr()
    );
    assert!(
        vm.lines().iter().all(|l| !l.contains("cannot load")),
        "a module failed to load"
    );
}

#[test]
fn runs_a_named_script_then_powers_off() {
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .memory_mib(384)
        .run_command("hello")
        .spawn()
        .unwrap();
    let ready = vm.wait_for_ready(BOOT).unwrap();
    assert_eq!(ready.cpus, 1);
    assert_memory_close(ready.mem_kib, 384);
    let hello = vm.wait_for_line("OUTBOARD_HELLO", BOOT).unwrap();
    assert!(hello.contains("kernel=6.1."), "{hello}");
    let done = vm.wait_for_run_done(BOOT).unwrap();
    assert_eq!((done.name.as_str(), done.status), ("hello", 0));
    assert!(vm.wait_exit(EXIT).unwrap().success());
}

#[test]
fn an_unknown_script_reports_status_127() {
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .run_command("no-such-script")
        .spawn()
        .unwrap();
    let done = vm.wait_for_run_done(BOOT).unwrap();
    assert_eq!((done.name.as_str(), done.status), ("no-such-script", 127));
    assert!(vm.wait_exit(EXIT).unwrap().success());
}

#[test]
fn too_little_memory_is_reported_not_a_silently_broken_guest() {
    // The unpacked image (fio's libraries mostly) needs about 256 MiB.
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .memory_mib(160)
        .cmdline("outboard.poweroff")
        .spawn()
        .unwrap();
    let line = vm.wait_for_line("OUTBOARD_GUEST_", BOOT).unwrap();
    assert!(
        line.contains("OUTBOARD_GUEST_ERROR reason=initramfs-incomplete"),
        "{line}"
    );
    assert!(vm.wait_exit(EXIT).unwrap().success());
}

#[test]
fn fio_verify_passes_on_a_virtio_blk_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .cpus(2)
        .run_command("fio-verify")
        .cmdline("outboard.fio.size=8M")
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .spawn()
        .unwrap();
    vm.wait_for_ready(BOOT).unwrap();
    let result = vm.wait_for_line(marker::FIO_RESULT, BOOT).unwrap();
    let fields = marker::fields(&result, marker::FIO_RESULT).unwrap();
    assert_eq!(fields["status"], "ok", "{result}");
    assert_eq!(fields["errors"], "0", "{result}");
    assert_eq!(fields["write_kib"], "8192", "{result}");
    assert_eq!(
        fields["read_kib"], "8192",
        "verify reads everything back: {result}"
    );
    assert_eq!(vm.wait_for_run_done(BOOT).unwrap().status, 0);
    assert!(vm.wait_exit(EXIT).unwrap().success());
    // The virtio_blk module really drove a PCI device, and fio's writes reached the host file.
    assert!(vm
        .lines()
        .iter()
        .any(|l| l.contains("virtio_blk") && l.contains("[vda]")));
    let data = std::fs::read(&disk).unwrap();
    let written = data[..8 << 20]
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert_eq!(
        written, 2048,
        "fio verified all 2048 blocks, so every one must be in the file"
    );
    assert!(
        data[8 << 20..].iter().all(|&b| b == 0),
        "fio wrote past its 8 MiB"
    );
}

/// The set-up later issues use to test vhost-user backends with a real Linux driver: guest
/// memory in a shared memfd and a vhost-user-blk disk served by qemu-storage-daemon.
#[test]
fn fio_verify_passes_on_a_vhost_user_blk_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, socket) = (dir.path().join("disk.raw"), dir.path().join("blk.sock"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let _backend = Daemon::spawn(Command::new("qemu-storage-daemon").args([
        "--blockdev",
        &format!("driver=file,node-name=file0,filename={}", disk.display()),
        "--export",
        &format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        ),
    ]))
    .unwrap();
    assert!(
        wait_for_path(&socket, Duration::from_secs(30)),
        "qemu-storage-daemon made no socket"
    );
    let vm = GuestCommand::linux(Runner::QemuTcg)
        .cpus(2)
        .shared_memory()
        .run_command("fio-verify")
        .cmdline("outboard.fio.size=8M")
        .args([
            "-chardev",
            &format!("socket,id=blk0,path={}", socket.display()),
        ])
        .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"])
        .spawn()
        .unwrap();
    let result = vm.wait_for_line(marker::FIO_RESULT, BOOT).unwrap();
    let fields = marker::fields(&result, marker::FIO_RESULT).unwrap();
    assert_eq!(fields["status"], "ok", "{result}");
    assert_eq!(vm.wait_for_run_done(BOOT).unwrap().status, 0);
    assert!(vm.wait_exit(EXIT).unwrap().success());
    let data = std::fs::read(&disk).unwrap();
    assert!(
        data[..8 << 20]
            .chunks(4096)
            .all(|b| b.iter().any(|&x| x != 0)),
        "a block never reached the backend's file"
    );
}
