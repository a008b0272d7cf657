//! A hostile driver: any sequence of BAR and configuration accesses on a virtio-pci transport
//! (common config, ISR, device config, notify, MSI-X) must leave the VMM standing.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outboard_pci::{PciDevice, RecordingInterrupts};
use outboard_virtio_devices::{ActiveQueue, Error, VirtioDevice, VirtioPciTransport};
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
        1 << 32
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

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = VirtioPciTransport::new("fuzz", Arc::new(Sink), mem, irqs.clone(), irqs).unwrap();
    t.set_bar_address(0, 1 << 32);
    t.bar_placed(0, Some(1 << 32), false);
    for op in data.chunks(8) {
        if op.len() < 8 {
            break;
        }
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let value = [op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]];
        let mut out = [0u8; 8];
        match op[0] % 5 {
            0 => t.bar_write(0, offset & 0x7fff, &value[..len]),
            1 => t.bar_read(0, offset & 0x7fff, &mut out[..len]),
            2 => t.config_write(offset & 0xfff, &value[..len]),
            3 => t.config_read(offset & 0xfff, &mut out[..len]),
            _ => t.bar_placed(
                0,
                (op[4] & 1 == 0).then_some(u64::from(op[5]) << 32),
                op[6] & 1 == 1,
            ),
        }
    }
});
