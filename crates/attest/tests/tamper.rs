//! One changed byte in anything measured changes exactly its PCR, and the document then fails a
//! policy made from the untampered launch.

mod common;

use outboard_attest::policy::{self, PcrVerdict};
use outboard_attest::verify::{self, verify_document, VerifyOptions};
use outboard_attest::{AttestationDocument, AttestationRequest, PcrIndex, Policy};

fn flip(v: &mut [u8], at: usize) {
    v[at] ^= 0x01;
}

#[test]
fn each_tampered_item_changes_exactly_its_pcr_and_fails_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki();
    let good = common::launch(dir.path());
    let reference = common::measure(&good, &pki.signer);

    let mut policy = Policy::default();
    for i in 0..=8u8 {
        policy.approve(i, *reference.pcrs().get(i.into()).unwrap());
    }
    let good_doc = AttestationDocument::build_and_sign(
        &pki.signer,
        reference.pcrs(),
        &AttestationRequest::default(),
    )
    .unwrap();
    let ok = verify_document(
        &good_doc,
        &pki.root.certificate,
        &VerifyOptions {
            policy: Some(&policy),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ok.policy_report.unwrap().approved());
    policy.check(&reference).unwrap();

    type Tamper = Box<dyn Fn(&mut common::Launch)>;
    let cases: Vec<(PcrIndex, Tamper)> = vec![
        (
            PcrIndex::VmmBinary,
            Box::new(|l| {
                let mut b = std::fs::read(&l.vmm).unwrap();
                flip(&mut b, 12345);
                std::fs::write(&l.vmm, b).unwrap();
            }),
        ),
        (PcrIndex::Kernel, Box::new(|l| flip(&mut l.kernel, 999_999))),
        (PcrIndex::Initrd, Box::new(|l| flip(&mut l.initrd, 0))),
        (PcrIndex::Cmdline, Box::new(|l| flip(&mut l.cmdline, 3))),
        (
            PcrIndex::VmConfig,
            Box::new(|l| l.config.memory_bytes += 4096),
        ),
        (
            PcrIndex::VmConfig,
            Box::new(|l| l.config.devices[0].backend.push('x')),
        ),
    ];
    for (pcr, tamper) in cases {
        let mut l = common::launch(dir.path());
        tamper(&mut l);
        let m = common::measure(&l, &pki.signer);
        let changed: Vec<usize> = (0..16)
            .filter(|&i| m.pcrs().get(i) != reference.pcrs().get(i))
            .collect();
        assert_eq!(changed, vec![pcr.index()], "tampering {pcr:?}");
        assert_eq!(&m.event_log().replay().unwrap(), m.pcrs());

        match policy.check(&m) {
            Err(policy::Error::Mismatch { mismatched, report }) => {
                assert_eq!(mismatched, vec![pcr.index() as u8]);
                let line = report
                    .checks
                    .iter()
                    .find(|c| usize::from(c.index) == pcr.index())
                    .unwrap();
                assert_eq!(line.verdict, PcrVerdict::Mismatch);
            }
            other => panic!("policy accepted tampered {pcr:?}: {other:?}"),
        }
        let doc = AttestationDocument::build_and_sign(
            &pki.signer,
            m.pcrs(),
            &AttestationRequest::default(),
        )
        .unwrap();
        let err = verify_document(
            &doc,
            &pki.root.certificate,
            &VerifyOptions {
                policy: Some(&policy),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, verify::Error::Policy(policy::Error::Mismatch { ref mismatched, .. }) if mismatched == &vec![pcr.index() as u8]),
            "{err:?}"
        );
    }
}

#[test]
fn kernel_file_prediction_equals_placed_bytes() {
    // A bzImage-shaped file: what the VMM reads back from guest memory is everything after the
    // setup sectors; `measure_kernel_file` must predict the same PCR2.
    let mut file = vec![0u8; 64 * 1024];
    file[0x1f1] = 7;
    file[0x202..0x206].copy_from_slice(b"HdrS");
    for (i, b) in file.iter_mut().enumerate().skip(4096) {
        *b = (i % 241) as u8;
    }
    let placed = &file[(7 + 1) * 512..];
    let mut from_memory = outboard_attest::Measurements::new();
    from_memory.measure_kernel(placed);
    let mut predicted = outboard_attest::Measurements::new();
    predicted.measure_kernel_file(&file).unwrap();
    assert_eq!(from_memory.pcrs(), predicted.pcrs());
    // A change in the (unmeasured, unexecuted) setup code does not; a change in the kernel does.
    file[0x300] ^= 1;
    let mut p2 = outboard_attest::Measurements::new();
    p2.measure_kernel_file(&file).unwrap();
    assert_eq!(p2.pcrs(), predicted.pcrs());
    file[10_000] ^= 1;
    let mut p3 = outboard_attest::Measurements::new();
    p3.measure_kernel_file(&file).unwrap();
    assert_ne!(p3.pcrs(), predicted.pcrs());
}
