//! Reusable bounce buffers for one engine.
//!
//! Allocating a fresh zeroed buffer per request is costly for large I/O: from 128 KiB on, the
//! allocator maps and unmaps memory for each one and every page faults in again. Buffers come
//! in power-of-two classes from 4 KiB to [`MAX_TRANSFER`](super::request::MAX_TRANSFER) and go
//! back to a bounded free list when their request completes. A reused buffer holds stale
//! bytes: callers overwrite (or zero) the prefix they use.

use crate::aligned::{AlignedBuf, ALIGN};

const CLASSES: usize = 11; // 4 KiB << 0 ..= 4 MiB
/// Bytes a pool keeps cached at most.
pub const MAX_CACHED: usize = 32 << 20;

/// Free lists by size class.
#[derive(Debug, Default)]
pub struct BufPool {
    free: [Vec<AlignedBuf>; CLASSES],
    cached: usize,
}

fn class(len: usize) -> usize {
    let blocks = len.max(1).div_ceil(ALIGN).next_power_of_two();
    blocks.trailing_zeros() as usize
}

impl BufPool {
    /// A buffer of at least `len` bytes (beyond the largest class: an exact, uncached one).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let c = class(len);
        if c >= CLASSES {
            return AlignedBuf::new(len);
        }
        match self.free[c].pop() {
            Some(b) => {
                self.cached -= b.len();
                b
            }
            None => AlignedBuf::new(ALIGN << c),
        }
    }

    /// Takes a buffer back, unless the pool is full.
    pub fn put(&mut self, buf: AlignedBuf) {
        let c = class(buf.len());
        if c < CLASSES && buf.len() == ALIGN << c && self.cached + buf.len() <= MAX_CACHED {
            self.cached += buf.len();
            self.free[c].push(buf);
        }
    }

    /// Bytes held in free lists.
    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_and_buffers_are_reused() {
        assert_eq!(class(1), 0);
        assert_eq!(class(4096), 0);
        assert_eq!(class(4097), 1);
        assert_eq!(class(128 * 1024), 5);
        assert_eq!(class(4 << 20), 10);
        let mut p = BufPool::default();
        let mut b = p.get(5000);
        assert_eq!(b.len(), 8192);
        let addr = b.as_mut_ptr() as usize;
        p.put(b);
        assert_eq!(p.cached(), 8192);
        let mut again = p.get(8192);
        assert_eq!(again.as_mut_ptr() as usize, addr);
        assert_eq!(p.cached(), 0);
        // Oversized buffers are exact and never cached; the cache is bounded.
        let big = p.get(8 << 20);
        assert_eq!(big.len(), 8 << 20);
        p.put(big);
        assert_eq!(p.cached(), 0);
        for _ in 0..20 {
            p.put(AlignedBuf::new(4 << 20));
        }
        assert!(p.cached() <= MAX_CACHED);
    }
}
