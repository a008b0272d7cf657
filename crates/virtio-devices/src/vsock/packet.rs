//! virtio-vsock packets (virtio 1.2 §5.10.6): the 44-byte little-endian header, and moving
//! packets between descriptor chains and host buffers. Everything read here comes from the
//! guest and is checked: lengths are bounded and a chain too short is an error, not a panic.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const HDR_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
pub const TYPE_STREAM: u16 = 1;
pub const HOST_CID: u64 = 2;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Errors of reading a packet from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Descriptor chain holds {0} readable bytes, less than a header")]
    ShortHeader(usize),
    #[error("Packet payload of {len} bytes exceeds the chain or the limit")]
    BadLength { len: u32 },
    #[error("Guest memory access failed")]
    Memory,
}

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A descriptor: guest address, length, whether the device writes it.
pub type Segment = (u64, u32, bool);

/// Reads a TX packet (header and payload) from the chain's readable segments.
pub fn read_packet<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
) -> Result<(Header, Vec<u8>), Error> {
    let readable: usize = segments.iter().filter(|s| !s.2).map(|s| s.1 as usize).sum();
    if readable < HDR_LEN {
        return Err(Error::ShortHeader(readable));
    }
    let mut bytes = Vec::with_capacity(readable.min(HDR_LEN + MAX_PAYLOAD));
    for (addr, len, write) in segments {
        if *write || bytes.len() >= HDR_LEN + MAX_PAYLOAD {
            continue;
        }
        let take = (*len as usize).min(HDR_LEN + MAX_PAYLOAD - bytes.len());
        let start = bytes.len();
        bytes.resize(start + take, 0);
        mem.read_slice(&mut bytes[start..], GuestAddress(*addr))
            .map_err(|_| Error::Memory)?;
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr.copy_from_slice(&bytes[..HDR_LEN]);
    let header = Header::parse(&hdr);
    let len = header.len as usize;
    if len > MAX_PAYLOAD || HDR_LEN + len > bytes.len() {
        return Err(Error::BadLength { len: header.len });
    }
    Ok((header, bytes[HDR_LEN..HDR_LEN + len].to_vec()))
}

/// Room for payload in an RX chain (writable bytes less the header), capped at the limit.
pub fn rx_capacity(segments: &[Segment]) -> usize {
    let writable: usize = segments.iter().filter(|s| s.2).map(|s| s.1 as usize).sum();
    writable.saturating_sub(HDR_LEN).min(MAX_PAYLOAD)
}

/// Writes header and payload into the chain's writable segments; returns bytes written.
pub fn write_packet<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    header: &Header,
    payload: &[u8],
) -> Result<u32, Error> {
    let mut data = header.bytes().to_vec();
    data.extend_from_slice(payload);
    let mut off = 0;
    for (addr, len, write) in segments {
        if !*write || off == data.len() {
            continue;
        }
        let n = (*len as usize).min(data.len() - off);
        mem.write_slice(&data[off..off + n], GuestAddress(*addr))
            .map_err(|_| Error::Memory)?;
        off += n;
    }
    if off < data.len() {
        return Err(Error::BadLength {
            len: payload.len() as u32,
        });
    }
    Ok(off as u32)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
    }

    #[test]
    fn packet_split_across_descriptors() {
        let m = mem();
        let h = Header {
            len: 6,
            op: OP_RW,
            ..Default::default()
        };
        let segs = [(0x100, 20, true), (0x1000, 20, true), (0x2000, 100, true)];
        assert_eq!(rx_capacity(&segs), 96);
        assert_eq!(write_packet(&m, &segs, &h, b"abcdef").unwrap(), 50);
        let ro: Vec<Segment> = segs.iter().map(|s| (s.0, s.1, false)).collect();
        let (got, payload) = read_packet(&m, &ro).unwrap();
        assert_eq!((got, payload.as_slice()), (h, &b"abcdef"[..]));
    }

    #[test]
    fn hostile_packets_are_refused() {
        let m = mem();
        assert_eq!(
            read_packet(&m, &[(0, 43, false)]),
            Err(Error::ShortHeader(43))
        );
        let h = Header {
            len: 100,
            ..Default::default()
        };
        m.write_slice(&h.bytes(), GuestAddress(0)).unwrap();
        assert_eq!(
            read_packet(&m, &[(0, 60, false)]),
            Err(Error::BadLength { len: 100 })
        );
        let h = Header {
            len: u32::MAX,
            ..Default::default()
        };
        m.write_slice(&h.bytes(), GuestAddress(0)).unwrap();
        assert!(read_packet(&m, &[(0, u32::MAX, false)]).is_err());
        assert_eq!(read_packet(&m, &[(0xfff0, 64, false)]), Err(Error::Memory));
        assert!(write_packet(&m, &[(0, 50, true)], &Header::default(), &[0; 10]).is_err());
    }
}
