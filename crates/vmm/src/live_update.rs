//! Live update: hand a running VM to a successor outboard-vmm process (a new binary) with a
//! pause of the vCPUs, no copy of guest memory and no reboot.
//!
//! A KVM VM fd only works in the process that created it, so the successor builds its own KVM
//! VM and restores the saved state into it; guest RAM (the memfd) and the API listener are
//! passed with SCM_RIGHTS over a socketpair the successor inherits as `--live-update-fd N`.
//!
//! ```text
//!   old VMM                                        successor (--live-update-fd N)
//!   spawn successor ─────────────────────────────► opens KVM
//!          ◄──────────────────────────── Hello {version}
//!   pause vCPUs (t0), save VmState
//!   Handover {config} + [memfd, listener], state ─►
//!                                                  build VM on the memfd, restore, vCPUs parked
//!          ◄──────────────────────────── Ready
//!   Commit {t0} ─────────────────────────────────► resume vCPUs; pause = now − t0
//!   exit (LiveUpdated)
//! ```
//!
//! Until `Commit` is sent the old VMM owns the guest: any failure before it (the successor exits,
//! says `Failed`, sends garbage or is silent for [`STEP_TIMEOUT`]) kills the successor and
//! resumes the guest on the old VMM. After `Commit` the old VMM never runs the guest again, so the
//! guest never runs in two processes.

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
/// Most descriptors one frame carries.
const MAX_FDS: usize = 8;

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
    /// Followed by one raw frame with the encoded [`crate::snapshot::VmState`].
    Handover(HandoverConfig),
    Ready,
    Commit {
        /// CLOCK_MONOTONIC ns when the old VMM began to pause the vCPUs.
        paused_at_ns: u64,
    },
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
    pub memfd: std::fs::File,
    pub api_listener: Option<std::os::unix::net::UnixListener>,
}

/// Successor side: says hello and receives the VM. Errors are reported to the old VMM too.
pub fn receive(channel: &Channel) -> Result<Incoming, crate::Error> {
    let result = (|| -> Result<Incoming, crate::Error> {
        channel.send(
            &Message::Hello {
                vmm_version: crate::VMM_VERSION.into(),
            },
            &[],
        )?;
        let (message, mut fds) = channel.recv()?;
        let Message::Handover(config) = message else {
            return Err(Error::Unexpected("Handover").into());
        };
        let (state, _) = channel.recv_frame()?;
        let state = crate::snapshot::decode(&state)?;
        if fds.is_empty() {
            return Err(Error::NoMemfd.into());
        }
        let memfd = std::fs::File::from(fds.remove(0));
        let api_listener = match (&config.api_sock, fds.pop()) {
            (Some(_), Some(fd)) => Some(std::os::unix::net::UnixListener::from(fd)),
            _ => None,
        };
        Ok(Incoming {
            config,
            state,
            memfd,
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
    api_listener: Option<RawFd>,
) -> Result<HandoverTimes, crate::Error> {
    let (mut child, channel) = spawn_successor(binary)?;
    let mut paused = false;
    let result = (|| -> Result<HandoverTimes, crate::Error> {
        let (hello, _) = channel.recv()?;
        let Message::Hello { vmm_version } = hello else {
            return Err(Error::Unexpected("Hello").into());
        };
        log::info!("Live update to outboard-vmm {vmm_version}");
        let paused_at_ns = monotonic_ns();
        if running {
            vm.pause()?;
            paused = true;
        }
        let state = crate::snapshot::encode(&vm.save_state(hv)?)?;
        let state_saved_ms = (monotonic_ns() - paused_at_ns) as f64 / 1e6;
        let mut fds = vec![vm.ram().memfd().as_raw_fd()];
        fds.extend(api_listener);
        channel.send(&Message::Handover(config), &fds)?;
        channel.send_frame(&state, &[])?;
        match channel.recv()? {
            (Message::Ready, _) => {}
            _ => return Err(Error::Unexpected("Ready").into()),
        }
        channel.send(&Message::Commit { paused_at_ns }, &[])?;
        Ok(HandoverTimes {
            state_saved_ms,
            committed_ms: (monotonic_ns() - paused_at_ns) as f64 / 1e6,
        })
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        if paused {
            vm.resume();
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
