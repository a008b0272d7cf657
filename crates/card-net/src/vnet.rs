//! The virtio-net header (`struct virtio_net_hdr`, virtio 1.x §5.1.6) that a TAP opened with
//! `IFF_VNET_HDR` puts before every frame: checksum and segmentation offload metadata. The
//! card reads it with each frame a VM sends and writes it with each frame it delivers, so
//! 64 KiB TCP segments cross the overlay whole and no checksum is computed in software.
//!
//! The TAP uses the host's byte order (little-endian here, as virtio 1.x), which is what
//! [`VnetHdr::parse`] and [`VnetHdr::write`] use; on the wire the fields travel in the Geneve
//! offload option ([`geneve::Offload`], big-endian).

use crate::geneve;

/// Length of the header we ask the TAP for (the legacy 10-byte layout).
pub const LEN: usize = 10;
/// `flags`: the checksum from `csum_start` on is still to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the segments carry ECN CWR on the first only.
pub const GSO_ECN: u8 = 0x80;

/// A virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `buf`; `None` when it is shorter than [`LEN`].
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let b = buf.get(..LEN)?;
        let h = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: h(2),
            gso_size: h(4),
            csum_start: h(6),
            csum_offset: h(8),
        })
    }

    pub fn write(&self, out: &mut [u8; LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// True when the frame needs nothing from its receiver (no checksum, no segmentation).
    pub fn is_plain(&self) -> bool {
        self.flags == 0 && self.gso_type == GSO_NONE
    }

    /// Checks the header against its frame, as a receiving kernel would: a peer is as hostile
    /// as a VM, and the TAP rejects (or a guest driver mishandles) an inconsistent header.
    pub fn valid_for(&self, frame_len: usize) -> bool {
        let known = matches!(
            self.gso_type & !GSO_ECN,
            GSO_NONE | GSO_TCPV4 | GSO_UDP | GSO_TCPV6
        );
        let csum_ok = self.flags & F_NEEDS_CSUM == 0
            || usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 <= frame_len;
        let gso_ok = self.gso_type == GSO_NONE || self.gso_size > 0;
        known && self.flags & !F_NEEDS_CSUM == 0 && csum_ok && gso_ok
    }
}

impl From<VnetHdr> for geneve::Offload {
    fn from(h: VnetHdr) -> Self {
        Self {
            flags: h.flags,
            gso_type: h.gso_type,
            hdr_len: h.hdr_len,
            gso_size: h.gso_size,
            csum_start: h.csum_start,
            csum_offset: h.csum_offset,
        }
    }
}

impl From<geneve::Offload> for VnetHdr {
    fn from(o: geneve::Offload) -> Self {
        Self {
            flags: o.flags,
            gso_type: o.gso_type,
            hdr_len: o.hdr_len,
            gso_size: o.gso_size,
            csum_start: o.csum_start,
            csum_offset: o.csum_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1348,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; LEN];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
        assert!(h.valid_for(60_000));
        assert!(!h.valid_for(40), "checksum field past the frame");
        assert!(!VnetHdr { gso_size: 0, ..h }.valid_for(60_000));
        assert!(!VnetHdr { gso_type: 9, ..h }.valid_for(60_000));
        assert!(!VnetHdr { flags: 4, ..h }.valid_for(60_000));
        assert!(VnetHdr::default().is_plain() && VnetHdr::default().valid_for(0));
        let o: geneve::Offload = h.into();
        assert_eq!(VnetHdr::from(o), h);
    }
}
