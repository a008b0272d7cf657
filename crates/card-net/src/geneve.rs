//! Geneve (RFC 8926) encapsulation: the 8-byte base header, the option list, and the Outboard
//! option that every overlay packet between two cards carries.
//!
//! Wire format of the Outboard option (class [`OPTION_CLASS`], type [`OPTION_TYPE`], length 7
//! words, so 32 bytes with its option header):
//!
//! ```text
//!  0                   1                   2                   3
//! |         class 0xFFF0          |   type 0x01   |R R R| len = 7 |
//! |                  flow sequence number (per datagram)          |
//! |                            flow id                            |
//! |    path id    | echoed path id|  echo flags   | fragment flags|
//! |               transmit timestamp (µs, sender clock)           |
//! |   echoed timestamp (µs, peer's transmit time + hold time)    |
//! |              sender card's underlay address (IPv4)            |
//! |          path sequence number (per destination host and path) |
//! ```
//!
//! A path is FIFO, so a gap in the path sequence is a loss on that path: the receiver echoes
//! it back ([`ECHO_LOSS`]) and the sender's policy moves traffic away.
//!
//! The class is in the experimental range 0xFFF0-0xFFFF (RFC 8926 §7); the type has its
//! critical bit clear, so a Geneve endpoint that does not know it (the kernel's) ignores it.
//! An echoed timestamp of 0 means "nothing echoed".
//!
//! Large frames: a VM hands the card TCP segments of up to 64 KiB (TSO, with a virtio-net
//! header). The card keeps them whole inside the tunnel: such a frame travels as consecutive
//! datagrams (consecutive sequence numbers), each with a fragment of it, flagged
//! [`FRAG_MORE`] (more follow) and [`FRAG_CONT`] (not the first). The first datagram carries the
//! frame's offload metadata in a second, critical option (type [`OFFLOAD_TYPE`], 3 words):
//!
//! ```text
//! |         class 0xFFF0          |   type 0x82   |R R R| len = 3 |
//! |  vnet flags   |   gso type    |        header length          |
//! |           gso size            |         checksum start        |
//! |        checksum offset        |           reserved            |
//! ```
//!
//! Everything read from the wire is bounded: a bad packet is an [`Error`], never a panic.

/// UDP destination port of Geneve.
pub const PORT: u16 = 6081;
/// Protocol type of an inner Ethernet frame (Transparent Ethernet Bridging).
pub const PROTO_ETHERNET: u16 = 0x6558;
/// Our option class: the first of the experimental range.
pub const OPTION_CLASS: u16 = 0xFFF0;
/// Our option type (critical bit, 0x80, clear).
pub const OPTION_TYPE: u8 = 0x01;
/// Base header length.
pub const BASE_LEN: usize = 8;
/// Body length of our option (7 words).
pub const OPTION_BODY_LEN: usize = 28;
/// Header length as we build it: base header and our option.
pub const HEADER_LEN: usize = BASE_LEN + 4 + OPTION_BODY_LEN;
/// Type of the offload option (critical: a receiver that ignored it would hand the VM a
/// frame with an unfinished checksum).
pub const OFFLOAD_TYPE: u8 = 0x82;
/// Body length of the offload option (3 words).
pub const OFFLOAD_BODY_LEN: usize = 12;
/// Header length with the offload option too.
pub const HEADER_LEN_OFFLOAD: usize = HEADER_LEN + 4 + OFFLOAD_BODY_LEN;
/// Fragment flag: more datagrams of this frame follow.
pub const FRAG_MORE: u8 = 0x01;
/// Fragment flag: this datagram continues a frame (it is not the first).
pub const FRAG_CONT: u8 = 0x02;
/// Largest inner frame we accept (a 64 KiB GSO frame is the biggest thing a TAP hands us).
pub const MAX_FRAME: usize = 65535;
/// Echo flag: the echoed packet arrived with ECN CE set on its outer header.
pub const ECHO_CE: u8 = 0x01;
/// Echo flag: this OAM packet answers a probe (so it is not answered in turn).
pub const ECHO_PROBE_REPLY: u8 = 0x02;
/// Echo flag: datagrams sent on the echoed path were lost since the last such echo.
pub const ECHO_LOSS: u8 = 0x04;

