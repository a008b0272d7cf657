//! A document verifies only with the right root, an intact signature, a valid chain and the
//! expected nonce.

mod common;

use outboard_attest::document;
use outboard_attest::keys::{CertificateAuthority, SecretKey, Validity};
use outboard_attest::verify::{self, verify_document, VerifyOptions};
use outboard_attest::{AttestationDocument, AttestationRequest, AttestationSigner};

fn nonce_request(nonce: &[u8]) -> AttestationRequest {
    AttestationRequest {
        nonce: Some(nonce.to_vec()),
        user_data: Some(b"launch-request-digest".to_vec()),
        public_key: Some(vec![0x30, 0x59, 1, 2, 3]),
    }
}

fn signed(pki: &common::Pki, nonce: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let m = common::measure(&common::launch(dir.path()), &pki.signer);
    AttestationDocument::build_and_sign(&pki.signer, m.pcrs(), &nonce_request(nonce)).unwrap()
}

fn with_nonce(n: &[u8]) -> VerifyOptions<'_> {
    VerifyOptions {
        expected_nonce: Some(n),
        ..Default::default()
    }
}

#[test]
fn good_document_verifies_and_carries_the_request() {
    let pki = common::pki();
    let doc = signed(&pki, b"nonce-1");
    assert_eq!(
        &doc[..8],
        &[0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x59],
        "Nitro prefix"
    );
    let v = verify_document(&doc, &pki.root.certificate, &with_nonce(b"nonce-1")).unwrap();
    assert_eq!(v.document.nonce.as_deref(), Some(&b"nonce-1"[..]));
    assert_eq!(
        v.document.user_data.as_deref(),
        Some(&b"launch-request-digest"[..])
    );
    assert_eq!(v.document.pcrs.len(), 16);
    assert_eq!(v.document.module_id, "host-test");
    assert_eq!(v.document.cabundle.len(), 1);
    // A tagged (tag 18) encoding of the same document is accepted too.
    let mut tagged = vec![0xd2];
    tagged.extend_from_slice(&doc);
    verify_document(&tagged, &pki.root.certificate, &with_nonce(b"nonce-1")).unwrap();
}

#[test]
fn forged_signature_fails() {
    let pki = common::pki();
    let mut doc = signed(&pki, b"n");
    let last = doc.len() - 1;
    doc[last] ^= 0x01;
    let err = verify_document(&doc, &pki.root.certificate, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, verify::Error::BadSignature), "{err:?}");
}

#[test]
fn altered_payload_fails_the_signature() {
    let pki = common::pki();
    let doc = signed(&pki, b"n");
    // Change a PCR byte inside the payload: PCR values are 48 zero bytes for PCR9..15.
    let zeros = [0u8; 48];
    let at = doc.windows(48).rposition(|w| w == zeros).unwrap();
    let mut forged = doc.clone();
    forged[at + 10] = 0x42;
    let err =
        verify_document(&forged, &pki.root.certificate, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, verify::Error::BadSignature), "{err:?}");
}

#[test]
fn wrong_root_fails() {
    let pki = common::pki();
    let doc = signed(&pki, b"n");
    let other =
        CertificateAuthority::create_root("Outboard test root", Validity::days_from_now(30))
            .unwrap();
    let err = verify_document(&doc, &other.certificate, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, verify::Error::Chain(_)), "{err:?}");
}

#[test]
fn self_made_chain_with_a_copied_root_name_fails() {
    // An attacker signs with their own root that claims the operator's name, and ships it in
    // the cabundle: the verifier trusts only the root it was given.
    let pki = common::pki();
    let fake_root =
        CertificateAuthority::create_root("Outboard test root", Validity::days_from_now(30))
            .unwrap();
    let key = SecretKey::generate().unwrap();
    let cert = fake_root
        .issue_host_certificate("host-test", &key, Validity::days_from_now(1))
        .unwrap();
    let fake = AttestationSigner::new(key, &cert, &fake_root.bundle()).unwrap();
    let doc = AttestationDocument::build_and_sign(
        &fake,
        &Default::default(),
        &AttestationRequest::default(),
    )
    .unwrap();
    let err = verify_document(&doc, &pki.root.certificate, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, verify::Error::Chain(_)), "{err:?}");
}

