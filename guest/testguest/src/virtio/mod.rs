//! Modern virtio-pci transport (virtio 1.2, 4.1): finds a device by PCI ID, maps its common,
//! notify, ISR and device-specific structures from the vendor capabilities, negotiates features
//! and sets up split virtqueues ([`queue`]). MSI-X vectors are programmed (config vector 0,
//! queue `i` vector `i + 1`, each aimed at the boot CPU's local APIC) so a VMM's interrupt
//! routing is exercised, but completions are found by polling the used rings; with
//! `outboard.virtio_irq=1` the waits between polls halt until an interrupt (`crate::irq`).
//!
//! ```text
//! open: reset -> ACKNOWLEDGE -> DRIVER -> features -> FEATURES_OK (checked)
//!   -> setup_queue * n -> DRIVER_OK -> requests ... -> reset
//! any time: status & NEEDS_RESET (0x40) -> the device gave up: reported, then reset
//! ```

pub mod blk;
pub mod net;
pub mod packet;
pub mod queue;
pub mod vsock;

use crate::clock::Clock;
use crate::mem::{self, Mmio};
use crate::pci::{self, Bar, Bdf, Msix};
use crate::platform;
use outboard_testguest_parse::pci::{
    self as decode, VirtioCap, BARS, VIRTIO_CAP_COMMON, VIRTIO_CAP_DEVICE, VIRTIO_CAP_ISR,
    VIRTIO_CAP_NOTIFY,
};
use outboard_testguest_parse::virtq;
pub use queue::Queue;

pub const VENDOR: u16 = 0x1AF4;
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
pub const F_VERSION_1: u64 = 1 << 32;
/// IDT vector of MSI-X entry 0; entry `n` uses `MSI_VECTOR_BASE + n`.
pub const MSI_VECTOR_BASE: u8 = crate::irq::DEVICE_FIRST;

// Common configuration structure (virtio 1.2, 4.1.4.3).
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0C;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
pub const QUEUE_ENABLE: u64 = 0x1C;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;
const COMMON_LEN: u32 = 0x38;
/// Status polls after a reset before the device counts as stuck.
const RESET_POLLS: u32 = 1_000_000;

