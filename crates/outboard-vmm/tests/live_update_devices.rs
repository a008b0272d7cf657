//! Live update of a VM with a disk (qemu-storage-daemon over vhost-user) and a NIC (the
//! vhost-user-net echo backend) while the test guest's `live-mix` runs the heartbeat, a disk
//! writer/verifier and a NIC exchange at once, taking completions as MSI-X interrupts: 20
//! updates alternating between two builds with different version strings, and successors
//! killed at each step of the handoff. Backends must never see a disconnect, and irqfds and
//! ioeventfds must register without error in every successor (device counters at zero). Also:
//! a snapshot written by the second build restores under this one.

mod common;
#[path = "../../virtio-devices/tests/common/net_echo.rs"]
mod net_echo;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_fault, testguest, with_api, TIMEOUT};
use outboard_guest_harness::{kvm_available, wait_for_path, ApiClient, Daemon, GuestVm};

const DISK_BYTES: u64 = 32 << 20;

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

/// A VM under `live-mix` with its two backends and scratch directory.
struct Rig {
    dir: PathBuf,
    _qsd: Daemon,
    echo: Arc<net_echo::Echo>,
    vm: GuestVm,
    api: ApiClient,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self
            .api
            .request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(test: &str) -> Rig {
    let dir = common::temp_path(test, ".d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let disk_sock = dir.join("blk.sock");
    let qsd = Daemon::spawn(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable=on,num-queues=1",
                disk_sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qsd.log")).unwrap()),
    )
    .unwrap();
    assert!(wait_for_path(&disk_sock, Duration::from_secs(10)));
    let net_sock = dir.join("net.sock");
    let echo = Arc::new(net_echo::Echo::default());
    let _echo_thread = net_echo::serve(net_sock.clone(), echo.clone());
    let (vm, api) = with_api(
        testguest(Some("live-mix"))
            .cmdline(
                "outboard.interval_ms=50 outboard.blk_every=8 outboard.blk_sectors=256 \
                 outboard.virtio_irq=1 \
                 outboard.net_batch=8",
            )
            .args([
                "--disk",
                &format!("socket={},num_queues=1", disk_sock.display()),
                "--net",
                &format!("socket={},mac=52:54:00:12:34:57", net_sock.display()),
            ]),
        test,
    );
    Rig {
        dir,
        _qsd: qsd,
        echo,
        vm,
        api,
    }
}

/// The last value of `key=` on lines containing `marker`.
fn last_field(vm: &GuestVm, marker: &str, key: &str) -> Option<u64> {
    vm.lines()
        .iter()
        .rev()
        .filter(|l| l.contains(marker))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")[..]))
                .and_then(|n| n.parse().ok())
        })
}

/// Heartbeats as (seq, ns).
fn heartbeats(vm: &GuestVm) -> Vec<(u64, u64)> {
    vm.lines()
        .iter()
        .filter(|l| l.starts_with("OUTBOARD_HEARTBEAT"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|n| n.parse().ok())
            };
            Some((field("seq=")?, field("ns=")?))
        })
        .collect()
}