/// A bad Geneve packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Truncated Geneve packet ({len} bytes, need {need})")]
    Truncated { len: usize, need: usize },
    #[error("Unsupported Geneve version {0}")]
    Version(u8),
    #[error("Geneve options run past the header")]
    OptionOverrun,
    #[error("Unknown critical Geneve option class {class:#06x} type {kind:#04x}")]
    CriticalOption { class: u16, kind: u8 },
    #[error("Malformed Outboard option (length {0} words)")]
    BadOption(u8),
    #[error("Unsupported inner protocol {0:#06x}")]
    Protocol(u16),
    #[error("Inner frame too large ({0} bytes)")]
    Oversized(usize),
    #[error("Malformed offload option (length {0} words)")]
    BadOffload(u8),
}

/// The Outboard option: per-flow sequence, path and timestamps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboardOption {
    /// Per (destination host, flow) sequence number, for the receiver's reorder buffer.
    pub seq: u32,
    /// Flow id (a bucket of the inner flow hash) the sequence belongs to.
    pub flow: u32,
    /// Path this packet was sent on.
    pub path: u8,
    /// Path of the packet whose timestamp is echoed.
    pub echo_path: u8,
    /// [`ECHO_CE`] and future flags about the echoed packet.
    pub echo_flags: u8,
    /// Sender's transmit time, µs (wrapping).
    pub tx_ts: u32,
    /// Peer's transmit time of an earlier packet plus how long we held it; 0 = none.
    pub echo_ts: u32,
    /// [`FRAG_MORE`] and [`FRAG_CONT`]; 0 for a frame in one datagram.
    pub frag: u8,
    /// Sender card's underlay address: names the sending host whichever path (source
    /// address) the datagram took, and for fragments that carry no inner header.
    pub sender: u32,
    /// Per (destination host, path) datagram counter: gaps are losses on the path.
    pub path_seq: u32,
}

/// Offload metadata of a frame (a virtio-net header's fields), carried by its first datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// A parsed Geneve packet, borrowing from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub vni: u32,
    /// O bit: a control packet (our probes and probe replies), no frame expected.
    pub oam: bool,
    pub option: Option<OutboardOption>,
    pub offload: Option<Offload>,
    /// The inner Ethernet frame, or a fragment of it (possibly empty for control packets).
    pub frame: &'a [u8],
}

/// Parses a Geneve datagram (the UDP payload).
pub fn parse(buf: &[u8]) -> Result<Packet<'_>, Error> {
    if buf.len() < BASE_LEN {
        return Err(Error::Truncated {
            len: buf.len(),
            need: BASE_LEN,
        });
    }
    let version = buf[0] >> 6;
    if version != 0 {
        return Err(Error::Version(version));
    }
    let opt_len = usize::from(buf[0] & 0x3f) * 4;
    let oam = buf[1] & 0x80 != 0;
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    let vni = u32::from_be_bytes([0, buf[4], buf[5], buf[6]]);
    let header_len = BASE_LEN + opt_len;
    if buf.len() < header_len {
        return Err(Error::Truncated {
            len: buf.len(),
            need: header_len,
        });
    }
    let (option, offload) = parse_options(&buf[BASE_LEN..header_len])?;
    if protocol != PROTO_ETHERNET {
        return Err(Error::Protocol(protocol));
    }
    let frame = &buf[header_len..];
    if frame.len() > MAX_FRAME {
        return Err(Error::Oversized(frame.len()));
    }
    Ok(Packet {
        vni,
        oam,
        option,
        offload,
        frame,
    })
}

type Options = (Option<OutboardOption>, Option<Offload>);

fn parse_options(mut opts: &[u8]) -> Result<Options, Error> {
    let mut ours = None;
    let mut offload = None;
    while !opts.is_empty() {
        if opts.len() < 4 {
            return Err(Error::OptionOverrun);
        }
        let class = u16::from_be_bytes([opts[0], opts[1]]);
        let kind = opts[2];
        let words = opts[3] & 0x1f;
        let len = 4 + usize::from(words) * 4;
        let body = opts.get(4..len).ok_or(Error::OptionOverrun)?;
        if class == OPTION_CLASS && kind == OPTION_TYPE {
            if body.len() != OPTION_BODY_LEN {
                return Err(Error::BadOption(words));
            }
            ours = Some(decode_option(body));
        } else if class == OPTION_CLASS && kind == OFFLOAD_TYPE {
            if body.len() != OFFLOAD_BODY_LEN {
                return Err(Error::BadOffload(words));
            }
            offload = Some(decode_offload(body));
        } else if kind & 0x80 != 0 {
            return Err(Error::CriticalOption { class, kind });
        }
        opts = &opts[len..];
    }
    Ok((ours, offload))
}

