//! One VM's attestation session: its measurements, launch policy and document signing, and the
//! JSON-line request loop both the per-VM helper and the host service run per VMM.
//!
//! ```text
//!   new (PCR0 VMM binary, PCR6 this helper) ──Measure──► measured ──CheckPolicy / Document──► …
//! ```
//! `Measure` is accepted once; `CheckPolicy` and `Document` need it first.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use outboard_attest::kernel::KernelLayout;
use outboard_attest::pcr::Digest;
use outboard_attest::{
    policy, AttestationDocument, AttestationRequest, AttestationSigner, CanonicalVmConfig,
    Measurements, PcrIndex, Policy,
};
use outboard_boot::layout;
use outboard_vmm::attestation::{MeasureRequest, Request, Response, MAX_MESSAGE};
use outboard_vmm::error_chain;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zeroize::Zeroizing;

/// The measurements every session starts from: the VMM's binary and the helper's own.
pub struct HostMeasurements {
    pub vmm: Digest,
    pub vmm_description: String,
    pub helper: Digest,
}

impl HostMeasurements {
    fn start(&self) -> Measurements {
        let mut m = Measurements::new();
        m.extend_digest(PcrIndex::VmmBinary, &self.vmm_description, self.vmm);
        m.extend_digest(
            PcrIndex::HostAgent,
            "host-agent outboard-vmm-attest",
            self.helper,
        );
        m
    }
}

pub struct Session {
    signer: Option<AttestationSigner>,
    policy: Option<Policy>,
    /// PCR0 and PCR6; phase 1 adds the rest.
    host_measured: Option<Measurements>,
    measured: Option<Measurements>,
}

impl Session {
    pub fn new(
        signer: Option<AttestationSigner>,
        policy: Option<Policy>,
        host: &HostMeasurements,
    ) -> Self {
        Session {
            signer,
            policy,
            host_measured: Some(host.start()),
            measured: None,
        }
    }

    /// Answers requests on `socket` until the VMM closes it.
    pub fn serve(&mut self, socket: &UnixStream) -> Result<()> {
        let mut out = BufWriter::new(socket.try_clone().context("Cannot use the socket")?);
        while let Some((line, files)) = receive(socket)? {
            let response = match serde_json::from_slice::<Request>(&line) {
                Err(e) => failed(400, format!("Malformed request: {e}")),
                Ok(Request::Open { .. }) => failed(409, "The session is already open".into()),
                Ok(Request::Measure(req)) => match <[File; 2]>::try_from(files) {
                    Ok([memfd, kernel]) => self.measure(&req, memfd, kernel),
                    Err(_) => failed(
                        400,
                        "Measure request without guest memory and kernel file".into(),
                    ),
                },
                Ok(Request::CheckPolicy) => self.check_policy(),
                Ok(Request::Document { query }) => self.document(&query),
            };
            send(&mut out, &response)?;
        }
        Ok(())
    }

    fn measure(&mut self, req: &MeasureRequest, memfd: File, kernel: File) -> Response {
        let Some(m) = self.host_measured.take() else {
            return failed(409, "The VM has already been measured".into());
        };
        match self.try_measure(m, req, memfd, kernel) {
            Ok(log) => Response::Measured { event_log: log },
            Err(e) => failed(500, format!("{e:#}")),
        }
    }

    fn try_measure(
        &mut self,
        mut m: Measurements,
        req: &MeasureRequest,
        memfd: File,
        mut kernel: File,
    ) -> Result<serde_json::Value> {
        let mem = map_guest(memfd, req.memory_bytes)?;
        // The kernel file only tells which guest bytes are the kernel: a file other than the one
        // loaded makes PCR2 disagree with any prediction, so it fails closed.
        let image = read_bounded(&mut kernel, MAX_KERNEL)
            .with_context(|| format!("Cannot read kernel {}", req.kernel_path.display()))?;
        let layout = KernelLayout::parse(&image)?;
        let initrd = req.initrd.map(|(addr, size)| (GuestAddress(addr), size));
        m.measure_kernel_and_initrd_in_guest(
            &mem,
            &layout,
            GuestAddress(req.kernel_image_base),
            initrd,
        )?;
        m.measure_cmdline_in_guest(&mem, GuestAddress(req.cmdline_addr), req.cmdline_len)?;
        let config: CanonicalVmConfig =
            serde_json::from_value(req.config.clone()).context("Bad VM configuration")?;
        m.measure_config(&config)?;
        if let Some(signer) = &self.signer {
            m.measure_signing_certificate(signer.certificate_der());
        }
        let pcrs: serde_json::Map<String, serde_json::Value> = m
            .pcrs()
            .registers()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.iter().any(|b| *b != 0))
            .map(|(i, r)| (i.to_string(), hex::encode(r).into()))
            .collect();
        let log = serde_json::json!({
            "events": m.event_log().events,
            "pcrs": pcrs,
            "config": config,
        });
        self.measured = Some(m);
        Ok(log)
    }

    fn check_policy(&self) -> Response {
        let Some(policy) = &self.policy else {
            return Response::Approved;
        };
        let Some(m) = &self.measured else {
            return Response::Refused {
                message: "The VM has not been measured".into(),
            };
        };
        match policy.check(m) {
            Ok(_) => Response::Approved,
            Err(e @ policy::Error::Mismatch { .. }) => Response::Refused {
                message: e.to_string(),
            },
            Err(e) => failed(500, error_chain(&e)),
        }
    }

    fn document(&self, query: &str) -> Response {
        let Some(signer) = &self.signer else {
            return failed(409, "No attestation key configured".into());
        };
        let request = match AttestationRequest::from_query(query) {
            Ok(r) => r,
            Err(e) => return failed(400, error_chain(&e)),
        };
        let Some(m) = &self.measured else {
            return failed(409, "The VM has not been loaded and measured".into());
        };
        match AttestationDocument::build_and_sign(signer, m.pcrs(), &request) {
            Ok(doc) => Response::Document {
                cbor_hex: hex::encode(doc),
            },
            Err(e) => failed(500, error_chain(&e)),
        }
    }
}

