//! Live update of a VM with a disk (qemu-storage-daemon over vhost-user) and a NIC (the
//! vhost-user-net echo backend) while the test guest's `live-mix` runs the heartbeat, a disk
//! writer/verifier and a NIC exchange at once, taking completions as MSI-X interrupts: 20
//! updates alternating between two builds with different version strings, and successors
//! killed at each step of the handoff. Backends must never see a disconnect, and irqfds and
//! ioeventfds must register without error in every successor (device counters at zero). Also:
//! a snapshot written by the second build restores under this one.

mod common;
mod live_update_shared;
#[path = "../../virtio-devices/tests/common/net_echo.rs"]
mod net_echo;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_fault, testguest, with_api, TIMEOUT};
use live_update_shared::{alternate_build, have_qsd, live_update, pauses, qsd_disk, version};
use outboard_guest_harness::{kvm_available, ApiClient, Daemon, GuestVm};

const DISK_BYTES: u64 = 32 << 20;

/// The tests of this file run one at a time: each runs VMs, backends and live updates, and six
/// at once on 2 cores stall guests for seconds.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
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
    rig_on(test, common::vmm())
}

/// [`rig`] with the VM started by `runner` (another build).
fn rig_on(test: &str, runner: outboard_guest_harness::Runner) -> Rig {
    let dir = common::fresh_dir(test);
    let (qsd, disk_sock) = qsd_disk(&dir, DISK_BYTES);
    let net_sock = dir.join("net.sock");
    let echo = Arc::new(net_echo::Echo::default());
    let _echo_thread = net_echo::serve(net_sock.clone(), echo.clone());
    let (vm, api) = with_api(
        outboard_guest_harness::GuestCommand::testguest(runner)
            .run_command("live-mix")
            // A batch waits up to 30 s for its echoes: on 2 cores shared by this file's parallel
            // tests a stall can pass the guest's 5 s default, and a stall must not read as loss
            // (frames that never come still fail the received == sent check).
            .cmdline(
                "outboard.interval_ms=50 outboard.blk_every=8 outboard.blk_sectors=256 \
                 outboard.virtio_irq=1 \
                 outboard.net_batch=8 outboard.net_timeout_ms=30000",
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
    wait_rounds(&rig.vm, blk + more, net + more, what);
}

/// Waits until `vm` has printed disk round `blk` and NIC batch `net` (or later ones).
fn wait_rounds(vm: &GuestVm, blk: u64, net: u64, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let b = last_field(vm, "OUTBOARD_BLK_PROGRESS", "round").unwrap_or(0);
        let n = last_field(vm, "OUTBOARD_NET_PROGRESS", "batch").unwrap_or(0);
        if b >= blk && n >= net {
            return;
        }
        let failed = vm
            .lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_MIX_RESULT") || l.contains("OUTBOARD_GUEST_ERROR"));
        assert!(
            !failed && Instant::now() < deadline,
            "{what}: no progress (disk round {b}, NIC batch {n})\n{}\n{}",
            vm.lines().join("\n"),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Device counters that must stay at zero: the backends never saw a disconnect.
fn assert_devices_clean(rig: &Rig) {
    devices_clean(&rig.api, &rig.vm, &rig.dir);
}

fn devices_clean(api: &ApiClient, vm: &GuestVm, dir: &Path) {
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
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
                vm.stderr(),
                std::fs::read_to_string(dir.join("qsd.log")).unwrap_or_default()
            );
        }
    }
}

/// The guest's own tallies are clean and the backends agree.
fn assert_mix_clean(rig: &Rig) {
    mix_clean(&rig.vm, &rig.echo);
}

fn mix_clean(vm: &GuestVm, echo: &net_echo::Echo) {
    let f = |m: &str, k: &str| last_field(vm, m, k).unwrap_or(u64::MAX);
    assert_eq!(f("OUTBOARD_BLK_PROGRESS", "errors"), 0);
    for k in ["lost", "duplicated", "unknown"] {
        assert_eq!(f("OUTBOARD_NET_PROGRESS", k), 0, "frames {k}");
    }
    let sent = f("OUTBOARD_NET_PROGRESS", "sent");
    let echoed = u64::from(*echo.echoed.lock().unwrap());
    assert_eq!(
        f("OUTBOARD_NET_PROGRESS", "received"),
        sent,
        "frames echoed by the backend: {echoed}; stderr:\n{}",
        vm.stderr()
    );
    // The batch running now may have frames on their way.
    assert!(
        echoed >= sent && echoed <= sent + 8,
        "echoed {echoed}, sent {sent}"
    );
    let seqs: Vec<u64> = heartbeats(vm).iter().map(|b| b.0).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the heartbeat counter restarted or skipped: {seqs:?}"
    );
    assert!(
        vm.lines()
            .iter()
            .filter(|l| l.contains("OUTBOARD_GUEST_READY"))
            .count()
            <= 1,
        "the guest booted again"
    );
    assert!(!vm.stderr().contains("panicked"), "{}", vm.stderr());
}

