//! The VMM's side of the attested two-phase launch (US 9880866): the attestation key and launch
//! policy given on the command line, phase-1 measurement of a loaded [`Vm`], the answers of
//! `GET /attestation` and `GET /attestation/event-log`, and zeroing guest memory on
//! `InstanceAbort`.
//!
//! The measuring, signing and policy logic (`outboard-attest`, on OpenSSL) runs in a helper
//! process, `outboard-vmm-attest`, next to the VMM binary:
//!
//! - the private attestation key never enters the process that runs hostile guests: the VMM
//!   passes the key's *paths*, the helper loads it;
//! - the VMM does not link OpenSSL, whose loading alone would add about a millisecond of page
//!   faults to every (also unattested) VMM start.
//!
//! The helper runs in one of two ways:
//!
//! - **per VM** (`--attest-key …`): the VMM starts its own helper, which loads the key and
//!   hashes the VMM binary while the VMM builds the VM;
//! - **host service** (`--attest-service SOCKET`): one long-running `outboard-vmm-attest --serve`
//!   per host holds the key and answers every VMM on the host over a Unix socket. It finds the
//!   VMM's binary from the connection's peer credentials (never from what the VMM claims) and
//!   hashes each binary once ([`outboard_attest::cache`]), so an attested launch costs a connect
//!   and the measuring of what was loaded. The VMM sends its launch policy's *text*, so the
//!   service never opens a path a VMM names.
//!
//! Either way the helper binary measures itself into PCR6 (the host's attestation agent).
//!
//! ```text
//!  outboard-vmm ──socketpair (the helper's stdin) or the service's socket, one JSON line each
//!                 way per request──► helper
//!     Open {module id, policy text} ─►       (service only) a session for this VM
//!     Measure + guest memfd + kernel file    measure kernel, initrd, cmdline (read back from
//!       (SCM_RIGHTS) ─►                      guest memory; the kernel file only says where its
//!                                            bytes went), config, certificate
//!     CheckPolicy ─►                         approve or refuse (naming the PCRs)
//!     Document {query} ─►                    COSE_Sign1 document, hex
//! ```
//!
//! When phase 1 measures (PCR layout in `outboard_attest`):
//!
//! | launch | helper started | measured |
//! |---|---|---|
//! | attestation key or policy configured | at VMM start (bad key files fail the start) | always, before any vCPU runs |
//! | explicit phase 1 (`InstanceLoad`, `--no-start`) without either | at phase 1 | yes (event log only) |
//! | one-shot start (`--kernel`, `InstanceStart` from `NotStarted`) without either | never | no |
//!
//! PCR5's canonical configuration lists the vCPUs, the memory size and the virtio devices with
//! the identity of their backends (socket paths), in PCI slot order; the fixed legacy devices
//! (UART, i8042, PM1, debug port) are part of the VMM binary, which PCR0 covers.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outboard_api_server::{ApiError, ApiResponse};
use outboard_boot::layout::CMDLINE_START;
use outboard_boot::GuestRam;
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::VmmConfig;
use crate::vm::Vm;

