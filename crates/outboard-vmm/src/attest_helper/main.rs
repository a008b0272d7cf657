//! outboard-vmm-attest: outboard-vmm's attestation helper. It holds the host's attestation key,
//! measures loaded VMs from guest memory (a memfd received over a socket, mapped read-only) and
//! signs documents. Requests and answers are the JSON lines of `outboard_vmm::attestation`
//! ([`Request`](outboard_vmm::attestation::Request)). Keeping OpenSSL and the key here keeps
//! both out of the process that runs the guest. Two ways to run it:
//!
//! - per VM: outboard-vmm starts it (never a user) with a socket as its standard input and the
//!   key and policy *paths* as flags; it exits when the VMM closes the socket;
//! - host service: `outboard-vmm-attest --serve SOCKET --attest-key … --attest-cert …
//!   --attest-cabundle …` serves every VMM on the host started with `--attest-service SOCKET`
//!   ([`service`]).

mod service;
mod session;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use outboard_attest::cache::DigestCache;
use outboard_attest::Policy;
use outboard_vmm::attestation::Response;
use session::{HostMeasurements, Session};

fn main() {
    if std::env::args().any(|a| a == "--help") {
        println!(
            "outboard-vmm-attest is started by outboard-vmm, or runs as the host's attestation \
             service:\n  outboard-vmm-attest --serve SOCKET --attest-key F --attest-cert F \
             --attest-cabundle F [--attest-passphrase-file F]"
        );
        return;
    }
    if let Err(e) = run() {
        eprintln!("outboard-vmm-attest: Error: {e:#}");
        std::process::exit(1);
    }
}

#[derive(Default)]
struct Flags {
    serve: Option<PathBuf>,
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
            "--serve" => f.serve = Some(value.into()),
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

fn run() -> Result<()> {
    let flags = parse_flags();
    if let Ok(
        f @ Flags {
            serve: Some(path), ..
        },
    ) = &flags
    {
        return service::serve(path, f);
    }
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("No socket on standard input")?;
    let socket = UnixStream::from(stdin);
    let mut out = std::io::BufWriter::new(socket.try_clone().context("Cannot use the socket")?);
    let mut session = match flags.and_then(|f| per_vm_session(&f)) {
        Ok(s) => {
            session::send(&mut out, &Response::Ready)?;
            s
        }
        Err(e) => {
            // The VMM reports it (once, with its own context).
            session::send(&mut out, &session::failed(500, format!("{e:#}")))?;
            std::process::exit(1);
        }
    };
    session.serve(&socket)
}

/// The session of the VMM that started this helper: key and policy from the flags, PCR0 from
/// `/proc/<vmm-pid>/exe` (the VMM is our parent and waits for us, so its pid is not reused).
fn per_vm_session(f: &Flags) -> Result<Session> {
    let signer = match (&f.key, &f.cert, &f.cabundle) {
        (Some(key), Some(cert), Some(bundle)) => {
            let signer = session::load_signer(key, cert, bundle, f.passphrase_file.as_deref())?;
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
    let cache = DigestCache::new();
    let vmm_exe = PathBuf::from(format!("/proc/{vmm_pid}/exe"));
    let vmm = cache
        .digest(&vmm_exe)
        .context("Cannot measure the VMM binary")?;
    let helper = own_digest(&cache)?;
    let host = HostMeasurements {
        vmm: vmm.digest,
        vmm_description: format!("vmm {}", vmm_exe.display()),
        helper,
    };
    Ok(Session::new(signer, policy, &host))
}

/// PCR6's input: this helper's own binary.
fn own_digest(cache: &DigestCache) -> Result<outboard_attest::pcr::Digest> {
    Ok(cache
        .digest(Path::new("/proc/self/exe"))
        .context("Cannot measure the attestation helper's own binary")?
        .digest)
}
