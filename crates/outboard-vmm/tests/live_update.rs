//! Live update: the running guest moves to a successor outboard-vmm process, repeatedly, on the
//! same API socket, without rebooting; a successor that fails leaves it running on the old one.

mod common;

use std::time::Duration;

use common::{assert_fault, testguest, with_api, TIMEOUT};
use outboard_guest_harness::{kvm_available, ApiClient, GuestVm};

fn heartbeat_seqs(vm: &GuestVm) -> Vec<u64> {
    vm.lines()
        .iter()
        .filter(|l| l.contains("OUTBOARD_HEARTBEAT"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

fn last_seq(vm: &GuestVm) -> u64 {
    *heartbeat_seqs(vm).last().expect("some heartbeats")
}

fn live_update(api: &ApiClient, binary: &str) -> (u16, String) {
    let body = serde_json::json!({ "binary": binary }).to_string();
    api.request("PUT", "/live-update", Some(&body)).unwrap()
}

/// Pause lengths the successors printed, in ms.
fn pauses(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.split("guest paused for ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn heartbeat_survives_five_live_updates_and_a_failed_one() {
    if !kvm_available("heartbeat_survives_five_live_updates_and_a_failed_one") {
        return;
    }
    let binary = env!("CARGO_BIN_EXE_outboard-vmm");
    // Two vCPUs: each hands its state over from its own thread.
    let (vm, api) = with_api(testguest(Some("heartbeat")).cpus(2), "liveupdate");
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=2 ", TIMEOUT)
        .unwrap();

    // A successor that exits at once: the update fails, the guest keeps running here.
    assert_fault(live_update(&api, "/bin/false"), 500, "runs on here");
    let after_failure = format!("OUTBOARD_HEARTBEAT seq={} ", last_seq(&vm) + 2);
    vm.wait_for_line(&after_failure, TIMEOUT).unwrap();
    assert_fault(
        live_update(&api, "/nonexistent/outboard-vmm"),
        500,
        "runs on here",
    );

    for round in 1..=5 {
        let (code, body) = live_update(&api, binary);
        assert_eq!(code, 204, "round {round}: {body}\n{}", vm.stderr());
        let next = format!("OUTBOARD_HEARTBEAT seq={} ", last_seq(&vm) + 2);
        vm.wait_for_line(&next, TIMEOUT)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", vm.stderr()));
        // The same socket path now reaches the successor.
        let (code, info) = api.request("GET", "/", None).unwrap();
        assert_eq!(code, 200, "{info}");
        assert!(info.contains("\"Running\""), "{info}");
    }
    // The first VMM exited 0 after the first handover.
    let status = vm.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0));

    let seqs = heartbeat_seqs(&vm);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter restarted or skipped: {seqs:?}"
    );
    // No byte of console output was lost or written twice (an I/O instruction replayed in the
    // successor would repeat a character).
    for line in vm.lines().iter().filter(|l| l.contains("HEARTBEAT")) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(
            fields.len() == 3
                && fields[0] == "OUTBOARD_HEARTBEAT"
                && fields[1]
                    .strip_prefix("seq=")
                    .is_some_and(|n| n.parse::<u64>().is_ok())
                && fields[2]
                    .strip_prefix("ns=")
                    .is_some_and(|n| n.parse::<u64>().is_ok()),
            "damaged heartbeat line {line:?}"
        );
    }
    assert!(
        vm.lines()
            .iter()
            .filter(|l| l.contains("OUTBOARD_GUEST_READY"))
            .count()
            <= 1,
        "the guest booted again"
    );
    let stderr = vm.stderr();
    let pauses = pauses(&stderr);
    assert_eq!(pauses.len(), 5, "{stderr}");
    eprintln!("live-update pauses (ms): {pauses:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (code, _) = api
        .request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#))
        .unwrap();
    assert_eq!(code, 204);
    let gone = std::time::Instant::now() + TIMEOUT;
    while api.path().exists() && std::time::Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!api.path().exists(), "the last successor did not exit");
}

/// The successor fails while it prepares the VM (before the old VMM pauses the guest): it
/// cannot map 1 GiB of guest memory under a 700 MB address-space limit. The guest runs on.
/// (Failures after the pause: `live_update_devices.rs` kills successors at each step.)
#[test]
fn successor_failing_to_prepare_rolls_back() {
    if !kvm_available("successor_failing_to_prepare_rolls_back") {
        return;
    }
    let script = common::temp_path("lu-limited", ".sh");
    let binary = env!("CARGO_BIN_EXE_outboard-vmm");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nulimit -v 700000\nexec {binary} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (vm, api) = with_api(
        testguest(Some("heartbeat")).memory_mib(1024),
        "liveupdate-oom",
    );
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=2 ", TIMEOUT)
        .unwrap();
    assert_fault(
        live_update(&api, script.to_str().unwrap()),
        500,
        "Cannot map guest memory",
    );
    let next = format!("OUTBOARD_HEARTBEAT seq={} ", last_seq(&vm) + 2);
    vm.wait_for_line(&next, TIMEOUT).unwrap();
    let (code, info) = api.request("GET", "/", None).unwrap();
    assert_eq!(code, 200);
    assert!(info.contains("\"Running\""), "{info}");
    let seqs = heartbeat_seqs(&vm);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let (code, _) = api
        .request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#))
        .unwrap();
    assert_eq!(code, 204);
    assert_eq!(common::exit_code(&vm), 0);
    let _ = std::fs::remove_file(&script);
}
