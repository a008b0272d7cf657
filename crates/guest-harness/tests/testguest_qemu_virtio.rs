//! The test guest's virtio-pci drivers under QEMU TCG (q35, PVH boot): `blk-verify` against a
//! vhost-user-blk disk served by qemu-storage-daemon with MSI-X interrupts taken (the data must be
//! in the backing file), persistence across a backend restart between boots, `blk-loop` through a
//! backend killed and restarted mid-run, `net-exchange` against a UDP echo, `vsock-echo` through
//! vhost-device-vsock (when installed), and `bad-desc` on QEMU's own virtio-blk (the device must
//! enter NEEDS_RESET and work again after a reset). Each boot takes about a second.

use outboard_guest_harness::{marker, GuestCommand, Runner};
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: TCG slows down a lot when tests run in parallel on 2 cores.
const RESULT_WAIT: Duration = Duration::from_secs(60);
const SECTOR: u64 = 512;

/// Kills the daemon when the test ends, whatever happens.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(program: &str, test: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIP: {test}: {program} is not installed");
    }
    found
}

fn result(vm: &outboard_guest_harness::GuestVm, marker_name: &str) -> BTreeMap<String, String> {
    vm.expect_fields(marker_name, RESULT_WAIT)
}

fn serve_disk(dir: &Path, image: &Path, queues: u32) -> (Daemon, std::path::PathBuf) {
    let socket = dir.join("vub.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, socket)
}

#[test]
fn blk_verify_over_vhost_user_with_four_queues() {
    const TEST: &str = "blk_verify_over_vhost_user_with_four_queues";
    if !have("qemu-storage-daemon", TEST) || !have("qemu-system-x86_64", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let capacity_sectors = 32 * 1024 * 1024 / SECTOR;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(capacity_sectors * SECTOR)
        .unwrap();
    let (_daemon, socket) = serve_disk(dir.path(), &image, 4);
    let (blocks, seed) = (256u64, 77u64);
    let vm = GuestCommand::testguest(Runner::QemuTcg)
        .shared_memory()
        .run_command("blk-verify")
        .cmdline(&format!(
            "outboard.blk_queues=4 outboard.blk_sectors={blocks} outboard.blk_seed={seed} outboard.virtio_irq=1"
        ))
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .arg("-device")
        .arg("vhost-user-blk-pci,chardev=c0,num-queues=4,disable-legacy=on")
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(r["ok"], "1", "{r:?}");
    assert_eq!(r["written"], blocks.to_string());
    assert_eq!(r["verified"], blocks.to_string());
    assert_eq!(r["queues"], "4");
    assert_eq!(r["errors"], "0");
    assert_eq!(r["unit"], "512");
    // Every queue's MSI-X vector fired at least once (the backend's call eventfds reach the guest).
    let irqs: u32 = r["irqs"].parse().unwrap();
    assert!(irqs >= 4, "irqs={irqs}");
    vm.wait_exit(RESULT_WAIT).unwrap();
    // Every block is in the backing file where the guest put it: blocks spread evenly, each
    // starting with the magic, its sector and the seed.
    let data = std::fs::read(&image).unwrap();
    if let Err(e) = marker::check_blk_pattern(&data, capacity_sectors, blocks, seed) {
        panic!("{e}");
    }
}

#[test]
fn net_exchange_with_a_udp_echo() {
    const TEST: &str = "net_exchange_with_a_udp_echo";
    if !have("qemu-system-x86_64", TEST) {
        return;
    }
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    // QEMU's end: a port free a moment ago (QEMU binds it itself).
    let qemu_port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    echo.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut echoed = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                echo.send_to(&buf[..n], from).unwrap();
                echoed += 1;
            }
        }
        echoed
    });
    let frames = 64;
    let vm = GuestCommand::testguest(Runner::QemuTcg)
        .run_command("net-exchange")
        .cmdline(&format!("outboard.net_echo=1 outboard.net_frames={frames}"))
        .arg("-netdev")
        .arg(format!(
            "socket,id=n0,udp=127.0.0.1:{echo_port},localaddr=127.0.0.1:{qemu_port}"
        ))
        .arg("-device")
        .arg("virtio-net-pci,netdev=n0,disable-legacy=on")
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_NET_RESULT");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = echoer.join().unwrap();
    assert_eq!(r["ok"], "1", "{r:?}");
    assert_eq!(r["sent"], frames.to_string());
    assert_eq!(r["received"], frames.to_string());
    assert_eq!((r["lost"].as_str(), r["duplicated"].as_str()), ("0", "0"));
    assert_eq!(echoed, frames, "frames the echo saw");
}

#[test]
fn bad_descriptors_put_qemu_virtio_blk_in_needs_reset_and_it_recovers() {
    const TEST: &str = "bad_descriptors_put_qemu_virtio_blk_in_needs_reset_and_it_recovers";
    if !have("qemu-system-x86_64", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let vm = GuestCommand::testguest(Runner::QemuTcg)
        .run_command("bad-desc")
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", image.display()))
        .arg("-device")
        .arg("virtio-blk-pci,drive=d0,disable-legacy=on")
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_BADINPUT_RESULT");
    assert_eq!(r["ok"], "1", "{r:?}");
    let lines = vm.lines();
    let done = |case: &str| {
        lines
            .iter()
            .find(|l| l.contains("bad-desc done") && l.contains(&format!("case={case} ")))
            .unwrap_or_else(|| panic!("no line for {case}: {lines:?}"))
            .clone()
    };
    // QEMU rejects a looping chain and a 4 GiB buffer by asking for a reset.
    assert!(done("loop").contains("needs_reset=1"), "{}", done("loop"));
    assert!(
        done("len-4g").contains("needs_reset=1"),
        "{}",
        done("len-4g")
    );
    let recovered = lines.iter().filter(|l| l.contains("recovered=1")).count();
    assert_eq!(recovered, 3, "{lines:?}");
}

fn blk_guest(socket: &Path, words: &str) -> outboard_guest_harness::GuestVm {
    GuestCommand::testguest(Runner::QemuTcg)
        .shared_memory()
        .cmdline(words)
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={},reconnect=1",
            socket.display()
        ))
        .arg("-device")
        .arg("vhost-user-blk-pci,chardev=c0,num-queues=2,disable-legacy=on")
        .spawn()
        .unwrap()
}

