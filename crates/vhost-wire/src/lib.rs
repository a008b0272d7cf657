//! Whole vhost-user messages (header, payload and the descriptors sent with them), read from
//! and written to a Unix socket. The card puts small relays between a front end and an
//! unmodified rust-vmm `VhostUserDaemon` (card-storage: the in-flight messages the daemon lacks;
//! card-net: a QEMU negotiation quirk); this is what they are built from. The VMM's vhost-user
//! disks read their backend request channel (CONFIG_CHANGE_MSG) with it too.
//!
//! A message is `request: u32, flags: u32, size: u32` (little-endian) then `size` bytes;
//! descriptors travel as SCM_RIGHTS with the header's bytes. A payload above [`MAX_PAYLOAD`] is
//! refused rather than read, so a hostile peer cannot make a relay allocate at will.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Header bytes.
pub const HDR: usize = 12;
/// Header flags: protocol version 1, a reply, a reply asked for.
pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;
/// Far above any request the card supports (a memory table of 509 regions is ~16 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most descriptors taken with one message; the kernel closes any beyond.
pub const MAX_FDS: usize = 32;

/// One whole message.
#[derive(Debug)]
pub struct Message {
    /// Header and payload.
    pub bytes: Vec<u8>,
    pub files: Vec<File>,
}

impl Message {
    /// A message of `request` with `flags` and `payload`, no descriptors.
    pub fn new(request: u32, flags: u32, payload: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(HDR + payload.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Self {
            bytes,
            files: Vec::new(),
        }
    }

    pub fn request(&self) -> u32 {
        self.word(0)
    }

    pub fn flags(&self) -> u32 {
        self.word(4)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[HDR..]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[HDR..]
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }
}

/// The next message on `s`; `None` when the peer closed the connection.
pub fn recv(s: &UnixStream) -> io::Result<Option<Message>> {
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
    Ok(Some(Message { bytes, files }))
}

/// Writes `msg` to `s`, its descriptors with the first bytes.
pub fn send(s: &UnixStream, msg: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = s
        .send_with_fds(&[&msg.bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < msg.bytes.len() {
        (&*s).write_all(&msg.bytes[sent..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_with_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut m = Message::new(5, VERSION | NEED_REPLY, &[9; 40]);
        m.files.push(File::open("/dev/null").unwrap());
        send(&a, &m).unwrap();
        let got = recv(&b).unwrap().unwrap();
        assert_eq!(got.bytes, m.bytes);
        assert_eq!((got.request(), got.flags()), (5, VERSION | NEED_REPLY));
        assert_eq!(got.payload(), &[9; 40]);
        assert_eq!(got.files.len(), 1);
    }

    #[test]
    fn oversized_and_truncated_messages_fail_and_a_close_ends() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut huge = Message::new(5, VERSION, &[]);
        huge.bytes[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&a).write_all(&huge.bytes).unwrap();
        assert!(recv(&b).is_err());
        let (c, d) = UnixStream::pair().unwrap();
        // A payload promised but cut short by the close.
        (&c).write_all(&Message::new(5, VERSION, &[1; 8]).bytes[..15])
            .unwrap();
        drop(c);
        assert!(recv(&d).is_err());
        let (e, f) = UnixStream::pair().unwrap();
        drop(e);
        assert!(recv(&f).unwrap().is_none());
    }
}