pub fn failed(status: u16, message: String) -> Response {
    Response::Failed { status, message }
}

pub fn send(out: &mut BufWriter<UnixStream>, response: &Response) -> Result<()> {
    serde_json::to_writer(&mut *out, response)?;
    out.write_all(b"\n")?;
    out.flush().context("Cannot answer the VMM")
}

/// Largest kernel file read to find its layout (a bzImage is tens of MiB at most).
const MAX_KERNEL: u64 = 512 << 20;
/// Most descriptors one request carries (Measure: guest memory and kernel file). The kernel
/// closes any beyond these.
const MAX_FILES: usize = 2;

fn read_bounded(file: &mut File, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        bail!("The file exceeds {max} bytes");
    }
    Ok(bytes)
}

/// The next request line and the descriptors sent with it; `None` when the VMM is gone.
/// The VMM sends one request at a time and waits for the answer, so a line never straddles two.
pub fn receive(socket: &UnixStream) -> Result<Option<(Vec<u8>, Vec<File>)>> {
    let mut line = Vec::new();
    let mut files = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, received) = recv_with_files(socket, &mut buf).context("Cannot read a request")?;
        files.extend(received);
        if files.len() > MAX_FILES {
            bail!("Request carries more than {MAX_FILES} descriptors");
        }
        if n == 0 {
            return Ok(None);
        }
        line.extend_from_slice(&buf[..n]);
        if line.ends_with(b"\n") {
            return Ok(Some((line, files)));
        }
        if line.len() > MAX_MESSAGE {
            bail!("Request exceeds {MAX_MESSAGE} bytes");
        }
    }
}

/// One `recvmsg` into `buf` with up to [`MAX_FILES`] descriptors, each owned as a `File`.
fn recv_with_files(socket: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<File>)> {
    use std::os::fd::{FromRawFd, RawFd};
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut fds: [RawFd; MAX_FILES] = [-1; MAX_FILES];
    // SAFETY: the one iovec covers `buf`, which we borrow mutably for the call, so the kernel
    // may write any bytes there.
    let (n, count) = unsafe { socket.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..count.min(MAX_FILES)]
        .iter()
        .map(|fd| {
            // SAFETY: recvmsg just installed these descriptors in this process for us; nothing
            // else owns them.
            unsafe { File::from_raw_fd(*fd) }
        })
        .collect();
    Ok((n, files))
}

/// Loads the host's attestation key, certificate and CA bundle.
pub fn load_signer(
    key: &Path,
    cert: &Path,
    cabundle: &Path,
    passphrase_file: Option<&Path>,
) -> Result<AttestationSigner> {
    let pass = passphrase_file.map(read_passphrase).transpose()?;
    AttestationSigner::from_files(key, cert, cabundle, pass.as_ref().map(|p| p.as_slice()))
        .context("Cannot load the attestation key, certificate and CA bundle")
}

fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("Cannot read passphrase file {}", path.display()))?,
    );
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        bail!("Passphrase file {} is empty", path.display());
    }
    Ok(bytes)
}

/// Guest memory as the VMM laid it out in its memfd, mapped read-only.
fn map_guest(memfd: File, size: u64) -> Result<GuestMemoryMmap> {
    let len = memfd.metadata().context("Cannot stat guest memory")?.len();
    if len < size {
        bail!("Guest memory file is {len} bytes, not {size}");
    }
    let file = Arc::new(memfd);
    let mut regions = Vec::new();
    for range in layout::ram_ranges(size) {
        let mapping = MmapRegionBuilder::new(range.size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), range.file_offset))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .context("Cannot map guest memory")?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(range.guest_addr))
            .context("Guest memory range overflows")?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).context("Bad guest memory layout")
}
