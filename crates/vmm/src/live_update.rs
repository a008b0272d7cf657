//! Live update: hand a running VM to a successor outboard-vmm process (a new binary) with a
//! pause of the vCPUs, no copy of guest memory and no reboot.
//!
//! A KVM VM fd only works in the process that created it, so the successor builds its own KVM
//! VM and restores the saved state into it; guest RAM (the memfd), a new API listener, each
//! virtio device's vhost-user socket, inflight region and queue eventfds, and the vsock
//! device's listener and open connections are passed with SCM_RIGHTS over a socketpair the
//! successor inherits as `--live-update-fd N`. The backends keep their connections: the old
//! VMM stops the rings (GET_VRING_BASE) and the successor restarts them from the same bases on
//! the same socket, so a backend never sees a disconnect; a host process talking to the guest
//! over vsock keeps its socket too (the connections' flow-control state moves with them).
//!
//! ```text
//!   old VMM                                        successor (--live-update-fd N)
//!   spawn successor ─────────────────────────────► opens KVM
//!          ◄──────────────────────────── Hello {version}
//!   Prepare {vCPUs, MiB, devices}                  KVM VM on the memfd, vCPUs, devices with
//!     + [memfd, device fds] ─────────────────────► their ioeventfds (the guest still runs)
//!          ◄──────────────────────────── Prepared
//!   pause vCPUs and rings (t0), save VmState,
//!   let go of the irqfds (MSI-X function mask)
//!   Handover {config} + [listener, vsock conns] ─►
//!   state ───────────────────────────────────────► restore into the prepared VM: registers,
//!                                                  vrings, MSI-X routes and irqfds (not a word
//!                                                  to the backends yet)
//!          ◄──────────────────────────── Ready
//!   Commit {t0} ─────────────────────────────────►
//!          ◄──────────────────────────── Resuming      (the commit point)
//!   rename the new API socket over the path;       kvmclock advanced past the pause, restart
//!   exit (LiveUpdated)                             rings, resume vCPUs; pause = now − t0
//! ```
//!
//! Until `Resuming` arrives the old VMM owns the guest: any failure before it (the successor
//! exits, says `Failed`, sends garbage or is silent for [`STEP_TIMEOUT`]) kills the successor,
//! gives the irqfds back and resumes the guest and its rings on the old VMM. The successor says
//! `Resuming` before it touches the guest or a backend, so the guest never runs in two
//! processes and a backend never hears from both.
//!
//! Why the irqfds move inside the pause: KVM binds an eventfd to the irqfd of one VM at a time
//! (EBUSY otherwise), so the successor's VM can only take the queues' call eventfds once the
//! old VM let go. The ioeventfds have no such limit and each costs an SRCU grace period
//! (milliseconds on a busy host), so they are registered while the guest still runs.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long each step of the handshake may take before the update is rolled back.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted (the state document of a small VM is tens of KiB).
const MAX_FRAME: u64 = crate::snapshot::MAX_PAYLOAD;
/// Most descriptors one frame carries (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;
/// Test hook: a successor with `OUTBOARD_VMM_TEST_KILL_AT=<step>` in its environment kills
/// itself with SIGKILL at that step (`hello`, `handover`, `ready`), to prove rollback.
pub const TEST_KILL_ENV: &str = "OUTBOARD_VMM_TEST_KILL_AT";
/// With `OUTBOARD_VMM_TEST_STATE_COPY=<path>`, the old VMM writes the state document it handed
/// over to `path` after the commit (how `tests/fixtures/vmstate-v2.obvm` was made).
pub const TEST_STATE_COPY_ENV: &str = "OUTBOARD_VMM_TEST_STATE_COPY";

