//! Policy files and kernel images are user-supplied: their parsers must never panic.
//!
//! `cargo +nightly fuzz run parse_policy_and_kernel` (from crates/attest).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = outboard_attest::Policy::from_json(text) {
            assert_eq!(
                outboard_attest::Policy::from_json(&p.to_json()).expect("reparse"),
                p
            );
        }
    }
    if let Ok(layout) = outboard_attest::kernel::KernelLayout::parse(data) {
        let total: usize = layout.measured_bytes(data).map(<[u8]>::len).sum();
        assert_eq!(total as u64, layout.measured_len());
    }
});
