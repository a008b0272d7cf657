//! The host's attestation service (`--serve SOCKET`): one process per host holds the
//! attestation key and answers every VMM started with `--attest-service SOCKET`, so an attested
//! launch no longer pays for starting a helper, loading OpenSSL and the key, and hashing the VMM
//! binary.
//!
//! ```text
//!   bind SOCKET (0600) ─► accept ─► thread per VMM:
//!       peer = SO_PEERPIDFD / SO_PEERCRED of the connection   (never what the VMM says)
//!       open /proc/<peer>/exe, check the peer still lives      (its pid was not reused)
//!       PCR0 = cache.digest(exe), PCR6 = our own binary
//!       Open {module id, policy text} ─► Ready | Failed, then the session's requests
//! ```
//!
//! Digests are cached by file identity ([`outboard_attest::cache`]): each VMM build is hashed
//! once per service lifetime.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use outboard_attest::cache::DigestCache;
use outboard_attest::pcr::Digest;
use outboard_attest::{AttestationSigner, Policy};
use outboard_vmm::attestation::{Request, Response};

use crate::session::{self, HostMeasurements, Session};
use crate::Flags;

/// Most VMMs served at once; more wait in the listen backlog.
const MAX_SESSIONS: usize = 4096;
/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the connecting process. Not in the libc crate yet.
const SO_PEERPIDFD: libc::c_int = 77;

struct Shared {
    signer: AttestationSigner,
    cache: DigestCache,
    own_digest: Digest,
    sessions: AtomicUsize,
}

pub fn serve(path: &Path, f: &Flags) -> Result<()> {
    let (Some(key), Some(cert), Some(bundle)) = (&f.key, &f.cert, &f.cabundle) else {
        bail!("--serve needs --attest-key, --attest-cert and --attest-cabundle");
    };
    if f.policy.is_some() || f.module_id.is_some() || f.vmm_pid.is_some() {
        bail!("--serve takes no --attest-policy, --module-id or --vmm-pid: each VMM sends its own");
    }
    let signer = session::load_signer(key, cert, bundle, f.passphrase_file.as_deref())?;
    let cache = DigestCache::new();
    let own_digest = crate::own_digest(&cache)?;
    let listener = bind(path)?;
    eprintln!(
        "outboard-vmm-attest: serving attestation on {}",
        path.display()
    );
    let shared = Arc::new(Shared {
        signer,
        cache,
        own_digest,
        sessions: AtomicUsize::new(0),
    });
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("outboard-vmm-attest: accept failed: {e}");
                continue;
            }
        };
        if shared.sessions.fetch_add(1, Ordering::AcqRel) >= MAX_SESSIONS {
            shared.sessions.fetch_sub(1, Ordering::AcqRel);
            refuse(
                &stream,
                503,
                "The attestation service is serving too many VMMs",
            );
            continue;
        }
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("attest-session".into())
            .spawn(move || {
                if let Err(e) = session_for(&stream, &shared) {
                    eprintln!("outboard-vmm-attest: session ended: {e:#}");
                }
                shared.sessions.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("outboard-vmm-attest: cannot start a session thread: {e}");
        }
    }
    Ok(())
}

/// Binds `path`, replacing a stale socket but never a live service's.
fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "Another attestation service is already serving {}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("Cannot remove the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("Cannot listen on {}", path.display()))?;
    // Only the VMMs' user may ask for measurements and signatures.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("Cannot restrict {}", path.display()))?;
    Ok(listener)
}

fn refuse(stream: &UnixStream, status: u16, message: &str) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(clone);
    let _ = session::send(&mut out, &session::failed(status, message.to_owned()));
}

fn session_for(stream: &UnixStream, shared: &Shared) -> Result<()> {
    let (exe, exe_path) = match peer_binary(stream) {
        Ok(found) => found,
        Err(e) => {
            refuse(stream, 403, &format!("{e:#}"));
            return Err(e);
        }
    };
    let vmm = shared
        .cache
        .digest_file(exe, &exe_path)
        .context("Cannot measure the VMM binary")?;
    let Some((line, _)) = session::receive(stream)? else {
        return Ok(());
    };
    let (module_id, policy) = match serde_json::from_slice::<Request>(&line) {
        Ok(Request::Open { module_id, policy }) => (module_id, policy),
        Ok(_) => {
            refuse(stream, 400, "The first request must be Open");
            bail!("The VMM did not open a session");
        }
        Err(e) => {
            refuse(stream, 400, &format!("Malformed request: {e}"));
            bail!("Malformed Open request");
        }
    };
    let policy = match policy.as_deref().map(Policy::from_json).transpose() {
        Ok(p) => p,
        Err(e) => {
            let message = format!(
                "Cannot load the launch policy: {}",
                outboard_vmm::error_chain(&e)
            );
            refuse(stream, 400, &message);
            bail!(message);
        }
    };
    eprintln!(
        "outboard-vmm-attest: session for {module_id} ({}, binary {})",
        exe_path.display(),
        if vmm.cached { "cached" } else { "measured" }
    );
    let host = HostMeasurements {
        vmm: vmm.digest,
        vmm_description: format!("vmm {}", exe_path.display()),
        helper: shared.own_digest,
    };
    let signer = shared.signer.clone().with_module_id(module_id);
    let mut out = std::io::BufWriter::new(stream.try_clone().context("Cannot use the connection")?);
    session::send(&mut out, &Response::Ready)?;
    Session::new(Some(signer), policy, &host).serve(stream)
}

/// The binary of the process at the other end of `stream`, opened, with its `/proc` path.
/// With a pidfd the process is checked to be alive after the open, so the file is the binary
/// of the process that connected and not of a later one that got its pid.
fn peer_binary(stream: &UnixStream) -> Result<(File, PathBuf)> {
    let pid = peer_pid(stream)?;
    let pidfd = peer_pidfd(stream);
    let path = PathBuf::from(format!("/proc/{pid}/exe"));
    let exe = File::open(&path)
        .with_context(|| format!("Cannot open the VMM's binary {}", path.display()))?;
    match &pidfd {
        Some(fd) if !alive(fd) => bail!("The VMM (pid {pid}) exited before it was measured"),
        Some(_) => {}
        // Kernels before 6.5: the pid could in principle have been reused between connect and
        // the open; the VMM's connection stays open meanwhile, which makes it very unlikely.
        None => {}
    }
    Ok((exe, path))
}

fn peer_pid(stream: &UnixStream) -> Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is a live ucred of that
    // size; the descriptor is the connected socket we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("Cannot identify the VMM");
    }
    if cred.pid <= 0 {
        bail!("The VMM's process id is unknown");
    }
    Ok(cred.pid)
}

fn peer_pidfd(stream: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a live c_int.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return None;
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has not exited (signal 0 only checks).
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 sends nothing; it only reads the descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}
