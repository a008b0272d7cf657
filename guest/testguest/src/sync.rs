//! Two tiny primitives for a guest without an allocator or scheduler: a spin lock (serializes the
//! UART between CPUs) and a write-once cell (boot-time facts: platform, clock). Both use plain
//! `lock cmpxchg`/`xchg` on u32 (PVM can't emulate cmpxchg16b).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU32, Ordering};

/// A test-and-set lock guarding no data (callers guard a device).
#[derive(Debug)]
pub struct SpinLock {
    locked: AtomicU32,
}

/// Held lock; unlocks on drop.
#[derive(Debug)]
pub struct SpinGuard<'a> {
    lock: &'a SpinLock,
}

impl SpinLock {
    pub const fn new() -> Self {
        SpinLock {
            locked: AtomicU32::new(0),
        }
    }

    /// Takes the lock, giving up after `spins` attempts (`None`): a fatal path must still print
    /// when the CPU it interrupted held the lock.
    pub fn lock_bounded(&self, spins: u64) -> Option<SpinGuard<'_>> {
        for _ in 0..spins {
            if self.locked.swap(1, Ordering::Acquire) == 0 {
                return Some(SpinGuard { lock: self });
            }
            while self.locked.load(Ordering::Relaxed) != 0 {
                crate::arch::pause();
            }
        }
        None
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.lock.locked.store(0, Ordering::Release);
    }
}

const EMPTY: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

/// A value set once (at boot) and read from anywhere afterwards.
pub struct Once<T> {
    state: AtomicU32,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, before `state` is released as READY, and only shared
// references are handed out after that.
unsafe impl<T: Send + Sync> Sync for Once<T> {}

impl<T> core::fmt::Debug for Once<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Once")
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> Once<T> {
    pub const fn new() -> Self {
        Once {
            state: AtomicU32::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores `value` unless a value is already set; returns the stored value.
    pub fn set(&self, value: T) -> Result<&T, T> {
        if self
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: winning the EMPTY -> WRITING exchange makes this the only writer, and readers
        // only look after READY.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        Ok(self.get().expect("just set"))
    }

    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        // SAFETY: READY is stored only after the value was written, and it is never written again.
        // MaybeUninit<T> has T's layout, so the cast pointer addresses the written T.
        Some(unsafe { &*self.value.get().cast::<T>() })
    }
}