#[test]
fn twenty_live_updates_between_two_builds_under_disk_and_nic_load() {
    let _serial = one_at_a_time();
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
        // gap late, plus 100 ms for the host's scheduling: the tests of this file run in
        // parallel on 2 cores, and a vCPU thread can wait that long for one.
        let bound = pause + steady_gap as f64 / 1e6 + 100.0;
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
    let _serial = one_at_a_time();
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

/// A Unix-socket echo server at `path` for the guest's vsock connections: counts the
/// connections it accepted and the bytes it echoed.
fn uds_echo(path: PathBuf) -> Arc<(AtomicU64, AtomicU64)> {
    let tally = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let t = tally.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            t.0.fetch_add(1, Ordering::SeqCst);
            let t = t.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    t.1.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    tally
}

/// A VM whose guest holds one vsock connection open and echoes over it every 20 ms, moved by
/// four live updates between the two builds: the connection goes on (the host sees one
/// connection and every byte echoed once), a host connection still in its `CONNECT`
/// handshake goes on too, and the vsock socket path answers throughout.
#[test]
fn vsock_connections_survive_live_updates() {
    let _serial = one_at_a_time();
    const TEST: &str = "vsock_connections_survive_live_updates";
    if !kvm_available(TEST) {
        return;
    }
    const ROUNDS: u64 = 300;
    const BYTES: u64 = 500;
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm"));
    let alt = alternate_build(&format!("{}+alt", env!("CARGO_PKG_VERSION")));
    let dir = common::fresh_dir(TEST);
    let uds = dir.join("vm.vsock");
    let tally = uds_echo(PathBuf::from(format!("{}_1234", uds.display())));
    let (vm, api) = with_api(
        testguest(Some("vsock-echo"))
            .cmdline(&format!(
                "outboard.vsock_rounds={ROUNDS} outboard.vsock_interval_ms=20 \
                 outboard.vsock_bytes={BYTES} outboard.virtio_irq=1"
            ))
            .args(["--vsock", &format!("cid=3,uds_path={}", uds.display())]),
        TEST,
    );
    let round = |vm: &GuestVm| last_field(vm, "OUTBOARD_VSOCK_PROGRESS", "round");
    let wait_round = |target: u64, what: &str| {
        let deadline = Instant::now() + TIMEOUT;
        while round(&vm).is_none_or(|r| r < target) {
            assert!(
                Instant::now() < deadline && !vm.lines().iter().any(|l| l.contains("RESULT")),
                "{what}: the guest's echo stopped\n{}\n{}",
                vm.lines().join("\n"),
                vm.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_round(2, "before the updates");
    // A host connection that has sent half its CONNECT line.
    let mut pending = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    pending.write_all(b"CONNECT").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    for update in 0..4 {
        let binary = if update % 2 == 0 { &alt } else { &ours };
        let before = round(&vm).unwrap();
        let (code, body) = live_update(&api, binary);
        assert_eq!(code, 204, "update {update}: {body}\n{}", vm.stderr());
        wait_round(before + 3, &format!("after update {update}"));
    }
    let paused = pauses(&vm.stderr());
    assert_eq!(paused.len(), 4, "{}", vm.stderr());
    eprintln!("live-update pauses with an open vsock connection (ms): {paused:?}");
    // The half-open handshake went on in the last successor: the rest of a bad line gets the
    // error answer (a dropped connection would read end-of-file instead).
    pending.write_all(b" nonsense\n").unwrap();
    pending
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = pending.read_to_string(&mut answer);
    assert!(answer.starts_with("ERROR"), "{answer:?}\n{}", vm.stderr());
    // The path answers new connections too.
    let mut fresh = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    fresh.write_all(b"HELLO\n").unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = fresh.read_to_string(&mut answer);
    assert!(answer.starts_with("ERROR"), "{answer:?}");

    let r = vm.expect_fields("OUTBOARD_VSOCK_RESULT", TIMEOUT);
    assert_eq!(
        (r["ok"].as_str(), r["bytes"].as_str()),
        ("1", format!("{}", ROUNDS * BYTES).as_str()),
        "{r:?}\n{}",
        vm.stderr()
    );
    assert_eq!(tally.0.load(Ordering::SeqCst), 1, "host connections");
    assert_eq!(
        tally.1.load(Ordering::SeqCst),
        ROUNDS * BYTES,
        "bytes echoed"
    );
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    let _ = vm.wait_exit(TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot file can't keep a vsock connection (its host end dies with the old process):
/// the restored VM listens on the same path again and the guest is told its connection was
/// reset, while the device itself keeps working.
#[test]
fn a_snapshot_resets_vsock_connections_and_keeps_the_device() {
    let _serial = one_at_a_time();
    const TEST: &str = "a_snapshot_resets_vsock_connections_and_keeps_the_device";
    if !kvm_available(TEST) {
        return;
    }
    let dir = common::fresh_dir(TEST);
    let uds = dir.join("vm.vsock");
    let tally = uds_echo(PathBuf::from(format!("{}_1234", uds.display())));
    let (old, api) = with_api(
        testguest(Some("vsock-echo"))
            .cmdline(
                "outboard.vsock_rounds=100000 outboard.vsock_interval_ms=20 \
                 outboard.virtio_irq=1",
            )
            .args(["--vsock", &format!("cid=3,uds_path={}", uds.display())]),
        TEST,
    );
    old.wait_for_line("OUTBOARD_VSOCK_PROGRESS round=2", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", old.stderr()));
    let (state, memory) = (dir.join("vm.state"), dir.join("vm.mem"));
    let snap = serde_json::json!({"state_path": state, "memory_path": memory}).to_string();
    let (code, body) = api
        .request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.request("PUT", "/snapshot/create", Some(&snap)).unwrap();
    assert_eq!(code, 204, "{body}\n{}", old.stderr());
    old.kill();
    let _ = old.wait_exit(TIMEOUT);

    // Restored paused: a host connection made now waits in the new listener's backlog (the
    // old process is gone, so only the restored VMM can have bound the path).
    let restore = format!(
        "state={},memory={},resume=off",
        state.display(),
        memory.display()
    );
    let (new, api) = with_api(
        outboard_guest_harness::GuestCommand::new(common::vmm()).args(["--restore", &restore]),
        "snapvsock-new",
    );
    // Answered by the control loop, which runs once the restore (and the bind) is done.
    let (code, info) = api.request("GET", "/", None).unwrap();
    assert!(code == 200 && info.contains("\"Paused\""), "{info}");
    let mut fresh = std::os::unix::net::UnixStream::connect(&uds)
        .unwrap_or_else(|e| panic!("{e}\n{}", new.stderr()));
    fresh.write_all(b"HELLO\n").unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (code, body) = api
        .request("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let mut answer = String::new();
    let _ = fresh.read_to_string(&mut answer);
    assert!(answer.starts_with("ERROR"), "{answer:?}\n{}", new.stderr());
    // The guest's connection was reset; it says so and ends its command (and powers off).
    let r = new.expect_fields("OUTBOARD_VSOCK_RESULT", TIMEOUT);
    assert_eq!(r["ok"], "0", "{r:?}");
    assert!(
        new.lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_VSOCK_RESULT")
                && l.contains("error=\"Host reset the connection\"")),
        "{}\n{}",
        new.lines().join("\n"),
        new.stderr()
    );
    assert_eq!(tally.0.load(Ordering::SeqCst), 1, "host connections");
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    assert_eq!(common::exit_code(&new), 0, "{}", new.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The other way to move a VM to a new binary: a snapshot written by the second build (an
/// older release, say) restores under this one and the guest goes on.
#[test]
fn a_snapshot_taken_by_the_other_build_restores() {
    let _serial = one_at_a_time();
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

/// `seq=` of every heartbeat line (a line cut by the snapshot still counts in the process
/// that printed its `seq=`).
fn heartbeat_seqs(vm: &GuestVm) -> Vec<u64> {
    vm.lines()
        .iter()
        .filter(|l| l.starts_with("OUTBOARD_HEARTBEAT"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// Snapshot to files of a VM with a disk and a NIC under `live-mix`, taken by the second
/// build, restored by this one in a new process: the new VMM connects to the same backends
/// afresh and the guest goes on. The disk round cut by the snapshot writes before it and
/// reads back and verifies after it; every frame comes back exactly once; the heartbeat
/// counter continues.
#[test]
fn a_vm_with_a_disk_and_a_nic_restores_from_the_other_builds_snapshot() {
    let _serial = one_at_a_time();
    const TEST: &str = "a_vm_with_a_disk_and_a_nic_restores_from_the_other_builds_snapshot";
    if !kvm_available(TEST) || !have_qsd(TEST) {
        return;
    }
    let alt_version = format!("{}+alt", env!("CARGO_PKG_VERSION"));
    let alt = alternate_build(&alt_version);
    let rig = rig_on("snapdev", outboard_guest_harness::Runner::OutboardVmm(alt));
    wait_progress(&rig, 3, "before the snapshot");
    assert_eq!(version(&rig.api).unwrap(), alt_version);
    let (state, memory) = (rig.dir.join("vm.state"), rig.dir.join("vm.mem"));
    let snap = serde_json::json!({"state_path": state, "memory_path": memory}).to_string();
    let (code, body) = rig
        .api
        .request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let (code, body) = rig
        .api
        .request("PUT", "/snapshot/create", Some(&snap))
        .unwrap();
    assert_eq!(code, 204, "{body}\n{}", rig.vm.stderr());
    std::thread::sleep(Duration::from_millis(300));
    let old_seqs = heartbeat_seqs(&rig.vm);
    let old_round = last_field(&rig.vm, "OUTBOARD_BLK_PROGRESS", "round").unwrap();
    let old_batch = last_field(&rig.vm, "OUTBOARD_NET_PROGRESS", "batch").unwrap();
    rig.vm.kill();
    let _ = rig.vm.wait_exit(TIMEOUT);
    // The test's echo backend serves one session; qemu-storage-daemon takes the next client.
    let _echo = net_echo::serve(rig.dir.join("net.sock"), rig.echo.clone());

    let restore = format!(
        "state={},memory={},resume=on",
        state.display(),
        memory.display()
    );
    let (new, api) = with_api(
        outboard_guest_harness::GuestCommand::new(common::vmm()).args(["--restore", &restore]),
        "snapdev-new",
    );
    wait_rounds(&new, old_round + 3, old_batch + 3, "after the restore");
    assert_ne!(version(&api).unwrap(), alt_version);
    assert!(
        new.stderr()
            .contains(&format!("(written by outboard-vmm {alt_version})")),
        "{}",
        new.stderr()
    );
    // Nothing repeated or skipped: the guest's state is the snapshot's.
    let first = |marker: &str, key: &str| {
        new.lines()
            .iter()
            .filter(|l| l.contains(marker))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")[..]))
                    .and_then(|n| n.parse::<u64>().ok())
            })
    };
    assert_eq!(first("OUTBOARD_BLK_PROGRESS", "round"), Some(old_round + 1));
    let new_seqs = heartbeat_seqs(&new);
    assert_eq!(
        new_seqs.first().copied(),
        old_seqs.last().map(|s| s + 1),
        "the heartbeat counter goes on: before {old_seqs:?}, after {new_seqs:?}"
    );
    devices_clean(&api, &new, &rig.dir);
    mix_clean(&new, &rig.echo);
    eprintln!(
        "restored after disk round {old_round}, NIC batch {old_batch}, heartbeat {:?}; now at \
         round {:?}, {} frames echoed\n{}",
        old_seqs.last(),
        last_field(&new, "OUTBOARD_BLK_PROGRESS", "round"),
        rig.echo.echoed.lock().unwrap(),
        new.stderr()
    );
    let _ = api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#));
    assert_eq!(common::exit_code(&new), 0, "{}", new.stderr());
}