/// Waits until the guest has finished `more` further disk rounds and NIC batches.
fn wait_progress(rig: &Rig, more: u64, what: &str) {
    let blk = last_field(&rig.vm, "OUTBOARD_BLK_PROGRESS", "round").unwrap_or(0);
    let net = last_field(&rig.vm, "OUTBOARD_NET_PROGRESS", "batch").unwrap_or(0);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let b = last_field(&rig.vm, "OUTBOARD_BLK_PROGRESS", "round").unwrap_or(0);
        let n = last_field(&rig.vm, "OUTBOARD_NET_PROGRESS", "batch").unwrap_or(0);
        if b >= blk + more && n >= net + more {
            return;
        }
        let failed = rig
            .vm
            .lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_MIX_RESULT") || l.contains("OUTBOARD_GUEST_ERROR"));
        assert!(
            !failed && Instant::now() < deadline,
            "{what}: no progress (disk round {b}, NIC batch {n})\n{}\n{}",
            rig.vm.lines().join("\n"),
            rig.vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn live_update(api: &ApiClient, binary: &Path) -> (u16, String) {
    let body = serde_json::json!({ "binary": binary }).to_string();
    api.request("PUT", "/live-update", Some(&body)).unwrap()
}

fn version(api: &ApiClient) -> Result<String, outboard_guest_harness::api::Error> {
    let (code, body) = api.request("GET", "/version", None)?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    Ok(v["vmm_version"].as_str().unwrap().to_owned())
}

/// Device counters that must stay at zero: the backends never saw a disconnect.
fn assert_devices_clean(rig: &Rig) {
    let (code, body) = rig.api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    for dev in ["virtio-blk0", "virtio-net0"] {
        for counter in [
            "disconnects",
            "reconnects",
            "backend_errors",
            "needs_reset",
            "msix_errors",
            "notifier_errors",
        ] {
            assert_eq!(
                m["devices"][dev][counter],
                0,
                "{dev} {counter}: {m}\n{}\nqemu-storage-daemon: {}",
                rig.vm.stderr(),
                std::fs::read_to_string(rig.dir.join("qsd.log")).unwrap_or_default()
            );
        }
    }
}

/// Pause lengths the successors printed, in ms.
fn pauses(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.split("guest paused for ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The guest's own tallies are clean and the backends agree.
fn assert_mix_clean(rig: &Rig) {
    let f = |m: &str, k: &str| last_field(&rig.vm, m, k).unwrap_or(u64::MAX);
    assert_eq!(f("OUTBOARD_BLK_PROGRESS", "errors"), 0);
    for k in ["lost", "duplicated", "unknown"] {
        assert_eq!(f("OUTBOARD_NET_PROGRESS", k), 0, "frames {k}");
    }
    let sent = f("OUTBOARD_NET_PROGRESS", "sent");
    assert_eq!(f("OUTBOARD_NET_PROGRESS", "received"), sent);
    let echoed = u64::from(*rig.echo.echoed.lock().unwrap());
    // The batch running now may have frames on their way.
    assert!(
        echoed >= sent && echoed <= sent + 8,
        "echoed {echoed}, sent {sent}"
    );
    let seqs: Vec<u64> = heartbeats(&rig.vm).iter().map(|b| b.0).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the heartbeat counter restarted or skipped: {seqs:?}"
    );
    assert!(
        rig.vm
            .lines()
            .iter()
            .filter(|l| l.contains("OUTBOARD_GUEST_READY"))
            .count()
            <= 1,
        "the guest booted again"
    );
    assert!(!rig.vm.stderr().contains("panicked"), "{}", rig.vm.stderr());
}

/// The second build: outboard-vmm built with another `OUTBOARD_VERSION` into its own target
/// directory (`OUTBOARD_VMM_ALT` names a ready one instead).
fn alternate_build(version: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("OUTBOARD_VMM_ALT") {
        return PathBuf::from(path);
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm"));
    let profile_dir = ours.parent().unwrap();
    let release = profile_dir.ends_with("release");
    let target = profile_dir.parent().unwrap().join("alt");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "outboard-vmm", "--bin", "outboard-vmm"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .env("OUTBOARD_VERSION", version);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo for the second build");
    assert!(status.success(), "the second build failed");
    target
        .join(if release { "release" } else { "debug" })
        .join("outboard-vmm")
}

#[test]
fn twenty_live_updates_between_two_builds_under_disk_and_nic_load() {
    const TEST: &str = "twenty_live_updates_between_two_builds_under_disk_and_nic_load";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm"));
    let alt_version = format!("{}+alt", env!("CARGO_PKG_VERSION"));
    let alt = alternate_build(&alt_version);
    let rig = rig("lu20");
    wait_progress(&rig, 10, "before the first update");
    let our_version = version(&rig.api).unwrap();
    assert_ne!(our_version, alt_version, "the two builds must differ");
    // The steady-state gap: how late a heartbeat gets behind a disk round or NIC batch (and
    // the host's scheduling) without any update.
    let steady_gap = max_gap(&heartbeats(&rig.vm));
    // Per update: the heartbeats from the last one before it to the last one after it.
    let mut windows = Vec::new();
    for round in 0..20 {
        let (binary, expect) = match round % 2 {
            0 => (&alt, &alt_version),
            _ => (&ours, &our_version),
        };
        let first = heartbeats(&rig.vm).len() - 1;
        let (code, body) = live_update(&rig.api, binary);
        assert_eq!(code, 204, "update {round}: {body}\n{}", rig.vm.stderr());
        let now = version(&rig.api).unwrap_or_else(|e| panic!("{e}\n{}", rig.vm.stderr()));
        assert_eq!(&now, expect, "update {round}");
        wait_progress(&rig, 1, &format!("after update {round}"));
        windows.push(first..heartbeats(&rig.vm).len());
    }
    assert_devices_clean(&rig);
    assert_mix_clean(&rig);
    let stderr = rig.vm.stderr();
    for line in stderr
        .lines()
        .filter(|l| l.contains("live update:"))
        .take(4)
    {
        eprintln!("{line}");
    }
    let pauses = pauses(&stderr);
    assert_eq!(pauses.len(), 20, "{stderr}");
    let beats = heartbeats(&rig.vm);
    let mut worst = (0.0, 0.0);
    for (window, pause) in windows.iter().zip(&pauses) {
        let gap = max_gap(&beats[window.clone()]) as f64 / 1e6;
        // A heartbeat due during the update comes at most the pause plus one steady-state
        // gap late, plus 50 ms for the host's scheduling (2 shared cores).
        let bound = pause + steady_gap as f64 / 1e6 + 50.0;
        assert!(
            gap <= bound,
            "heartbeat gap {gap:.1} ms across an update with a {pause:.1} ms pause exceeds \
             {bound:.1} ms"
        );
        if gap - pause > worst.0 - worst.1 {
            worst = (gap, *pause);
        }
    }
    eprintln!(
        "live-update pauses (ms): {pauses:?}; steady-state heartbeat gap {:.1} ms; worst gap \
         across an update {:.1} ms (pause {:.1} ms)",
        steady_gap as f64 / 1e6,
        worst.0,
        worst.1
    );
}

/// The longest interval between consecutive heartbeats, in ns.
fn max_gap(beats: &[(u64, u64)]) -> u64 {
    beats
        .windows(2)
        .map(|w| w[1].1.saturating_sub(w[0].1))
        .max()
        .unwrap_or(0)
}

/// A wrapper around outboard-vmm whose successor SIGKILLs itself at `step`.
fn dying_successor(dir: &Path, step: &str) -> PathBuf {
    let script = dir.join(format!("die-at-{step}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{}={step} exec {} \"$@\"\n",
            "OUTBOARD_VMM_TEST_KILL_AT",
            env!("CARGO_BIN_EXE_outboard-vmm")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[test]
fn successor_killed_at_each_step_leaves_devices_working_on_the_old_vmm() {
    const TEST: &str = "successor_killed_at_each_step_leaves_devices_working_on_the_old_vmm";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let rig = rig("lukill");
    wait_progress(&rig, 2, "before the first update");
    for step in ["hello", "handover", "ready"] {
        let script = dying_successor(&rig.dir, step);
        assert_fault(live_update(&rig.api, &script), 500, "runs on here");
        wait_progress(&rig, 2, &format!("after the successor died at {step}"));
        let (code, info) = rig.api.request("GET", "/", None).unwrap();
        assert_eq!(code, 200, "{info}");
        assert!(info.contains("\"Running\""), "{info}");
    }
    assert_devices_clean(&rig);
    // The same VM still moves.
    let (code, body) = live_update(&rig.api, Path::new(env!("CARGO_BIN_EXE_outboard-vmm")));
    assert_eq!(code, 204, "{body}\n{}", rig.vm.stderr());
    wait_progress(&rig, 2, "after the real update");
    assert_devices_clean(&rig);
    assert_mix_clean(&rig);
    eprintln!("{}", rig.vm.stderr());
}

#[test]
fn vms_with_vsock_are_refused_clearly() {
    const TEST: &str = "vms_with_vsock_are_refused_clearly";
    if !kvm_available(TEST) {
        return;
    }
    let uds = common::temp_path(TEST, ".vsock");
    let (vm, api) = with_api(
        testguest(Some("heartbeat"))
            .args(["--vsock", &format!("cid=3,uds_path={}", uds.display())]),
        TEST,
    );
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=1 ", TIMEOUT)
        .unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_outboard-vmm"));
    assert_fault(live_update(&api, binary), 409, "vsock");
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=4 ", TIMEOUT)
        .unwrap();
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    let _ = vm.wait_exit(TIMEOUT);
}

/// The other way to move a VM to a new binary: a snapshot written by the second build (an
/// older release, say) restores under this one and the guest goes on.
#[test]
fn a_snapshot_taken_by_the_other_build_restores() {
    const TEST: &str = "a_snapshot_taken_by_the_other_build_restores";
    if !kvm_available(TEST) {
        return;
    }
    let alt_version = format!("{}+alt", env!("CARGO_PKG_VERSION"));
    let alt = alternate_build(&alt_version);
    let runner = outboard_guest_harness::Runner::OutboardVmm(alt);
    let (old, api) = with_api(
        outboard_guest_harness::GuestCommand::testguest(runner).run_command("heartbeat"),
        "snapalt-old",
    );
    old.wait_for_line("OUTBOARD_HEARTBEAT seq=3 ", TIMEOUT)
        .unwrap();
    assert_eq!(version(&api).unwrap(), alt_version);
    let (state, memory) = (
        common::temp_path(TEST, ".state"),
        common::temp_path(TEST, ".mem"),
    );
    let (code, body) = api
        .request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let snap = format!(
        r#"{{"state_path":"{}","memory_path":"{}"}}"#,
        state.display(),
        memory.display()
    );
    let (code, body) = api.request("PUT", "/snapshot/create", Some(&snap)).unwrap();
    assert_eq!(code, 204, "{body}\n{}", old.stderr());
    std::thread::sleep(Duration::from_millis(200));
    let last = heartbeats(&old).last().expect("heartbeats").0;
    old.kill();

    let restore = format!(
        "state={},memory={},resume=on",
        state.display(),
        memory.display()
    );
    let (new, api) = with_api(
        outboard_guest_harness::GuestCommand::new(common::vmm()).args(["--restore", &restore]),
        "snapalt-new",
    );
    let next = format!("OUTBOARD_HEARTBEAT seq={} ", last + 2);
    new.wait_for_line(&next, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", new.stderr()));
    assert_eq!(heartbeats(&new)[0].0, last + 1, "the counter goes on");
    assert_ne!(version(&api).unwrap(), alt_version);
    assert!(
        new.stderr()
            .contains(&format!("(written by outboard-vmm {alt_version})")),
        "{}",
        new.stderr()
    );
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    let _ = new.wait_exit(TIMEOUT);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&memory);
}
