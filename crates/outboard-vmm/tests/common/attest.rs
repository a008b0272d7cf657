//! Shared by the attested-launch tests (`attest.rs`, `attest_service.rs`): a throwaway PKI,
//! offline PCR predictions, and API helpers that read raw bytes.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{temp_path, vmm, TIMEOUT};
use openssl::x509::X509;
use outboard_attest::keys::{save_host_files, CertificateAuthority, SecretKey, Validity};
use outboard_attest::{CanonicalVmConfig, Measurements, Policy};
use outboard_guest_harness::{ApiClient, GuestCommand, GuestVm};

pub const MEMORY_MIB: u64 = 128;
pub const CMDLINE: &str = "outboard.run=poweroff";
/// Guest address of the command line (outboard-boot's layout), also its memfd offset.
pub const CMDLINE_START: u64 = 0x2_0000;

/// Operator root CA and a host key (passphrase-protected) written as outboard-vmm reads them.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub root: X509,
    pub host_cert_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let root =
            CertificateAuthority::create_root("Attest test root", Validity::days_from_now(2))
                .unwrap();
        let key = SecretKey::generate().unwrap();
        let cert = root
            .issue_host_certificate("attest-test-host", &key, Validity::days_from_now(1))
            .unwrap();
        std::fs::write(dir.path().join("pass"), b"correct horse\n").unwrap();
        save_host_files(
            dir.path(),
            &key,
            &cert,
            &root.bundle(),
            Some(b"correct horse"),
        )
        .unwrap();
        let root_pem = root.certificate.to_pem().unwrap();
        std::fs::write(dir.path().join("root.pem"), &root_pem).unwrap();
        Pki {
            root: root.certificate.clone(),
            host_cert_der: cert.to_der().unwrap(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn vmm_args(&self) -> Vec<PathBuf> {
        let mut args = Vec::new();
        for (flag, file) in [
            ("--attest-key", "host.key"),
            ("--attest-cert", "host.pem"),
            ("--attest-cabundle", "cabundle.pem"),
            ("--attest-passphrase-file", "pass"),
        ] {
            args.push(PathBuf::from(flag));
            args.push(self.path(file));
        }
        args
    }
}

/// A private copy of the test guest: another build replacing it mid-test must not change what
/// is predicted or loaded.
pub fn guest_copy(dir: &Path) -> PathBuf {
    let guest = outboard_guest_harness::testguest_path();
    outboard_guest_harness::require_guest_image(&guest);
    let copy = dir.join("testguest");
    std::fs::copy(&guest, &copy).unwrap();
    copy
}

/// The PCRs of a launch predicted from its files, as `outboard attest measure --vmm …
/// --host-agent … --kernel … --cmdline … --cpus 1 --memory 128M --signing-cert …` computes them.
pub fn predict(kernel: &Path, cmdline: &str, signing_cert_der: Option<&[u8]>) -> Measurements {
    let mut m = Measurements::new();
    m.measure_vmm_binary(Path::new(env!("CARGO_BIN_EXE_outboard-vmm")))
        .unwrap();
    // PCR6: the attestation helper that measured (per VM or the host's service).
    m.measure_host_agent(Path::new(env!("CARGO_BIN_EXE_outboard-vmm-attest")))
        .unwrap();
    m.measure_kernel_file(&std::fs::read(kernel).unwrap())
        .unwrap();
    m.measure_cmdline(cmdline.as_bytes());
    m.measure_config(&CanonicalVmConfig {
        vcpus: 1,
        memory_bytes: MEMORY_MIB << 20,
        devices: Vec::new(),
    })
    .unwrap();
    if let Some(der) = signing_cert_der {
        m.measure_signing_certificate(der);
    }
    m
}

/// A policy approving every PCR `m` measured.
pub fn policy_for(m: &Measurements) -> Policy {
    let mut policy = Policy::default();
    for e in &m.event_log().events {
        policy.approve(e.pcr as u8, *m.pcrs().get(e.pcr).unwrap());
    }
    policy
}

/// outboard-vmm in phase 1 only (`--no-start`) with the test guest and `extra` flags.
pub fn spawn_loaded(kernel: &Path, test: &str, extra: Vec<PathBuf>) -> (GuestVm, ApiClient) {
    let sock = temp_path(test, ".sock");
    let vm = GuestCommand::new(vmm())
        .kernel(kernel)
        .cmdline(CMDLINE)
        .cpus(1)
        .memory_mib(MEMORY_MIB)
        .api_socket(&sock)
        .args(["--no-start", "--id", test])
        .args(extra)
        .spawn()
        .expect("spawn outboard-vmm");
    let api = ApiClient::new(&sock);
    api.wait_ready(TIMEOUT).expect("API socket comes up");
    (vm, api)
}

/// `GET path` returning (status, content type, raw body): the harness client only reads text.
pub fn get_bytes(api: &ApiClient, path: &str) -> (u16, String, Vec<u8>) {
    let mut stream = UnixStream::connect(api.path()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8(response[..head_end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, response[head_end + 4..].to_vec())
}

pub fn state(api: &ApiClient) -> String {
    let (code, body) = api.request("GET", "/", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["state"].as_str().unwrap().to_owned()
}

pub fn action(api: &ApiClient, name: &str) -> (u16, String) {
    api.request(
        "PUT",
        "/actions",
        Some(&format!(r#"{{"action_type":"{name}"}}"#)),
    )
    .unwrap()
}

/// No vCPU has run: every exit counter is zero and the guest printed nothing.
pub fn assert_vcpus_never_ran(vm: &GuestVm, api: &ApiClient) {
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    for vcpu in metrics["vcpus"].as_array().expect("vCPU counters") {
        for counter in ["exits_io", "exits_mmio", "exits_other"] {
            assert_eq!(vcpu[counter], 0, "a vCPU ran in phase 1: {body}");
        }
    }
    assert!(
        !vm.lines()
            .iter()
            .any(|l| l.contains("OUTBOARD_GUEST_READY")),
        "the guest ran in phase 1"
    );
}

pub fn event_log_of(api: &ApiClient) -> serde_json::Value {
    let (code, body) = api.request("GET", "/attestation/event-log", None).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Python cbor2 + pycose + cryptography, if importable (crates/attest's test installs them).
pub fn python_verifier() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import cbor2, pycose, cryptography.x509.verification"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../attest/tests/verify_nitro.py"
    ))
}
