//! Writes a signed sample document and its root certificate, e.g. to seed the fuzzer or to try
//! `outboard attest verify` without a VM:
//!
//! `cargo run -p outboard-attest --example sample_document -- OUT_DIR`
//! → `OUT_DIR/sample.cbor` (nonce `00010203`), `OUT_DIR/sample-root.pem`.

use std::path::PathBuf;

use outboard_attest::keys::{CertificateAuthority, SecretKey, Validity};
use outboard_attest::{
    AttestationDocument, AttestationRequest, AttestationSigner, CanonicalVmConfig, Measurements,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: sample_document OUT_DIR")?,
    );
    std::fs::create_dir_all(&out)?;
    let root = CertificateAuthority::create_root("sample root", Validity::days_from_now(30))?;
    let key = SecretKey::generate()?;
    let cert = root.issue_host_certificate("sample-host", &key, Validity::days_from_now(30))?;
    let signer = AttestationSigner::new(key, &cert, &root.bundle())?;
    let mut m = Measurements::new();
    m.measure_kernel(b"sample kernel");
    m.measure_cmdline(b"console=ttyS0");
    m.measure_config(&CanonicalVmConfig {
        vcpus: 1,
        memory_bytes: 128 << 20,
        devices: Vec::new(),
    })?;
    m.measure_signing_certificate(signer.certificate_der());
    let request = AttestationRequest {
        nonce: Some(vec![0, 1, 2, 3]),
        user_data: Some(b"sample".to_vec()),
        public_key: None,
    };
    let doc = AttestationDocument::build_and_sign(&signer, m.pcrs(), &request)?;
    std::fs::write(out.join("sample.cbor"), doc)?;
    std::fs::write(out.join("sample-root.pem"), root.certificate.to_pem()?)?;
    Ok(())
}
