//! Timing of the phase-1 work this crate adds to a launch, for `cargo xtask bench attest`.
//!
//! One run = measure kernel + initrd + command line + configuration into a fresh
//! [`Measurements`], reading the boot items back from guest memory as the VMM does after
//! loading ([`crate::guest`]), then build and sign a document.
//! The figures are medians over runs; the benchmark driver compares them with boot time.

use std::time::{Duration, Instant};

use crate::config::CanonicalVmConfig;
use crate::document::{self, AttestationDocument, AttestationRequest};
use crate::kernel::{KernelFormat, KernelLayout, KernelRegion};
use crate::keys::AttestationSigner;
use crate::measure::{self, Measurements};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Measuring failed")]
    Measure(#[source] measure::Error),
    #[error("Signing failed")]
    Sign(#[source] document::Error),
    #[error("Cannot set up guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error("Cannot place the boot items in guest memory")]
    Place(#[source] vm_memory::GuestMemoryError),
    #[error("Cannot measure guest memory")]
    Guest(#[source] crate::guest::Error),
}

/// What phase 1 measures.
#[derive(Clone, Copy, Debug)]
pub struct Phase1Inputs<'a> {
    /// Kernel bytes as the loader places them (see [`KernelLayout::measured_bytes`]).
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a [u8],
    pub config: &'a CanonicalVmConfig,
}

/// Median timings of `runs` phase-1 runs.
#[derive(Clone, Copy, Debug)]
pub struct Phase1Timing {
    pub runs: usize,
    /// Bytes hashed per run.
    pub measured_bytes: u64,
    pub measure: Duration,
    pub sign: Duration,
    /// Size of the signed document.
    pub document_bytes: usize,
}

impl Phase1Timing {
    /// Hashing throughput of the measure step in MiB/s.
    pub fn measure_mib_per_s(&self) -> f64 {
        (self.measured_bytes as f64 / (1 << 20) as f64) / self.measure.as_secs_f64().max(1e-9)
    }

    /// Measure time per MiB of measured data, in milliseconds.
    pub fn measure_ms_per_mib(&self) -> f64 {
        self.measure.as_secs_f64() * 1e3 / (self.measured_bytes as f64 / (1 << 20) as f64).max(1e-9)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs phase 1 `runs` times (at least once) and returns the medians.
pub fn phase1(
    inputs: &Phase1Inputs<'_>,
    signer: &AttestationSigner,
    runs: usize,
) -> Result<Phase1Timing, Error> {
    let runs = runs.max(1);
    let mut measure_times = Vec::with_capacity(runs);
    let mut sign_times = Vec::with_capacity(runs);
    let mut document_bytes = 0;
    let measured_bytes =
        (inputs.kernel.len() + inputs.initrd.map_or(0, <[u8]>::len) + inputs.cmdline.len()) as u64;
    let request = AttestationRequest {
        nonce: Some(vec![0x5a; 32]),
        ..Default::default()
    };
    // Place the items in guest memory like a loader: kernel at 1 MiB, initrd and command line
    // after it, 2 MiB aligned.
    let align = |v: u64| (v + (2 << 20) - 1) & !((2 << 20) - 1);
    let kernel_at = GuestAddress(1 << 20);
    let initrd_at = GuestAddress(align(kernel_at.0 + inputs.kernel.len() as u64));
    let initrd_len = inputs.initrd.map_or(0, |i| i.len() as u64);
    let cmdline_at = GuestAddress(align(initrd_at.0 + initrd_len));
    let size = align(cmdline_at.0 + inputs.cmdline.len() as u64 + 1) as usize;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).map_err(Error::Memory)?;
    let place = |data: &[u8], at: GuestAddress| mem.write_slice(data, at).map_err(Error::Place);
    place(inputs.kernel, kernel_at)?;
    if let Some(initrd) = inputs.initrd {
        place(initrd, initrd_at)?;
    }
    place(inputs.cmdline, cmdline_at)?;
    let kernel_layout = KernelLayout {
        format: KernelFormat::Raw,
        regions: vec![KernelRegion {
            file_offset: 0,
            len: inputs.kernel.len() as u64,
            guest_offset: 0,
        }],
    };
    for _ in 0..runs {
        let t = Instant::now();
        let mut m = Measurements::new();
        let initrd = inputs.initrd.map(|_| (initrd_at, initrd_len));
        m.measure_kernel_and_initrd_in_guest(&mem, &kernel_layout, kernel_at, initrd)
            .map_err(Error::Guest)?;
        m.measure_cmdline_in_guest(&mem, cmdline_at, inputs.cmdline.len() as u64)
            .map_err(Error::Guest)?;
        m.measure_config(inputs.config).map_err(Error::Measure)?;
        m.measure_signing_certificate(signer.certificate_der());
        measure_times.push(t.elapsed());

        let t = Instant::now();
        let doc =
            AttestationDocument::build_and_sign(signer, m.pcrs(), &request).map_err(Error::Sign)?;
        sign_times.push(t.elapsed());
        document_bytes = doc.len();
    }
    Ok(Phase1Timing {
        runs,
        measured_bytes,
        measure: median(measure_times),
        sign: median(sign_times),
        document_bytes,
    })
}
