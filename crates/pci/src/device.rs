//! What a PCI function offers the root complex, and the host bridge at 00:00.0.

use std::sync::{Mutex, PoisonError};

use crate::config::{BarRange, BarSpec, ConfigSpace, PciIds};

/// A PCI function: its configuration space and the BARs it decodes.
///
/// The root complex calls [`PciDevice::decoded_bars`] after every configuration write and
/// moves the BARs on the MMIO bus to match, then reports the outcome through
/// [`PciDevice::bar_placed`] (so a device can move its ioeventfds along).
pub trait PciDevice: Send + Sync {
    fn config_read(&self, offset: u64, data: &mut [u8]);
    fn config_write(&self, offset: u64, data: &[u8]);
    fn bar_specs(&self) -> Vec<(usize, BarSpec)>;
    /// Programs a BAR at creation (the VMM acts as firmware).
    fn set_bar_address(&self, index: usize, addr: u64);
    /// The ranges the function decodes now.
    fn decoded_bars(&self) -> Vec<BarRange>;
    fn bar_read(&self, index: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, index: usize, offset: u64, data: &[u8]);
    /// BAR `index` is now mapped at `addr`, or unmapped (`None`); `conflict` when the guest's
    /// address overlapped another device and the BAR was left unmapped.
    fn bar_placed(&self, _index: usize, _addr: Option<u64>, _conflict: bool) {}
}

/// The host bridge: a function with no BARs that makes bus 0 look like a PCIe root.
#[derive(Debug)]
pub struct HostBridge {
    config: Mutex<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: Mutex::new(ConfigSpace::new(PciIds {
                // Red Hat's generic PCIe host bridge ID: what Linux expects of a virtual root.
                vendor: 0x1b36,
                device: 0x0008,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
                class: 0x06_00_00,
                revision: 0,
            })),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, data);
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, data);
    }

    fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        Vec::new()
    }

    fn set_bar_address(&self, _index: usize, _addr: u64) {}

    fn decoded_bars(&self) -> Vec<BarRange> {
        Vec::new()
    }

    fn bar_read(&self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&self, _index: usize, _offset: u64, _data: &[u8]) {}
}
