//! Root complex tests: ECAM and 0xCF8 decoding, allocation, BAR moves and conflicts.

use std::sync::{Arc, Mutex};

use outboard_devices::{Bus, BusDevice};

use crate::config::{BarKind, BarRange, BarSpec, ConfigSpace, PciIds};
use crate::device::PciDevice;
use crate::root::{PciConfigIo, PciEcam, PciRoot, PciWindows};

#[derive(Debug)]
struct TestDevice {
    config: Mutex<ConfigSpace>,
    placed: Mutex<Vec<(usize, Option<u64>, bool)>>,
}

impl TestDevice {
    fn new() -> Arc<Self> {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            ..Default::default()
        });
        config
            .add_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem64,
                    size: 0x4000,
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1000,
                    prefetchable: false,
                },
            )
            .unwrap();
        Arc::new(TestDevice {
            config: Mutex::new(config),
            placed: Mutex::new(Vec::new()),
        })
    }
}

impl PciDevice for TestDevice {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.config.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u64, data: &[u8]) {
        self.config.lock().unwrap().write(offset, data);
    }
    fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        self.config.lock().unwrap().bar_specs().collect()
    }
    fn set_bar_address(&self, index: usize, addr: u64) {
        self.config.lock().unwrap().set_bar_address(index, addr);
    }
    fn decoded_bars(&self) -> Vec<BarRange> {
        self.config.lock().unwrap().decoded_bars()
    }
    fn bar_read(&self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(index as u8 * 0x10 + offset as u8);
    }
    fn bar_write(&self, _index: usize, _offset: u64, _data: &[u8]) {}
    fn bar_placed(&self, index: usize, addr: Option<u64>, conflict: bool) {
        self.placed.lock().unwrap().push((index, addr, conflict));
    }
}

const WINDOWS: PciWindows = PciWindows {
    mmio32_start: 0xc000_0000,
    mmio32_size: 0x2000_0000,
    mmio64_start: 0x100_0000_0000,
    mmio64_size: 0x10_0000_0000,
};

fn setup() -> (Arc<PciRoot>, Arc<Bus>, Arc<TestDevice>, u8) {
    let mmio = Arc::new(Bus::new());
    let root = PciRoot::new(mmio.clone(), WINDOWS);
    let dev = TestDevice::new();
    let slot = root.add_device(dev.clone()).unwrap();
    (root, mmio, dev, slot)
}

