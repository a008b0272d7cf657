//! The data the block commands write: every 8-byte word of a block is a function of (seed,
//! sector, word), so a reader that knows the seed can verify any block alone, and a block written
//! to the wrong sector or with another seed never verifies. The first two words name the sector
//! and seed in clear, which makes a mismatch readable in a hex dump of the backing file.

/// A mismatch found by [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte offset of the first differing word in the block.
    pub offset: usize,
    pub expected: u64,
    pub found: u64,
}

/// Word 0 of every block: "OBBLK" and a version byte, so a block is recognisable in a hex dump.
pub const MAGIC: u64 = 0x0142_4C4B_424F_0000;

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser: cheap, and every input bit reaches every output bit.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `index` of the block at `sector` for `seed`.
pub fn word(seed: u64, sector: u64, index: usize) -> u64 {
    match index {
        0 => MAGIC,
        1 => sector,
        2 => seed,
        _ => mix(seed ^ mix(sector.wrapping_add(0x9E37_79B9_7F4A_7C15)) ^ index as u64),
    }
}

/// Fills `block` (a multiple of 8 bytes; a tail is zeroed) with the pattern.
pub fn fill(seed: u64, sector: u64, block: &mut [u8]) {
    let mut chunks = block.chunks_exact_mut(8);
    for (i, w) in chunks.by_ref().enumerate() {
        w.copy_from_slice(&word(seed, sector, i).to_le_bytes());
    }
    chunks.into_remainder().fill(0);
}

/// Checks `block` against the pattern; the first differing word on mismatch.
pub fn verify(seed: u64, sector: u64, block: &[u8]) -> Result<(), Mismatch> {
    let mut chunks = block.chunks_exact(8);
    for (i, w) in chunks.by_ref().enumerate() {
        let found = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        let expected = word(seed, sector, i);
        if found != expected {
            return Err(Mismatch {
                offset: i * 8,
                expected,
                found,
            });
        }
    }
    match chunks.remainder().iter().position(|b| *b != 0) {
        Some(p) => Err(Mismatch {
            offset: block.len() - chunks.remainder().len() + p,
            expected: 0,
            found: u64::from(chunks.remainder()[p]),
        }),
        None => Ok(()),
    }
}

/// The first sector of block `index` of `count` blocks spread evenly over a disk of
/// `capacity_sectors`, each `sectors_per_block` long and aligned to it; `None` when the blocks
/// don't fit.
pub fn spread_sector(
    index: u64,
    count: u64,
    capacity_sectors: u64,
    sectors_per_block: u64,
) -> Option<u64> {
    if count == 0 || index >= count || sectors_per_block == 0 {
        return None;
    }
    let blocks = capacity_sectors / sectors_per_block;
    if blocks < count {
        return None;
    }
    let stride = blocks / count;
    index.checked_mul(stride)?.checked_mul(sectors_per_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_verify() {
        let mut b = [0u8; 512];
        fill(7, 99, &mut b);
        assert_eq!(verify(7, 99, &b), Ok(()));
        assert_eq!(&b[8..16], &99u64.to_le_bytes());
        assert_eq!(verify(8, 99, &b).unwrap_err().offset, 16);
        assert_eq!(verify(7, 98, &b).unwrap_err().offset, 8);
        b[300] ^= 1;
        let m = verify(7, 99, &b).unwrap_err();
        assert_eq!(m.offset, 296);
        assert_ne!(m.expected, m.found);
    }

    #[test]
    fn odd_lengths() {
        let mut b = [0xFFu8; 13];
        fill(1, 2, &mut b);
        assert_eq!(&b[8..], &[0; 5]);
        assert_eq!(verify(1, 2, &b), Ok(()));
        b[12] = 1;
        assert_eq!(verify(1, 2, &b).unwrap_err().offset, 12);
        assert_eq!(verify(1, 2, &[]), Ok(()));
    }

    #[test]
    fn words_differ_between_blocks() {
        assert_ne!(word(1, 5, 10), word(1, 6, 10));
        assert_ne!(word(1, 5, 10), word(2, 5, 10));
        assert_ne!(word(1, 5, 10), word(1, 5, 11));
    }

    #[test]
    fn spreading() {
        assert_eq!(spread_sector(0, 4, 64, 8), Some(0));
        assert_eq!(spread_sector(3, 4, 64, 8), Some(48));
        assert_eq!(spread_sector(4, 4, 64, 8), None);
        assert_eq!(spread_sector(0, 9, 64, 8), None);
        assert_eq!(spread_sector(0, 0, 64, 8), None);
        assert_eq!(spread_sector(0, 1, 64, 0), None);
        let last = spread_sector(999, 1000, u64::MAX, 1).unwrap();
        assert!(last < u64::MAX);
    }
}
