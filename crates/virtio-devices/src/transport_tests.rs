//! virtio-pci transport tests: register semantics, feature negotiation, activation and the
//! bad-input cases, driven through the PCI device interface as a guest would.

use std::sync::{Arc, Mutex};

use outboard_devices::Lifecycle;
use outboard_pci::{PciDevice, RecordingInterrupts};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::transport::*;
use crate::{ActiveQueue, Error, VirtioDevice, VIRTIO_F_VERSION_1};

#[derive(Default)]
struct Model {
    activated: Mutex<Vec<(u64, Vec<ActiveQueue>)>>,
    resets: Mutex<u32>,
    fail_activate: bool,
}

impl VirtioDevice for Model {
    fn device_type(&self) -> u32 {
        crate::TYPE_BLOCK
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << 9) | (1 << 34)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    fn activate(&self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), Error> {
        if self.fail_activate {
            return Err(Error::Disconnected);
        }
        self.activated.lock().unwrap().push((features, queues));
        Ok(())
    }
    fn reset(&self) {
        *self.resets.lock().unwrap() += 1;
    }
}

const BAR: u64 = 0x1_0000_0000;

struct Guest {
    t: VirtioPciTransport<GuestMemoryMmap>,
    model: Arc<Model>,
    irqs: Arc<RecordingInterrupts>,
}

