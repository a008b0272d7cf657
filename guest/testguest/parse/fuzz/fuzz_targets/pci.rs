//! A hostile device's configuration space and MCFG table: the capability walk, MSI-X and virtio
//! capability decoding, BAR sizing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_testguest_parse::pci;

fuzz_target!(|data: &[u8]| {
    let cfg = &data[..data.len().min(pci::CONFIG_LEN)];
    for cap in pci::capabilities(cfg).take(1000) {
        let Ok(cap) = cap else { break };
        let _ = pci::MsixCap::parse(cfg, cap.offset);
        if let Ok(Some(vc)) = pci::VirtioCap::parse(cfg, cap.offset) {
            let _ = vc.fits(u32::from(cap.offset), u64::from(vc.offset));
        }
    }
    for bar in cfg.chunks_exact(8).take(6) {
        let lo = u32::from_le_bytes([bar[0], bar[1], bar[2], bar[3]]);
        let hi = u32::from_le_bytes([bar[4], bar[5], bar[6], bar[7]]);
        let _ = pci::bar_kind(lo);
        let _ = pci::mem_bar_size(lo, Some(hi));
        let _ = pci::mem_bar_size(lo, None);
    }
    if let Ok(Some(ecam)) = pci::parse_mcfg(data) {
        let _ = ecam.offset(data.len() as u8, 31, 7);
    }
});