fn disk(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    image
}

#[test]
fn blocks_written_in_one_boot_verify_in_the_next_after_a_backend_restart() {
    const TEST: &str = "blocks_written_in_one_boot_verify_in_the_next_after_a_backend_restart";
    if !have("qemu-storage-daemon", TEST) || !have("qemu-system-x86_64", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path(), 16 << 20);
    let params = "outboard.blk_queues=2 outboard.blk_sectors=128";
    let (daemon, socket) = serve_disk(dir.path(), &image, 2);
    let vm = blk_guest(
        &socket,
        &format!("outboard.run=blk-write outboard.blk_seed=42 {params}"),
    );
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(
        (r["ok"].as_str(), r["written"].as_str()),
        ("1", "128"),
        "{r:?}"
    );
    vm.wait_exit(RESULT_WAIT).unwrap();
    drop(daemon);
    std::fs::remove_file(&socket).ok();
    let (_daemon, socket) = serve_disk(dir.path(), &image, 2);
    let vm = blk_guest(
        &socket,
        &format!("outboard.run=blk-read-verify outboard.blk_seed=42 {params}"),
    );
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(
        (r["ok"].as_str(), r["verified"].as_str()),
        ("1", "128"),
        "{r:?}"
    );
    // Another seed must not verify: the check reads what is on the disk.
    let vm = blk_guest(
        &socket,
        &format!("outboard.run=blk-read-verify outboard.blk_seed=43 {params}"),
    );
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(
        (r["ok"].as_str(), r["verified"].as_str()),
        ("0", "0"),
        "{r:?}"
    );
    assert_eq!(r["offset"], "16", "the seed word differs: {r:?}");
}

#[test]
fn blk_loop_sees_delay_not_errors_when_the_backend_restarts() {
    const TEST: &str = "blk_loop_sees_delay_not_errors_when_the_backend_restarts";
    if !have("qemu-storage-daemon", TEST) || !have("qemu-system-x86_64", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = disk(dir.path(), 16 << 20);
    let (daemon, socket) = serve_disk(dir.path(), &image, 2);
    let vm = blk_guest(
        &socket,
        "outboard.run=blk-loop outboard.blk_queues=2 outboard.blk_every=128 \
         outboard.blk_sectors=512 outboard.blk_rounds=400 outboard.blk_timeout_ms=500",
    );
    vm.wait_for_line("OUTBOARD_BLK_PROGRESS round=3 ", RESULT_WAIT)
        .unwrap_or_else(|e| panic!("{e}: {:?}", vm.lines()));
    drop(daemon);
    std::fs::remove_file(&socket).ok();
    std::thread::sleep(Duration::from_secs(2));
    let (_daemon, _socket) = serve_disk(dir.path(), &image, 2);
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    let lines = vm.lines();
    assert_eq!(r["ok"], "1", "{r:?}\n{}\n{}", lines.join("\n"), vm.stderr());
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verified"], (400 * 128).to_string());
    assert!(
        lines.iter().any(|l| l.contains("no completion for 500 ms")),
        "the guest never waited: was the backend really gone? {lines:?}"
    );
}

/// vhost-device-vsock (rust-vmm, `cargo install vhost-device-vsock`): on PATH or named by
/// OUTBOARD_VHOST_DEVICE_VSOCK.
fn vhost_device_vsock(test: &str) -> Option<std::path::PathBuf> {
    let program = std::env::var_os("OUTBOARD_VHOST_DEVICE_VSOCK")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "vhost-device-vsock".into());
    let found = Command::new(&program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIP: {test}: vhost-device-vsock is not installed (cargo install vhost-device-vsock, or set OUTBOARD_VHOST_DEVICE_VSOCK)");
    }
    found.then_some(program)
}

#[test]
fn vsock_echo_through_vhost_device_vsock() {
    const TEST: &str = "vsock_echo_through_vhost_device_vsock";
    if !have("qemu-system-x86_64", TEST) {
        return;
    }
    let Some(program) = vhost_device_vsock(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (socket, uds) = (dir.path().join("vhv.sock"), dir.path().join("vm.vsock"));
    // The host side: guest connections to port 1234 arrive on `<uds>_1234`.
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break total,
                Ok(n) => {
                    conn.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
    });
    let child = Command::new(program)
        .args(["--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "vhost-device-vsock made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let vm = GuestCommand::testguest(Runner::QemuTcg)
        .shared_memory()
        .run_command("vsock-echo")
        .cmdline("outboard.vsock_bytes=1000 outboard.virtio_irq=1")
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .arg("-device")
        .arg("vhost-user-vsock-pci,chardev=c0,disable-legacy=on")
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_VSOCK_RESULT");
    assert_eq!(
        (r["ok"].as_str(), r["bytes"].as_str(), r["cid"].as_str()),
        ("1", "1000", "3"),
        "{r:?}"
    );
    vm.wait_exit(RESULT_WAIT).unwrap();
    assert_eq!(echo.join().unwrap(), 1000, "bytes the host echoed");
}
