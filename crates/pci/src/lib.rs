//! PCI for outboard-vmm: configuration spaces, the root complex on bus 0 (ECAM and 0xCF8/0xCFC),
//! BAR placement on the MMIO bus, MSI-X, and the interrupt seams to KVM (GSI routing, irqfd,
//! ioeventfd) that keep the VMM off the data path. The ACPI description (MCFG, the PNP0A08 host
//! bridge) is built here for crates/boot to place.
//!
//! Layering: above `outboard-devices` (the `Bus` and `BusDevice`), below the virtio transport
//! and the VMM.
//!
//! # Wiring into the VMM
//!
//! 1. `let irqs = Arc::new(KvmInterrupts::new(vm.clone()))` (after KVM_CREATE_IRQCHIP; it
//!    keeps the default PIC/IOAPIC routes of GSIs 0–23 in every KVM_SET_GSI_ROUTING).
//! 2. `let root = PciRoot::new(mmio_bus.clone(), layout_windows(mmio64_start, mmio64_size))`.
//! 3. `mmio_bus.insert(layout::ECAM_START, root::ECAM_BUS_SIZE, Arc::new(PciEcam::new(root.clone())))`
//!    and `pio_bus.insert(0xcf8, 8, Arc::new(PciConfigIo::new(root.clone())))`.
//! 4. `root.add_device(transport)` per device: BARs allocated and mapped, memory decode on.
//! 5. ACPI: `acpi::mcfg(layout::ECAM_START, 0, oem_id, table_id)` into the XSDT, and
//!    `HostBridgeAml { ecam_base, last_bus: 0, windows }` appended to the DSDT body.
//! 6. Restore in a successor: `add_device`, restore the device's state, then `sync_bars(slot)`.

pub mod acpi;
pub mod config;
pub mod device;
pub mod interrupt;
pub mod msix;
pub mod root;
#[cfg(test)]
mod root_tests;

pub use config::{BarKind, BarRange, BarSpec, ConfigSpace, PciIds};
pub use device::PciDevice;
pub use interrupt::{IoEventRegistrar, KvmInterrupts, MsiMessage, MsiRouter, RecordingInterrupts};
pub use msix::Msix;
pub use root::{PciConfigIo, PciEcam, PciRoot, PciWindows};

/// The windows from crates/boot's layout, with a 64-bit window of `mmio64_size` bytes placed
/// at `mmio64_start` (above guest RAM; the layout has no 64-bit window constant yet).
pub fn layout_windows(mmio64_start: u64, mmio64_size: u64) -> PciWindows {
    PciWindows {
        mmio32_start: outboard_boot::layout::MMIO32_START,
        mmio32_size: outboard_boot::layout::MMIO32_SIZE,
        mmio64_start,
        mmio64_size,
    }
}
