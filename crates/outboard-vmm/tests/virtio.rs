//! virtio devices on outboard-vmm's PCI bus, driven by the test guest's own drivers: disks
//! served by qemu-storage-daemon over vhost-user (data checked in the backing file, a backend
//! killed and restarted mid-run), malformed device programming, vsock to a host Unix socket,
//! a NIC against a vhost-user-net echo backend, and a clear error for an unreachable backend.

mod common;
#[path = "../../virtio-devices/tests/common/net_echo.rs"]
mod net_echo;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{exit_code, testguest, TIMEOUT};
use outboard_guest_harness::{kvm_available, marker, wait_for_path, Daemon, GuestVm};

const SECTOR: u64 = 512;
const DISK_BYTES: u64 = 32 << 20;

/// A per-test scratch directory, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = common::fresh_dir(test);
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qsd(test: &str) -> bool {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIP: {test}: qemu-storage-daemon is not installed");
    }
    found
}

/// Creates a sparse disk image of [`DISK_BYTES`].
fn image(scratch: &Scratch) -> PathBuf {
    let path = scratch.path("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    path
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk with `queues` queues on `socket`.
fn serve_disk(image: &Path, socket: &Path, queues: u16) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let daemon = Daemon::spawn(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    assert!(
        wait_for_path(socket, Duration::from_secs(10)),
        "qemu-storage-daemon made no socket"
    );
    daemon
}

fn disk_arg(socket: &Path, queues: u16) -> String {
    format!("socket={},num_queues={queues}", socket.display())
}

fn result(vm: &GuestVm, marker_name: &str) -> BTreeMap<String, String> {
    vm.expect_fields(marker_name, TIMEOUT)
}

/// Every one of `blocks` blocks is in the image where the guest put it.
fn assert_blocks_on_disk(image: &Path, blocks: u64, seed: u64) {
    let data = std::fs::read(image).unwrap();
    if let Err(e) = marker::check_blk_pattern(&data, DISK_BYTES / SECTOR, blocks, seed) {
        panic!("{e}");
    }
}

#[test]
fn pci_lists_the_virtio_blk_device() {
    const TEST: &str = "pci_lists_the_virtio_blk_device";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let _qsd = serve_disk(&img, &sock, 1);
    let vm = testguest(Some("pci"))
        .args(["--disk", &disk_arg(&sock, 1)])
        .spawn()
        .unwrap();
    let done = result(&vm, "OUTBOARD_PCI_DONE");
    assert_eq!(done["access"], "ecam", "MCFG found: {done:?}");
    assert_eq!(done["functions"], "2", "host bridge and the disk");
    let lines = vm.lines();
    let blk = lines
        .iter()
        .find(|l| l.contains("id=1af4:1042"))
        .unwrap_or_else(|| panic!("no virtio-blk function: {lines:?}"));
    let f = marker::fields(blk, "OUTBOARD_PCI").unwrap();
    assert_eq!(f["class"], "01:80:00");
    assert_eq!(f["msix"], "2", "one vector per queue plus config");
    assert!(f["bar0"].starts_with("0xc"), "BAR below 4 GiB: {blk}");
    assert_eq!(exit_code(&vm), 0);
}

fn blk_verify(test: &str, queues: u16, extra: &str) {
    if !kvm_available(test) || !have_qsd(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let _qsd = serve_disk(&img, &sock, queues);
    let (blocks, seed) = (256u64, 40 + u64::from(queues));
    let vm = testguest(Some("blk-verify"))
        .cmdline(&format!(
            "outboard.blk_queues={queues} outboard.blk_sectors={blocks} outboard.blk_seed={seed} {extra}"
        ))
        .args(["--disk", &disk_arg(&sock, queues)])
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(r["ok"], "1", "{r:?}");
    assert_eq!(r["written"], blocks.to_string());
    assert_eq!(r["verified"], blocks.to_string());
    assert_eq!(r["queues"], queues.to_string());
    assert_eq!(r["errors"], "0");
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert_blocks_on_disk(&img, blocks, seed);
    if extra.contains("virtio_irq=1") {
        // Completions arrived as MSI-X messages: backend call eventfd → KVM irqfd → MSI route.
        // At least one: the guest also polls, so a queue whose completions it reaped before
        // the interrupt arrived counts none, and how many do depends on timing.
        let irqs: u32 = r["irqs"].parse().unwrap();
        assert!(irqs >= 1, "irqs={irqs}");
    }
}

#[test]
fn blk_verify_one_queue() {
    blk_verify("blk_verify_one_queue", 1, "");
}

#[test]
fn blk_verify_four_queues() {
    blk_verify("blk_verify_four_queues", 4, "");
}

#[test]
fn blk_verify_four_queues_with_msix_interrupts() {
    blk_verify(
        "blk_verify_four_queues_with_msix_interrupts",
        4,
        "outboard.virtio_irq=1",
    );
}

#[test]
fn blk_loop_sees_delay_not_errors_when_the_backend_restarts() {
    const TEST: &str = "blk_loop_sees_delay_not_errors_when_the_backend_restarts";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let mut qsd = serve_disk(&img, &sock, 2);
    let rounds = 12;
    let vm = testguest(Some("blk-loop"))
        .cmdline(&format!(
            "outboard.blk_queues=2 outboard.blk_every=64 outboard.blk_sectors=512 \
             outboard.blk_rounds={rounds} outboard.blk_timeout_ms=500"
        ))
        .args(["--disk", &disk_arg(&sock, 2)])
        .spawn()
        .unwrap();
    vm.wait_for_line("OUTBOARD_BLK_PROGRESS round=2 ", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}: {:?}", vm.lines()));
    qsd.kill();
    std::thread::sleep(Duration::from_secs(2));
    let _qsd = serve_disk(&img, &sock, 2);
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    let lines = vm.lines();
    assert_eq!(r["ok"], "1", "{r:?}\n{}\n{}", lines.join("\n"), vm.stderr());
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verified"], (rounds * 64).to_string());
    assert!(
        lines.iter().any(|l| l.contains("no completion for 500 ms")),
        "the guest never waited: was the backend really gone? {lines:?}"
    );
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
}

#[test]
fn malformed_programming_leaves_the_vmm_running_and_the_device_recovers() {
    const TEST: &str = "malformed_programming_leaves_the_vmm_running_and_the_device_recovers";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    // The backend may drop the session on bad descriptors: the VMM reconnects.
    let _qsd = serve_disk(&img, &sock, 1);
    for (command, needs_reset) in [
        ("bad-queue-addr", true),
        ("bad-queue-size", true),
        ("bad-msix", true),
        ("bad-bar", false),
        ("bad-desc", false),
    ] {
        let vm = testguest(Some(command))
            .args(["--disk", &disk_arg(&sock, 1)])
            .spawn()
            .unwrap();
        let r = result(&vm, "OUTBOARD_BADINPUT_RESULT");
        let lines = vm.lines();
        assert_eq!(r["ok"], "1", "{command}: {r:?}\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("recovered=1")),
            "{command}: {lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("recovered=0")),
            "{command}: {lines:?}"
        );
        if needs_reset {
            // The VMM validated the programming itself and asked for a reset.
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(" done ") && l.contains("needs_reset=1")),
                "{command}: {lines:?}"
            );
        }
        assert_eq!(exit_code(&vm), 0, "{command}: stderr:\n{}", vm.stderr());
        common::assert_no_panic(&vm);
    }
}

/// Accepts one connection on `path`, echoes until EOF, returns the bytes echoed.
fn uds_echo(path: PathBuf) -> std::thread::JoinHandle<usize> {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
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
    })
}

