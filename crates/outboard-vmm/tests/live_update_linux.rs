//! Live update under a stock Linux guest (hosts with hardware virtualization only: PVM can't
//! run a stock kernel, so here the test prints a SKIP line). The Debian guest from
//! `cargo xtask guest` boots with a disk (qemu-storage-daemon over vhost-user) and a NIC (the
//! vhost-user-net echo backend) and runs `heartbeat.sh`, which every 100 ms writes its counter
//! to the disk, reads it back from the device and prints it with the guest's uptime. Ten live
//! updates alternate between two builds: the counter never restarts or skips, uptime never
//! goes back, every disk check passes, the kernel doesn't boot again and the backends never
//! see a disconnect.

mod common;
mod live_update_shared;
#[path = "../../virtio-devices/tests/common/net_echo.rs"]
mod net_echo;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{vmm, with_api, TIMEOUT};
use live_update_shared::{alternate_build, have_qsd, live_update, pauses, qsd_disk, version};
use outboard_guest_harness::{hardware_virtualization, kvm_available, GuestCommand, GuestVm};

const DISK_BYTES: u64 = 64 << 20;
const UPDATES: usize = 10;

/// `(seq, uptime in s, disk check)` of every heartbeat line.
fn heartbeats(vm: &GuestVm) -> Vec<(u64, f64, Option<bool>)> {
    vm.lines()
        .iter()
        .filter(|l| l.starts_with("OUTBOARD_HEARTBEAT"))
        .filter_map(|l| {
            let field = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k));
            let seq = field("seq=")?.parse().ok()?;
            let uptime = field("uptime=")?.parse().ok()?;
            Some((seq, uptime, field("disk=").map(|d| d.trim_end() == "ok")))
        })
        .collect()
}

/// Waits until the guest printed heartbeat `seq` (or a later one).
fn wait_beat(vm: &GuestVm, seq: u64, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while heartbeats(vm).last().is_none_or(|b| b.0 < seq) {
        // (The first VMM exits at the first update; its successors write to the same pipes.)
        let ended = vm.lines().iter().any(|l| l.contains("OUTBOARD_RUN_DONE"));
        assert!(
            Instant::now() < deadline && !ended,
            "{what}: no heartbeat {seq}\n{}\n{}",
            vm.lines().join("\n"),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn linux_heartbeat_survives_ten_live_updates_between_two_builds() {
    const TEST: &str = "linux_heartbeat_survives_ten_live_updates_between_two_builds";
    if !kvm_available(TEST) || !hardware_virtualization(TEST) || !have_qsd(TEST) {
        return;
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm"));
    let alt_version = format!("{}+alt", env!("CARGO_PKG_VERSION"));
    let alt = alternate_build(&alt_version);

    let dir = common::fresh_dir(TEST);
    let (_qsd, disk_sock) = qsd_disk(&dir, DISK_BYTES);
    let net_sock = dir.join("net.sock");
    let echo = Arc::new(net_echo::Echo::default());
    let _echo_thread = net_echo::serve(net_sock.clone(), echo.clone());

    let (vm, api) = with_api(
        GuestCommand::linux(vmm())
            .memory_mib(512)
            .cmdline("outboard.run=heartbeat outboard.heartbeat.dev=/dev/vda")
            .args([
                "--disk",
                &format!("socket={},num_queues=1", disk_sock.display()),
                "--net",
                &format!("socket={},mac=52:54:00:12:34:58", net_sock.display()),
            ]),
        TEST,
    );
    wait_beat(&vm, 5, "before the first update");
    let our_version = version(&api).unwrap();
    assert_ne!(our_version, alt_version, "the two builds must differ");
    for update in 0..UPDATES {
        let (binary, expect) = match update % 2 {
            0 => (&alt, &alt_version),
            _ => (&ours, &our_version),
        };
        let before = heartbeats(&vm).last().map_or(0, |b| b.0);
        let (code, body) = live_update(&api, binary);
        assert_eq!(code, 204, "update {update}: {body}\n{}", vm.stderr());
        assert_eq!(&version(&api).unwrap(), expect, "update {update}");
        wait_beat(&vm, before + 3, &format!("after update {update}"));
    }

    let beats = heartbeats(&vm);
    assert!(
        beats.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "the heartbeat counter restarted or skipped: {:?}",
        beats.iter().map(|b| b.0).collect::<Vec<_>>()
    );
    assert!(
        beats.windows(2).all(|w| w[1].1 >= w[0].1),
        "the guest's uptime went back: {beats:?}"
    );
    assert!(
        beats.iter().all(|b| b.2 == Some(true)),
        "a disk check failed: {beats:?}"
    );
    let boots = vm
        .lines()
        .iter()
        .filter(|l| l.contains("OUTBOARD_GUEST_READY"))
        .count();
    assert_eq!(boots, 1, "the kernel booted again");
    let stderr = vm.stderr();
    assert_eq!(pauses(&stderr).len(), UPDATES, "{stderr}");
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    for dev in ["virtio-blk0", "virtio-net0"] {
        for counter in ["disconnects", "reconnects", "backend_errors", "needs_reset"] {
            assert_eq!(m["devices"][dev][counter], 0, "{dev} {counter}: {m}");
        }
    }
    eprintln!("live-update pauses (ms): {:?}", pauses(&stderr));
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    let _ = vm.wait_exit(TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
}
