//! The host's attestation service (`outboard-vmm-attest --serve`) with real VMMs: documents
//! from VMMs started with `--attest-service` verify and carry exactly the predicted PCRs, the
//! second VMM of a binary is served from the digest cache, a VMM's launch policy travels as
//! text and still refuses a mismatch, and hostile clients neither crash the service nor get a
//! measurement of anything but their own binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_fault, assert_no_panic, exit_code, TIMEOUT};
use outboard_attest::pcr::PCR_COUNT;
use outboard_attest::{verify_document, VerifyOptions};
use outboard_guest_harness::kvm_available;

#[path = "common/attest.rs"]
mod attest_common;

use attest_common::*;

/// A running service; its stderr lines are collected for the cache checks.
struct Service {
    child: Child,
    socket: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn start(pki: &Pki) -> Service {
        let socket = pki.path("attest.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_outboard-vmm-attest"))
            .arg("--serve")
            .arg(&socket)
            .args(pki.vmm_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the attestation service");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the service never listened: {:?}",
                log.lock().unwrap()
            );
            assert!(child.try_wait().unwrap().is_none(), "the service exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        Service { child, socket, log }
    }

    fn flags(&self) -> Vec<PathBuf> {
        vec!["--attest-service".into(), self.socket.clone()]
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn document(api: &outboard_guest_harness::ApiClient, nonce: &str) -> Vec<u8> {
    let (code, _, doc) = get_bytes(api, &format!("/attestation?nonce={nonce}"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&doc));
    doc
}

#[test]
fn service_documents_verify_and_the_second_vmm_hits_the_cache() {
    if !kvm_available("service_documents_verify_and_the_second_vmm_hits_the_cache") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    let predicted = predict(&kernel, CMDLINE, Some(&pki.host_cert_der));
    let service = Service::start(&pki);

    for (round, id) in ["svc-first", "svc-second"].into_iter().enumerate() {
        let (vm, api) = spawn_loaded(&kernel, id, service.flags());
        assert_eq!(state(&api), "Loaded");
        let doc = document(&api, "c0ffee");
        let verified = verify_document(
            &doc,
            &pki.root,
            &VerifyOptions {
                expected_nonce: Some(&[0xc0, 0xff, 0xee]),
                ..Default::default()
            },
        )
        .expect("a service-signed document verifies");
        assert_eq!(verified.document.module_id, id, "one module id per VM");
        for i in 0..PCR_COUNT {
            assert_eq!(
                verified.document.pcrs[&(i as u8)][..],
                predicted.pcrs().get(i).unwrap()[..],
                "PCR{i} differs from the offline prediction (round {round})"
            );
        }
        let line = service.wait_for(&format!("session for {id} "));
        let expected = if round == 0 { "measured" } else { "cached" };
        assert!(line.contains(expected), "{line}");

        let (code, body) = action(&api, "InstanceStart");
        assert_eq!(code, 204, "{body}");
        vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
        assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
        assert_no_panic(&vm);
    }
    assert!(
        !service.log().iter().any(|l| l.contains("PRIVATE KEY")),
        "key material in the service's log"
    );
}

#[test]
fn a_policy_sent_to_the_service_refuses_a_changed_command_line() {
    if !kvm_available("a_policy_sent_to_the_service_refuses_a_changed_command_line") {
        return;
    }
    let pki = Pki::new();
    let kernel = guest_copy(pki.dir.path());
    let approved = predict(&kernel, "outboard.run=heartbeat", Some(&pki.host_cert_der));
    std::fs::write(pki.path("policy.json"), policy_for(&approved).to_json()).unwrap();
    let service = Service::start(&pki);
    let mut flags = service.flags();
    flags.extend(["--attest-policy".into(), pki.path("policy.json")]);
    let (vm, api) = spawn_loaded(&kernel, "svc-policy", flags);
    assert_fault(action(&api, "InstanceStart"), 409, "PCR 4");
    assert_vcpus_never_ran(&vm, &api);
    let (code, body) = action(&api, "InstanceAbort");
    assert_eq!(code, 204, "{body}");
    assert_no_panic(&vm);
}

/// Sends raw lines to the service as a hostile local client would.
fn raw_session(socket: &Path, lines: &[&[u8]]) -> Vec<String> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The service may hang up mid-write on an over-long line: that is its answer.
    for l in lines {
        let _ = s.write_all(l);
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    BufReader::new(s).lines().map_while(Result::ok).collect()
}

#[test]
fn hostile_clients_get_errors_and_the_service_keeps_serving() {
    let pki = Pki::new();
    let service = Service::start(&pki);
    // Not Open first, garbage, an over-long line, an invalid policy.
    let cases: [(&[u8], &str); 4] = [
        (b"{\"op\":\"check_policy\"}\n", "must be Open"),
        (b"\x00\xff not json\n", "Malformed"),
        (&[b'x'; 2 << 20], "exceeds"),
        (
            b"{\"op\":\"open\",\"module_id\":\"x\",\"policy\":\"{\\\"version\\\": 99}\"}\n",
            "launch policy",
        ),
    ];
    for (input, needle) in cases {
        let answers = raw_session(&service.socket, &[input]);
        // Refused in the answer, or (no answer to a line it never finished reading) in the
        // service's log, which may come a moment after the hang-up.
        if !answers.iter().any(|a| a.contains(needle)) {
            service.wait_for(needle);
        }
    }
    // A client that is not a VMM is measured as what it is: the service opens a session for
    // it with PCR0 = its own binary, never something it names.
    // It also cannot make the service open a file by naming it: the kernel travels as a
    // descriptor or the request fails.
    let measure = br#"{"op":"measure","memory_bytes":4096,"kernel_path":"/etc/shadow","kernel_image_base":0,"initrd":null,"cmdline_addr":0,"cmdline_len":1,"config":{}}"#;
    let mut s = UnixStream::connect(&service.socket).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut answers = BufReader::new(s.try_clone().unwrap()).lines();
    s.write_all(b"{\"op\":\"open\",\"module_id\":\"impostor\",\"policy\":null}\n")
        .unwrap();
    assert_eq!(answers.next().unwrap().unwrap(), r#"{"result":"ready"}"#);
    s.write_all(&[&measure[..], b"\n"].concat()).unwrap();
    let answer = answers.next().unwrap().unwrap();
    assert!(
        answer.contains("without guest memory and kernel file"),
        "{answer}"
    );
    drop(s);
    let line = service.wait_for("session for impostor ");
    assert!(
        line.contains(&format!("/proc/{}/exe", std::process::id())),
        "{line}"
    );
    // A second service on the same socket is refused; the first keeps serving.
    let second = Command::new(env!("CARGO_BIN_EXE_outboard-vmm-attest"))
        .arg("--serve")
        .arg(&service.socket)
        .args(pki.vmm_args())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    let answers = raw_session(
        &service.socket,
        &[b"{\"op\":\"open\",\"module_id\":\"again\",\"policy\":null}\n"],
    );
    assert_eq!(answers, [r#"{"result":"ready"}"#]);
}