impl Guest {
    fn new(model: Model) -> Self {
        let model = Arc::new(model);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irqs = Arc::new(RecordingInterrupts::default());
        let t =
            VirtioPciTransport::new("virtio-blk", model.clone(), mem, irqs.clone(), irqs.clone())
                .unwrap();
        t.set_bar_address(0, BAR);
        t.config_write(4, &2u16.to_le_bytes());
        t.bar_placed(0, Some(BAR), false);
        Guest { t, model, irqs }
    }
    fn w(&self, off: u64, v: u64, len: usize) {
        self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }
    fn negotiate(&self) {
        self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        self.w(0x08, 1, 4);
        self.w(0x0c, 1, 4);
        self.w(0x08, 0, 4);
        self.w(0x0c, 1 << 9, 4);
        self.w(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
    }
    fn setup_queue(&self, q: u16, base: u64, size: u16) {
        self.w(0x16, u64::from(q), 2);
        self.w(0x18, u64::from(size), 2);
        self.w(0x20, base, 8);
        self.w(0x28, base.wrapping_add(0x1000), 4);
        self.w(0x2c, base.wrapping_add(0x1000) >> 32, 4);
        self.w(0x30, base.wrapping_add(0x2000), 8);
        self.w(0x1c, 1, 2);
    }
    fn driver_ok(&self) {
        self.w(0x14, 0x0f, 1);
    }
}

#[test]
fn capabilities_describe_the_bar_layout() {
    let g = Guest::new(Model::default());
    let mut found = Vec::new();
    let mut ptr = g.t.state().config.read_u16(0x34) as u8 as usize;
    while ptr != 0 {
        let c = g.t.state().config;
        let id = c.read_u16(ptr) as u8;
        if id == 0x09 {
            let typ = (c.read_u32(ptr) >> 24) as u8;
            let offset = c.read_u32(ptr + 8);
            found.push((typ, offset));
            if typ == 2 {
                assert_eq!(c.read_u32(ptr + 16), NOTIFY_MULTIPLIER);
            }
        } else {
            assert_eq!(id, 0x11);
            assert_eq!(c.read_u16(ptr + 2) & 0x7ff, 2, "3 vectors");
        }
        ptr = (c.read_u16(ptr) >> 8) as usize;
    }
    assert_eq!(
        found,
        vec![(1, 0), (2, 0x3000), (3, 0x1000), (4, 0x2000), (5, 0)]
    );
    assert_eq!(g.t.state().config.read_u16(2), 0x1042);
}

#[test]
fn feature_negotiation_masks_unsupported_bits() {
    let g = Guest::new(Model::default());
    g.w(0x00, 1, 4);
    assert_eq!(g.r(0x04, 4), 1, "VERSION_1 offered, RING_PACKED masked");
    g.w(0x00, 0, 4);
    assert_eq!(g.r(0x04, 4), 1 << 9);
    g.negotiate();
    assert_ne!(g.status() & STATUS_FEATURES_OK, 0);
    assert_eq!(g.r(0x12, 2), 2);
    // Features the device doesn't offer: FEATURES_OK refused.
    g.w(0x14, 0, 1);
    g.w(0x14, 3, 1);
    g.w(0x08, 1, 4);
    g.w(0x0c, 1 | (1 << 2), 4);
    g.w(0x14, 0x0b, 1);
    assert_eq!(g.status() & STATUS_FEATURES_OK, 0);
}

#[test]
fn activation_hands_over_enabled_queues_with_eventfds() {
    let g = Guest::new(Model::default());
    g.negotiate();
    g.setup_queue(0, 0x10000, 128);
    g.w(0x1a, 1, 2);
    assert_eq!(g.r(0x1a, 2), 1);
    assert_eq!(g.r(0x20, 8), 0x10000);
    g.driver_ok();
    assert_eq!(g.status() & STATUS_NEEDS_RESET, 0);
    let act = g.model.activated.lock().unwrap();
    assert_eq!(act.len(), 1);
    assert_eq!(act[0].0, VIRTIO_F_VERSION_1 | (1 << 9));
    assert_eq!(act[0].1.len(), 1);
    assert_eq!(act[0].1[0].config.size, 128);
    // Kicks arrive by ioeventfd at the notify addresses.
    let rec = g.irqs.snapshot();
    assert_eq!(
        rec.ioevents.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![BAR + 0x3000, BAR + 0x3004]
    );
    assert_eq!(g.t.notify_address(1), Some(BAR + 0x3004));
    // Queue registers are frozen while live.
    g.w(0x18, 64, 2);
    assert_eq!(g.r(0x18, 2), 128);
}

#[test]
fn notify_write_that_reaches_the_vmm_is_forwarded_and_counted() {
    let g = Guest::new(Model::default());
    g.w(0x3004, 1, 2);
    assert_eq!(g.t.kick_fds()[1].read().unwrap(), 1);
    assert_eq!(g.t.counters.vmm_notifications.get(), 1);
}

#[test]
fn bar_move_reregisters_ioeventfds() {
    let g = Guest::new(Model::default());
    g.t.bar_placed(0, Some(0x2_0000_0000), false);
    let rec = g.irqs.snapshot();
    assert_eq!(rec.ioevents.len(), 2);
    assert!(rec.ioevents.iter().all(|e| e.1 >= 0x2_0000_0000));
    g.t.bar_placed(0, None, false);
    assert!(g.irqs.snapshot().ioevents.is_empty());
}

#[test]
fn bad_queue_size_sets_needs_reset() {
    for size in [0u16, 100, 512] {
        let g = Guest::new(Model::default());
        g.negotiate();
        g.w(0x10, 2, 2);
        g.w(0x16, 0, 2);
        g.w(0x18, u64::from(size), 2);
        assert_ne!(g.status() & STATUS_NEEDS_RESET, 0, "size {size}");
        assert_eq!(g.r(0x18, 2), 256, "size unchanged");
        assert_eq!(g.r(0x1000, 1), 2, "config-change ISR bit");
        assert_eq!(g.r(0x1000, 1), 0, "ISR read clears");
        // Held on vector 2 (masked): visible in the PBA.
        assert_eq!(g.r(MSIX_PBA_OFFSET, 1), 0b100);
        // DRIVER_OK does not activate a device needing reset; reset recovers.
        g.driver_ok();
        assert!(g.model.activated.lock().unwrap().is_empty());
        g.w(0x14, 0, 1);
        assert_eq!(g.status(), 0);
        assert_eq!(g.t.counters.needs_reset.get(), 1);
    }
}

#[test]
fn queue_outside_guest_memory_sets_needs_reset() {
    for base in [0xff000u64, 1 << 30, u64::MAX - 0x1000, 0x10008] {
        let g = Guest::new(Model::default());
        g.negotiate();
        g.setup_queue(0, base, 256);
        assert_ne!(g.status() & STATUS_NEEDS_RESET, 0, "base {base:#x}");
        assert_eq!(g.r(0x1c, 2), 0, "queue not enabled");
    }
}

#[test]
fn msix_vector_beyond_table_sets_needs_reset() {
    let g = Guest::new(Model::default());
    g.negotiate();
    g.w(0x16, 0, 2);
    g.w(0x1a, 3, 2);
    assert_eq!(g.r(0x1a, 2), u64::from(NO_VECTOR));
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
    let g = Guest::new(Model::default());
    g.w(0x10, 0x7fff, 2);
    assert_eq!(g.r(0x10, 2), u64::from(NO_VECTOR));
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn driver_ok_without_features_ok_or_failed_activation_needs_reset() {
    let g = Guest::new(Model::default());
    g.w(0x14, 7, 1);
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
    let g = Guest::new(Model {
        fail_activate: true,
        ..Default::default()
    });
    g.negotiate();
    g.setup_queue(0, 0x10000, 64);
    g.driver_ok();
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn bar_conflict_while_live_needs_reset() {
    let g = Guest::new(Model::default());
    g.negotiate();
    g.setup_queue(0, 0x10000, 64);
    g.driver_ok();
    g.t.bar_placed(0, None, true);
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn stray_accesses_are_harmless() {
    let g = Guest::new(Model::default());
    g.w(0x16, 9, 2);
    assert_eq!(g.r(0x18, 2), 0, "no such queue");
    assert_eq!(g.r(0x1a, 2), u64::from(NO_VECTOR));
    g.w(0x18, 64, 2);
    g.w(0x1c, 1, 2);
    g.w(0x7ff0, 1, 4);
    assert_eq!(g.r(0x7ff0, 4), 0);
    assert_eq!(g.r(0x37, 1), 0);
    assert!(g.t.counters.bad_accesses.get() >= 3);
    assert_eq!(g.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn reset_resets_device_and_registers() {
    let g = Guest::new(Model::default());
    g.negotiate();
    g.setup_queue(0, 0x10000, 64);
    g.w(0x1a, 0, 2);
    g.driver_ok();
    g.w(0x14, 0, 1);
    assert_eq!(*g.model.resets.lock().unwrap(), 1);
    g.w(0x16, 0, 2);
    assert_eq!(
        (g.r(0x18, 2), g.r(0x1c, 2), g.r(0x1a, 2)),
        (256, 0, u64::from(NO_VECTOR))
    );
}

#[test]
fn msix_enable_binds_queue_irqfds_and_state_round_trips() {
    let g = Guest::new(Model::default());
    // Enable MSI-X through the capability, program and unmask vector 0.
    let c = g.t.state().config;
    let mut cap = c.read_u16(0x34) as u8 as usize;
    while c.read_u16(cap) as u8 != 0x11 {
        cap = (c.read_u16(cap) >> 8) as usize;
    }
    let ctrl = g.t.state().config.read_u16(cap + 2);
    g.t.config_write((cap + 2) as u64, &(ctrl | 0x8000).to_le_bytes());
    g.w(MSIX_TABLE_OFFSET, 0xfee0_0000, 8);
    g.w(MSIX_TABLE_OFFSET + 8, 0x41, 4);
    g.w(MSIX_TABLE_OFFSET + 12, 0, 4);
    g.negotiate();
    g.setup_queue(0, 0x10000, 64);
    g.w(0x1a, 0, 2);
    let rec = g.irqs.snapshot();
    assert_eq!(rec.irqfds.len(), 1, "queue 0 call eventfd is an irqfd");
    assert_eq!(rec.routes.values().next().unwrap().data, 0x41);
    let saved = g.t.save().unwrap();
    let h = Guest::new(Model::default());
    h.t.restore(&saved).unwrap();
    assert_eq!(h.t.state(), g.t.state());
    assert_eq!(h.irqs.snapshot().irqfds.len(), 1);
    assert!(h.t.restore(&serde_json::json!({"transport": 5})).is_err());
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let g = Guest::new(Model::default());
    let c = g.t.state().config;
    let mut cap = c.read_u16(0x34) as u8 as usize;
    while !(c.read_u16(cap) as u8 == 0x09 && (c.read_u32(cap) >> 24) as u8 == 5) {
        cap = (c.read_u16(cap) >> 8) as usize;
    }
    // num_queues (common config 0x12, 2 bytes) through the window.
    g.t.config_write((cap + 4) as u64, &[0]);
    g.t.config_write((cap + 8) as u64, &0x12u32.to_le_bytes());
    g.t.config_write((cap + 12) as u64, &2u32.to_le_bytes());
    let mut v = [0u8; 2];
    g.t.config_read((cap + 16) as u64, &mut v);
    assert_eq!(u16::from_le_bytes(v), 2);
    // A write goes through too: device status.
    g.t.config_write((cap + 8) as u64, &0x14u32.to_le_bytes());
    g.t.config_write((cap + 12) as u64, &1u32.to_le_bytes());
    g.t.config_write((cap + 16) as u64, &[STATUS_ACKNOWLEDGE]);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE);
    // Width mismatch or beyond the BAR: refused, reads zero.
    g.t.config_write((cap + 8) as u64, &(BAR_SIZE as u32).to_le_bytes());
    let mut w = [0xffu8; 1];
    g.t.config_read((cap + 16) as u64, &mut w);
    assert_eq!(w, [0]);
    g.t.config_write((cap + 16) as u64, &[1, 2, 3, 4]);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE);
}