/// Errors of the handover protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot talk to the successor VMM")]
    Io(#[source] std::io::Error),
    #[error("The other VMM closed the live-update channel")]
    Closed,
    #[error("Live-update frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("Malformed live-update message")]
    Json(#[source] serde_json::Error),
    #[error("Unexpected live-update message (wanted {0})")]
    Unexpected(&'static str),
    #[error("The successor VMM failed: {0}")]
    Successor(String),
    #[error("Handover lacks the guest memory file")]
    NoMemfd,
}

/// One protocol message (JSON), possibly carrying descriptors.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    Hello {
        vmm_version: String,
    },
    /// Carries the memfd: the successor builds its KVM VM and vCPUs while the guest runs.
    Prepare {
        vcpu_count: u32,
        mem_size_mib: u64,
        /// The virtio devices as they are now; their descriptors follow the memfd.
        devices: Vec<crate::snapshot::PciDeviceState>,
    },
    Prepared,
    /// Followed by one raw frame with the encoded [`crate::snapshot::VmState`]. Carries the
    /// successor's API listener (first, when `api_sock` is set), then the sockets of the vsock
    /// connections (see [`crate::snapshot::devices`]).
    Handover(HandoverConfig),
    Ready,
    Commit {
        /// CLOCK_MONOTONIC ns when the old VMM began to pause the vCPUs.
        paused_at_ns: u64,
    },
    /// The successor takes the guest: from here on the old VMM must never run it.
    Resuming,
    Failed {
        reason: String,
    },
}

/// What the successor needs beyond the VM state: this process's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandoverConfig {
    pub id: String,
    pub serial_output: Option<PathBuf>,
    pub reboot_restart: bool,
    /// The API socket path; the listener itself is the second descriptor when present.
    pub api_sock: Option<PathBuf>,
    /// Whether the guest was running (else it stays paused in the successor).
    pub running: bool,
    /// CLOCK_MONOTONIC ns when the state's kvmclock was read: the successor advances the clock
    /// by the time since, so the guest's clock doesn't fall behind by each update's pause.
    #[serde(default)]
    pub clock_read_at_ns: u64,
    /// The VM was measured at launch: its measurements describe the old binary, so the
    /// successor refuses to serve them as current.
    #[serde(default)]
    pub attested: bool,
}

/// CLOCK_MONOTONIC in ns: one clock for both processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The live-update channel: length-prefixed frames on a Unix stream, descriptors attached to a
/// frame's header.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Result<Self, Error> {
        sock.set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(Error::Io)?;
        Ok(Channel { sock })
    }

    /// Takes the inherited descriptor `fd` (`--live-update-fd`).
    ///
    /// # Safety
    ///
    /// `fd` must be an open Unix stream socket that nothing else in the process owns.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Self, Error> {
        // SAFETY: the caller guarantees `fd` is an unowned Unix stream socket.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        Self::new(sock)
    }

    pub fn send_frame(&self, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        header[8..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        let sent = self
            .sock
            .send_with_fds(&[&header[..]], fds)
            .map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        (&self.sock)
            .write_all(&header[sent..])
            .and_then(|()| (&self.sock).write_all(payload))
            .map_err(Error::Io)
    }

    pub fn recv_frame(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let mut header = [0u8; 12];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        // SAFETY: the iovec points at `header`, which may receive any bytes.
        let (read, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        let fds: Vec<OwnedFd> = raw[..nfds]
            .iter()
            // SAFETY: recvmsg just installed these descriptors in this process; we own them.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        for fd in &fds {
            // recvmsg (without MSG_CMSG_CLOEXEC) leaves them inheritable: this process's own
            // successor must not inherit a copy of every descriptor of every generation.
            // SAFETY: F_SETFD on a descriptor we own changes only its flags.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        if read == 0 {
            return Err(Error::Closed);
        }
        (&self.sock)
            .read_exact(&mut header[read..])
            .map_err(closed_or_io)?;
        let len = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
        if len > MAX_FRAME {
            return Err(Error::TooLarge(len));
        }
        let mut payload = vec![0u8; len as usize];
        (&self.sock)
            .read_exact(&mut payload)
            .map_err(closed_or_io)?;
        Ok((payload, fds))
    }

    pub fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), Error> {
        let json = serde_json::to_vec(message).map_err(Error::Json)?;
        self.send_frame(&json, fds)
    }

    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), Error> {
        let (payload, fds) = self.recv_frame()?;
        let message = serde_json::from_slice(&payload).map_err(Error::Json)?;
        if let Message::Failed { reason } = message {
            return Err(Error::Successor(reason));
        }
        Ok((message, fds))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

fn closed_or_io(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::Closed
    } else {
        Error::Io(e)
    }
}

