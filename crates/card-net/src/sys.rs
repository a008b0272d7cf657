//! The unsafe corner of card networking: opening a TAP device (`TUNSETIFF`, with the
//! virtio-net header and offloads), batched UDP I/O (`sendmmsg`/`recvmmsg`, with UDP GSO
//! trains and GRO) and entering a network namespace (`setns`). Everything else in the crate is
//! safe code over these wrappers.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// A system call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("Cannot create TAP device {name:?}")]
    CreateTap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP name {0:?} is empty, too long or not plain ASCII")]
    TapName(String),
    #[error("Cannot enable offloads on TAP device {name:?}")]
    TapOffload {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open network namespace {name:?}")]
    OpenNetns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot enter network namespace {name:?}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `SOL_UDP` options (not in the libc crate for glibc targets).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one UDP GSO send may carry (a UDP length is 16 bits).
pub const GSO_MAX_BYTES: usize = 65_000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device: one Ethernet frame per read or write, no packet-info prefix, non-blocking;
/// with `vnet_hdr`, each frame is preceded by a [`crate::vnet::VnetHdr`].
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tap {
    /// Creates (or attaches to) TAP `name` in the calling thread's network namespace. With
    /// `vnet_hdr`, frames carry a virtio-net header and the TAP offers checksum and TCP
    /// segmentation offload, so the kernel hands over (and accepts) 64 KiB TCP segments.
    pub fn open(name: &str, vnet_hdr: bool) -> Result<Self, Error> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::TapName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | if vnet_hdr { libc::IFF_VNET_HDR } else { 0 })
                as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `IfReq` has its layout (16-byte
        // name, short flags, padded to 40 bytes) and lives for the whole call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(Error::CreateTap {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        if vnet_hdr {
            let hdr_len = crate::vnet::LEN as libc::c_int;
            let offloads =
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
            // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, valid for the call.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
            // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours.
            let rc2 = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) };
            if rc < 0 || rc2 < 0 {
                return Err(Error::TapOffload {
                    name,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(Self {
            file,
            name,
            vnet_hdr,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when frames carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (pointers and integers); all-zero is its documented empty value.
    unsafe { std::mem::zeroed() }
}

/// One message of a [`send_batch`]: a datagram, or with `segment > 0` a UDP GSO train that
/// the kernel cuts into datagrams of `segment` bytes (the last may be shorter).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub to: SocketAddrV4,
    pub data: &'a [u8],
    pub segment: u16,
}

/// Room for one control message with a u16 or int payload (CMSG_SPACE(4) on 64-bit).
const CMSG_ROOM: usize = 24;

/// A `UDP_SEGMENT` control message, laid out as `struct cmsghdr` + u16 (built from bytes, so
/// no pointer arithmetic); 8-byte aligned as the kernel expects.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SegmentCmsg([u8; CMSG_ROOM]);

impl SegmentCmsg {
    fn new(segment: u16) -> Self {
        const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
        let mut b = [0u8; CMSG_ROOM];
        b[..8].copy_from_slice(&(HDR + 2).to_ne_bytes());
        b[8..12].copy_from_slice(&SOL_UDP.to_ne_bytes());
        b[12..16].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
        b[HDR..HDR + 2].copy_from_slice(&segment.to_ne_bytes());
        Self(b)
    }
}

/// Sends `msgs` on `sock` with one `sendmmsg`; returns how many messages went.
pub fn send_batch(sock: &UdpSocket, msgs: &[Outgoing<'_>]) -> io::Result<usize> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let mut addrs: Vec<libc::sockaddr_in> = msgs.iter().map(|m| sockaddr(m.to)).collect();
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|m| libc::iovec {
            iov_base: m.data.as_ptr() as *mut libc::c_void,
            iov_len: m.data.len(),
        })
        .collect();
    let mut cmsgs: Vec<SegmentCmsg> = msgs.iter().map(|m| SegmentCmsg::new(m.segment)).collect();
    let mut hdrs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .zip(cmsgs.iter_mut().zip(msgs))
        .map(|((a, iov), (c, m))| {
            let mut h = zeroed_msghdr();
            h.msg_name = (a as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            if m.segment > 0 {
                h.msg_control = c.0.as_mut_ptr().cast();
                h.msg_controllen = CMSG_ROOM;
            }
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every header points at an address, an iovec and maybe a control message in
    // `addrs`/`iovs`/`cmsgs`, and each iovec at a caller's slice; all outlive the call and the
    // kernel only reads them.
    let n = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What `recv_batch` learnt about one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Payload length; 0 for a datagram larger than its buffer (so it fails to parse).
    pub len: usize,
    pub src: SocketAddrV4,
    /// Outer IPv4 TOS byte (ECN in the low two bits) when the socket has [`enable_ecn`].
    pub tos: u8,
    /// With [`enable_gro`]: the buffer holds datagrams of this size back to back (the last
    /// may be shorter); 0 when it holds one datagram.
    pub segment: usize,
}

/// Control-message room per datagram (IP_TOS and UDP_GRO messages with their headers).
const CONTROL_LEN: usize = 64;

/// Receives up to `bufs.len()` datagrams with one non-blocking `recvmmsg`; fills `meta` with
/// one entry per datagram and returns the count (0 when nothing is waiting).
pub fn recv_batch(
    sock: &UdpSocket,
    bufs: &mut [Vec<u8>],
    meta: &mut Vec<RecvMeta>,
) -> io::Result<usize> {
    meta.clear();
    let mut addrs = vec![sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); bufs.len()];
    let mut controls = vec![[0u8; CONTROL_LEN]; bufs.len()];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .zip(controls.iter_mut())
        .map(|((a, iov), c)| {
            let mut h = zeroed_msghdr();
            h.msg_name = (a as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h.msg_control = c.as_mut_ptr().cast();
            h.msg_controllen = CONTROL_LEN;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: each header points at an address slot, a control buffer of CONTROL_LEN bytes and an iovec covering a distinct caller
    // buffer of `iov_len` bytes; all outlive the call, which writes only within them.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    for ((h, a), c) in hdrs.iter().zip(&addrs).zip(&controls).take(n as usize) {
        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let control = &c[..h.msg_hdr.msg_controllen.min(CONTROL_LEN)];
        meta.push(RecvMeta {
            len: if truncated { 0 } else { h.msg_len as usize },
            src: SocketAddrV4::new(ip, u16::from_be(a.sin_port)),
            tos: find_control(control, libc::IPPROTO_IP, libc::IP_TOS)
                .and_then(|d| d.first().copied())
                .unwrap_or(0),
            segment: find_control(control, SOL_UDP, UDP_GRO)
                .and_then(|d| Some(i32::from_ne_bytes(d.get(..4)?.try_into().ok()?)))
                .map_or(0, |s| s.max(0) as usize),
        });
    }
    Ok(meta.len())
}

/// Finds the data of control message (`want_level`, `want_kind`) among those the kernel wrote
/// (read as bytes with bounds checks, so no pointer walking).
fn find_control(control: &[u8], want_level: i32, want_kind: i32) -> Option<&[u8]> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut off = 0;
    while off + HDR <= control.len() {
        let word = |at: usize, n: usize| control.get(off + at..off + at + n);
        let len = usize::from_ne_bytes(word(0, ALIGN)?.try_into().ok()?);
        let level = i32::from_ne_bytes(word(ALIGN, 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(word(ALIGN + 4, 4)?.try_into().ok()?);
        if len < HDR || off + len > control.len() {
            return None;
        }
        if level == want_level && kind == want_kind && len > HDR {
            return Some(&control[off + HDR..off + len]);
        }
        off += len.div_ceil(ALIGN) * ALIGN;
    }
    None
}

/// Marks outgoing datagrams ECN-capable (ECT(0)) and asks for each received datagram's TOS,
/// so a CE mark set by a congested underlay queue reaches the path policy.
pub fn enable_ecn(sock: &UdpSocket) -> io::Result<()> {
    setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_TOS, 0x02)?;
    setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)
}

/// Asks the kernel to coalesce received datagrams of one sender into GRO trains
/// ([`RecvMeta::segment`]): one receive per train instead of per datagram.
pub fn enable_gro(sock: &UdpSocket) -> io::Result<()> {
    setsockopt_int(sock, SOL_UDP, UDP_GRO, 1)
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns readiness per fd.
pub fn poll_readable(fds: &[i32], timeout_ms: i32, ready: &mut Vec<bool>) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the whole call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    ready.clear();
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            ready.resize(fds.len(), false);
            return Ok(());
        }
        return Err(e);
    }
    ready.extend(pfds.iter().map(|p| p.revents != 0));
    Ok(())
}

/// Asks for `bytes` of socket receive and send buffer; as root past `rmem_max`/`wmem_max`
/// (`SO_*BUFFORCE`), else up to them. A sprayed burst must not overflow the receive queue.
pub fn set_buffers(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(sock, libc::SOL_SOCKET, force, val).is_err() {
            setsockopt_int(sock, libc::SOL_SOCKET, plain, val)?;
        }
    }
    Ok(())
}

fn setsockopt_int(
    sock: &UdpSocket,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int on our stack, valid for the call, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into network namespace `name` (a file under /var/run/netns, as
/// made by `ip netns add`). Sockets and TAPs it opens afterwards belong to that namespace.
pub fn enter_netns(name: &str) -> Result<(), Error> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).map_err(|source| Error::OpenNetns {
        name: name.to_owned(),
        source,
    })?;
    let fd = OwnedFd::from(file);
    // SAFETY: `fd` is an open namespace file for the whole call; setns changes only this
    // thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(Error::Setns {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(to: SocketAddrV4, data: &[u8]) -> Outgoing<'_> {
        Outgoing {
            to,
            data,
            segment: 0,
        }
    }

    fn v4(a: std::net::SocketAddr) -> SocketAddrV4 {
        match a {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn gso_train_arrives_as_datagrams_or_one_gro_train() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // 3 datagrams of 1000 bytes and one of 10, each starting with its index.
        let mut train = vec![0u8; 3010];
        for i in 0..4 {
            train[i * 1000] = i as u8 + 1;
        }
        for gro in [false, true] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            if gro {
                enable_gro(&rx).unwrap();
            }
            let to = v4(rx.local_addr().unwrap());
            let msg = Outgoing {
                to,
                data: &train,
                segment: 1000,
            };
            assert_eq!(send_batch(&tx, &[msg]).unwrap(), 1);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut bufs = vec![vec![0u8; 65536]; 8];
            let mut meta = Vec::new();
            let n = recv_batch(&rx, &mut bufs, &mut meta).unwrap();
            let mut firsts = Vec::new();
            for (b, m) in bufs.iter().zip(&meta).take(n) {
                let seg = if m.segment == 0 { m.len } else { m.segment };
                firsts.extend(b[..m.len].chunks(seg).map(|d| (d[0], d.len())));
            }
            assert_eq!(
                firsts,
                vec![(1, 1000), (2, 1000), (3, 1000), (4, 10)],
                "gro={gro}"
            );
            if !gro {
                assert_eq!(n, 4);
            }
        }
    }

    #[test]
    fn batch_round_trip_reports_source_and_ecn() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_ecn(&rx).unwrap();
        enable_ecn(&tx).unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let big = [7u8; 100];
        assert_eq!(
            send_batch(&tx, &[one(to, b"one"), one(to, b"two"), one(to, &big)]).unwrap(),
            3
        );
        let mut bufs = vec![vec![0u8; 64]; 4];
        let mut meta = Vec::new();
        let mut got = 0;
        for _ in 0..100 {
            got += recv_batch(&rx, &mut bufs[got..], &mut meta).unwrap();
            if got == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 3);
        assert_eq!(&bufs[0][..3], b"one");
        assert_eq!(
            meta.last().unwrap().len,
            0,
            "oversized datagram reported as length 0"
        );
        assert_eq!(
            meta.last().unwrap().src,
            match tx.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                other => panic!("{other}"),
            }
        );
        assert_eq!(meta.last().unwrap().tos & 3, 2, "ECT(0) seen on receive");
        // A CE-marked datagram (what a congested queue would turn ECT into).
        setsockopt_int(&tx, libc::IPPROTO_IP, libc::IP_TOS, 0x03).unwrap();
        send_batch(&tx, &[one(to, b"ce")]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv_batch(&rx, &mut bufs, &mut meta).unwrap(), 1);
        assert_eq!(meta[0].tos & 3, 3);
        assert_eq!(recv_batch(&rx, &mut bufs, &mut meta).unwrap(), 0);
    }

    #[test]
    fn control_parsing_is_bounded() {
        let tos = |c: &[u8]| {
            find_control(c, libc::IPPROTO_IP, libc::IP_TOS).and_then(|d| d.first().copied())
        };
        assert_eq!(tos(&[]), None);
        assert_eq!(tos(&[0xff; 40]), None);
        let mut c = vec![0u8; 24];
        c[..8].copy_from_slice(&17usize.to_ne_bytes());
        c[8..12].copy_from_slice(&libc::IPPROTO_IP.to_ne_bytes());
        c[12..16].copy_from_slice(&libc::IP_TOS.to_ne_bytes());
        c[16] = 3;
        assert_eq!(tos(&c), Some(3));
        assert_eq!(tos(&c[..16]), None);
    }

    #[test]
    fn bad_tap_names_rejected() {
        for name in ["", "x".repeat(16).as_str(), "tap 0", "tap\u{e9}"] {
            assert!(
                matches!(Tap::open(name, true), Err(Error::TapName(_))),
                "{name:?}"
            );
        }
    }
}
