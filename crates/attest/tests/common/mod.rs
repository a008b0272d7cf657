//! Shared fixtures: a root CA, a host signer and a phase-1 measurement set.
#![allow(dead_code)]

use outboard_attest::keys::{CertificateAuthority, SecretKey, Validity};
use outboard_attest::{AttestationSigner, CanonicalVmConfig, DeviceConfig, Measurements};

pub struct Pki {
    pub root: CertificateAuthority,
    pub signer: AttestationSigner,
}

/// root → host, both valid now.
pub fn pki() -> Pki {
    let root = CertificateAuthority::create_root("Outboard test root", Validity::days_from_now(30))
        .unwrap();
    let host_key = SecretKey::generate().unwrap();
    let cert = root
        .issue_host_certificate("host-test", &host_key, Validity::days_from_now(1))
        .unwrap();
    let signer = AttestationSigner::new(host_key, &cert, &root.bundle()).unwrap();
    Pki { root, signer }
}

pub struct Launch {
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub cmdline: Vec<u8>,
    pub config: CanonicalVmConfig,
    pub vmm: std::path::PathBuf,
}

pub fn launch(dir: &std::path::Path) -> Launch {
    let vmm = dir.join("outboard-vmm");
    std::fs::write(
        &vmm,
        (0..200_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    Launch {
        kernel: (0..1_000_000u32).map(|i| (i % 251) as u8).collect(),
        initrd: (0..300_000u32).map(|i| (i % 13) as u8).collect(),
        cmdline: b"console=ttyS0 outboard.run=poweroff".to_vec(),
        config: CanonicalVmConfig {
            vcpus: 2,
            memory_bytes: 128 << 20,
            devices: vec![DeviceConfig {
                kind: "virtio-blk".into(),
                id: "root".into(),
                backend: "card:vol-1".into(),
                properties: Default::default(),
            }],
        },
        vmm,
    }
}

pub fn measure(l: &Launch, signer: &AttestationSigner) -> Measurements {
    let mut m = Measurements::new();
    m.measure_vmm_binary(&l.vmm).unwrap();
    m.measure_kernel(&l.kernel);
    m.measure_initrd(&l.initrd);
    m.measure_cmdline(&l.cmdline);
    m.measure_config(&l.config).unwrap();
    m.measure_signing_certificate(signer.certificate_der());
    m
}
