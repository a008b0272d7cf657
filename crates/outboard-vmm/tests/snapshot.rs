//! Snapshot to files and restore in a new outboard-vmm process: the guest goes on where it was
//! paused (its heartbeat counter continues, it does not boot again).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_fault, exit_code, temp_path, testguest, vmm, with_api, TIMEOUT};
use outboard_guest_harness::{kvm_available, ApiClient, GuestCommand, GuestVm};

/// `(seq, ns)` of every heartbeat line; a line cut in two by the snapshot still counts in the
/// process that printed its `seq=`.
fn heartbeats(vm: &GuestVm) -> Vec<(u64, u64)> {
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
    };
    vm.lines()
        .iter()
        .filter_map(|l| Some((field(l, "seq=")?, field(l, "ns=")?)))
        .collect()
}

fn patch(api: &ApiClient, state: &str) {
    let body = format!(r#"{{"state":"{state}"}}"#);
    let (code, text) = api.request("PATCH", "/vm", Some(&body)).unwrap();
    assert_eq!(code, 204, "{text}");
}

fn state(api: &ApiClient) -> String {
    let (code, body) = api.request("GET", "/", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["state"].as_str().unwrap().to_owned()
}

fn snapshot_body(state: &Path, memory: &Path) -> String {
    serde_json::json!({"state_path": state, "memory_path": memory}).to_string()
}

#[test]
fn heartbeat_continues_after_snapshot_and_restore_in_a_new_process() {
    if !kvm_available("heartbeat_continues_after_snapshot_and_restore_in_a_new_process") {
        return;
    }
    let state_path = temp_path("snap", ".state");
    let memory_path = temp_path("snap", ".mem");
    let (old, api) = with_api(testguest(Some("heartbeat")), "snap-old");
    old.wait_for_line("OUTBOARD_HEARTBEAT seq=3 ", TIMEOUT)
        .unwrap();

    // Running: refused.
    let body = snapshot_body(&state_path, &memory_path);
    assert_fault(
        api.request("PUT", "/snapshot/create", Some(&body)).unwrap(),
        409,
        "must be paused",
    );
    patch(&api, "Paused");
    let (code, text) = api.request("PUT", "/snapshot/create", Some(&body)).unwrap();
    assert_eq!(code, 204, "{text}\n{}", old.stderr());
    // A bad path is the client's error; the VM stays paused and usable.
    let bad = snapshot_body(Path::new("/nonexistent/dir/s"), &memory_path);
    assert_fault(
        api.request("PUT", "/snapshot/create", Some(&bad)).unwrap(),
        400,
        "Cannot write state file",
    );
    // Let any line still in the pipe arrive, then stop the old VMM for good.
    std::thread::sleep(Duration::from_millis(300));
    let before = heartbeats(&old);
    old.kill();
    let (last_seq, last_ns) = *before.last().expect("heartbeats before the snapshot");
    if let Some(dir) = std::env::var_os("OUTBOARD_KEEP_SNAPSHOT") {
        std::fs::copy(&state_path, Path::new(&dir).join("vmstate-v1.obvm")).unwrap();
    }

    // Restored paused: nothing runs until PATCH /vm Resumed.
    let sock = temp_path("snap-new", ".sock");
    let restore = format!(
        "state={},memory={},resume=off",
        state_path.display(),
        memory_path.display()
    );
    let new = GuestCommand::new(vmm())
        .args(["--restore", &restore])
        .api_socket(&sock)
        .spawn()
        .unwrap();
    let api = ApiClient::new(&sock);
    api.wait_ready(TIMEOUT).unwrap();
    assert_eq!(state(&api), "Paused", "{}", new.stderr());
    let next = format!("seq={} ", last_seq + 1);
    assert!(
        new.wait_for_line(&next, Duration::from_millis(500))
            .is_err(),
        "the restored guest ran while paused"
    );
    patch(&api, "Resumed");
    let later = format!("OUTBOARD_HEARTBEAT seq={} ", last_seq + 3);
    new.wait_for_line(&later, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", new.stderr()));

    let after = heartbeats(&new);
    assert_eq!(
        after[0].0,
        last_seq + 1,
        "the counter continues from where it stopped: {after:?}"
    );
    assert!(after
        .windows(2)
        .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 > w[0].1));
    assert!(
        after[0].1 > last_ns,
        "kvmclock went back: {last_ns} then {after:?}"
    );
    eprintln!(
        "guest-time gap across snapshot+restore: {:.1} ms",
        (after[0].1 - last_ns) as f64 / 1e6
    );
    assert!(
        !new.lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_GUEST_READY")),
        "the guest booted again"
    );
    let stderr = new.stderr();
    assert!(stderr.contains("outboard-vmm: restored"), "{stderr}");

    let (code, _) = api
        .request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#))
        .unwrap();
    assert_eq!(code, 204);
    assert_eq!(exit_code(&new), 0);
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_file(&memory_path);
}

#[test]
fn restore_refuses_damaged_and_mismatched_files() {
    if !kvm_available("restore_refuses_damaged_and_mismatched_files") {
        return;
    }
    let garbage = temp_path("snap-bad", ".state");
    std::fs::write(&garbage, b"this is not a state file at all").unwrap();
    let restore = format!("state={},memory=/dev/null", garbage.display());
    let vm = GuestCommand::new(vmm())
        .args(["--restore", &restore])
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&vm), 1);
    assert!(vm.stderr().contains("bad magic"), "{}", vm.stderr());
    common::assert_no_panic(&vm);
    let _ = std::fs::remove_file(&garbage);

    // A valid state whose memory file has the wrong size.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../vmm/tests/fixtures/vmstate-v1.obvm"
    );
    let short = temp_path("snap-short", ".mem");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let restore = format!("state={fixture},memory={}", short.display());
    let vm = GuestCommand::new(vmm())
        .args(["--restore", &restore])
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&vm), 1);
    assert!(vm.stderr().contains("holds 4096 bytes"), "{}", vm.stderr());
    common::assert_no_panic(&vm);
    let _ = std::fs::remove_file(&short);
}

/// A snapshot of a VM with a disk and a NIC whose backends are gone: the restore fails with a
/// clear error naming the socket (the devices are connected afresh), no panic.
#[test]
fn restoring_devices_without_their_backends_is_a_clear_error() {
    if !kvm_available("restoring_devices_without_their_backends_is_a_clear_error") {
        return;
    }
    // The v2 fixture's backends lived in a test's scratch directory, long gone.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../vmm/tests/fixtures/vmstate-v2.obvm"
    );
    let memory = temp_path("snap-nobackend", ".mem");
    std::fs::File::create(&memory)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let restore = format!("state={fixture},memory={}", memory.display());
    let vm = GuestCommand::new(vmm())
        .args(["--restore", &restore])
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&vm), 1);
    assert!(
        vm.stderr()
            .contains("Cannot connect to vhost-user backend /tmp/obvmm-20673-lukill.d/blk.sock"),
        "{}",
        vm.stderr()
    );
    common::assert_no_panic(&vm);
    let _ = std::fs::remove_file(&memory);
}
