//! Phase 1 measurements: what the VMM extends into each PCR before the vCPUs start.
//!
//! [`Measurements`] owns a [`PcrBank`] and the [`EventLog`] that explains it. Every `measure_*`
//! call is one event on the register the crate layout assigns (see [`PcrIndex`]). Measuring the
//! same item twice extends twice (PCRs never go back), so the VMM measures each item once.
//!
//! The kernel, initrd and command line are measured from the bytes *as placed in guest memory*:
//! the VMM reads them back after loading, in chunks, through [`Measurements::begin`] and
//! [`Measurements::record`]; the whole-slice methods are the same thing for callers that hold the
//! bytes (and for `outboard attest measure`, which predicts the values from the files).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::config::CanonicalVmConfig;
use crate::kernel::KernelLayout;
use crate::pcr::{self, Event, EventHasher, EventLog, PcrBank, PcrIndex};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: pcr::Error,
    },
    #[error("Cannot encode the VM configuration")]
    Config(#[source] crate::config::Error),
    #[error("Cannot parse the kernel image")]
    Kernel(#[source] crate::kernel::Error),
    #[error("Cannot extend a PCR")]
    Extend(#[source] pcr::Error),
}

/// A measurement in progress: feed it the item's bytes, then [`Measurements::record`] it.
#[derive(Debug)]
pub struct PendingEvent {
    pcr: PcrIndex,
    description: String,
    hasher: EventHasher,
}

impl PendingEvent {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }
}

/// PCRs plus their event log.
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    bank: PcrBank,
    log: EventLog,
}

impl Measurements {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts measuring an item into `pcr`; `description` goes into the event log.
    pub fn begin(&self, pcr: PcrIndex, description: impl Into<String>) -> PendingEvent {
        PendingEvent {
            pcr,
            description: description.into(),
            hasher: EventHasher::new(),
        }
    }

    /// Finishes a measurement: extends its PCR and logs it.
    pub fn record(&mut self, event: PendingEvent) {
        self.extend_digest(event.pcr, event.description, event.hasher.finish());
    }

    /// Extends `pcr` with an already computed SHA-384 of the item (e.g. the host agent's digest
    /// of itself, passed to the VMM).
    pub fn extend_digest(
        &mut self,
        pcr: PcrIndex,
        description: impl Into<String>,
        digest: pcr::Digest,
    ) {
        // PcrIndex values are all below PCR_COUNT, so extend cannot fail.
        let _ = self.bank.extend(pcr.index(), &digest);
        self.log.events.push(Event {
            pcr: pcr.index(),
            description: description.into(),
            digest,
        });
    }

    /// Measures `data` into `pcr`.
    pub fn measure_bytes(&mut self, pcr: PcrIndex, description: impl Into<String>, data: &[u8]) {
        let mut e = self.begin(pcr, description);
        e.update(data);
        self.record(e);
    }

    /// Measures a file's content into `pcr`, streaming it.
    pub fn measure_file(&mut self, pcr: PcrIndex, path: &Path) -> Result<(), Error> {
        let f = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut e = self.begin(pcr, format!("{} {}", pcr.name(), path.display()));
        e.hasher
            .update_from_reader(f)
            .map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
        self.record(e);
        Ok(())
    }

    /// PCR0: the VMM binary at `path`.
    pub fn measure_vmm_binary(&mut self, path: &Path) -> Result<(), Error> {
        self.measure_file(PcrIndex::VmmBinary, path)
    }

    /// PCR0: the binary of the running process (`/proc/self/exe`), i.e. the VMM actually running
    /// even if its file on disk was replaced since it started.
    pub fn measure_running_vmm(&mut self) -> Result<(), Error> {
        self.measure_vmm_binary(Path::new("/proc/self/exe"))
    }

    /// PCR1: guest firmware bytes as placed in guest memory.
    pub fn measure_firmware(&mut self, bytes: &[u8]) {
        self.measure_bytes(PcrIndex::Firmware, "firmware", bytes);
    }

    /// PCR2: the kernel bytes as placed in guest memory (the concatenation of the regions
    /// [`KernelLayout`] lists, read back from guest memory).
    pub fn measure_kernel(&mut self, placed: &[u8]) {
        self.measure_bytes(PcrIndex::Kernel, "kernel", placed);
    }

    /// PCR2 predicted from a kernel *file*: the bytes the loader will place, per [`KernelLayout`].
    pub fn measure_kernel_file(&mut self, image: &[u8]) -> Result<(), Error> {
        let layout = KernelLayout::parse(image).map_err(Error::Kernel)?;
        let mut e = self.begin(PcrIndex::Kernel, "kernel");
        for part in layout.measured_bytes(image) {
            e.update(part);
        }
        self.record(e);
        Ok(())
    }

    /// PCR3: the initrd as placed in guest memory (it is copied verbatim).
    pub fn measure_initrd(&mut self, placed: &[u8]) {
        self.measure_bytes(PcrIndex::Initrd, "initrd", placed);
    }

    /// PCR4: the command line as the guest sees it, without the terminating NUL.
    pub fn measure_cmdline(&mut self, cmdline: &[u8]) {
        let trimmed = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
        self.measure_bytes(PcrIndex::Cmdline, "cmdline", trimmed);
    }

    /// PCR5: the canonical VM configuration.
    pub fn measure_config(&mut self, config: &CanonicalVmConfig) -> Result<(), Error> {
        let bytes = config.canonical_bytes().map_err(Error::Config)?;
        self.measure_bytes(PcrIndex::VmConfig, "config", &bytes);
        Ok(())
    }

    /// PCR6: the host agent binary.
    pub fn measure_host_agent(&mut self, path: &Path) -> Result<(), Error> {
        self.measure_file(PcrIndex::HostAgent, path)
    }

    /// PCR7: the card (offload process) binary.
    pub fn measure_card(&mut self, path: &Path) -> Result<(), Error> {
        self.measure_file(PcrIndex::Card, path)
    }

    /// PCR8: the DER certificate of the attestation signing key.
    pub fn measure_signing_certificate(&mut self, der: &[u8]) {
        self.measure_bytes(PcrIndex::SigningCertificate, "signing-certificate", der);
    }

    pub fn pcrs(&self) -> &PcrBank {
        &self.bank
    }

    pub fn event_log(&self) -> &EventLog {
        &self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_equals_whole_and_log_replays() {
        let kernel = vec![7u8; 5000];
        let mut a = Measurements::new();
        a.measure_kernel(&kernel);
        a.measure_cmdline(b"console=ttyS0\0");
        let mut b = Measurements::new();
        let mut e = b.begin(PcrIndex::Kernel, "kernel");
        for c in kernel.chunks(333) {
            e.update(c);
        }
        b.record(e);
        b.measure_cmdline(b"console=ttyS0");
        assert_eq!(a.pcrs(), b.pcrs());
        assert_eq!(&a.event_log().replay().unwrap(), a.pcrs());
    }
}
