//! The `outboard attest` commands end to end: keys from the CLI, a document signed with them (as
//! outboard-vmm does, through the library), verification and policies from the CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use outboard_attest::{
    AttestationDocument, AttestationRequest, AttestationSigner, CanonicalVmConfig, Measurements,
};

fn outboard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = outboard(args);
    assert!(
        out.status.success(),
        "outboard {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What the VMM would do at launch: measure the placed kernel, initrd, cmdline, config; sign.
fn vmm_document(host: &Path, kernel: &[u8], initrd: &[u8], cmdline: &str, nonce: &[u8]) -> Vec<u8> {
    let signer = AttestationSigner::from_files(
        &host.join("host.key"),
        &host.join("host.pem"),
        &host.join("cabundle.pem"),
        None,
    )
    .unwrap();
    let mut m = Measurements::new();
    m.measure_kernel(kernel);
    m.measure_initrd(initrd);
    m.measure_cmdline(cmdline.as_bytes());
    m.measure_config(&CanonicalVmConfig {
        vcpus: 2,
        memory_bytes: 256 << 20,
        devices: vec![],
    })
    .unwrap();
    m.measure_signing_certificate(signer.certificate_der());
    let req = AttestationRequest {
        nonce: Some(nonce.to_vec()),
        ..Default::default()
    };
    AttestationDocument::build_and_sign(&signer, m.pcrs(), &req).unwrap()
}

#[test]
fn keys_measure_verify_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    let host = d.join("host");
    ok(&[
        "attest",
        "ca",
        "create",
        "--out-dir",
        s(&ca),
        "--name",
        "Test Root",
    ]);
    let mode = std::fs::metadata(ca.join("root-ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwrites a key.
    assert!(!outboard(&["attest", "ca", "create", "--out-dir", s(&ca)])
        .status
        .success());
    ok(&[
        "attest",
        "host-key",
        "create",
        "--ca-dir",
        s(&ca),
        "--out-dir",
        s(&host),
        "--name",
        "host-7",
    ]);
    let mode = std::fs::metadata(host.join("host.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 199) as u8).collect();
    let initrd: Vec<u8> = (0..100_000u32).map(|i| (i % 3) as u8).collect();
    std::fs::write(d.join("kernel"), &kernel).unwrap();
    std::fs::write(d.join("initrd"), &initrd).unwrap();
    let cmdline = "console=ttyS0 quiet";

    // Expected values, without launching anything; the policy also pins PCR8 via --signing-cert.
    let policy = d.join("policy.json");
    let printed = ok(&[
        "attest",
        "measure",
        "--kernel",
        s(&d.join("kernel")),
        "--initrd",
        s(&d.join("initrd")),
        "--cmdline",
        cmdline,
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--signing-cert",
        s(&host.join("host.pem")),
        "--policy-out",
        s(&policy),
        "--event-log-out",
        s(&d.join("log.json")),
    ]);
    assert_eq!(printed.lines().count(), 5, "{printed}");
    assert!(printed.contains("PCR2  kernel"));

    let doc = d.join("doc.cbor");
    std::fs::write(
        &doc,
        vmm_document(&host, &kernel, &initrd, cmdline, b"\x01\x02"),
    )
    .unwrap();
    let root = host.join("cabundle.pem");
    let out = ok(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
        "--nonce",
        "0102",
        "--policy",
        s(&policy),
        "--event-log",
        s(&d.join("log.json")),
    ]);
    assert!(out.contains("OK: signature"), "{out}");
    assert!(out.contains("event log replays"), "{out}");
    assert_eq!(out.matches(" match ").count(), 5, "{out}");

    // Wrong nonce, missing nonce (none sent by this verifier but expected), wrong root.
    let bad = outboard(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&root),
        "--nonce",
        "0103",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nonce"));
    ok(&["attest", "ca", "create", "--out-dir", s(&d.join("other"))]);
    let bad = outboard(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&d.join("other/root-ca.pem")),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("chain"));

    // A tampered kernel: PCR2 mismatch, per-PCR lines printed, non-zero exit.
    let mut evil = kernel.clone();
    evil[77] ^= 0x80;
    std::fs::write(
        &doc,
        vmm_document(&host, &evil, &initrd, cmdline, b"\x01\x02"),
    )
    .unwrap();
    let bad = outboard(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
        "--policy",
        s(&policy),
    ]);
    assert!(!bad.status.success());
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("PCR2 ") && l.contains("MISMATCH")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("PCR3 ") && l.contains(" match ")),
        "{stdout}"
    );
    // The predicted event log no longer explains the tampered document either.
    let bad = outboard(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
        "--event-log",
        s(&d.join("log.json")),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("replay to the document's PCR 2"));

    // Approve both kernels from their documents: several values per PCR.
    let good_doc = d.join("good.cbor");
    std::fs::write(
        &good_doc,
        vmm_document(&host, &kernel, &initrd, cmdline, b""),
    )
    .unwrap();
    let both = d.join("both.json");
    ok(&[
        "attest",
        "policy",
        "--from-doc",
        s(&good_doc),
        "--from-doc",
        s(&doc),
        "--out",
        s(&both),
    ]);
    let text = std::fs::read_to_string(&both).unwrap();
    assert!(
        !text.contains("\"8\""),
        "PCR8 is host-specific and left out by default: {text}"
    );
    ok(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
        "--policy",
        s(&both),
    ]);
    ok(&[
        "attest",
        "verify",
        "--doc",
        s(&good_doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
        "--policy",
        s(&both),
    ]);
}

