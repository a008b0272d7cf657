//! Emulated devices of outboard-vmm and the buses they sit on.
//!
//! A device is reached through the minimal [`BusDevice`] trait (`read`/`write` at an offset from
//! the base it was inserted at) and managed through the one [`Lifecycle`] trait (pause, resume,
//! save, restore, reset, counters). Devices take `&self` and lock what they must inside, so
//! several vCPU threads can dispatch to one bus at once.
//!
//! Device state machine (driven by the VMM; every hook defaults to "nothing to do"):
//!
//! ```text
//!   created ──► running ──pause()──► paused ──resume()──► running
//!                  ▲                    │
//!                  └──── reset() ◄──────┤  save() / restore() only while paused
//! ```

pub mod acpi_pm;
pub mod bus;
pub mod debugcon;
pub mod i8042;
pub mod serial;

use std::sync::atomic::{AtomicU64, Ordering};

pub use bus::Bus;

/// Errors of device lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Device {device} state is malformed: {reason}")]
    BadState {
        device: &'static str,
        reason: String,
    },
}

/// The data path of a device: guest reads and writes of its registers.
pub trait BusDevice: Send + Sync {
    /// Guest read of `data.len()` bytes at `offset` from the device's base.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base.
    fn write(&self, offset: u64, data: &[u8]);
}

/// The control path of a device, shared by all device kinds.
pub trait Lifecycle: Send + Sync {
    /// Short, stable name (used in metrics and saved state).
    fn name(&self) -> &'static str;

    fn pause(&self) -> Result<(), Error> {
        Ok(())
    }

    fn resume(&self) -> Result<(), Error> {
        Ok(())
    }

    /// The device's guest-visible state, for a snapshot or a successor VMM.
    fn save(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::Value::Null)
    }

    fn restore(&self, _state: &serde_json::Value) -> Result<(), Error> {
        Ok(())
    }

    /// Back to power-on state (the VM is being restarted).
    fn reset(&self) {}

    /// Event counters, as (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// A device that is both on a bus and managed.
pub trait Device: BusDevice + Lifecycle {}

impl<T: BusDevice + Lifecycle> Device for T {}

/// A monotonically increasing event counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Helpers shared by the device unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A `Write` sink whose bytes the test can read back through a clone.
    #[derive(Clone, Default)]
    pub struct Shared(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
