//! A hostile device's used ring: indices and ids in any order; the bookkeeping never panics and
//! never counts a slot twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_testguest_parse::{netframe, virtq, vsock};

fuzz_target!(|data: &[u8]| {
    let Some((&size_log, rest)) = data.split_first() else { return };
    let size = 1u16 << (size_log % 16);
    let mut slots = virtq::Slots::new(size, 3);
    let mut last = 0u16;
    for chunk in rest.chunks_exact(6) {
        let used = u16::from_le_bytes([chunk[0], chunk[1]]);
        let id = u32::from_le_bytes([chunk[2], chunk[3], chunk[4], chunk[5]]);
        let _ = slots.take();
        if virtq::new_used(last, used, size).is_ok() {
            last = used;
        }
        let before = slots.in_flight();
        if slots.complete(id).is_ok() {
            assert_eq!(slots.in_flight() + 1, before);
        }
        let _ = virtq::slot(used, size);
    }
    let _ = netframe::parse(data);
    let _ = vsock::Header::decode(data);
});
