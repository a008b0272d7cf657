//! A relay between the front end and the vhost-user daemon that repairs one front-end quirk.
//!
//! QEMU 7.2's vhost-user-net negotiates the protocol features (GET/SET_PROTOCOL_FEATURES) but
//! then sends SET_VRING_ENABLE before any SET_FEATURES, and leaves
//! `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30) out of its SET_FEATURES, which the vhost-user spec
//! later made explicit; vhost-user-backend refuses such a SET_VRING_ENABLE and drops the
//! connection. A front end that sent SET_PROTOCOL_FEATURES has negotiated that bit, so the relay
//! sets it in SET_FEATURES, and sends a SET_FEATURES of just that bit (no reply asked) before a
//! SET_VRING_ENABLE that comes first. Every other message, and every reply, passes unchanged
//! with its descriptors.
//!
//! ```text
//!  front end ══ socket ══► relay ── SET_FEATURES (+bit 30 after SET_PROTOCOL_FEATURES) ──►
//!      ▲                                   everything else as is ──► VhostUserDaemon (private)
//!      └───────────────────── replies as is ◄──────────────────────────────┘
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, no reply asked.
const VERSION: u32 = 0x1;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const HDR: usize = 12;
/// Far above any message a net device needs (a 509-region memory table is ~16 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_FDS: usize = 32;

/// One whole message: header, payload and the descriptors that came with it.
struct Msg {
    bytes: Vec<u8>,
    files: Vec<File>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
}

fn recv(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR];
    let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR,
    }];
    // SAFETY: the iovec covers `hdr`, borrowed mutably for the call; any bytes may land there.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg just installed these descriptors for us; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = s;
    if n < HDR {
        r.read_exact(&mut hdr[n..])?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!(
            "Oversized vhost-user message ({size} bytes)"
        )));
    }
    let mut bytes = hdr.to_vec();
    bytes.resize(HDR + size, 0);
    r.read_exact(&mut bytes[HDR..])?;
    Ok(Some(Msg { bytes, files }))
}

fn send(s: &UnixStream, msg: &Msg) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = s
        .send_with_fds(&[&msg.bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < msg.bytes.len() {
        (&*s).write_all(&msg.bytes[sent..])?;
    }
    Ok(())
}

/// Sets bit 30 in a SET_FEATURES message once the front end negotiated protocol features.
fn repair(msg: &mut Msg, protocol_negotiated: bool) {
    if msg.request() != SET_FEATURES || !protocol_negotiated || msg.bytes.len() != HDR + 8 {
        return;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&msg.bytes[HDR..]);
    let features = u64::from_le_bytes(v) | PROTOCOL_FEATURES_BIT;
    msg.bytes[HDR..].copy_from_slice(&features.to_le_bytes());
}

/// SET_FEATURES with only `VHOST_USER_F_PROTOCOL_FEATURES`, asking no reply.
fn protocol_features_only() -> Msg {
    let mut bytes = SET_FEATURES.to_le_bytes().to_vec();
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&PROTOCOL_FEATURES_BIT.to_le_bytes());
    Msg {
        bytes,
        files: Vec::new(),
    }
}

fn requests(front: &UnixStream, inner: &UnixStream) -> io::Result<()> {
    let (mut protocol_negotiated, mut features_set) = (false, false);
    while let Some(mut msg) = recv(front)? {
        match msg.request() {
            SET_PROTOCOL_FEATURES => protocol_negotiated = true,
            SET_FEATURES => features_set = true,
            SET_VRING_ENABLE if protocol_negotiated && !features_set => {
                send(inner, &protocol_features_only())?;
                features_set = true;
            }
            _ => {}
        }
        repair(&mut msg, protocol_negotiated);
        send(inner, &msg)?;
    }
    Ok(())
}

fn replies(inner: &UnixStream, front: &UnixStream) -> io::Result<()> {
    while let Some(msg) = recv(inner)? {
        send(front, &msg)?;
    }
    Ok(())
}

/// The relay's two threads; closing either side closes both.
pub(super) struct Relay {
    threads: [JoinHandle<()>; 2],
    front: UnixStream,
}

impl Relay {
    pub(super) fn spawn(front: UnixStream, inner: UnixStream) -> io::Result<Relay> {
        let handle = front.try_clone()?;
        let (f1, i1) = (front.try_clone()?, inner.try_clone()?);
        let up = std::thread::Builder::new()
            .name("vport-relay-req".into())
            .spawn(move || {
                if let Err(e) = requests(&f1, &i1) {
                    log::debug!("vhost-user-net front end ended: {e}");
                }
                let _ = i1.shutdown(Shutdown::Both);
                let _ = f1.shutdown(Shutdown::Both);
            })?;
        let down = std::thread::Builder::new()
            .name("vport-relay-rep".into())
            .spawn(move || {
                let _ = replies(&inner, &front);
                let _ = inner.shutdown(Shutdown::Both);
                let _ = front.shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            threads: [up, down],
            front: handle,
        })
    }

    /// Closes the front end's connection and waits for both threads.
    pub(super) fn close(self) {
        let _ = self.front.shutdown(Shutdown::Both);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, payload: &[u8]) -> Msg {
        let mut bytes = request.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Msg {
            bytes,
            files: Vec::new(),
        }
    }

    #[test]
    fn set_features_gains_bit_30_only_after_protocol_negotiation() {
        let features = (1u64 << 32) | 1;
        let mut before = msg(SET_FEATURES, &features.to_le_bytes());
        repair(&mut before, false);
        assert_eq!(before.bytes[HDR..], features.to_le_bytes());
        let mut after = msg(SET_FEATURES, &features.to_le_bytes());
        repair(&mut after, true);
        assert_eq!(
            after.bytes[HDR..],
            (features | PROTOCOL_FEATURES_BIT).to_le_bytes()
        );
        // Other requests and malformed SET_FEATURES pass untouched.
        let mut other = msg(SET_PROTOCOL_FEATURES, &features.to_le_bytes());
        repair(&mut other, true);
        assert_eq!(other.bytes[HDR..], features.to_le_bytes());
        let mut short = msg(SET_FEATURES, &[1, 2, 3]);
        repair(&mut short, true);
        assert_eq!(short.bytes[HDR..], [1, 2, 3]);
    }

    #[test]
    fn messages_cross_with_their_descriptors_and_oversized_ones_fail() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile_like();
        let mut m = msg(5, &[9; 40]);
        m.files.push(file);
        send(&a, &m).unwrap();
        let got = recv(&b).unwrap().unwrap();
        assert_eq!(got.bytes, m.bytes);
        assert_eq!(got.files.len(), 1);
        let mut huge = msg(5, &[]);
        huge.bytes[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&a).write_all(&huge.bytes).unwrap();
        assert!(recv(&b).is_err());
        drop(a);
        // A closed peer is the end, not an error.
        let (c, d) = UnixStream::pair().unwrap();
        drop(c);
        assert!(recv(&d).unwrap().is_none());
    }

    fn tempfile_like() -> File {
        File::open("/dev/null").unwrap()
    }
}
