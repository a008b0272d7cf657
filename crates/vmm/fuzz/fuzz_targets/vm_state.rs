//! Arbitrary bytes as a VM state file: decoding must fail with an error, never panic. Inputs
//! with a valid frame (magic, version, length, CRC) around the fuzzed payload reach the JSON
//! reader and the consistency checks too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_vmm::snapshot;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::decode(data);
    let mut framed = snapshot::MAGIC.to_vec();
    framed.extend_from_slice(&snapshot::FORMAT_VERSION.to_le_bytes());
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(data);
    let crc = crc32c_of(&framed);
    framed.extend_from_slice(&crc.to_le_bytes());
    let _ = snapshot::decode(&framed);
});

/// CRC32C (Castagnoli), bitwise: the fuzz crate stays free of extra dependencies.
fn crc32c_of(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