/// Errors of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("No PCI device {vendor:04x}:{device:04x}")]
    NotFound { vendor: u16, device: u16 },
    #[error("Device {bdf} lacks a usable {what} capability")]
    MissingCap { bdf: Bdf, what: &'static str },
    #[error("Device does not offer VERSION_1")]
    NoVersion1,
    #[error("Device refused the features (FEATURES_OK clear)")]
    FeaturesRefused,
    #[error("Device did not finish its reset (status {status:#x})")]
    ResetStuck { status: u8 },
    #[error("Queue {index} is not available")]
    NoQueue { index: u16 },
    #[error(transparent)]
    Queue(#[from] virtq::Error),
    #[error(transparent)]
    Memory(#[from] mem::Error),
    #[error("Device needs a reset (status {status:#x})")]
    NeedsReset { status: u8 },
    #[error("Timed out waiting for the device (status {status:#x})")]
    Timeout { status: u8 },
    #[error("Device reported {what}")]
    Device { what: &'static str },
}

/// A virtio-pci function with its structures mapped.
#[derive(Debug)]
pub struct Device {
    pub bdf: Bdf,
    pub common: Mmio,
    pub notify: Mmio,
    pub notify_multiplier: u32,
    pub config: Mmio,
    pub msix: Option<Msix>,
    pub bars: [Option<Bar>; BARS],
    pub features: u64,
}

impl Device {
    /// Finds the device `0x1af4:<device>` and maps it.
    pub fn open(device: u16) -> Result<Device, Error> {
        let bdf = pci::find(VENDOR, device).ok_or(Error::NotFound {
            vendor: VENDOR,
            device,
        })?;
        Self::open_at(bdf)
    }

    pub fn open_at(bdf: Bdf) -> Result<Device, Error> {
        crate::irq::enable_if_asked();
        let bars = pci::memory_bars(bdf);
        let cfg = pci::snapshot(bdf);
        let mut found: [Option<(VirtioCap, Mmio)>; 5] = [None; 5];
        for cap in decode::capabilities(&cfg) {
            let Ok(cap) = cap else { break };
            if cap.id != decode::CAP_ID_VENDOR {
                continue;
            }
            let Ok(Some(vc)) = VirtioCap::parse(&cfg, cap.offset) else {
                continue;
            };
            let slot = &mut found[usize::from(vc.cfg_type)];
            // The first capability of each type is the preferred one (4.1.4).
            if slot.is_some() {
                continue;
            }
            let Some(bar) = bars[usize::from(vc.bar)] else {
                continue;
            };
            if !vc.fits(0, bar.size) {
                continue;
            }
            let base = bar.base.checked_add(vc.offset.into());
            if let Some(window) = base.and_then(|b| Mmio::new(b, vc.length.into())) {
                *slot = Some((vc, window));
            }
        }
        let need = |t: u8, what: &'static str, len: u32| match found[usize::from(t)] {
            Some((vc, w)) if vc.length >= len => Ok((vc, w)),
            _ => Err(Error::MissingCap { bdf, what }),
        };
        let (_, common) = need(VIRTIO_CAP_COMMON, "common", COMMON_LEN)?;
        let (notify_cap, notify) = need(VIRTIO_CAP_NOTIFY, "notify", 2)?;
        // Unused when polling, but a modern device without one is malformed (4.1.4.5).
        need(VIRTIO_CAP_ISR, "ISR", 1)?;
        let config = need(VIRTIO_CAP_DEVICE, "device", 0)
            .map(|(_, w)| w)
            .unwrap_or(Mmio { base: 0, len: 0 });
        let msix = Msix::find(bdf, &cfg, &bars);
        Ok(Device {
            bdf,
            common,
            notify,
            notify_multiplier: notify_cap.notify_multiplier,
            config,
            msix,
            bars,
            features: 0,
        })
    }

    pub fn status(&self) -> u8 {
        self.common.read8(DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        self.common.write8(DEVICE_STATUS, self.status() | bits);
    }

    /// Writes 0 to the status and waits until it reads back 0 (4.1.4.3.2).
    pub fn reset(&self) -> Result<(), Error> {
        self.common.write8(DEVICE_STATUS, 0);
        for _ in 0..RESET_POLLS {
            if self.status() == 0 {
                return Ok(());
            }
            crate::arch::pause();
        }
        Err(Error::ResetStuck {
            status: self.status(),
        })
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 plus what the device offers of
    /// `wanted`), FEATURES_OK, and MSI-X on with the config vector.
    pub fn initialize(&mut self, wanted: u64) -> Result<u64, Error> {
        self.reset()?;
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let offered = self.read_features();
        if offered & F_VERSION_1 == 0 {
            self.add_status(STATUS_FAILED);
            return Err(Error::NoVersion1);
        }
        let features = offered & (wanted | F_VERSION_1);
        for half in 0..2u32 {
            self.common.write32(DRIVER_FEATURE_SELECT, half);
            self.common
                .write32(DRIVER_FEATURE, (features >> (32 * half)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.add_status(STATUS_FAILED);
            return Err(Error::FeaturesRefused);
        }
        self.features = features;
        if let Some(msix) = &self.msix {
            msix.enable();
            msix.program_lapic(0, boot_apic_id(), MSI_VECTOR_BASE);
            self.common.write16(CONFIG_MSIX_VECTOR, 0);
        }
        Ok(features)
    }

    pub fn read_features(&self) -> u64 {
        let mut offered = 0u64;
        for half in 0..2u32 {
            self.common.write32(DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(self.common.read32(DEVICE_FEATURE)) << (32 * half);
        }
        offered
    }

    /// Sets up queue `index` with at most `wanted` entries, chains of `chain` descriptors and at
    /// most `max_slots` requests in flight; its MSI-X vector is table entry `index + 1` when the
    /// table has one.
    pub fn setup_queue(
        &self,
        index: u16,
        wanted: u16,
        chain: u16,
        max_slots: u16,
    ) -> Result<Queue, Error> {
        self.common.write16(QUEUE_SELECT, index);
        let max = self.common.read16(QUEUE_SIZE);
        if max == 0 {
            return Err(Error::NoQueue { index });
        }
        let size = virtq::choose_size(max, wanted)?;
        let queue = Queue::allocate(index, size, chain, max_slots, self.notify_address(index)?)?;
        self.common.write16(QUEUE_SIZE, size);
        self.common.write64(QUEUE_DESC, queue.desc);
        self.common.write64(QUEUE_DRIVER, queue.avail);
        self.common.write64(QUEUE_DEVICE, queue.used);
        if let Some(msix) = &self.msix {
            let entry = index.saturating_add(1);
            if entry < msix.cap.table_size && usize::from(entry) < crate::irq::DEVICE_COUNT {
                msix.program_lapic(
                    entry,
                    boot_apic_id(),
                    MSI_VECTOR_BASE.wrapping_add(entry as u8),
                );
                self.common.write16(QUEUE_MSIX_VECTOR, entry);
                if self.common.read16(QUEUE_MSIX_VECTOR) != entry {
                    crate::println!(
                        "outboard-testguest: virtio {}: queue {index} MSI-X vector refused",
                        self.bdf
                    );
                }
            }
        }
        self.common.write16(QUEUE_ENABLE, 1);
        Ok(queue)
    }

    /// The notify address of queue `index` (`queue_notify_off * notify_off_multiplier`), which
    /// must hold a 16-bit write inside the notify structure.
    pub fn notify_address(&self, index: u16) -> Result<u64, Error> {
        self.common.write16(QUEUE_SELECT, index);
        let off =
            u64::from(self.common.read16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        if off + 2 > self.notify.len {
            return Err(Error::MissingCap {
                bdf: self.bdf,
                what: "notify (offset past its window)",
            });
        }
        Ok(self.notify.base + off)
    }

    /// Fails unless the device-specific structure has at least `len` bytes (what the driver reads).
    pub fn require_config(&self, len: u64) -> Result<(), Error> {
        if self.config.len < len {
            return Err(Error::MissingCap {
                bdf: self.bdf,
                what: "device (too short)",
            });
        }
        Ok(())
    }

    /// The device's config generation (changes whenever its configuration does).
    pub fn config_generation(&self) -> u8 {
        self.common.read8(CONFIG_GENERATION)
    }

    pub fn driver_ok(&self) {
        self.add_status(STATUS_DRIVER_OK);
    }

    /// The error for a device that gave up, if it did.
    pub fn check(&self) -> Result<(), Error> {
        let status = self.status();
        if status & STATUS_NEEDS_RESET != 0 {
            return Err(Error::NeedsReset { status });
        }
        Ok(())
    }

    /// Polls `queue` until it returns a completion or `timeout_ns` pass (checking for
    /// NEEDS_RESET while waiting).
    pub fn wait(
        &self,
        queue: &mut Queue,
        clock: &Clock,
        timeout_ns: u64,
    ) -> Result<(u16, u32), Error> {
        let mut deadline = Deadline::new(clock, timeout_ns);
        loop {
            if let Some(done) = queue.poll()? {
                return Ok(done);
            }
            crate::irq::wait();
            if deadline.expired() {
                self.check()?;
                return Err(Error::Timeout {
                    status: self.status(),
                });
            }
        }
    }
}

/// The boot CPU's APIC ID (the MADT lists it first).
pub fn boot_apic_id() -> u32 {
    platform::get()
        .and_then(|p| p.apic_ids().first().copied())
        .unwrap_or(0)
}

/// A timeout on the guest clock; without a clock, a count of polls.
#[derive(Debug)]
pub struct Deadline<'a> {
    clock: &'a Clock,
    end: Option<u64>,
    polls: u64,
}

/// Polls per millisecond assumed without a clock (generous: PVM is slow).
const POLLS_PER_MS: u64 = 100;

impl<'a> Deadline<'a> {
    pub fn new(clock: &'a Clock, timeout_ns: u64) -> Deadline<'a> {
        Deadline {
            clock,
            end: clock.now_ns().map(|n| n.saturating_add(timeout_ns)),
            polls: (timeout_ns / 1_000_000).saturating_mul(POLLS_PER_MS),
        }
    }

    pub fn expired(&mut self) -> bool {
        match (self.end, self.clock.now_ns()) {
            (Some(end), Some(now)) => now >= end,
            _ => {
                self.polls = self.polls.saturating_sub(1);
                self.polls == 0
            }
        }
    }
}
