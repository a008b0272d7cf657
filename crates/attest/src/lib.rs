//! Outboard attestation: measurements, Nitro-format attestation documents, verification and
//! launch policies (the attested two-phase launch of US 9880866).
//!
//! Phase 1 (configure and load) ends with the VMM measuring what it loaded into
//! [`Measurements`]; the user (or a [`Policy`]) approves the measurements, which an
//! [`AttestationDocument`] proves, before phase 2 starts the vCPUs.
//!
//! ## PCR layout
//!
//! Each PCR is SHA-384, extended from zero as `PCR ← SHA384(PCR ‖ SHA384(data))` ([`pcr`]).
//!
//! | PCR | measures | by |
//! |---|---|---|
//! | 0 | the outboard-vmm binary actually running (`/proc/self/exe` bytes) | [`Measurements::measure_running_vmm`] |
//! | 1 | guest firmware (reserved; zero while Outboard boots kernels directly) | [`Measurements::measure_firmware`] |
//! | 2 | kernel, as placed in guest memory ([`kernel::KernelLayout`]) | [`Measurements::measure_kernel`] |
//! | 3 | initrd, as placed in guest memory | [`Measurements::measure_initrd`] |
//! | 4 | kernel command line, as placed in guest memory, without the NUL | [`Measurements::measure_cmdline`] |
//! | 5 | canonical VM configuration ([`config::CanonicalVmConfig`]) | [`Measurements::measure_config`] |
//! | 6 | host agent: the attestation helper that measured and signs (`outboard-vmm-attest`, per VM or the host's service) | [`Measurements::measure_host_agent`] |
//! | 7 | card (offload process) | [`Measurements::measure_card`] |
//! | 8 | the attestation signing certificate (DER) | [`Measurements::measure_signing_certificate`] |
//! | 9–15 | unused (zero); reported so documents carry 16 PCRs like the Nitro Secure Module | |
//!
//! ## Integration with outboard-vmm
//!
//! ```text
//! startup      signer = AttestationSigner::from_files(--attest-key, --attest-cert, --attest-cabundle, None)?
//!                         .with_module_id(vm_id)
//!              policy = --attest-policy.map(Policy::load)
//! phase 1      load kernel/initrd/cmdline into guest memory (linux-loader), then, vCPUs not started:
//!              m = Measurements::new()
//!              m.measure_running_vmm()?                              // PCR0, /proc/self/exe
//!              layout = KernelLayout::parse(&kernel_file)?           // which file bytes the loader placed
//!              m.measure_kernel_and_initrd_in_guest(&mem, &layout, base, Some((initrd_addr, initrd_len)))?
//!                                                                    // PCR2 and PCR3 on two threads; base = kernel_load (bzImage), kernel_offset or 0 (ELF)
//!              m.measure_cmdline_in_guest(&mem, cmdline_addr, cmdline_len_with_nul)?         // PCR4
//!              m.measure_config(&CanonicalVmConfig { vcpus, memory_bytes, devices })?         // PCR5
//!              m.measure_signing_certificate(signer.certificate_der())                        // PCR8
//! GET /attestation?nonce=<hex>&user_data=<hex>&public_key=<hex>
//!              req = AttestationRequest::from_query(query)?          // 400 on error
//!              200, Content-Type: DOCUMENT_CONTENT_TYPE, body = AttestationDocument::build_and_sign(&signer, m.pcrs(), &req)?
//! InstanceStart  if let Some(p) = policy { p.check(&m)? }            // refuse (e.g. 403) on Err(policy::Error::Mismatch)
//! ```
//!
//! The VMM should also expose `m.event_log()` (serde JSON) and its `CanonicalVmConfig` (serde
//! JSON, the form `outboard attest measure --config F` takes) so users can reproduce PCR5.
//!
//! ## Modules
//!
//! | module | owns |
//! |---|---|
//! | [`pcr`] | registers, extension, event log and its replay |
//! | [`kernel`] | which kernel file bytes land in guest memory (PCR2's definition) |
//! | [`config`] | canonical VM configuration and its deterministic encoding (PCR5) |
//! | [`measure`] | the phase-1 [`Measurements`] builder |
//! | [`cache`] | a host's digests of the binaries it measured, by file identity |
//! | [`guest`] | measuring kernel, initrd and command line back from guest memory |
//! | [`keys`] | root CA, host keys and certificates, key files, the [`AttestationSigner`] |
//! | [`document`] | the Nitro-format COSE_Sign1 document: build, sign, parse |
//! | [`verify`] | chain, signature, nonce and policy verification |
//! | [`policy`] | approved PCR values and their file format |
//! | [`bench`](mod@bench) | phase-1 timing for `cargo xtask bench attest` |

pub mod bench;
pub mod cache;
pub mod config;
pub mod document;
pub mod guest;
pub mod kernel;
pub mod keys;
pub mod measure;
pub mod pcr;
pub mod policy;
pub mod verify;

pub use config::{CanonicalVmConfig, DeviceConfig};
pub use document::{AttestationDocument, AttestationRequest};
pub use keys::{AttestationSigner, CertificateAuthority, SecretKey, Validity};
pub use measure::Measurements;
pub use pcr::{EventLog, PcrBank, PcrIndex};
pub use policy::{Policy, PolicyReport};
pub use verify::{verify_document, Verified, VerifyOptions};

/// The `Content-Type` of a served attestation document.
pub const DOCUMENT_CONTENT_TYPE: &str = "application/cbor";

#[cfg(test)]
mod tests {
    /// The VMM shares these between its API thread and its launch path.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::AttestationSigner>();
        check::<crate::Measurements>();
        check::<crate::Policy>();
    }
}
