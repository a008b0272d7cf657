//! The virtio-blk configuration space we present (virtio 1.2, 5.2.4).
//!
//! WRITE_ZEROES limits depend on the volume, because the cost of zeroing does:
//! - plain: the store zeroes with one fallocate per extent piece, metadata work whatever the
//!   length, so one segment may cover [`MAX_WRITE_ZEROES_BYTES`] (the guest then sends a
//!   mkfs-sized zeroout as a few requests instead of thousands);
//! - encrypted: zeros must be encrypted and written like data, which the engine does one
//!   [`ZERO_CHUNK`] after the other within a request, so a request never holds more than one
//!   chunk of bounce buffer whatever its size. [`ENCRYPTED_WRITE_ZEROES_BYTES`] sits between
//!   two slow ends: one huge request is served strictly serially (encrypt a chunk, write it,
//!   wait, encrypt the next), and one-chunk requests pay the per-request cost once per MiB;
//!   with a few chunks per request and several requests in flight, encrypting one request's
//!   chunk overlaps another's write. (The parser accepts up to the plain limit from any
//!   driver: larger requests are only slower, never unsafe.)
//!
//! UNMAP is advertised for both: plain volumes punch holes for it, encrypted ones ignore it
//! (a hole would decrypt to garbage) and write encrypted zeros, which the flag allows.

use crate::blk::engine::ZERO_CHUNK;
use crate::blk::request::{
    MAX_DISCARD_BYTES, MAX_RANGES, MAX_TRANSFER, MAX_WRITE_ZEROES_BYTES, VIRTIO_SECTOR,
};

/// Largest WRITE_ZEROES segment advertised for an encrypted volume: 16 chunks.
pub const ENCRYPTED_WRITE_ZEROES_BYTES: u64 = 16 * ZERO_CHUNK as u64;

/// Largest guest segment; with [`SEG_MAX`] it bounds a request to [`MAX_TRANSFER`].
pub const SIZE_MAX: u32 = 64 * 1024;
/// Segments per request.
pub const SEG_MAX: u32 = (MAX_TRANSFER / SIZE_MAX as u64) as u32;

/// The fields we set; everything else reads as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

/// Length of the layout up to and including write_zeroes_may_unmap and its padding.
pub const CONFIG_LEN: usize = 60;

impl BlkConfig {
    /// The configuration of a volume of `capacity` bytes, `encrypted` or not.
    pub fn for_volume(capacity: u64, num_queues: u16, encrypted: bool) -> Self {
        let sectors = |bytes: u64| (bytes / VIRTIO_SECTOR) as u32;
        let zeroes_bytes = if encrypted {
            ENCRYPTED_WRITE_ZEROES_BYTES
        } else {
            MAX_WRITE_ZEROES_BYTES
        };
        Self {
            capacity: capacity / VIRTIO_SECTOR,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: 4096,
            num_queues,
            max_discard_sectors: sectors(MAX_DISCARD_BYTES),
            max_discard_seg: MAX_RANGES as u32,
            discard_sector_alignment: 4096 / VIRTIO_SECTOR as u32,
            max_write_zeroes_sectors: sectors(zeroes_bytes),
            max_write_zeroes_seg: MAX_RANGES as u32,
            write_zeroes_may_unmap: 1,
        }
    }

    /// The little-endian layout of struct virtio_blk_config.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20 geometry: unused.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // 24..32 topology: unused; 32 writeback, 33 unused.
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn write_zeroes_limits_follow_the_cost_of_zeroing() {
        let plain = BlkConfig::for_volume(8 << 20, 1, false).to_bytes();
        let crypt = BlkConfig::for_volume(8 << 20, 1, true).to_bytes();
        assert_eq!(plain.len(), CONFIG_LEN);
        for b in [&plain, &crypt] {
            // Discard: 1 MiB segments, 16 of them, 4 KiB aligned.
            assert_eq!(le32(b, 36), 2048);
            assert_eq!(le32(b, 40), 16);
            assert_eq!(le32(b, 44), 8);
            assert_eq!(le32(b, 52), 16, "write-zeroes segments");
            assert_eq!(b[56], 1, "write_zeroes_may_unmap");
        }
        // Plain: fallocate, 1 GiB per segment; encrypted: 16 chunks of encrypted zeros.
        assert_eq!(le32(&plain, 48), (1 << 30) / 512);
        assert_eq!(le32(&crypt, 48), (16 << 20) / 512);
        // Whatever a device advertises, the parser accepts.
        for b in [&plain, &crypt] {
            assert!(u64::from(le32(b, 48)) * VIRTIO_SECTOR <= MAX_WRITE_ZEROES_BYTES);
        }
        assert!(u64::from(le32(&plain, 36)) * VIRTIO_SECTOR <= MAX_DISCARD_BYTES);
    }
}
