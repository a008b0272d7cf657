//! The attested two-phase launch against real KVM and the test guest: phase 1 (`--no-start` or
//! `InstanceLoad`) loads and measures with the vCPUs stopped; the document served by the live
//! VMM verifies, carries exactly the PCRs predicted offline from the same files ("what is
//! measured is what runs"), and is accepted by a verifier we did not write; a launch policy
//! refuses a start whose measurements differ; `InstanceAbort` zeroes guest memory.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{assert_fault, assert_no_panic, exit_code, temp_path, vmm, TIMEOUT};
use outboard_attest::pcr::PCR_COUNT;
use outboard_attest::{verify_document, CanonicalVmConfig, EventLog, VerifyOptions};
use outboard_guest_harness::{kvm_available, ApiClient, GuestCommand};

#[path = "common/attest.rs"]
mod attest_common;

use attest_common::*;

#[test]
fn attested_launch_serves_a_document_of_exactly_what_runs() {
    if !kvm_available("attested_launch_serves_a_document_of_exactly_what_runs") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    let predicted = predict(&kernel, CMDLINE, Some(&pki.host_cert_der));
    let policy = policy_for(&predicted);
    std::fs::write(pki.path("policy.json"), policy.to_json()).unwrap();
    let mut flags = pki.vmm_args();
    flags.extend(["--attest-policy".into(), pki.path("policy.json")]);
    let (vm, api) = spawn_loaded(&kernel, "attest-ok", flags);

    assert_eq!(state(&api), "Loaded");
    assert_vcpus_never_ran(&vm, &api);

    let nonce = format!("5eed{:08x}{:016x}", std::process::id(), nanos_now());
    let (code, content_type, doc) = get_bytes(&api, &format!("/attestation?nonce={nonce}"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&doc));
    assert_eq!(content_type, outboard_attest::DOCUMENT_CONTENT_TYPE);

    // The event log the VMM serves replays to the document's PCRs, and its configuration is
    // PCR5's input.
    let log_json = event_log_of(&api);
    let log: EventLog =
        serde_json::from_value(serde_json::json!({ "events": log_json["events"] })).unwrap();
    let config: CanonicalVmConfig = serde_json::from_value(log_json["config"].clone()).unwrap();
    assert_eq!(config.vcpus, 1);
    assert_eq!(config.memory_bytes, MEMORY_MIB << 20);

    let nonce_bytes = hex::decode(&nonce).unwrap();
    let verified = verify_document(
        &doc,
        &pki.root,
        &VerifyOptions {
            expected_nonce: Some(&nonce_bytes),
            policy: Some(&policy),
            event_log: Some(&log),
            time: None,
        },
    )
    .expect("the live document verifies against the root, nonce, policy and event log");
    let document = verified.document;
    assert_eq!(document.module_id, "attest-ok");
    // What was measured is what was predicted from the files, register for register.
    for i in 0..PCR_COUNT {
        assert_eq!(
            document.pcrs[&(i as u8)][..],
            predicted.pcrs().get(i).unwrap()[..],
            "PCR{i} measured by the VMM differs from the offline prediction"
        );
    }
    assert_eq!(&log.replay().unwrap(), predicted.pcrs());
    for (i, value) in log_json["pcrs"].as_object().unwrap() {
        let i: usize = i.parse().unwrap();
        assert_eq!(
            value.as_str().unwrap(),
            hex::encode(predicted.pcrs().get(i).unwrap())
        );
    }

    // A stale nonce is caught.
    let err = verify_document(
        &doc,
        &pki.root,
        &VerifyOptions {
            expected_nonce: Some(b"another challenge"),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("nonce"), "{err}");

    // A verifier we did not write accepts the live document.
    match python_verifier() {
        Some(script) => {
            std::fs::write(pki.path("doc.cbor"), &doc).unwrap();
            let out = Command::new("python3")
                .arg(script)
                .arg(pki.path("doc.cbor"))
                .arg(pki.path("root.pem"))
                .arg(&nonce)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "python verifier rejected the live document: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
        }
        None => eprintln!("SKIP: python3 with cbor2, pycose and cryptography is not available"),
    }

    // Bad requests and out-of-order actions in phase 1.
    let (code, _, body) = get_bytes(&api, "/attestation?nonce=xyz");
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let (code, _, body) = get_bytes(&api, "/attestation?nonce=00&nonce=01");
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let (code, _, body) = get_bytes(&api, &format!("/attestation?nonce={}", "00".repeat(513)));
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert_fault(action(&api, "InstanceLoad"), 409, "already been loaded");
    assert_fault(
        api.request(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent"}"#),
        )
        .unwrap(),
        409,
        "loaded and measured",
    );
    assert_vcpus_never_ran(&vm, &api);

    // Phase 2: approved, so it runs; the guest powers off by itself.
    let (code, body) = action(&api, "InstanceStart");
    assert_eq!(code, 204, "{body}");
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert!(vm.stderr().contains("VM loaded and measured"));
    assert_no_panic(&vm);
}

#[test]
fn policy_mismatch_refuses_start_and_abort_zeroes_guest_memory() {
    if !kvm_available("policy_mismatch_refuses_start_and_abort_zeroes_guest_memory") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    // Approved: the same VM with another command line.
    let approved = predict(&kernel, "outboard.run=heartbeat", Some(&pki.host_cert_der));
    std::fs::write(pki.path("policy.json"), policy_for(&approved).to_json()).unwrap();
    let mut flags = pki.vmm_args();
    flags.extend(["--attest-policy".into(), pki.path("policy.json")]);
    let (vm, api) = spawn_loaded(&kernel, "attest-refused", flags);

    let (code, body) = action(&api, "InstanceStart");
    assert_eq!(code, 409, "{body}");
    let fault: serde_json::Value = serde_json::from_str(&body).unwrap();
    let message = fault["fault_message"].as_str().unwrap();
    assert!(
        message.contains("Refusing to start") && message.ends_with("PCR 4"),
        "{message:?} should refuse naming only PCR 4 (the command line)"
    );
    assert_eq!(state(&api), "Loaded", "a refused VM stays loaded");
    assert_vcpus_never_ran(&vm, &api);

    // Hold guest memory open (through /proc) so it can be inspected after the VMM is gone.
    let memfd = open_guest_memfd(vm.pid());
    let mut cmdline = vec![0u8; CMDLINE.len()];
    memfd.read_exact_at(&mut cmdline, CMDLINE_START).unwrap();
    assert_eq!(
        cmdline,
        CMDLINE.as_bytes(),
        "guest memory holds the loaded VM"
    );

    let (code, body) = action(&api, "InstanceAbort");
    assert_eq!(code, 204, "{body}");
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert!(
        vm.stderr()
            .contains("aborted by InstanceAbort; guest memory zeroed"),
        "{}",
        vm.stderr()
    );
    assert_no_panic(&vm);

    let size = memfd.metadata().unwrap().len();
    assert_eq!(size, MEMORY_MIB << 20);
    let mut chunk = vec![0u8; 1 << 20];
    for offset in (0..size).step_by(chunk.len()) {
        memfd.read_exact_at(&mut chunk, offset).unwrap();
        assert!(
            chunk.iter().all(|b| *b == 0),
            "guest memory at {offset:#x} survived InstanceAbort"
        );
    }
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Opens the VMM's guest-memory memfd through `/proc/<pid>/fd`.
fn open_guest_memfd(pid: u32) -> std::fs::File {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = entry.unwrap().path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target
            .to_string_lossy()
            .starts_with("/memfd:outboard-guest-ram")
        {
            return std::fs::File::open(&path).unwrap();
        }
    }
    panic!("outboard-vmm {pid} has no guest memory memfd");
}

#[test]
fn two_phase_through_the_api_without_an_attestation_key() {
    if !kvm_available("two_phase_through_the_api_without_an_attestation_key") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_copy(dir.path());
    let sock = temp_path("attest-nokey", ".sock");
    let vm = GuestCommand::new(vmm())
        .api_socket(&sock)
        .spawn()
        .expect("spawn outboard-vmm");
    let api = ApiClient::new(&sock);
    api.wait_ready(TIMEOUT).unwrap();

    assert_fault(
        api.request("GET", "/attestation/event-log", None).unwrap(),
        409,
        "InstanceLoad",
    );
    assert_fault(action(&api, "InstanceLoad"), 409, "boot source");
    let boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": CMDLINE});
    let (code, body) = api
        .request("PUT", "/boot-source", Some(&boot.to_string()))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let (code, body) = api
        .request(
            "PUT",
            "/machine-config",
            Some(&format!(
                r#"{{"vcpu_count":1,"mem_size_mib":{MEMORY_MIB}}}"#
            )),
        )
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let (code, body) = action(&api, "InstanceLoad");
    assert_eq!(code, 204, "{body}");
    assert_eq!(state(&api), "Loaded");

    // No key: no document, but the measurements are there and match the files.
    let (code, _, body) = get_bytes(&api, "/attestation?nonce=00");
    assert_eq!(code, 409);
    assert!(String::from_utf8_lossy(&body).contains("No attestation key configured"));
    let log_json = event_log_of(&api);
    let log: EventLog =
        serde_json::from_value(serde_json::json!({ "events": log_json["events"] })).unwrap();
    assert_eq!(
        &log.replay().unwrap(),
        predict(&kernel, CMDLINE, None).pcrs()
    );

    let (code, body) = action(&api, "InstanceStart");
    assert_eq!(code, 204, "{body}");
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert_no_panic(&vm);
}

#[test]
fn bad_attestation_files_fail_the_start_clearly() {
    if !kvm_available("bad_attestation_files_fail_the_start_clearly") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    std::fs::write(pki.path("wrong-pass"), b"not the passphrase\n").unwrap();
    // (key, certificate, passphrase file, expected words)
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "host.key",
            "root.pem",
            "pass",
            "does not match the private key",
        ),
        (
            "host.key",
            "host.pem",
            "wrong-pass",
            "Cannot load the attestation key",
        ),
        ("missing.key", "host.pem", "pass", "missing.key"),
    ];
    for (key, cert, pass, needle) in cases {
        let vm = GuestCommand::new(vmm())
            .kernel(&kernel)
            .cmdline(CMDLINE)
            .memory_mib(MEMORY_MIB)
            .args(["--attest-key".into(), pki.path(key)])
            .args(["--attest-cert".into(), pki.path(cert)])
            .args(["--attest-cabundle".into(), pki.path("cabundle.pem")])
            .args(["--attest-passphrase-file".into(), pki.path(pass)])
            .spawn()
            .expect("spawn outboard-vmm");
        assert_eq!(exit_code(&vm), 1, "stderr:\n{}", vm.stderr());
        let stderr = vm.stderr();
        assert!(stderr.contains("Cannot set up attestation"), "{stderr}");
        assert!(stderr.contains(needle), "{stderr} lacks {needle:?}");
        assert!(!stderr.contains("correct horse"), "a passphrase was logged");
        assert!(!vm
            .lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_GUEST_READY")));
        assert_no_panic(&vm);
    }
    // A policy file that is not a policy.
    std::fs::write(pki.path("bad-policy.json"), b"{\"version\": 99}").unwrap();
    let vm = GuestCommand::new(vmm())
        .kernel(&kernel)
        .cmdline(CMDLINE)
        .memory_mib(MEMORY_MIB)
        .args(["--attest-policy".into(), pki.path("bad-policy.json")])
        .spawn()
        .expect("spawn outboard-vmm");
    assert_eq!(exit_code(&vm), 1, "stderr:\n{}", vm.stderr());
    assert!(
        vm.stderr().contains("Cannot load the launch policy"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn a_live_updated_vm_does_not_serve_its_old_measurements() {
    if !kvm_available("a_live_updated_vm_does_not_serve_its_old_measurements") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    let sock = temp_path("attest-lu", ".sock");
    let vm = GuestCommand::new(vmm())
        .kernel(&kernel)
        .cmdline("outboard.run=heartbeat")
        .cpus(1)
        .memory_mib(MEMORY_MIB)
        .api_socket(&sock)
        .args(["--id", "attest-lu"])
        .args(pki.vmm_args())
        .spawn()
        .expect("spawn outboard-vmm");
    let api = ApiClient::new(&sock);
    api.wait_ready(TIMEOUT).expect("API socket comes up");
    vm.wait_for_line("OUTBOARD_HEARTBEAT", TIMEOUT).unwrap();
    let (code, _, _) = get_bytes(&api, "/attestation?nonce=01");
    assert_eq!(code, 200, "measured at launch");

    let body = serde_json::json!({ "binary": vmm_binary() }).to_string();
    let (code, reply) = api.request("PUT", "/live-update", Some(&body)).unwrap();
    assert_eq!(code, 204, "{reply}\n{}", vm.stderr());
    // The successor runs the guest but will not present the old binary's PCR0 as its own.
    for path in ["/attestation?nonce=02", "/attestation/event-log"] {
        let (code, _, body) = get_bytes(&api, path);
        assert_eq!(code, 409, "{path}");
        assert!(
            String::from_utf8_lossy(&body).contains("live-updated"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // The successor is not our child: stop it through the API.
    let (code, body) = action(&api, "InstanceStop");
    assert_eq!(code, 204, "{body}");
    drop(vm);
}

fn vmm_binary() -> &'static str {
    env!("CARGO_BIN_EXE_outboard-vmm")
}