/// What a successor receives: the state, guest RAM and the predecessor's settings.
#[derive(Debug)]
pub struct Incoming {
    pub config: HandoverConfig,
    pub state: crate::snapshot::VmState,
    /// KVM VM on the predecessor's guest RAM, and vCPUs, made before the pause.
    pub prepared: crate::vm::PreparedVm,
    pub api_listener: Option<std::os::unix::net::UnixListener>,
}

/// The [`TEST_KILL_ENV`] hook: dies here, abruptly, when asked to.
pub fn test_kill_point(step: &str) {
    if std::env::var(TEST_KILL_ENV).is_ok_and(|s| s == step) {
        // SAFETY: raising a signal in this process has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// Successor side: says hello, prepares the VM while the guest still runs, and receives it.
/// Errors are reported to the old VMM too.
pub fn receive(
    channel: &Channel,
    hv: &outboard_hypervisor::Hypervisor,
) -> Result<Incoming, crate::Error> {
    let result = (|| -> Result<Incoming, crate::Error> {
        channel.send(
            &Message::Hello {
                vmm_version: crate::VMM_VERSION.into(),
            },
            &[],
        )?;
        test_kill_point("hello");
        let (message, mut fds) = channel.recv()?;
        let prepare_started = monotonic_ns();
        let Message::Prepare {
            vcpu_count,
            mem_size_mib,
            devices,
        } = message
        else {
            return Err(Error::Unexpected("Prepare").into());
        };
        if fds.is_empty() {
            return Err(Error::NoMemfd.into());
        }
        let memfd = std::fs::File::from(fds.remove(0));
        let vm_config = crate::VmmConfig {
            machine: outboard_api_types::MachineConfig {
                vcpu_count,
                mem_size_mib,
            },
            ..Default::default()
        };
        let ram = outboard_boot::GuestRam::from_memfd(memfd, vm_config.mem_bytes())
            .map_err(crate::vm::Error::from)?;
        let prepared = crate::vm::Vm::prepare(hv, &vm_config, ram, Some((&devices, fds)))?;
        channel.send(&Message::Prepared, &[])?;
        crate::status_line!(
            "outboard-vmm: live update: VM prepared in {:.3} ms (the guest still runs)",
            (monotonic_ns() - prepare_started) as f64 / 1e6
        );
        let (message, mut fds) = channel.recv()?;
        let Message::Handover(config) = message else {
            return Err(Error::Unexpected("Handover").into());
        };
        let (state, _) = channel.recv_frame()?;
        test_kill_point("handover");
        let state = crate::snapshot::decode(&state)?;
        let api_listener = match (&config.api_sock, fds.is_empty()) {
            (Some(_), false) => Some(std::os::unix::net::UnixListener::from(fds.remove(0))),
            _ => None,
        };
        let mut prepared = prepared;
        prepared.set_vsock_streams(fds);
        Ok(Incoming {
            config,
            state,
            prepared,
            api_listener,
        })
    })();
    if let Err(e) = &result {
        report_failure(channel, e);
    }
    result
}

/// Tells the old VMM why this successor gives up (best effort: it may be gone).
pub fn report_failure(channel: &Channel, error: &dyn std::error::Error) {
    let _ = channel.send(
        &Message::Failed {
            reason: crate::error_chain(error),
        },
        &[],
    );
}

/// The API socket a successor serves: bound beside the API path and renamed over it at the
/// commit point, so every connection made after the update reaches the successor (a listener
/// shared by both processes would let the old one accept, and drop, some of them).
#[derive(Debug)]
struct NextListener {
    listener: std::os::unix::net::UnixListener,
    temp: PathBuf,
    path: PathBuf,
}

impl NextListener {
    fn bind(path: &std::path::Path) -> Result<Self, Error> {
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".next-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let _ = std::fs::remove_file(&temp);
        let listener = std::os::unix::net::UnixListener::bind(&temp).map_err(Error::Io)?;
        Ok(NextListener {
            listener,
            temp,
            path: path.to_owned(),
        })
    }

    /// Makes the API path reach the successor (atomically: no connect fails).
    fn publish(self) -> Result<(), Error> {
        std::fs::rename(&self.temp, &self.path).map_err(Error::Io)
    }
}

impl Drop for NextListener {
    fn drop(&mut self) {
        // After `publish` this finds nothing; after a rollback it removes the unused socket.
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Starts `binary` with the child end of a socketpair as `--live-update-fd N`.
fn spawn_successor(binary: &std::path::Path) -> Result<(std::process::Child, Channel), Error> {
    let (ours, theirs) = UnixStream::pair().map_err(Error::Io)?;
    // The pair is close-on-exec; the successor gets a duplicate without the flag.
    // SAFETY: F_DUPFD on a descriptor we own returns a new descriptor or -1.
    let inherited = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD, 3) };
    if inherited < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `inherited` was just created by fcntl and nothing else owns it.
    let inherited = unsafe { OwnedFd::from_raw_fd(inherited) };
    let child = std::process::Command::new(binary)
        .arg("--live-update-fd")
        .arg(inherited.as_raw_fd().to_string())
        .spawn()
        .map_err(Error::Io)?;
    drop(inherited);
    drop(theirs);
    Ok((child, Channel::new(ours)?))
}

/// Times of one handover, in ms from the pause.
#[derive(Clone, Copy, Debug)]
pub struct HandoverTimes {
    pub state_saved_ms: f64,
    pub committed_ms: f64,
}

/// Old VMM side: hands `vm` to a successor started from `binary`. On success the successor
/// owns the guest (this VMM must exit without resuming it); on failure the successor is killed
/// and the guest runs here again if it was `running`.
pub fn hand_over(
    vm: &crate::vm::Vm,
    hv: &outboard_hypervisor::Hypervisor,
    binary: &std::path::Path,
    config: HandoverConfig,
    running: bool,
) -> Result<HandoverTimes, crate::Error> {
    let (mut child, channel) = spawn_successor(binary)?;
    let mut paused = false;
    let mut released = None;
    let result = (|| -> Result<HandoverTimes, crate::Error> {
        let (hello, _) = channel.recv()?;
        let Message::Hello { vmm_version } = hello else {
            return Err(Error::Unexpected("Hello").into());
        };
        log::info!("Live update to outboard-vmm {vmm_version}");
        let machine = &vm.config().machine;
        let (devices, device_fds) = vm.pci().handover().map_err(crate::vm::Error::from)?;
        let mut fds = vec![vm.ram().memfd().as_raw_fd()];
        fds.extend(device_fds.iter().map(AsRawFd::as_raw_fd));
        channel.send(
            &Message::Prepare {
                vcpu_count: machine.vcpu_count,
                mem_size_mib: machine.mem_size_mib,
                devices,
            },
            &fds,
        )?;
        drop(device_fds);
        match channel.recv()? {
            (Message::Prepared, _) => {}
            _ => return Err(Error::Unexpected("Prepared").into()),
        }
        let next = config
            .api_sock
            .as_deref()
            .map(NextListener::bind)
            .transpose()?;
        let paused_at_ns = monotonic_ns();
        if running {
            vm.pause()?;
            paused = true;
        }
        let state = vm.handover_state(hv)?;
        let streams = vm.pci().vsock_streams().map_err(crate::vm::Error::from)?;
        let mut config = config;
        config.clock_read_at_ns = monotonic_ns();
        let state = crate::snapshot::encode(&state)?;
        released = Some(vm.pci().release_interrupts());
        let state_saved_ms = (monotonic_ns() - paused_at_ns) as f64 / 1e6;
        let fds: Vec<RawFd> = next
            .iter()
            .map(|n| n.listener.as_raw_fd())
            .chain(streams.iter().map(AsRawFd::as_raw_fd))
            .collect();
        channel.send(&Message::Handover(config), &fds)?;
        channel.send_frame(&state, &[])?;
        match channel.recv()? {
            (Message::Ready, _) => {}
            _ => return Err(Error::Unexpected("Ready").into()),
        }
        channel.send(&Message::Commit { paused_at_ns }, &[])?;
        match channel.recv()? {
            (Message::Resuming, _) => {}
            _ => return Err(Error::Unexpected("Resuming").into()),
        }
        vm.pci().detach();
        if let Some(path) = std::env::var_os(TEST_STATE_COPY_ENV) {
            let _ = std::fs::write(path, &state);
        }
        if let Some(next) = next {
            // The successor runs the guest now: a failure here costs API connections only.
            if let Err(e) = next.publish() {
                log::error!("Cannot move the API socket to the successor: {e}");
            }
        }
        Ok(HandoverTimes {
            state_saved_ms,
            committed_ms: (monotonic_ns() - paused_at_ns) as f64 / 1e6,
        })
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        if let Some(controls) = &released {
            vm.pci().restore_interrupts(controls);
        }
        if paused {
            vm.resume();
            // The successor's VM may have taken a completion's interrupt before it died.
            vm.pci().replay_interrupts();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use super::*;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a).unwrap(), b)
    }

    #[test]
    fn frames_carry_payload_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let mut file = tempfile::tempfile().unwrap();
        a.send(&Message::Ready, &[file.as_raw_fd()]).unwrap();
        // Larger than the socket buffer: the reader must take it in pieces.
        let big = vec![7u8; 300_000];
        let sent = big.clone();
        let writer = std::thread::spawn(move || a.send_frame(&sent, &[]).unwrap());
        let (message, fds) = b.recv().unwrap();
        assert!(matches!(message, Message::Ready));
        assert_eq!(fds.len(), 1);
        std::fs::File::from(fds.into_iter().next().unwrap())
            .write_all(b"shared")
            .unwrap();
        let mut text = String::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared");
        assert_eq!(b.recv_frame().unwrap().0, big);
        writer.join().unwrap();
    }

    #[test]
    fn the_api_path_moves_to_the_new_listener_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let old = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Rolled back: the spare socket goes, the path still reaches the old listener.
        let spare = NextListener::bind(&path).unwrap();
        let temp = spare.temp.clone();
        assert!(temp.exists());
        drop(spare);
        assert!(!temp.exists());
        UnixStream::connect(&path).unwrap();
        assert!(old.accept().is_ok());
        // Committed: the same path now reaches the new listener.
        let next = NextListener::bind(&path).unwrap();
        let new = next.listener.try_clone().unwrap();
        next.publish().unwrap();
        UnixStream::connect(&path).unwrap();
        new.set_nonblocking(true).unwrap();
        assert!(new.accept().is_ok());
        old.set_nonblocking(true).unwrap();
        assert!(
            old.accept().is_err(),
            "the old listener got a new connection"
        );
    }

    #[test]
    fn hostile_or_broken_peers_give_errors() {
        let (ours, mut theirs) = pair();
        let mut header = (MAX_FRAME + 1).to_le_bytes().to_vec();
        header.extend_from_slice(&0u32.to_le_bytes());
        theirs.write_all(&header).unwrap();
        assert!(matches!(ours.recv_frame(), Err(Error::TooLarge(_))));

        let (ours, mut theirs) = pair();
        theirs.write_all(&5u64.to_le_bytes()).unwrap();
        theirs.write_all(&0u32.to_le_bytes()).unwrap();
        theirs.write_all(b"nope!").unwrap();
        assert!(matches!(ours.recv(), Err(Error::Json(_))));

        let (ours, theirs) = pair();
        let theirs = Channel::new(theirs).unwrap();
        theirs
            .send(
                &Message::Failed {
                    reason: "no KVM".into(),
                },
                &[],
            )
            .unwrap();
        let err = ours.recv().unwrap_err();
        assert_eq!(err.to_string(), "The successor VMM failed: no KVM");

        let (ours, mut theirs) = pair();
        theirs.write_all(&[1, 0]).unwrap();
        drop(theirs);
        assert!(matches!(ours.recv_frame(), Err(Error::Closed)));
        let (ours, theirs) = pair();
        drop(theirs);
        assert!(matches!(ours.recv(), Err(Error::Closed)));
    }
}
