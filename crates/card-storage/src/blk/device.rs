//! An attached volume as the data path sees it: extents, key, throttle and counters, shared by
//! the worker threads that serve its queues.
//!
//! A volume can grow while attached. Its extent list is swapped whole ([`ArcSwap`]): a worker
//! loads it once per mapping, and a grown list only adds bytes at the end (the old extents
//! stay, the last one may get longer), so a request bounds-checked against the old size maps
//! to the same physical bytes under either list.
//!
//! ```text
//!  size S ──grow(T ≥ S): check prefix, store──► size T   (workers see S or T, both valid)
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};

use crate::backing::Backing;
use crate::table::Volume;
use crate::throttle::{self, Limits, Throttle};
use crate::xts::XtsKey;

use super::engine::zeroes::ZeroSupport;
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
    #[error("Volume {name} cannot grow from {current} to {requested} bytes with these extents")]
    Grow {
        name: String,
        current: u64,
        requested: u64,
    },
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
    volume: ArcSwap<Volume>,
    /// Serialises growers, so that each checks against the list it replaces.
    grow: Mutex<()>,
    backing: Arc<Backing>,
    key: Option<XtsKey>,
    throttle: Mutex<Throttle>,
    epoch: Instant,
    serial: [u8; ID_BYTES],
    /// The fallocate modes the store refused for WRITE_ZEROES, learned by whichever worker
    /// met the refusal first.
    zeroes: ZeroSupport,
    pub counters: Counters,
}

impl fmt::Debug for VolumeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.volume.load();
        f.debug_struct("VolumeDevice")
            .field("volume", &v.name)
            .field("size", &v.size)
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
        check_extents(&volume, &backing)?;
        // The GET_ID serial: the volume name, zero padded (names are at most 63 bytes, so
        // long names are cut to 20 as virtio allows).
        let mut serial = [0u8; ID_BYTES];
        let n = volume.name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&volume.name.as_bytes()[..n]);
        Ok(Self {
            volume: ArcSwap::from_pointee(volume),
            grow: Mutex::new(()),
            backing,
            key,
            throttle: Mutex::new(Throttle::new(limits)?),
            epoch: Instant::now(),
            serial,
            zeroes: ZeroSupport::default(),
            counters: Counters::default(),
        })
    }

    /// The volume's extents and size as of now (a grow may replace them at any time, only
    /// ever adding bytes at the end).
    pub fn volume(&self) -> Guard<Arc<Volume>> {
        self.volume.load()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.volume.load().size
    }

    /// Grows the attached volume to `volume` (the same volume, as the table has it after its
    /// grow): every byte of the current address space must map where it did before.
    pub fn grow(&self, volume: Volume) -> Result<(), Error> {
        let _one = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.volume.load_full();
        let refused = || Error::Grow {
            name: cur.name.clone(),
            current: cur.size,
            requested: volume.size,
        };
        if volume.name != cur.name || volume.id != cur.id || volume.size < cur.size {
            return Err(refused());
        }
        // The old list must be a prefix of the new one, its last extent possibly lengthened.
        let n = cur.extents.len();
        let keeps_prefix = volume.extents.len() >= n
            && cur
                .extents
                .iter()
                .zip(&volume.extents)
                .enumerate()
                .all(|(i, (a, b))| {
                    a.physical == b.physical
                        && (a.length == b.length || (i + 1 == n && a.length < b.length))
                });
        if !keeps_prefix {
            return Err(refused());
        }
        check_extents(&volume, &self.backing)?;
        self.volume.store(Arc::new(volume));
        Ok(())
    }

    pub(crate) fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Whether the volume is served encrypted.
    pub fn encrypted(&self) -> bool {
        self.key.is_some()
    }

    pub(crate) fn key(&self) -> Option<&XtsKey> {
        self.key.as_ref()
    }

    pub(crate) fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    pub(crate) fn zero_support(&self) -> &ZeroSupport {
        &self.zeroes
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

/// The data path trusts the extents: check that they cover the volume and lie in the store
/// (the table parser checked this for tables read from disk).
fn check_extents(volume: &Volume, backing: &Backing) -> Result<(), Error> {
    let held = volume
        .extents
        .iter()
        .try_fold(0u64, |acc, e| acc.checked_add(e.length));
    if volume.size == 0
        || held.is_none_or(|h| h < volume.size)
        || volume.map(0, volume.size).is_none()
    {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Extent, VolumeStore};
    use crate::testutil::TempDir;

    const MIB: u64 = 1 << 20;

    fn rig(dir: &TempDir) -> (VolumeStore, VolumeDevice) {
        let path = dir.path().join("store");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let mut store = VolumeStore::format(&path).unwrap();
        let v = store.create("v", 4 * MIB).unwrap();
        store.create("n", MIB).unwrap();
        let backing = Arc::new(Backing::open(&path).unwrap());
        let dev = VolumeDevice::new(v, backing, None, Limits::default()).unwrap();
        (store, dev)
    }

    #[test]
    fn grows_keep_every_old_byte_where_it_was() {
        let dir = TempDir::new("dev-grow");
        let (mut store, dev) = rig(&dir);
        let old = dev.volume().map(0, 4 * MIB).unwrap();
        let v = store.grow("v", 6 * MIB).unwrap();
        dev.grow(v.clone()).unwrap();
        assert_eq!(dev.capacity(), 6 * MIB);
        assert_eq!(dev.volume().map(0, 4 * MIB).unwrap(), old);
        assert!(dev.volume().map(4 * MIB, 2 * MIB).is_some());
        assert!(dev.volume().map(6 * MIB - 4096, 8192).is_none());
        // Same size again: allowed, nothing changes.
        dev.grow(v).unwrap();
        assert_eq!(dev.capacity(), 6 * MIB);
    }

    #[test]
    fn grows_that_would_move_or_lose_bytes_are_refused() {
        let dir = TempDir::new("dev-grow-bad");
        let (mut store, dev) = rig(&dir);
        let cur = dev.volume().as_ref().clone();
        let refused = |v: Volume| matches!(dev.grow(v), Err(Error::Grow { .. }));
        let mut smaller = cur.clone();
        smaller.size -= 4096;
        assert!(refused(smaller));
        let mut renamed = cur.clone();
        renamed.name = "w".into();
        assert!(refused(renamed));
        // Same size, but the extent moved: old data would vanish.
        let mut moved = cur.clone();
        moved.extents[0].physical += MIB;
        assert!(refused(moved));
        let mut dropped = cur.clone();
        dropped.size += MIB;
        dropped.extents = vec![Extent {
            physical: 20 * MIB,
            length: 5 * MIB,
        }];
        assert!(refused(dropped));
        // Extents that do not cover the size, or run past the store.
        let mut short = cur.clone();
        short.size += MIB;
        assert!(matches!(dev.grow(short), Err(Error::Extents(_))));
        let mut past = cur.clone();
        past.size += 64 * MIB;
        past.extents.push(Extent {
            physical: 16 * MIB,
            length: 64 * MIB,
        });
        assert!(matches!(dev.grow(past), Err(Error::PastStore { .. })));
        assert_eq!(*dev.volume().as_ref(), cur);
        // The table's own grow still applies afterwards.
        dev.grow(store.grow("v", 8 * MIB).unwrap()).unwrap();
        assert_eq!(dev.capacity(), 8 * MIB);
    }
}