/// Name of the helper binary, looked up next to the VMM's own.
pub const HELPER_NAME: &str = "outboard-vmm-attest";
/// Longest a helper request may take (hashing a 1 GiB initrd takes about a second); below the
/// API's own reply timeout, so a stuck helper becomes a clear error, not a hung request.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Errors of attestation set-up, measurement and memory scrubbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot find the attestation helper next to the VMM binary")]
    HelperPath(#[source] std::io::Error),
    #[error("Cannot connect to the attestation service {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read the launch policy {path}")]
    ReadPolicy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open kernel {path} to measure it")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Launch policy {0} is too large")]
    PolicyTooLarge(PathBuf),
    #[error("Cannot start the attestation helper {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot talk to the attestation helper")]
    Talk(#[source] std::io::Error),
    #[error("Attestation helper sent a malformed answer")]
    Answer(#[source] serde_json::Error),
    #[error("Attestation helper gave an unexpected answer")]
    Unexpected,
    #[error("Cannot set up attestation: {0}")]
    HelperStart(String),
    #[error("{0}")]
    Helper(String),
    #[error("Cannot zero guest memory")]
    Zero(#[source] std::io::Error),
    #[error("Guest memory still holds {0} allocated bytes after zeroing")]
    NotZeroed(u64),
}

/// Key files given with `--attest-key`, `--attest-cert`, `--attest-cabundle`
/// (`outboard attest host-key create` writes them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub cabundle: PathBuf,
    /// A file holding the key's passphrase, if the key is encrypted.
    pub passphrase_file: Option<PathBuf>,
}

/// What the command line asks of attestation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttestationConfig {
    pub keys: Option<KeyFiles>,
    /// `--attest-policy`: approved PCR values; `InstanceStart` is refused unless they match.
    pub policy: Option<PathBuf>,
    /// `--attest-service`: the host's attestation service socket (instead of `keys`).
    pub service: Option<PathBuf>,
}

impl AttestationConfig {
    /// The helper's command-line flags (paths only: the helper reads the files). PCR0 is
    /// `/proc/<vmm_pid>/exe`, the binary actually running.
    pub fn helper_args(&self, module_id: &str, vmm_pid: u32) -> Vec<String> {
        let mut args = vec![
            "--module-id".to_owned(),
            module_id.to_owned(),
            "--vmm-pid".to_owned(),
            vmm_pid.to_string(),
        ];
        let mut flag = |name: &str, path: &PathBuf| {
            args.push(name.to_owned());
            args.push(path.display().to_string());
        };
        if let Some(k) = &self.keys {
            flag("--attest-key", &k.key);
            flag("--attest-cert", &k.cert);
            flag("--attest-cabundle", &k.cabundle);
            if let Some(p) = &k.passphrase_file {
                flag("--attest-passphrase-file", p);
            }
        }
        if let Some(p) = &self.policy {
            flag("--attest-policy", p);
        }
        args
    }
}

/// A request to the helper: one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first request on a connection to the host's attestation service: the VM's id and
    /// its launch policy's text (the service never reads a path a VMM names).
    Open {
        module_id: String,
        policy: Option<String>,
    },
    /// Measure the loaded VM; the guest memory memfd and the kernel file travel with this line
    /// (SCM_RIGHTS, in that order), so the helper never opens a path the VMM names.
    Measure(MeasureRequest),
    /// Check the measurements against the launch policy.
    CheckPolicy,
    /// Build and sign a document over the measurements.
    Document { query: String },
}

/// What and where phase 1 measures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureRequest {
    pub memory_bytes: u64,
    /// The kernel file's name, for messages (the file itself is sent as a descriptor).
    pub kernel_path: PathBuf,
    /// Guest address the kernel file's loaded regions are relative to.
    pub kernel_image_base: u64,
    /// `(address, size)` of the initrd in guest memory.
    pub initrd: Option<(u64, u64)>,
    pub cmdline_addr: u64,
    /// Command line length including its NUL.
    pub cmdline_len: u64,
    /// PCR5's input, the JSON form of `outboard_attest::CanonicalVmConfig`.
    pub config: serde_json::Value,
}

/// The helper's answer: one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Key and policy loaded (per VM), or the session opened (service).
    Ready,
    /// `GET /attestation/event-log`'s body: `events`, `pcrs` (non-zero ones, hex), `config`.
    Measured {
        event_log: serde_json::Value,
    },
    Approved,
    /// The policy rejects the measurements; `message` names the PCRs.
    Refused {
        message: String,
    },
    /// The signed document, hex.
    Document {
        cbor_hex: String,
    },
    /// The request failed; `status` is the HTTP status to answer with.
    Failed {
        status: u16,
        message: String,
    },
}

