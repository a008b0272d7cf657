//! Arbitrary guest port I/O against the legacy devices as outboard-vmm places them: no access
//! may panic, whatever its port, size or data.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outboard_devices::acpi_pm::AcpiPm;
use outboard_devices::i8042::I8042;
use outboard_devices::serial::SerialDevice;
use outboard_devices::Bus;
use vmm_sys_util::eventfd::EventFd;

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

fuzz_target!(|data: &[u8]| {
    let bus = Bus::new();
    let serial = Arc::new(SerialDevice::new(evt(), Box::new(std::io::sink())));
    bus.insert(0x3f8, 8, serial.clone()).unwrap();
    bus.insert(0x60, 5, Arc::new(I8042::new(evt()))).unwrap();
    bus.insert(0x600, 6, Arc::new(AcpiPm::new(5, evt()))).unwrap();
    // Each op: kind, port (2 bytes), size, then `size` data bytes for writes.
    let mut ops = data;
    while ops.len() >= 4 {
        let (kind, port, size) = (ops[0], u16::from_le_bytes([ops[1], ops[2]]), (ops[3] % 8) as usize + 1);
        ops = &ops[4..];
        match kind % 3 {
            0 => {
                let mut buf = vec![0u8; size];
                bus.read(u64::from(port), &mut buf);
            }
            1 => {
                let take = size.min(ops.len());
                bus.write(u64::from(port), &ops[..take]);
                ops = &ops[take..];
            }
            _ => {
                let take = size.min(ops.len());
                serial.enqueue_input(&ops[..take]);
                ops = &ops[take..];
            }
        }
    }
});