fn half(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn decode_offload(b: &[u8]) -> Offload {
    Offload {
        flags: b[0],
        gso_type: b[1],
        hdr_len: half(b, 2),
        gso_size: half(b, 4),
        csum_start: half(b, 6),
        csum_offset: half(b, 8),
    }
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn decode_option(b: &[u8]) -> OutboardOption {
    OutboardOption {
        seq: word(b, 0),
        flow: word(b, 4),
        path: b[8],
        echo_path: b[9],
        echo_flags: b[10],
        frag: b[11],
        tx_ts: word(b, 12),
        echo_ts: word(b, 16),
        sender: word(b, 20),
        path_seq: word(b, 24),
    }
}

/// Writes our header (base header and the Outboard option) into `out`.
pub fn write_header(out: &mut [u8; HEADER_LEN], vni: u32, oam: bool, opt: &OutboardOption) {
    write_base(out, vni, oam, (4 + OPTION_BODY_LEN) / 4, opt);
}

/// Appends our header to `out`, with the offload option when `offload` is given; returns
/// the header length.
pub fn push_header(
    out: &mut Vec<u8>,
    vni: u32,
    oam: bool,
    opt: &OutboardOption,
    offload: Option<&Offload>,
) -> usize {
    let at = out.len();
    let Some(o) = offload else {
        out.resize(at + HEADER_LEN, 0);
        write_base(&mut out[at..], vni, oam, (4 + OPTION_BODY_LEN) / 4, opt);
        return HEADER_LEN;
    };
    out.resize(at + HEADER_LEN_OFFLOAD, 0);
    let words = (8 + OPTION_BODY_LEN + OFFLOAD_BODY_LEN) / 4;
    write_base(&mut out[at..], vni, oam, words, opt);
    let b = &mut out[at + HEADER_LEN..at + HEADER_LEN_OFFLOAD];
    b[0..2].copy_from_slice(&OPTION_CLASS.to_be_bytes());
    b[2] = OFFLOAD_TYPE;
    b[3] = (OFFLOAD_BODY_LEN / 4) as u8;
    b[4] = o.flags;
    b[5] = o.gso_type;
    b[6..8].copy_from_slice(&o.hdr_len.to_be_bytes());
    b[8..10].copy_from_slice(&o.gso_size.to_be_bytes());
    b[10..12].copy_from_slice(&o.csum_start.to_be_bytes());
    b[12..14].copy_from_slice(&o.csum_offset.to_be_bytes());
    HEADER_LEN_OFFLOAD
}

/// The base header and our option into `out[..HEADER_LEN]`; `words` is the whole option area.
fn write_base(out: &mut [u8], vni: u32, oam: bool, words: usize, opt: &OutboardOption) {
    out[0] = words as u8; // version 0, option length in words
    out[1] = if oam { 0x80 } else { 0 };
    out[2..4].copy_from_slice(&PROTO_ETHERNET.to_be_bytes());
    out[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
    out[7] = 0;
    out[8..10].copy_from_slice(&OPTION_CLASS.to_be_bytes());
    out[10] = OPTION_TYPE;
    out[11] = (OPTION_BODY_LEN / 4) as u8;
    let b = &mut out[12..];
    b[0..4].copy_from_slice(&opt.seq.to_be_bytes());
    b[4..8].copy_from_slice(&opt.flow.to_be_bytes());
    b[8] = opt.path;
    b[9] = opt.echo_path;
    b[10] = opt.echo_flags;
    b[11] = opt.frag;
    b[12..16].copy_from_slice(&opt.tx_ts.to_be_bytes());
    b[16..20].copy_from_slice(&opt.echo_ts.to_be_bytes());
    b[20..24].copy_from_slice(&opt.sender.to_be_bytes());
    b[24..28].copy_from_slice(&opt.path_seq.to_be_bytes());
}

/// Encapsulates `frame` into a new datagram buffer.
pub fn encapsulate(vni: u32, oam: bool, opt: &OutboardOption, frame: &[u8], out: &mut Vec<u8>) {
    let mut hdr = [0u8; HEADER_LEN];
    write_header(&mut hdr, vni, oam, opt);
    out.clear();
    out.extend_from_slice(&hdr);
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OutboardOption {
        OutboardOption {
            seq: 0xdead_beef,
            flow: 77,
            path: 3,
            echo_path: 1,
            echo_flags: ECHO_CE,
            tx_ts: 123_456,
            echo_ts: 99,
            frag: FRAG_MORE,
            sender: 0x0a09_0001,
            path_seq: 0x1234_5678,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encapsulate(0x00ab_cdef, false, &sample(), b"frame-bytes", &mut buf);
        assert_eq!(buf.len(), HEADER_LEN + 11);
        let p = parse(&buf).unwrap();
        assert_eq!(p.vni, 0x00ab_cdef);
        assert!(!p.oam);
        assert_eq!(p.option, Some(sample()));
        assert_eq!(p.frame, b"frame-bytes");
    }

    #[test]
    fn offload_option_round_trip() {
        let off = Offload {
            flags: 1,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1348,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut buf = Vec::new();
        let hl = push_header(&mut buf, 9, false, &sample(), Some(&off));
        assert_eq!(hl, HEADER_LEN_OFFLOAD);
        buf.extend_from_slice(b"ab");
        let p = parse(&buf).unwrap();
        assert_eq!(
            (p.vni, p.option, p.offload, p.frame),
            (9, Some(sample()), Some(off), &b"ab"[..])
        );
        // Wrong length of the offload option.
        buf[HEADER_LEN + 3] = 2;
        assert!(parse(&buf).is_err());
        let mut plain = Vec::new();
        assert_eq!(
            push_header(&mut plain, 9, false, &sample(), None),
            HEADER_LEN
        );
        assert_eq!(parse(&plain).unwrap().offload, None);
    }

    #[test]
    fn oam_and_empty_frame() {
        let mut buf = Vec::new();
        encapsulate(5, true, &sample(), &[], &mut buf);
        let p = parse(&buf).unwrap();
        assert!(p.oam);
        assert!(p.frame.is_empty());
    }

    #[test]
    fn foreign_options_skipped_and_ours_found_after_them() {
        // Base header with 3 words of options: a foreign non-critical 1-word option, then...
        let mut buf = vec![0u8; 8];
        buf[2..4].copy_from_slice(&PROTO_ETHERNET.to_be_bytes());
        buf.extend_from_slice(&[0x01, 0x02, 0x03, 0x01, 9, 9, 9, 9]);
        let mut ours = [0u8; HEADER_LEN];
        write_header(&mut ours, 0, false, &sample());
        buf.extend_from_slice(&ours[8..]);
        buf[0] = ((buf.len() - 8) / 4) as u8;
        buf.extend_from_slice(b"x");
        let p = parse(&buf).unwrap();
        assert_eq!(p.option, Some(sample()));
        assert_eq!(p.frame, b"x");
    }

    #[test]
    fn hostile_input_is_an_error() {
        let mut good = Vec::new();
        encapsulate(1, false, &sample(), b"abc", &mut good);
        for len in 0..HEADER_LEN {
            assert!(matches!(parse(&good[..len]), Err(Error::Truncated { .. })));
        }
        let mut v = good.clone();
        v[0] |= 0x40;
        assert_eq!(parse(&v), Err(Error::Version(1)));
        // Option length word claims more than the option area holds.
        let mut v = good.clone();
        v[11] = 0x1f;
        assert_eq!(parse(&v), Err(Error::OptionOverrun));
        // Our option with the wrong length, fitting inside the area.
        let mut v = good.clone();
        v[11] = 1;
        assert!(parse(&v).is_err());
        // Unknown critical option.
        let mut v = good.clone();
        v[10] = 0x81;
        v[8] = 0x12;
        assert!(matches!(parse(&v), Err(Error::CriticalOption { .. })));
        // Not Ethernet inside.
        let mut v = good.clone();
        v[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse(&v), Err(Error::Protocol(0x0800)));
        // Oversized.
        let mut v = good.clone();
        v.resize(HEADER_LEN + MAX_FRAME + 1, 0);
        assert_eq!(parse(&v), Err(Error::Oversized(MAX_FRAME + 1)));
        // Option area of 3 bytes left over (opt len 1 word, option header of 4 bytes needs body).
        let mut v = vec![0u8; 12];
        v[0] = 1;
        v[2..4].copy_from_slice(&PROTO_ETHERNET.to_be_bytes());
        v[11] = 2;
        assert_eq!(parse(&v), Err(Error::OptionOverrun));
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut buf = [0u8; 96];
        for _ in 0..200_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            buf[0] &= 0x3f; // mostly version 0 to reach the option parser
            let len = (x % 97) as usize;
            let _ = parse(&buf[..len]);
        }
    }
}
