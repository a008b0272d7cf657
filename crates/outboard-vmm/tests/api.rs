//! The REST API against a running test guest: pause/resume, stop, and requests that are
//! malformed or out of order.

mod common;

use std::time::Duration;

use common::{assert_fault, exit_code, testguest, vmm, with_api, TIMEOUT};
use outboard_guest_harness::{kvm_available, ApiClient, GuestCommand, ReadyMarker};

/// Heartbeat sequence number of a `OUTBOARD_HEARTBEAT seq=<n> ns=<t>` line.
fn heartbeat_seq(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a heartbeat line: {line:?}"))
}

fn vcpu0_exits(api: &ApiClient) -> u64 {
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["vcpus"][0]["exits_io"]
        .as_u64()
        .expect("vCPU 0 exit counter")
}

fn state(api: &ApiClient) -> String {
    let (code, body) = api.request("GET", "/", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["state"].as_str().unwrap().to_owned()
}

#[test]
fn pause_stops_the_heartbeat_and_resume_continues_it() {
    if !kvm_available("pause_stops_the_heartbeat_and_resume_continues_it") {
        return;
    }
    let (vm, api) = with_api(testguest(Some("heartbeat")), "pause");
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=3 ", TIMEOUT)
        .unwrap();

    assert_eq!(
        api.request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
            .unwrap()
            .0,
        204
    );
    assert_eq!(state(&api), "Paused");
    let exits_at_pause = vcpu0_exits(&api);
    let last = vm
        .lines()
        .iter()
        .filter(|l| l.contains("OUTBOARD_HEARTBEAT"))
        .map(|l| heartbeat_seq(l))
        .max()
        .unwrap();
    // One line may still be in the pipe; three more would take 300 ms of guest time.
    let later = format!("OUTBOARD_HEARTBEAT seq={} ", last + 3);
    assert!(
        vm.wait_for_line(&later, Duration::from_secs(1)).is_err(),
        "heartbeat went on while paused"
    );
    assert_eq!(vcpu0_exits(&api), exits_at_pause, "vCPU 0 ran while paused");

    assert_eq!(
        api.request("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))
            .unwrap()
            .0,
        204
    );
    assert_eq!(state(&api), "Running");
    vm.wait_for_line(&later, TIMEOUT).unwrap();
    assert!(vcpu0_exits(&api) > exits_at_pause);

    assert_eq!(
        api.request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#))
            .unwrap()
            .0,
        204
    );
    assert_eq!(exit_code(&vm), 0);
}

#[test]
fn instance_stop_exits_zero() {
    if !kvm_available("instance_stop_exits_zero") {
        return;
    }
    let (vm, api) = with_api(testguest(None), "stop");
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    let (code, body) = api
        .request("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert!(vm.stderr().contains("stopped by InstanceStop"));
}

#[test]
fn configure_and_start_through_the_api_with_bad_and_out_of_order_requests() {
    if !kvm_available("configure_and_start_through_the_api") {
        return;
    }
    let (vm, api) = with_api(GuestCommand::new(vmm()), "config");
    let req = |m: &str, p: &str, b: Option<&str>| api.request(m, p, b).unwrap();
    assert_eq!(state(&api), "NotStarted");

    // Out of order: nothing runs yet.
    assert_fault(
        req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)),
        409,
        "not running",
    );
    assert_fault(
        req("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),
        409,
        "not running",
    );
    assert_fault(
        req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        409,
        "boot source",
    );
    // Malformed.
    assert_fault(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib""#),
        ),
        400,
        "",
    );
    assert_fault(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128,"x":1}"#),
        ),
        400,
        "",
    );
    assert_fault(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":0,"mem_size_mib":128}"#),
        ),
        400,
        "at least 1",
    );
    assert_fault(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":100000,"mem_size_mib":128}"#),
        ),
        400,
        "exceeds the maximum",
    );
    assert_fault(
        req(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent/outboard/kernel"}"#),
        ),
        400,
        "Cannot open the kernel",
    );

    // A size the host can't give fails at start, with the VM still configurable.
    assert_eq!(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":67108864}"#)
        )
        .0,
        204
    );
    let guest = outboard_guest_harness::testguest_path();
    outboard_guest_harness::require_guest_image(&guest);
    let boot =
        serde_json::json!({"kernel_image_path": guest, "boot_args": "outboard.run=heartbeat"})
            .to_string();
    assert_eq!(req("PUT", "/boot-source", Some(&boot)).0, 204);
    assert_fault(
        req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        400,
        "exceeds what the host can give",
    );
    assert_eq!(state(&api), "NotStarted");

    assert_eq!(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":128}"#)
        )
        .0,
        204
    );
    assert_eq!(
        req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#)
        )
        .0,
        204
    );
    let ready =
        ReadyMarker::parse(&vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap()).unwrap();
    assert_eq!(ready.cpus, 2);

    // Out of order once running.
    assert_fault(
        req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        409,
        "already been started",
    );
    assert_fault(
        req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128}"#),
        ),
        409,
        "after the VM has started",
    );
    assert_fault(
        req("PUT", "/boot-source", Some(&boot)),
        409,
        "after the VM has started",
    );
    assert_fault(
        req("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),
        409,
        "not paused",
    );
    assert_eq!(req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0, 204);
    assert_fault(
        req("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)),
        409,
        "already paused",
    );

    let (code, body) = req("GET", "/vm/config", None);
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["machine_config"]["vcpu_count"], 2);

    assert_eq!(
        req("PUT", "/actions", Some(r#"{"action_type":"InstanceStop"}"#)).0,
        204
    );
    assert_eq!(exit_code(&vm), 0);
    common::assert_no_panic(&vm);
}
