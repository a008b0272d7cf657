//! The transport wired to a real KVM VM (needs /dev/kvm): notify addresses become ioeventfds,
//! MSI-X vectors become GSI routes, and a queue's call eventfd is an irqfd that KVM consumes,
//! so an interrupt from a backend never passes through a VMM thread.

use std::sync::Arc;
use std::time::Duration;

use outboard_pci::{KvmInterrupts, PciDevice};
use outboard_virtio_devices::transport::{VirtioPciTransport, MSIX_TABLE_OFFSET};
use outboard_virtio_devices::{ActiveQueue, Error, VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct Sink;

impl VirtioDevice for Sink {
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_max_size(&self) -> u16 {
        64
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    fn activate(&self, _features: u64, _queues: Vec<ActiveQueue>) -> Result<(), Error> {
        Ok(())
    }
    fn reset(&self) {}
}

#[test]
fn kick_and_call_fds_are_registered_with_kvm() {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm unavailable ({e})");
            return;
        }
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let irqs = Arc::new(KvmInterrupts::new(Arc::new(vm)));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let t = VirtioPciTransport::new("virtio-blk", Arc::new(Sink), mem, irqs.clone(), irqs).unwrap();
    let bar = 0x100_0000_0000u64;
    t.set_bar_address(0, bar);
    // Placing the BAR registers one ioeventfd per queue; moving it re-registers them (KVM
    // refuses a duplicate registration, so a stale one would show up as an error here).
    t.bar_placed(0, Some(bar), false);
    t.bar_placed(0, Some(bar + 0x10_0000), false);
    t.bar_placed(0, Some(bar), false);

    // Enable MSI-X, program vector 0, bind queue 0's call eventfd to it.
    let config = t.state().config;
    let mut cap = usize::from(config.read_u16(0x34) as u8);
    while config.read_u16(cap) as u8 != 0x11 {
        cap = usize::from((config.read_u16(cap) >> 8) as u8);
    }
    t.config_write(cap as u64 + 2, &0x8000u16.to_le_bytes());
    t.bar_write(0, MSIX_TABLE_OFFSET, &0xfee0_0000u64.to_le_bytes());
    t.bar_write(0, MSIX_TABLE_OFFSET + 8, &0x31u32.to_le_bytes());
    t.bar_write(0, MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    t.bar_write(0, 0x16, &0u16.to_le_bytes());
    t.bar_write(0, 0x1a, &0u16.to_le_bytes());
    let counters: std::collections::BTreeMap<_, _> = outboard_devices::Lifecycle::counters(&t)
        .into_iter()
        .collect();
    assert_eq!(counters["msix_errors"], 0, "KVM refused a route or irqfd");

    // A backend signalling the call eventfd: KVM takes it (the count is consumed).
    let call = t.call_fds()[0].clone();
    call.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(call.read().is_err(), "the irqfd did not consume the signal");
    // Masked, the signal stays in the eventfd and shows in the PBA.
    t.bar_write(0, MSIX_TABLE_OFFSET + 12, &1u32.to_le_bytes());
    call.write(1).unwrap();
    let mut pba = [0u8; 1];
    t.bar_read(
        0,
        outboard_virtio_devices::transport::MSIX_PBA_OFFSET,
        &mut pba,
    );
    assert_eq!(pba[0], 1);
    // Unmasking re-registers the irqfd; KVM injects a signal already pending at registration
    // (it does not consume that count, so only the PBA tells).
    t.bar_write(0, MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    t.bar_read(
        0,
        outboard_virtio_devices::transport::MSIX_PBA_OFFSET,
        &mut pba,
    );
    assert_eq!(pba[0], 0);
    let counters: std::collections::BTreeMap<_, _> = outboard_devices::Lifecycle::counters(&t)
        .into_iter()
        .collect();
    assert_eq!(counters["msix_errors"], 0);
    assert_eq!(
        counters["notifier_errors"], 0,
        "an ioeventfd (re)registration failed"
    );
}
