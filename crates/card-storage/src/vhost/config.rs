//! The virtio-blk configuration space we present (virtio 1.2, 5.2.4).

use crate::blk::request::{MAX_RANGES, MAX_RANGE_BYTES, MAX_TRANSFER, VIRTIO_SECTOR};

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
    /// The configuration of a volume of `capacity` bytes.
    pub fn for_volume(capacity: u64, num_queues: u16) -> Self {
        let range_sectors = (MAX_RANGE_BYTES / VIRTIO_SECTOR) as u32;
        Self {
            capacity: capacity / VIRTIO_SECTOR,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: 4096,
            num_queues,
            max_discard_sectors: range_sectors,
            max_discard_seg: MAX_RANGES as u32,
            discard_sector_alignment: 4096 / VIRTIO_SECTOR as u32,
            max_write_zeroes_sectors: range_sectors,
            max_write_zeroes_seg: MAX_RANGES as u32,
            write_zeroes_may_unmap: 0,
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