fn ecam_read32(ecam: &PciEcam, slot: u8, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    ecam.read((u64::from(slot) << 15) | reg, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn host_bridge_and_device_enumerate_through_ecam() {
    let (root, _, _, slot) = setup();
    assert_eq!(slot, 1);
    let ecam = PciEcam::new(root.clone());
    assert_eq!(ecam_read32(&ecam, 0, 0), 0x0008_1b36);
    assert_eq!(ecam_read32(&ecam, 0, 8) >> 8, 0x06_00_00);
    assert_eq!(ecam_read32(&ecam, 1, 0), 0x1042_1af4);
    assert_eq!(ecam_read32(&ecam, 2, 0), 0xffff_ffff, "empty slot");
    let mut b = [0u8; 4];
    ecam.read((1 << 15) | (1 << 12), &mut b);
    assert_eq!(b, [0xff; 4], "function 1 absent");
    ecam.read(1 << 20, &mut b);
    assert_eq!(b, [0xff; 4], "bus 1 absent");
    ecam.read((1 << 15) | 2, &mut b);
    assert_eq!(b, [0xff; 4], "misaligned dword");
    let mut w = [0u8; 2];
    ecam.read((1 << 15) + 2, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x1042);
}

#[test]
fn bars_are_allocated_below_4g_first_and_mapped() {
    let (root, mmio, _, _) = setup();
    let ecam = PciEcam::new(root);
    let bar0 = u64::from(ecam_read32(&ecam, 1, 0x10) & !0xf)
        | (u64::from(ecam_read32(&ecam, 1, 0x14)) << 32);
    assert_eq!(bar0, WINDOWS.mmio32_start, "64-bit BAR placed below 4 GiB");
    let bar2 = u64::from(ecam_read32(&ecam, 1, 0x18) & !0xf);
    assert_eq!(bar2, WINDOWS.mmio32_start + 0x4000);
    let mut b = [0u8; 1];
    assert!(mmio.read(bar2 + 3, &mut b));
    assert_eq!(b, [0x23]);
    assert!(mmio.read(bar0 + 0x3fff, &mut b));
}

#[test]
fn cf8_cfc_access() {
    let (root, _, _, _) = setup();
    let io = PciConfigIo::new(root);
    let select = |slot: u32, reg: u32| (0x8000_0000 | (slot << 11) | reg).to_le_bytes();
    io.write(0, &select(1, 0));
    let mut b = [0u8; 4];
    io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
    let mut w = [0u8; 2];
    io.read(6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x1042);
    io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
    // Disabled, other bus, or crossing the dword: all ones.
    io.write(0, &0x0000_0800u32.to_le_bytes());
    io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    io.write(0, &(0x8001_0000u32).to_le_bytes());
    io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    io.write(0, &select(1, 0));
    io.read(6, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Byte-wide address writes are not address-register writes.
    io.write(0, &[0]);
    assert_eq!(io.address(), 0x8000_0800);
}

#[test]
fn bar_reprogramming_moves_the_range() {
    let (root, mmio, dev, _) = setup();
    let ecam = PciEcam::new(root.clone());
    let cfg = 1u64 << 15;
    let old = WINDOWS.mmio32_start + 0x4000;
    let new = 0xc800_0000u32;
    ecam.write(cfg | 0x18, &new.to_le_bytes());
    let mut b = [0u8; 1];
    assert!(!mmio.read(old, &mut b), "old range unmapped");
    assert!(mmio.read(u64::from(new), &mut b));
    assert_eq!(
        dev.placed.lock().unwrap().last(),
        Some(&(2, Some(u64::from(new)), false))
    );
    // Memory decode off: everything unmapped; on again: back.
    ecam.write(cfg | 4, &0u16.to_le_bytes());
    assert!(!mmio.read(u64::from(new), &mut b));
    assert_eq!(dev.placed.lock().unwrap().last(), Some(&(2, None, false)));
    ecam.write(cfg | 4, &2u16.to_le_bytes());
    assert!(mmio.read(u64::from(new), &mut b));
    assert_eq!(root.counters()[2].0, "bar_moves");
}

#[test]
fn overlapping_bar_is_refused_and_counted() {
    let (root, mmio, dev, _) = setup();
    let ecam = PciEcam::new(root.clone());
    let cfg = 1u64 << 15;
    // Put BAR 0 on top of BAR 2.
    let bar2 = WINDOWS.mmio32_start + 0x4000;
    ecam.write(cfg | 0x10, &(bar2 as u32).to_le_bytes());
    assert_eq!(root.counters.bar_conflicts.get(), 1);
    assert_eq!(dev.placed.lock().unwrap().last(), Some(&(0, None, true)));
    let mut b = [0u8; 1];
    assert!(mmio.read(bar2, &mut b));
    assert_eq!(b, [0x20], "BAR 2 still owns its range");
    // Moving it somewhere free maps it again.
    ecam.write(cfg | 0x10, &0xd000_0000u32.to_le_bytes());
    assert!(mmio.read(0xd000_0000, &mut b));
    assert_eq!(b, [0x00]);
}

#[test]
fn allocation_fails_cleanly_when_window_is_full() {
    let mmio = Arc::new(Bus::new());
    let root = PciRoot::new(
        mmio,
        PciWindows {
            mmio32_size: 0x1000,
            mmio64_size: 0x4000,
            ..WINDOWS
        },
    );
    let first = TestDevice::new();
    root.add_device(first.clone()).unwrap();
    // The 32-bit window is too small for the 64-bit BAR: it went above 4 GiB.
    let bar0 = first.config.lock().unwrap().bar_address(0);
    assert_eq!(bar0, Some(WINDOWS.mmio64_start));
    let err = root.add_device(TestDevice::new()).unwrap_err();
    assert!(err.to_string().starts_with("No room for a BAR"), "{err}");
}

#[test]
fn sync_bars_follows_restored_config_space() {
    let (root, mmio, dev, slot) = setup();
    // A successor restored a configuration space where the guest had moved BAR 2.
    dev.config.lock().unwrap().set_bar_address(2, 0xd800_0000);
    root.sync_bars(slot);
    let mut b = [0u8; 1];
    assert!(mmio.read(0xd800_0000, &mut b));
    assert!(!mmio.read(WINDOWS.mmio32_start + 0x4000, &mut b));
    root.sync_bars(99);
}
