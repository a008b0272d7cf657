//! outboard-vmm-attest: outboard-vmm's attestation helper. The VMM starts it (never a user) with
//! a socket as its standard input and the key and policy *paths* as flags; it holds the
//! attestation key, measures the loaded VM from guest memory (a memfd received over the socket,
//! mapped read-only) and signs documents. Requests and answers are the JSON lines of
//! `outboard_vmm::attestation` ([`Request`], [`Response`]); it exits when the VMM closes the
//! socket. Keeping OpenSSL and the key here keeps both out of the process that runs the guest.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use outboard_attest::kernel::KernelLayout;
use outboard_attest::{
    policy, AttestationDocument, AttestationRequest, AttestationSigner, CanonicalVmConfig,
    Measurements, Policy,
};
use outboard_boot::layout;
use outboard_vmm::attestation::{MeasureRequest, Request, Response, MAX_MESSAGE};
use outboard_vmm::error_chain;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zeroize::Zeroizing;

fn main() {
    if std::env::args().any(|a| a == "--help") {
        println!("outboard-vmm-attest is started by outboard-vmm; it is not run by hand");
        return;
    }
    if let Err(e) = run() {
        eprintln!("outboard-vmm-attest: Error: {e:#}");
        std::process::exit(1);
    }
}

#[derive(Default)]
struct Flags {
    module_id: Option<String>,
    vmm_pid: Option<u32>,
    key: Option<PathBuf>,
    cert: Option<PathBuf>,
    cabundle: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    policy: Option<PathBuf>,
}

fn parse_flags() -> Result<Flags> {
    let mut f = Flags::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--module-id" => f.module_id = Some(value),
            "--vmm-pid" => f.vmm_pid = Some(value.parse().context("--vmm-pid needs a process id")?),
            "--attest-key" => f.key = Some(value.into()),
            "--attest-cert" => f.cert = Some(value.into()),
            "--attest-cabundle" => f.cabundle = Some(value.into()),
            "--attest-passphrase-file" => f.passphrase_file = Some(value.into()),
            "--attest-policy" => f.policy = Some(value.into()),
            other => bail!("Unknown argument {other:?}"),
        }
    }
    Ok(f)
}

struct Helper {
    signer: Option<AttestationSigner>,
    policy: Option<Policy>,
    /// PCR0, measured at start (while the VMM builds the VM); phase 1 adds the rest.
    vmm_measured: Option<Measurements>,
    measured: Option<Measurements>,
}

fn run() -> Result<()> {
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("No socket on standard input")?;
    let socket = UnixStream::from(stdin);
    let mut out = BufWriter::new(socket.try_clone().context("Cannot use the socket")?);
    let mut helper = match parse_flags().and_then(|f| Helper::load(&f)) {
        Ok(h) => {
            send(&mut out, &Response::Ready)?;
            h
        }
        Err(e) => {
            // The VMM reports it (once, with its own context).
            let message = format!("{e:#}");
            send(
                &mut out,
                &Response::Failed {
                    status: 500,
                    message,
                },
            )?;
            std::process::exit(1);
        }
    };
    while let Some((line, fd)) = receive(&socket)? {
        let response = match serde_json::from_slice::<Request>(&line) {
            Err(e) => failed(400, format!("Malformed request: {e}")),
            Ok(Request::Measure(req)) => match fd {
                Some(memfd) => helper.measure(&req, memfd),
                None => failed(400, "Measure request without guest memory".into()),
            },
            Ok(Request::CheckPolicy) => helper.check_policy(),
            Ok(Request::Document { query }) => helper.document(&query),
        };
        send(&mut out, &response)?;
    }
    Ok(())
}

fn failed(status: u16, message: String) -> Response {
    Response::Failed { status, message }
}

fn send(out: &mut BufWriter<UnixStream>, response: &Response) -> Result<()> {
    serde_json::to_writer(&mut *out, response)?;
    out.write_all(b"\n")?;
    out.flush().context("Cannot answer the VMM")
}

/// The next request line and the file descriptor sent with it; `None` when the VMM is gone.
/// The VMM sends one request at a time and waits for the answer, so a line never straddles two.
fn receive(socket: &UnixStream) -> Result<Option<(Vec<u8>, Option<File>)>> {
    let mut line = Vec::new();
    let mut fd = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, file) = socket
            .recv_with_fd(&mut buf)
            .context("Cannot read a request")?;
        if file.is_some() {
            fd = file;
        }
        if n == 0 {
            return Ok(None);
        }
        line.extend_from_slice(&buf[..n]);
        if line.ends_with(b"\n") {
            return Ok(Some((line, fd)));
        }
        if line.len() > MAX_MESSAGE {
            bail!("Request exceeds {MAX_MESSAGE} bytes");
        }
    }
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

impl Helper {
    fn load(f: &Flags) -> Result<Helper> {
        let signer = match (&f.key, &f.cert, &f.cabundle) {
            (Some(key), Some(cert), Some(bundle)) => {
                let pass = f
                    .passphrase_file
                    .as_deref()
                    .map(read_passphrase)
                    .transpose()?;
                let signer = AttestationSigner::from_files(
                    key,
                    cert,
                    bundle,
                    pass.as_ref().map(|p| p.as_slice()),
                )
                .context("Cannot load the attestation key, certificate and CA bundle")?;
                Some(match &f.module_id {
                    Some(id) => signer.with_module_id(id.clone()),
                    None => signer,
                })
            }
            (None, None, None) => None,
            _ => bail!("Give --attest-key, --attest-cert and --attest-cabundle together"),
        };
        let policy = match &f.policy {
            Some(path) => Some(Policy::load(path).context("Cannot load the launch policy")?),
            None => None,
        };
        let vmm_pid = f.vmm_pid.context("--vmm-pid is required")?;
        let mut m = Measurements::new();
        m.measure_vmm_binary(Path::new(&format!("/proc/{vmm_pid}/exe")))
            .context("Cannot measure the VMM binary")?;
        Ok(Helper {
            signer,
            policy,
            vmm_measured: Some(m),
            measured: None,
        })
    }

    fn measure(&mut self, req: &MeasureRequest, memfd: File) -> Response {
        let Some(m) = self.vmm_measured.take() else {
            return failed(409, "The VM has already been measured".into());
        };
        match self.try_measure(m, req, memfd) {
            Ok(log) => Response::Measured { event_log: log },
            Err(e) => failed(500, format!("{e:#}")),
        }
    }

    fn try_measure(
        &mut self,
        mut m: Measurements,
        req: &MeasureRequest,
        memfd: File,
    ) -> Result<serde_json::Value> {
        let mem = map_guest(memfd, req.memory_bytes)?;
        // The file is read again by path: one swapped since loading makes PCR2 disagree with any
        // prediction, so it fails closed.
        let image = std::fs::read(&req.kernel_path)
            .with_context(|| format!("Cannot read kernel {}", req.kernel_path.display()))?;
        let layout = KernelLayout::parse(&image)?;
        m.measure_kernel_in_guest(&mem, &layout, GuestAddress(req.kernel_image_base))?;
        if let Some((addr, size)) = req.initrd {
            m.measure_initrd_in_guest(&mem, GuestAddress(addr), size)?;
        }
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