/// The running helper.
#[derive(Debug)]
struct Helper {
    /// The per-VM helper process; `None` when talking to the host's service.
    child: Option<Child>,
    socket: UnixStream,
    reader: BufReader<UnixStream>,
    /// Whether its `Ready` arrived. The helper loads the key and policy and hashes the VMM
    /// binary (PCR0) while the VMM builds the VM; the first request waits for it.
    ready: bool,
}

impl Helper {
    fn spawn(config: &AttestationConfig, module_id: &str) -> Result<Helper, Error> {
        let exe = std::env::current_exe().map_err(Error::HelperPath)?;
        let path = exe.with_file_name(HELPER_NAME);
        let (socket, theirs) = UnixStream::pair().map_err(Error::Talk)?;
        let child = Command::new(&path)
            .args(config.helper_args(module_id, std::process::id()))
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn { path, source })?;
        Helper::over(socket, Some(child))
    }

    /// The helper at the other end of `socket`: a child we started, or the host's service.
    fn over(socket: UnixStream, child: Option<Child>) -> Result<Helper, Error> {
        socket
            .set_read_timeout(Some(HELPER_TIMEOUT))
            .map_err(Error::Talk)?;
        let reader = BufReader::new(socket.try_clone().map_err(Error::Talk)?);
        Ok(Helper {
            child,
            socket,
            reader,
            ready: false,
        })
    }

    /// Opens a session with the host's attestation service. The answer to `Open` is read by
    /// the first request, so the VMM builds the VM meanwhile.
    fn connect(service: &Path, policy: Option<&Path>, module_id: &str) -> Result<Helper, Error> {
        let policy = policy.map(read_policy).transpose()?;
        let socket = UnixStream::connect(service).map_err(|source| Error::Connect {
            path: service.to_owned(),
            source,
        })?;
        let mut helper = Helper::over(socket, None)?;
        let open = Request::Open {
            module_id: module_id.to_owned(),
            policy,
        };
        helper.send(&open, &[])?;
        Ok(helper)
    }

    fn wait_ready(&mut self) -> Result<(), Error> {
        if !self.ready {
            match self.receive()? {
                Response::Ready => self.ready = true,
                Response::Failed { message, .. } => return Err(Error::HelperStart(message)),
                _ => return Err(Error::Unexpected),
            }
        }
        Ok(())
    }

    fn call(&mut self, request: &Request, files: &[&File]) -> Result<Response, Error> {
        self.wait_ready()?;
        self.send(request, files)?;
        self.receive()
    }

    /// Writes `request` as one line, `files` attached to its first bytes.
    fn send(&mut self, request: &Request, files: &[&File]) -> Result<(), Error> {
        let mut line = serde_json::to_vec(request).map_err(Error::Answer)?;
        line.push(b'\n');
        if files.is_empty() {
            self.socket.write_all(&line).map_err(Error::Talk)?;
        } else {
            let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
            let sent = self
                .socket
                .send_with_fds(&[&line[..]], &fds)
                .map_err(|e| Error::Talk(e.into()))?;
            self.socket.write_all(&line[sent..]).map_err(Error::Talk)?;
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<Response, Error> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE as u64)
            .read_until(b'\n', &mut line)
            .map_err(Error::Talk)?;
        if n == 0 {
            return Err(Error::Talk(std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_slice(&line).map_err(Error::Answer)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The attestation set-up of one VMM and, once phase 1 ran, its measurements.
#[derive(Debug, Default)]
pub struct Attestation {
    config: AttestationConfig,
    module_id: String,
    helper: Option<Helper>,
    /// `GET /attestation/event-log`'s body, once measured.
    event_log: Option<serde_json::Value>,
    /// This process took the VM over by live update: the launch measurements describe the
    /// previous binary and are not served.
    superseded: bool,
}

impl Attestation {
    /// Starts the helper when a key or policy is configured; it gets ready while the VMM sets
    /// up ([`Attestation::wait_ready`] reports bad key or policy files).
    pub fn new(config: AttestationConfig, module_id: &str) -> Result<Self, Error> {
        let mut a = Attestation {
            config,
            module_id: module_id.to_owned(),
            helper: None,
            event_log: None,
            superseded: false,
        };
        if a.measures_every_launch() {
            a.helper = Some(a.start_helper()?);
        }
        Ok(a)
    }

    /// The attestation of a VMM that took a measured VM over by live update.
    pub fn superseded() -> Self {
        Attestation {
            superseded: true,
            ..Default::default()
        }
    }

    /// Waits for the helper (if started) to load the key and policy.
    pub fn wait_ready(&mut self) -> Result<(), Error> {
        match &mut self.helper {
            Some(h) => h.wait_ready(),
            None => Ok(()),
        }
    }

    /// Whether every launch must be measured (a document may be asked for, or a policy checked).
    pub fn measures_every_launch(&self) -> bool {
        self.config.keys.is_some() || self.config.policy.is_some() || self.config.service.is_some()
    }

    fn start_helper(&self) -> Result<Helper, Error> {
        match &self.config.service {
            Some(service) => {
                Helper::connect(service, self.config.policy.as_deref(), &self.module_id)
            }
            None => Helper::spawn(&self.config, &self.module_id),
        }
    }

    pub fn measured(&self) -> bool {
        self.event_log.is_some()
    }

    fn helper(&mut self) -> Result<&mut Helper, Error> {
        if self.helper.is_none() {
            self.helper = Some(self.start_helper()?);
        }
        self.helper.as_mut().ok_or(Error::Unexpected)
    }

    /// Phase 1's measurements of the loaded `vm` (vCPUs not started).
    pub fn measure(&mut self, vm: &Vm, config: &VmmConfig) -> Result<(), Error> {
        let placement = vm.placement().ok_or(Error::Unexpected)?;
        let kernel_path = config
            .boot
            .as_ref()
            .map(|b| b.kernel_image_path.clone())
            .unwrap_or_default();
        let kernel = File::open(&kernel_path).map_err(|source| Error::OpenKernel {
            path: kernel_path.clone(),
            source,
        })?;
        let request = Request::Measure(MeasureRequest {
            memory_bytes: vm.ram().size(),
            kernel_path,
            kernel_image_base: placement.kernel.image_base,
            initrd: placement.initrd.map(|i| (i.addr, i.size)),
            cmdline_addr: CMDLINE_START,
            cmdline_len: placement.cmdline_len as u64 + 1,
            config: canonical_config(config),
        });
        crate::trace::mark("VM loaded");
        let helper = self.helper()?;
        helper.wait_ready()?;
        crate::trace::mark("attestation helper ready");
        match helper.call(&request, &[vm.ram().memfd(), &kernel])? {
            Response::Measured { event_log } => {
                crate::trace::mark("phase 1 measured");
                self.event_log = Some(event_log);
                Ok(())
            }
            Response::Failed { message, .. } => Err(Error::Helper(message)),
            _ => Err(Error::Unexpected),
        }
    }

    /// The launch policy's verdict: `Ok(None)` to go ahead (approved, or no policy),
    /// `Ok(Some(message))` when it refuses.
    pub fn check_policy(&mut self) -> Result<Option<String>, Error> {
        if self.config.policy.is_none() {
            return Ok(None);
        }
        match self.helper()?.call(&Request::CheckPolicy, &[])? {
            Response::Approved => Ok(None),
            Response::Refused { message } => Ok(Some(message)),
            Response::Failed { message, .. } => Err(Error::Helper(message)),
            _ => Err(Error::Unexpected),
        }
    }

    /// `GET /attestation?<query>`.
    pub fn document(&mut self, query: &str) -> Result<ApiResponse, ApiError> {
        if self.superseded {
            return Err(superseded());
        }
        if self.config.keys.is_none() && self.config.service.is_none() {
            return Err(ApiError::conflict(
                "No attestation key configured: start outboard-vmm with --attest-service, or \
                 --attest-key, --attest-cert and --attest-cabundle",
            ));
        }
        if !self.measured() {
            return Err(not_measured());
        }
        let request = Request::Document {
            query: query.to_owned(),
        };
        let internal = |e: Error| ApiError::internal(crate::error_chain(&e));
        match self.helper().map_err(internal)?.call(&request, &[]) {
            Ok(Response::Document { cbor_hex }) => Ok(ApiResponse::Bytes {
                content_type: DOCUMENT_CONTENT_TYPE,
                body: hex::decode(cbor_hex).map_err(|_| internal(Error::Unexpected))?,
            }),
            Ok(Response::Failed { status, message }) => Err(ApiError { status, message }),
            Ok(_) => Err(internal(Error::Unexpected)),
            Err(e) => Err(internal(e)),
        }
    }

    /// `GET /attestation/event-log`.
    pub fn event_log(&self) -> Result<ApiResponse, ApiError> {
        if self.superseded {
            return Err(superseded());
        }
        self.event_log
            .clone()
            .map(ApiResponse::Json)
            .ok_or_else(not_measured)
    }
}

/// The `Content-Type` of a served attestation document (`outboard_attest::DOCUMENT_CONTENT_TYPE`).
pub const DOCUMENT_CONTENT_TYPE: &str = "application/cbor";

fn superseded() -> ApiError {
    ApiError::conflict(
        "This VM was live-updated to another outboard-vmm binary: its launch measurements \
         describe the previous binary, and attestation does not carry across a live update yet",
    )
}

fn not_measured() -> ApiError {
    ApiError::conflict(
        "The VM has not been loaded and measured: send InstanceLoad (or start outboard-vmm with \
         --no-start) first",
    )
}

/// PCR5's input for `config`, in the JSON form of `outboard_attest::CanonicalVmConfig` (see the
/// module documentation for what it lists).
pub fn canonical_config(config: &VmmConfig) -> serde_json::Value {
    let d = &config.devices;
    let mut devices = Vec::new();
    // Attach order, the order PCI slots are given in: disks, NICs, vsock.
    for (i, disk) in d.disks.iter().enumerate() {
        devices.push(serde_json::json!({
            "kind": "virtio-blk",
            "id": format!("virtio-blk{i}"),
            "backend": format!("vhost-user:{}", disk.socket.display()),
            "properties": {
                "num_queues": disk.num_queues.to_string(),
                "queue_size": disk.queue_size.to_string(),
            },
        }));
    }
    for (i, net) in d.nets.iter().enumerate() {
        let mac = net.mac.as_ref().map(crate::pci::mac_string);
        devices.push(serde_json::json!({
            "kind": "virtio-net",
            "id": format!("virtio-net{i}"),
            "backend": format!("vhost-user:{}", net.socket.display()),
            "properties": {
                "mac": mac.unwrap_or_default(),
                "num_queues": net.num_queues.to_string(),
                "queue_size": net.queue_size.to_string(),
            },
        }));
    }
    if let Some(vsock) = &d.vsock {
        devices.push(serde_json::json!({
            "kind": "virtio-vsock",
            "id": "virtio-vsock0",
            "backend": format!("uds:{}", vsock.uds_path.display()),
            "properties": { "cid": vsock.cid.to_string() },
        }));
    }
    serde_json::json!({
        "vcpus": config.machine.vcpu_count,
        "memory_bytes": config.mem_bytes(),
        "devices": devices,
    })
}

/// A launch policy's text, bounded so it fits one protocol line.
fn read_policy(path: &Path) -> Result<String, Error> {
    let err = |source| Error::ReadPolicy {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    File::open(path)
        .map_err(err)?
        .take(MAX_MESSAGE as u64 / 2 + 1)
        .read_to_string(&mut text)
        .map_err(err)?;
    if text.len() > MAX_MESSAGE / 2 {
        return Err(Error::PolicyTooLarge(path.to_owned()));
    }
    Ok(text)
}

/// Zeroes all of guest memory by punching its memfd empty: the pages are freed and every later
/// read, through the VMM's mapping or the file, returns zeros. Checks that no block is left.
pub fn zero_guest_memory(ram: &GuestRam) -> Result<(), Error> {
    punch_hole(ram.memfd(), ram.size())
}

fn punch_hole(file: &File, size: u64) -> Result<(), Error> {
    let len = libc::off_t::try_from(size)
        .map_err(|_| Error::Zero(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: fallocate only acts on the file behind a valid descriptor we own; no memory of
    // ours is passed. Mappings of the file stay valid and read zeros afterwards.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if rc != 0 {
        return Err(Error::Zero(std::io::Error::last_os_error()));
    }
    use std::os::unix::fs::MetadataExt;
    let blocks = file.metadata().map_err(Error::Zero)?.blocks();
    if blocks != 0 {
        return Err(Error::NotZeroed(blocks * 512));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn zeroing_clears_the_mapping_and_the_memfd() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let secret = b"guest secret that must not outlive an abort";
        for at in [0x1000u64, 0x10_0000, (32 << 20) - 0x1000] {
            ram.memory().write_slice(secret, GuestAddress(at)).unwrap();
        }
        let mut back = vec![0u8; secret.len()];
        ram.memfd().read_exact_at(&mut back, 0x10_0000).unwrap();
        assert_eq!(&back, secret);

        zero_guest_memory(&ram).unwrap();

        for at in [0x1000u64, 0x10_0000, (32 << 20) - 0x1000] {
            ram.memory()
                .read_slice(&mut back, GuestAddress(at))
                .unwrap();
            assert!(back.iter().all(|b| *b == 0), "mapping at {at:#x}");
        }
        let mut whole = vec![0xffu8; 32 << 20];
        ram.memfd().read_exact_at(&mut whole, 0).unwrap();
        assert!(whole.iter().all(|b| *b == 0), "memfd content");
        assert_eq!(ram.memfd().metadata().unwrap().len(), 32 << 20);
    }

    #[test]
    fn no_key_and_no_measurements_are_conflicts() {
        let mut none = Attestation::new(AttestationConfig::default(), "vm").unwrap();
        assert!(!none.measures_every_launch());
        assert!(none.helper.is_none(), "no helper without a key or policy");
        let err = none.document("nonce=00").unwrap_err();
        assert_eq!(err.status, 409);
        assert!(
            err.message.contains("No attestation key"),
            "{}",
            err.message
        );
        assert_eq!(none.event_log().unwrap_err().status, 409);
        assert_eq!(none.check_policy().unwrap(), None);
    }

    #[test]
    fn protocol_lines_round_trip() {
        let req = Request::Document {
            query: "nonce=00".into(),
        };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(line, r#"{"op":"document","query":"nonce=00"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
        let refused: Response =
            serde_json::from_str(r#"{"result":"refused","message":"PCR 4"}"#).unwrap();
        assert_eq!(
            refused,
            Response::Refused {
                message: "PCR 4".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn helper_flags_carry_paths_only() {
        let config = AttestationConfig {
            keys: Some(KeyFiles {
                key: "/k".into(),
                cert: "/c".into(),
                cabundle: "/b".into(),
                passphrase_file: None,
            }),
            policy: Some("/p".into()),
            service: None,
        };
        assert_eq!(
            config.helper_args("vm-1", 42),
            [
                "--module-id",
                "vm-1",
                "--vmm-pid",
                "42",
                "--attest-key",
                "/k",
                "--attest-cert",
                "/c",
                "--attest-cabundle",
                "/b",
                "--attest-policy",
                "/p"
            ]
        );
    }
}
