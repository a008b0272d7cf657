//! Verifiers we did not write accept our documents: AWS's `aws-nitro-enclaves-cose` crate, and
//! Python `cbor2` + `pycose` + `cryptography` (tests/verify_nitro.py).

mod common;

use std::process::Command;

use aws_nitro_enclaves_cose::crypto::Openssl;
use aws_nitro_enclaves_cose::CoseSign1;
use outboard_attest::{AttestationDocument, AttestationRequest};

fn document(pki: &common::Pki, nonce: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let m = common::measure(&common::launch(dir.path()), &pki.signer);
    let req = AttestationRequest {
        nonce: Some(nonce.to_vec()),
        ..Default::default()
    };
    AttestationDocument::build_and_sign(&pki.signer, m.pcrs(), &req).unwrap()
}

#[test]
fn aws_nitro_enclaves_cose_verifies_our_document() {
    let pki = common::pki();
    let doc = document(&pki, b"aws");
    let leaf = openssl::x509::X509::from_der(pki.signer.certificate_der()).unwrap();
    let key = leaf.public_key().unwrap();
    let cose = CoseSign1::from_bytes(&doc).unwrap();
    assert!(cose.verify_signature::<Openssl>(&key).unwrap());
    let payload = cose.get_payload::<Openssl>(Some(&key)).unwrap();
    assert_eq!(
        AttestationDocument::from_payload(&payload)
            .unwrap()
            .nonce
            .as_deref(),
        Some(&b"aws"[..])
    );

    // A flipped signature byte is caught by it too.
    let mut bad = doc.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let cose = CoseSign1::from_bytes(&bad).unwrap();
    assert!(!cose.verify_signature::<Openssl>(&key).unwrap());
}

/// `python3 -c "import cbor2, pycose, cryptography"`; installs them with pip once if missing.
fn python_ready() -> Result<(), String> {
    let probe = || {
        Command::new("python3")
            .args(["-c", "import cbor2, pycose, cryptography.x509.verification"])
            .output()
            .map(|o| o.status.success())
    };
    match probe() {
        Err(e) => return Err(format!("python3 not runnable: {e}")),
        Ok(true) => return Ok(()),
        Ok(false) => {}
    }
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "cbor2",
            "pycose",
            "cryptography",
        ])
        .output()
        .map_err(|e| format!("pip not runnable: {e}"))?;
    if !pip.status.success() || !probe().unwrap_or(false) {
        return Err(format!(
            "cannot install cbor2/pycose/cryptography: {}",
            String::from_utf8_lossy(&pip.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(())
}

#[test]
fn python_cbor2_pycose_cryptography_verify_our_document() {
    if let Err(why) = python_ready() {
        eprintln!("SKIP: {why}");
        return;
    }
    let pki = common::pki();
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("doc.cbor");
    let root_path = dir.path().join("root.pem");
    std::fs::write(&doc_path, document(&pki, b"python-nonce")).unwrap();
    std::fs::write(&root_path, pki.root.certificate.to_pem().unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/verify_nitro.py");
    let run = |nonce: &[u8], root: &std::path::Path| {
        Command::new("python3")
            .arg(script)
            .arg(&doc_path)
            .arg(root)
            .arg(hex::encode(nonce))
            .output()
            .unwrap()
    };
    let out = run(b"python-nonce", &root_path);
    assert!(
        out.status.success(),
        "python verifier rejected our document: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");

    // The outside verifier is not a rubber stamp: wrong nonce and wrong root fail there too.
    assert!(!run(b"other", &root_path).status.success());
    let other = outboard_attest::CertificateAuthority::create_root(
        "x",
        outboard_attest::Validity::days_from_now(1),
    )
    .unwrap();
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, other.certificate.to_pem().unwrap()).unwrap();
    assert!(!run(b"python-nonce", &other_path).status.success());
    let mut forged = std::fs::read(&doc_path).unwrap();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    std::fs::write(&doc_path, forged).unwrap();
    let out = run(b"python-nonce", &root_path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("COSE signature does not verify"));
}