#[test]
fn expired_certificates_fail() {
    let now = Validity::days_from_now(0).not_after;
    let long = Validity {
        not_before: now - 30 * 86_400,
        not_after: now + 30 * 86_400,
    };
    let root = CertificateAuthority::create_root("r", long).unwrap();
    let key = SecretKey::generate().unwrap();
    let expired = Validity {
        not_before: now - 10 * 86_400,
        not_after: now - 86_400,
    };
    let cert = root.issue_host_certificate("h", &key, expired).unwrap();
    let signer = AttestationSigner::new(key, &cert, &root.bundle()).unwrap();
    let doc = AttestationDocument::build_and_sign(
        &signer,
        &Default::default(),
        &AttestationRequest::default(),
    )
    .unwrap();
    let err = verify_document(&doc, &root.certificate, &VerifyOptions::default()).unwrap_err();
    match err {
        verify::Error::Chain(why) => assert!(why.contains("expired"), "{why}"),
        other => panic!("{other:?}"),
    }
    // ... and it did verify while it was valid.
    let then = VerifyOptions {
        time: Some(now - 5 * 86_400),
        ..Default::default()
    };
    verify_document(&doc, &root.certificate, &then).unwrap();

    // An expired intermediate breaks the chain too.
    let inter = root.create_intermediate("i", expired).unwrap();
    let key = SecretKey::generate().unwrap();
    let cert = inter
        .issue_host_certificate("h", &key, Validity::days_from_now(1))
        .unwrap();
    let signer = AttestationSigner::new(key, &cert, &inter.bundle()).unwrap();
    let doc = AttestationDocument::build_and_sign(
        &signer,
        &Default::default(),
        &AttestationRequest::default(),
    )
    .unwrap();
    assert!(matches!(
        verify_document(&doc, &root.certificate, &VerifyOptions::default()),
        Err(verify::Error::Chain(_))
    ));
}

#[test]
fn intermediate_chain_verifies_and_a_non_ca_issuer_does_not() {
    let root = CertificateAuthority::create_root("r", Validity::days_from_now(30)).unwrap();
    let inter = root
        .create_intermediate("region", Validity::days_from_now(30))
        .unwrap();
    let key = SecretKey::generate().unwrap();
    let cert = inter
        .issue_host_certificate("h", &key, Validity::days_from_now(1))
        .unwrap();
    let signer = AttestationSigner::new(key, &cert, &inter.bundle()).unwrap();
    let doc = AttestationDocument::build_and_sign(
        &signer,
        &Default::default(),
        &AttestationRequest::default(),
    )
    .unwrap();
    let v = verify_document(&doc, &root.certificate, &VerifyOptions::default()).unwrap();
    assert_eq!(v.document.cabundle.len(), 2);

    // A host certificate (CA:FALSE) used as an issuer is rejected.
    let host_key = SecretKey::generate().unwrap();
    let host_cert = root
        .issue_host_certificate("h1", &host_key, Validity::days_from_now(1))
        .unwrap();
    let rogue_issuer = CertificateAuthority {
        key: host_key,
        certificate: host_cert,
        chain: vec![root.certificate.clone()],
    };
    let key = SecretKey::generate().unwrap();
    let cert = rogue_issuer
        .issue_host_certificate("h2", &key, Validity::days_from_now(1))
        .unwrap();
    // AttestationSigner refuses this chain, so assemble the document by hand.
    let mut forged = AttestationDocument::from_payload(
        &outboard_attest::document::parse(&doc)
            .unwrap()
            .document
            .to_payload()
            .unwrap(),
    )
    .unwrap();
    forged.certificate = cert.to_der().unwrap();
    forged.cabundle = rogue_issuer
        .bundle()
        .iter()
        .map(|c| c.to_der().unwrap())
        .collect();
    let doc = forged.sign_with_key(&key).unwrap();
    assert!(matches!(
        verify_document(&doc, &root.certificate, &VerifyOptions::default()),
        Err(verify::Error::Chain(_))
    ));
}