fn vsock_echo(test: &str, irq: bool) {
    if !kvm_available(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let uds = scratch.path("vm.vsock");
    let echo = uds_echo(PathBuf::from(format!("{}_1234", uds.display())));
    let vm = testguest(Some("vsock-echo"))
        .cmdline(&format!(
            "outboard.vsock_bytes=2000 outboard.virtio_irq={}",
            u8::from(irq)
        ))
        .args(["--vsock", &format!("cid=3,uds_path={}", uds.display())])
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_VSOCK_RESULT");
    assert_eq!(
        (r["ok"].as_str(), r["bytes"].as_str(), r["cid"].as_str()),
        ("1", "2000", "3"),
        "{r:?}\n{}",
        vm.stderr()
    );
    assert_eq!(exit_code(&vm), 0);
    assert_eq!(echo.join().unwrap(), 2000, "bytes the host echoed");
}

#[test]
fn vsock_echo_to_a_host_unix_socket() {
    vsock_echo("vsock_echo_to_a_host_unix_socket", false);
}

#[test]
fn vsock_echo_with_msix_interrupts() {
    vsock_echo("vsock_echo_with_msix_interrupts", true);
}

#[test]
fn unreachable_disk_backend_is_a_clear_error() {
    const TEST: &str = "unreachable_disk_backend_is_a_clear_error";
    if !kvm_available(TEST) {
        return;
    }
    let vm = testguest(Some("poweroff"))
        .args(["--disk", "socket=/nonexistent/outboard/vub.sock"])
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&vm), 1, "stderr:\n{}", vm.stderr());
    let stderr = vm.stderr();
    assert!(
        stderr.contains("Error: ")
            && stderr
                .contains("Cannot connect to vhost-user backend /nonexistent/outboard/vub.sock"),
        "{stderr}"
    );
    common::assert_no_panic(&vm);
}

