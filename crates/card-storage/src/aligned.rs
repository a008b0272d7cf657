//! Heap buffers aligned for O_DIRECT.
//!
//! O_DIRECT transfers need the memory address, the file offset and the length to be multiples of
//! the device's logical block size. Everything here uses [`ALIGN`] (4 KiB), which also matches the
//! volumes' logical block size, so a buffer from this module is valid for any backing store.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every buffer, and the granularity of every physical I/O.
pub const ALIGN: usize = 4096;

/// A zero-initialised, [`ALIGN`]-aligned byte buffer whose length is a multiple of [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>), so moving it to another
// thread or sharing `&AlignedBuf` is as safe as for a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only hands out shared slices.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes rounded up to a multiple of [`ALIGN`] (at least one block).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        // Cannot fail: ALIGN is a power of two and `len` was rounded from a usize that
        // the caller could allocate.
        Layout::from_size_align(len, ALIGN).expect("valid layout")
    }

    /// Length in bytes (a multiple of [`ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a buffer holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised bytes owned by self, alive for &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for kernel I/O (io_uring); valid while self is alive and not moved from.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_and_aligns() {
        let mut b = AlignedBuf::new(1);
        assert_eq!(b.len(), ALIGN);
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4095] = 7;
        assert_eq!(AlignedBuf::new(4097).len(), 2 * ALIGN);
    }
}