#[test]
fn garbage_document_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(&["attest", "ca", "create", "--out-dir", s(&ca)]);
    let doc = dir.path().join("junk");
    std::fs::write(&doc, b"\x84\x44\xa1\x01\x38\x22\xa0\x59\xff\xff").unwrap();
    let out = outboard(&[
        "attest",
        "verify",
        "--doc",
        s(&doc),
        "--root-ca",
        s(&ca.join("root-ca.pem")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REJECTED") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn config_file_and_flags_give_the_same_pcr5_and_devices_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k"), b"kernel").unwrap();
    let kernel = d.join("k");
    let pcr5 = |extra: &[&str]| -> String {
        let mut args = vec!["attest", "measure", "--kernel", s(&kernel)];
        args.extend_from_slice(extra);
        ok(&args)
            .lines()
            .find(|l| l.starts_with("PCR5 "))
            .unwrap()
            .to_owned()
    };
    let flags = pcr5(&["--cpus", "2", "--memory", "256M"]);
    std::fs::write(
        d.join("c.json"),
        r#"{"vcpus": 2, "memory_bytes": 268435456}"#,
    )
    .unwrap();
    assert_eq!(flags, pcr5(&["--config", s(&d.join("c.json"))]));
    std::fs::write(
        d.join("dev.json"),
        r#"{"vcpus": 2, "memory_bytes": 268435456,
            "devices": [{"kind": "virtio-blk", "id": "root", "backend": "card:vol-1"}]}"#,
    )
    .unwrap();
    assert_ne!(flags, pcr5(&["--config", s(&d.join("dev.json"))]));
    assert_ne!(flags, pcr5(&["--cpus", "3", "--memory", "256M"]));
    std::fs::write(
        d.join("bad.json"),
        r#"{"vcpus": 2, "memory_bytes": 1, "typo": 1}"#,
    )
    .unwrap();
    assert!(!outboard(&[
        "attest",
        "measure",
        "--kernel",
        s(&d.join("k")),
        "--config",
        s(&d.join("bad.json"))
    ])
    .status
    .success());
}

#[test]
fn bench_ends_with_a_result_line() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("k");
    std::fs::write(&kernel, vec![0x5au8; 3 << 20]).unwrap();
    let out = ok(&["attest", "bench", "--kernel", s(&kernel), "--runs", "2"]);
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("RESULT attest measure_ms="), "{out}");
    assert!(
        last.contains(" sign_ms=") && last.contains(" measured_mib=3.00"),
        "{out}"
    );
}
