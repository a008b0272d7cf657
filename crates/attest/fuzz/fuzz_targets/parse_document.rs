//! Attestation documents come from hosts the verifier does not trust: parsing (and verifying
//! against a fixed root) must never panic, hang or over-allocate.
//!
//! `cargo +nightly fuzz run parse_document` (from crates/attest).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outboard_attest::keys::{CertificateAuthority, Validity};
use outboard_attest::verify::{verify_document, VerifyOptions};

fn root() -> &'static openssl::x509::X509 {
    static ROOT: OnceLock<openssl::x509::X509> = OnceLock::new();
    ROOT.get_or_init(|| {
        CertificateAuthority::create_root("fuzz", Validity::days_from_now(1))
            .expect("root CA")
            .certificate
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = outboard_attest::document::parse(data) {
        // A parsed payload re-encodes and re-parses to the same document.
        let payload = signed.document.to_payload().expect("encode");
        let again = outboard_attest::AttestationDocument::from_payload(&payload).expect("reparse");
        assert_eq!(again, signed.document);
    }
    let _ = verify_document(
        data,
        root(),
        &VerifyOptions {
            expected_nonce: Some(b"n"),
            ..Default::default()
        },
    );
});