#[test]
fn a_ca_certificate_cannot_sign_documents() {
    // The intermediate chains to the root, but its key usage is keyCertSign|cRLSign only.
    let root = CertificateAuthority::create_root("r", Validity::days_from_now(30)).unwrap();
    let inter = root
        .create_intermediate("i", Validity::days_from_now(30))
        .unwrap();
    let pki = common::pki();
    let mut payload = document::parse(&signed(&pki, b"n")).unwrap().document;
    payload.certificate = inter.certificate.to_der().unwrap();
    payload.cabundle = vec![root.certificate.to_der().unwrap()];
    let doc = payload.sign_with_key(&inter.key).unwrap();
    let err = verify_document(&doc, &root.certificate, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, verify::Error::LeafKeyUsage), "{err:?}");
}

#[test]
fn replayed_and_missing_nonces_fail() {
    let pki = common::pki();
    let old = signed(&pki, b"challenge-1");
    let err =
        verify_document(&old, &pki.root.certificate, &with_nonce(b"challenge-2")).unwrap_err();
    assert!(matches!(err, verify::Error::NonceMismatch), "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    let m = common::measure(&common::launch(dir.path()), &pki.signer);
    let no_nonce =
        AttestationDocument::build_and_sign(&pki.signer, m.pcrs(), &AttestationRequest::default())
            .unwrap();
    let err = verify_document(
        &no_nonce,
        &pki.root.certificate,
        &with_nonce(b"challenge-2"),
    )
    .unwrap_err();
    assert!(matches!(err, verify::Error::NonceMissing), "{err:?}");
    // Without an expected nonce the same document verifies.
    verify_document(&no_nonce, &pki.root.certificate, &VerifyOptions::default()).unwrap();
}

#[test]
fn event_log_replays_to_the_document_pcrs() {
    let pki = common::pki();
    let dir = tempfile::tempdir().unwrap();
    let m = common::measure(&common::launch(dir.path()), &pki.signer);
    let doc =
        AttestationDocument::build_and_sign(&pki.signer, m.pcrs(), &AttestationRequest::default())
            .unwrap();
    let v = verify_document(&doc, &pki.root.certificate, &VerifyOptions::default()).unwrap();
    let json = serde_json::to_string(m.event_log()).unwrap();
    let log: outboard_attest::EventLog = serde_json::from_str(&json).unwrap();
    let replayed = log.replay().unwrap();
    for (i, value) in &v.document.pcrs {
        assert_eq!(
            &replayed.get((*i).into()).unwrap()[..],
            &value[..],
            "PCR{i}"
        );
    }
    assert_eq!(log.events.len(), 6);

    let with_log = |log| VerifyOptions {
        event_log: Some(log),
        ..Default::default()
    };
    verify_document(&doc, &pki.root.certificate, &with_log(&log)).unwrap();
    // A log that lies about one measurement no longer explains the document.
    let mut lying = log.clone();
    lying.events[2].digest[0] ^= 1;
    let pcr = lying.events[2].pcr as u8;
    let err = verify_document(&doc, &pki.root.certificate, &with_log(&lying)).unwrap_err();
    assert!(
        matches!(err, verify::Error::EventLogMismatch(ref v) if v == &vec![pcr]),
        "{err:?}"
    );
    // Dropping an event is caught too.
    let mut short = log.clone();
    short.events.remove(0);
    assert!(verify_document(&doc, &pki.root.certificate, &with_log(&short)).is_err());
}

#[test]
fn hostile_bytes_never_panic() {
    // Deterministic mutations of a real document (a stand-in for the fuzz target in CI).
    let pki = common::pki();
    let doc = signed(&pki, b"n");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut d = doc.clone();
        for _ in 0..(rand() % 4 + 1) {
            let at = (rand() as usize) % d.len();
            match rand() % 3 {
                0 => d[at] = rand() as u8,
                1 => d.truncate(at),
                _ => d.insert(at, rand() as u8),
            }
            if d.is_empty() {
                break;
            }
        }
        let _ = document::parse(&d);
        let _ = verify_document(&d, &pki.root.certificate, &VerifyOptions::default());
    }
    assert!(matches!(
        document::parse(&[]),
        Err(document::Error::Cose(_))
    ));
    assert!(matches!(
        document::parse(&vec![0x84; document::MAX_DOCUMENT_SIZE + 1]),
        Err(document::Error::TooLarge(_))
    ));
    // Deep nesting is bounded.
    let mut deep = vec![0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x59, 0x10, 0x00];
    deep.extend(std::iter::repeat_n(0x81, 4096));
    assert!(document::parse(&deep).is_err());
}
