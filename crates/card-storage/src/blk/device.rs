//! An attached volume as the data path sees it: extents, key, throttle and counters, shared by
//! the worker threads that serve its queues.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backing::Backing;
use crate::table::Volume;
use crate::throttle::{self, Limits, Throttle};
use crate::xts::XtsKey;

use super::request::defs::ID_BYTES;

/// Errors attaching a volume.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid QoS limits")]
    Limits(#[from] throttle::Error),
    #[error("Extents of volume {0} do not cover its size")]
    Extents(String),
    #[error("Volume {name} ends at {end}, past the backing store's {size} bytes")]
    PastStore { name: String, end: u64, size: u64 },
}

/// Per-volume counters, readable at any time (metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
    /// Total time requests spent waiting for the throttle, in nanoseconds.
    pub throttled_ns: AtomicU64,
    /// Requests currently in the backend (throttled or in flight).
    pub queue_depth: AtomicU64,
    /// Reads and writes done straight to or from guest memory (no bounce buffer).
    pub zero_copy: AtomicU64,
    /// Worst lateness of a throttle wake-up: how long after a waiting request became
    /// admissible its worker ran, in nanoseconds (scheduling delay on a loaded host).
    pub wake_late_max_ns: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
    pub throttled_ns: u64,
    pub queue_depth: u64,
    pub zero_copy: u64,
    pub wake_late_max_ns: u64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            read_ops: l(&self.read_ops),
            write_ops: l(&self.write_ops),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            errors: l(&self.errors),
            throttled_ns: l(&self.throttled_ns),
            queue_depth: l(&self.queue_depth),
            zero_copy: l(&self.zero_copy),
            wake_late_max_ns: l(&self.wake_late_max_ns),
        }
    }
}

/// One attached volume.
pub struct VolumeDevice {
    volume: Volume,
    backing: Arc<Backing>,
    key: Option<XtsKey>,
    throttle: Mutex<Throttle>,
    epoch: Instant,
    serial: [u8; ID_BYTES],
    pub counters: Counters,
}

impl fmt::Debug for VolumeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeDevice")
            .field("volume", &self.volume.name)
            .field("size", &self.volume.size)
            .field("encrypted", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl VolumeDevice {
    /// Attaches `volume` of `backing`, encrypted with `key` if given, throttled by `limits`.
    pub fn new(
        volume: Volume,
        backing: Arc<Backing>,
        key: Option<XtsKey>,
        limits: Limits,
    ) -> Result<Self, Error> {
        // The data path trusts the extents: check once that they cover the volume and lie in
        // the store (the table parser checked this for tables read from disk).
        let held: u64 = volume.extents.iter().map(|e| e.length).sum();
        if volume.size == 0 || held < volume.size || volume.map(0, volume.size).is_none() {
            return Err(Error::Extents(volume.name.clone()));
        }
        if let Some(e) = volume
            .extents
            .iter()
            .find(|e| e.physical.saturating_add(e.length) > backing.size())
        {
            return Err(Error::PastStore {
                name: volume.name.clone(),
                end: e.physical.saturating_add(e.length),
                size: backing.size(),
            });
        }
        // The GET_ID serial: the volume name, zero padded (names are at most 63 bytes, so
        // long names are cut to 20 as virtio allows).
        let mut serial = [0u8; ID_BYTES];
        let n = volume.name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&volume.name.as_bytes()[..n]);
        Ok(Self {
            volume,
            backing,
            key,
            throttle: Mutex::new(Throttle::new(limits)?),
            epoch: Instant::now(),
            serial,
            counters: Counters::default(),
        })
    }

    /// The volume's extents and size.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.volume.size
    }

    pub(crate) fn backing(&self) -> &Backing {
        &self.backing
    }

    pub(crate) fn key(&self) -> Option<&XtsKey> {
        self.key.as_ref()
    }

    pub(crate) fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// Monotonic nanoseconds since the device was created (the throttle's clock).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(crate) fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        // A panic while holding the lock cannot leave a bucket inconsistent (plain integers),
        // so a poisoned lock is still usable.
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the QoS limits live.
    pub fn set_limits(&self, limits: Limits) -> Result<(), throttle::Error> {
        self.throttle().set_limits(limits)
    }
}