#[test]
fn bad_device_options_are_refused() {
    for (flag, value, needle) in [
        ("--disk", "num_queues=2", "Invalid --disk"),
        ("--disk", "socket=/s,num_queues=0", "num_queues"),
        ("--net", "socket=/s,mac=01:00:00:00:00:01", "Invalid --net"),
        ("--vsock", "cid=2,uds_path=/v", "cid"),
    ] {
        let vm = testguest(None).args([flag, value]).spawn().unwrap();
        assert_eq!(exit_code(&vm), 1, "{flag} {value}: {}", vm.stderr());
        let stderr = vm.stderr();
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
        common::assert_no_panic(&vm);
    }
}

#[test]
fn net_exchange_against_a_vhost_user_echo_backend() {
    net_exchange("net_exchange_against_a_vhost_user_echo_backend", false);
}

#[test]
fn net_exchange_with_msix_interrupts() {
    net_exchange("net_exchange_with_msix_interrupts", true);
}

fn net_exchange(test: &str, irq: bool) {
    if !kvm_available(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let socket = scratch.path("net.sock");
    let echo = std::sync::Arc::new(net_echo::Echo::default());
    let _backend = net_echo::serve(socket.clone(), echo.clone());
    let frames = 64;
    let vm = testguest(Some("net-exchange"))
        .cmdline(&format!(
            "outboard.net_echo=1 outboard.net_frames={frames} outboard.virtio_irq={}",
            u8::from(irq)
        ))
        .args([
            "--net",
            &format!("socket={},mac=52:54:00:12:34:56", socket.display()),
        ])
        .spawn()
        .unwrap();
    let r = result(&vm, "OUTBOARD_NET_RESULT");
    assert_eq!(
        r["ok"],
        "1",
        "{r:?}\n{}\n{}",
        vm.lines().join("\n"),
        vm.stderr()
    );
    assert_eq!(r["sent"], frames.to_string());
    assert_eq!(r["received"], frames.to_string());
    assert_eq!((r["lost"].as_str(), r["duplicated"].as_str()), ("0", "0"));
    if irq {
        let irqs: u32 = r["irqs"].parse().unwrap();
        assert!(
            irqs > 0,
            "the backend's calls reached the guest as MSI-X: {r:?}"
        );
    }
    assert_eq!(exit_code(&vm), 0);
    assert_eq!(
        *echo.echoed.lock().unwrap(),
        frames,
        "frames the backend echoed"
    );
}

#[test]
fn pause_and_resume_mid_io_lose_nothing() {
    const TEST: &str = "pause_and_resume_mid_io_lose_nothing";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let _qsd = serve_disk(&img, &sock, 2);
    let rounds = 8;
    let (vm, api) = common::with_api(
        testguest(Some("blk-loop"))
            .cmdline(&format!(
                "outboard.blk_queues=2 outboard.blk_every=64 outboard.blk_sectors=512 \
                 outboard.blk_rounds={rounds}"
            ))
            .args(["--disk", &disk_arg(&sock, 2)]),
        TEST,
    );
    vm.wait_for_line("OUTBOARD_BLK_PROGRESS round=1 ", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}: {:?}", vm.lines()));
    for _ in 0..3 {
        // Pause stops the vCPUs and the backend's rings (GET_VRING_BASE); resume restarts the
        // rings where they stopped.
        let (code, body) = api
            .request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
            .unwrap();
        assert_eq!(code, 204, "{body}");
        std::thread::sleep(Duration::from_millis(200));
        let (code, body) = api
            .request("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))
            .unwrap();
        assert_eq!(code, 204, "{body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    let blk = &metrics["devices"]["virtio-blk0"];
    assert_eq!(blk["activations"], 1, "{metrics}");
    assert_eq!(blk["needs_reset"], 0, "{metrics}");
    assert_eq!(blk["backend_errors"], 0, "{metrics}");
    assert!(metrics["devices"]["pci-root"]["config_reads"].as_u64() > Some(0));
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(r["ok"], "1", "{r:?}\n{}", vm.stderr());
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verified"], (rounds * 64).to_string());
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
}

/// `cargo xtask guest --tiny-kernel`'s image, or the one OUTBOARD_TINY_KERNEL names.
fn tiny_kernel() -> PathBuf {
    std::env::var_os("OUTBOARD_TINY_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| outboard_guest_harness::guest_dir().join("tiny-vmlinux"))
}

#[test]
#[ignore = "slow: boots the tiny kernel (~1 min under PVM); run with cargo xtask test --slow"]
fn linux_enumerates_our_pci_bus_and_probes_virtio_blk_and_net() {
    const TEST: &str = "linux_enumerates_our_pci_bus_and_probes_virtio_blk_and_net";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let kernel = tiny_kernel();
    assert!(
        kernel.is_file(),
        "Tiny kernel {} is missing: run `cargo xtask guest --tiny-kernel` first",
        kernel.display()
    );
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let _qsd = serve_disk(&img, &sock, 1);
    let net_sock = scratch.path("net.sock");
    let _net = net_echo::serve(
        net_sock.clone(),
        std::sync::Arc::new(net_echo::Echo::default()),
    );
    let vm = outboard_guest_harness::GuestCommand::new(common::vmm())
        .kernel(&kernel)
        .cmdline(
            "console=ttyS0 earlyprintk=serial noxsave \
             clearcpuid=141,150,151,158,288,306,308,534 panic=-1",
        )
        .memory_mib(256)
        .args(["--disk", &disk_arg(&sock, 1)])
        .args(["--net", &format!("socket={}", net_sock.display())])
        .spawn()
        .unwrap();
    let boot = Duration::from_secs(600);
    let wait = |pattern: &str| {
        vm.wait_for_line(pattern, boot)
            .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()))
    };
    wait("ACPI: MCFG");
    wait("PCI: MMCONFIG for domain 0000 [bus 00-00] at [mem 0xe0000000-0xe00fffff]");
    wait("ACPI: PCI Root Bridge [PCI0]");
    wait("pci 0000:00:01.0: [1af4:1042]");
    wait("pci 0000:00:02.0: [1af4:1041]");
    let vda = wait("virtio_blk virtio0: [vda]");
    assert!(
        vda.contains(&format!("{} 512-byte logical blocks", DISK_BYTES / SECTOR)),
        "{vda}"
    );
    wait("VFS: Unable to mount root fs");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(120)).unwrap().code(),
        Some(0)
    );
    common::assert_no_panic(&vm);
}

#[test]
fn disks_added_through_the_api_carry_data_and_bad_ones_are_refused() {
    const TEST: &str = "disks_added_through_the_api";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let scratch = Scratch::new(TEST);
    let (img, sock) = (image(&scratch), scratch.path("vub.sock"));
    let _qsd = serve_disk(&img, &sock, 2);
    let (vm, api) = common::with_api(
        outboard_guest_harness::GuestCommand::new(common::vmm()),
        TEST,
    );
    let req = |m: &str, p: &str, b: &str| api.request(m, p, Some(b)).unwrap();

    // Refused before anything is added: unknown fields, bad values, unrepresentable paths.
    common::assert_fault(
        req("PUT", "/disks", r#"{"socket":"/x","queues":2}"#),
        400,
        "unknown field",
    );
    common::assert_fault(
        req("PUT", "/disks", r#"{"socket":"/x","num_queues":0}"#),
        400,
        "num_queues",
    );
    common::assert_fault(
        req("PUT", "/disks", r#"{"socket":"/x","queue_size":100}"#),
        400,
        "queue_size",
    );
    common::assert_fault(
        req("PUT", "/disks", r#"{"socket":"/a,b"}"#),
        400,
        "without ','",
    );
    common::assert_fault(
        req(
            "PUT",
            "/network-interfaces",
            r#"{"socket":"/x","mac":"01:00:00:00:00:01"}"#,
        ),
        400,
        "multicast",
    );
    common::assert_fault(
        req("PUT", "/vsock", r#"{"cid":2,"uds_path":"/x"}"#),
        400,
        "cid",
    );

    let disk = serde_json::json!({"socket": sock, "num_queues": 2}).to_string();
    assert_eq!(req("PUT", "/disks", &disk).0, 204);
    let (code, body) = api.request("GET", "/vm/config", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        config["disks"][0]["socket"],
        sock.to_str().unwrap(),
        "{config}"
    );
    assert_eq!(config["disks"][0]["num_queues"], 2, "{config}");
    let guest = outboard_guest_harness::testguest_path();
    outboard_guest_harness::require_guest_image(&guest);
    let (blocks, seed) = (64u64, 77u64);
    let boot = serde_json::json!({
        "kernel_image_path": guest,
        "boot_args": format!(
            "outboard.run=blk-verify outboard.blk_queues=2 outboard.blk_sectors={blocks} outboard.blk_seed={seed}"
        ),
    })
    .to_string();
    assert_eq!(req("PUT", "/boot-source", &boot).0, 204);
    assert_eq!(
        req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#).0,
        204
    );
    let r = result(&vm, "OUTBOARD_BLK_RESULT");
    assert_eq!(r["ok"], "1", "{r:?}");
    assert_eq!(r["queues"], "2");
    assert_eq!(r["verified"], blocks.to_string());
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert_blocks_on_disk(&img, blocks, seed);
}
