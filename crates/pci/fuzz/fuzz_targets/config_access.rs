//! Guest configuration accesses (ECAM and 0xCF8/0xCFC) and MSI-X table/PBA accesses in any
//! order, width and offset: nothing may panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outboard_devices::{Bus, BusDevice};
use outboard_pci::msix::Msix;
use outboard_pci::{PciConfigIo, PciEcam, PciRoot, PciWindows, RecordingInterrupts};

fuzz_target!(|data: &[u8]| {
    let mmio = Arc::new(Bus::new());
    let root = PciRoot::new(
        mmio,
        PciWindows {
            mmio32_start: 0xc000_0000,
            mmio32_size: 0x2000_0000,
            mmio64_start: 1 << 40,
            mmio64_size: 1 << 36,
        },
    );
    let ecam = PciEcam::new(root.clone());
    let cf8 = PciConfigIo::new(root);
    let mut msix = Msix::new(8, Arc::new(RecordingInterrupts::default())).unwrap();
    for op in data.chunks(8) {
        if op.len() < 8 {
            break;
        }
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u32::from_le_bytes([op[2], op[3], op[4], 0]));
        let value = [op[5], op[6], op[7], op[5], op[6], op[7], op[5], op[6]];
        let mut out = [0u8; 8];
        match op[0] % 8 {
            0 => ecam.write(offset, &value[..len]),
            1 => ecam.read(offset, &mut out[..len]),
            2 => cf8.write(offset & 7, &value[..len]),
            3 => cf8.read(offset & 7, &mut out[..len]),
            4 => msix.write_table(offset & 0xfff, &value[..len]),
            5 => msix.read_table(offset & 0xfff, &mut out[..len]),
            6 => msix.read_pba(offset & 0xff, &mut out[..len]),
            _ => msix.set_control(u16::from_le_bytes([op[5], op[6]])),
        }
    }
});
