//! vsock TX packets from a hostile guest: any descriptor layout and content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_virtio_devices::vsock::packet::{read_packet, rx_capacity, write_packet, Header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
    let (layout, content) = data.split_at(data.len().min(48));
    let _ = mem.write_slice(&content[..content.len().min(0x20000)], GuestAddress(0));
    let segments: Vec<(u64, u32, bool)> = layout
        .chunks(6)
        .filter(|c| c.len() == 6)
        .map(|c| {
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], 0]));
            let len = u32::from(u16::from_le_bytes([c[3], c[4]]));
            (addr, len, c[5] & 1 == 1)
        })
        .collect();
    if let Ok((header, payload)) = read_packet(&mem, &segments) {
        let _ = Header::parse(&header.bytes());
        let _ = write_packet(
            &mem,
            &segments,
            &header,
            &payload[..payload.len().min(rx_capacity(&segments))],
        );
    }
});
