use super::*;

fn cfg_with_caps(caps: &[(u8, u8, u8)]) -> [u8; CONFIG_LEN] {
    // (offset, id, next)
    let mut cfg = [0u8; CONFIG_LEN];
    cfg[STATUS] = STATUS_CAP_LIST as u8;
    cfg[CAP_PTR] = caps.first().map_or(0, |c| c.0);
    for &(off, id, next) in caps {
        cfg[usize::from(off)] = id;
        cfg[usize::from(off) + 1] = next;
    }
    cfg
}

#[test]
fn walks_a_normal_list() {
    let cfg = cfg_with_caps(&[(0x40, 0x11, 0x50), (0x50, 0x09, 0)]);
    let caps: std::vec::Vec<_> = capabilities(&cfg).collect();
    assert_eq!(
        caps,
        [
            Ok(Cap {
                id: 0x11,
                offset: 0x40
            }),
            Ok(Cap {
                id: 0x09,
                offset: 0x50
            })
        ]
    );
}

#[test]
fn no_list_without_the_status_bit() {
    let mut cfg = cfg_with_caps(&[(0x40, 0x11, 0)]);
    cfg[STATUS] = 0;
    assert_eq!(capabilities(&cfg).count(), 0);
}

#[test]
fn loops_and_bad_pointers_end_the_walk() {
    let cfg = cfg_with_caps(&[(0x40, 1, 0x50), (0x50, 2, 0x40)]);
    let caps: std::vec::Vec<_> = capabilities(&cfg).collect();
    assert_eq!(caps.last(), Some(&Err(Error::CapLoop { ptr: 0x40 })));
    assert_eq!(caps.len(), 3);
    let self_loop = cfg_with_caps(&[(0x44, 1, 0x47)]);
    assert_eq!(capabilities(&self_loop).count(), 2);
    let low = cfg_with_caps(&[(0x40, 1, 0x10)]);
    assert_eq!(
        capabilities(&low).nth(1),
        Some(Err(Error::CapPointer { ptr: 0x10 }))
    );
    // A short snapshot: the pointer is past its end.
    let cfg = cfg_with_caps(&[(0x40, 1, 0xFC)]);
    assert_eq!(
        capabilities(&cfg[..0x80]).nth(1),
        Some(Err(Error::CapPointer { ptr: 0xFC }))
    );
}

#[test]
fn every_byte_pattern_terminates() {
    // Each cap pointing to a pseudo-random next: the walk is bounded whatever the bytes.
    let mut cfg = [0u8; CONFIG_LEN];
    cfg[STATUS] = 0x10;
    let mut x = 0x1234_5678u32;
    for seed in 0..200 {
        for b in cfg[CAP_PTR..].iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345 + seed);
            *b = (x >> 16) as u8;
        }
        cfg[CAP_PTR] |= 0x40;
        assert!(capabilities(&cfg).count() <= MAX_CAPS + 1);
    }
}

#[test]
fn bar_sizes() {
    assert_eq!(bar_kind(0xFE00_000C), BarKind::Mem64);
    assert_eq!(bar_kind(0xC001), BarKind::Io);
    assert_eq!(bar_kind(0x0000_0002), BarKind::Reserved);
    assert_eq!(mem_bar_size(0xFFFF_C000, None), Some(0x4000));
    assert_eq!(mem_bar_size(0xFFFF_C00C, Some(0xFFFF_FFFF)), Some(0x4000));
    assert_eq!(mem_bar_size(0xC, Some(0xFFFF_FFF0)), Some(0x10_0000_0000));
    assert_eq!(mem_bar_size(0xC, Some(0xFFFF_FFFF)), Some(0x1_0000_0000));
    // Unimplemented BARs read back zero.
    assert_eq!(mem_bar_size(0, None), None);
    assert_eq!(mem_bar_size(0, Some(0)), None);
    // Holes in the mask: not a power-of-two window.
    assert_eq!(mem_bar_size(0xFF00_F000, None), None);
    assert_eq!(mem_bar_size(0xFFFF_F000, Some(0xFF00_FFFF)), None);
    assert_eq!(mem_bar_base(0xFEBC_000C, 1), 0x1_FEBC_0000);
}

fn msix_cfg(control: u16, table: u32, pba: u32) -> [u8; CONFIG_LEN] {
    let mut cfg = cfg_with_caps(&[(0x40, CAP_ID_MSIX, 0)]);
    cfg[0x42..0x44].copy_from_slice(&control.to_le_bytes());
    cfg[0x44..0x48].copy_from_slice(&table.to_le_bytes());
    cfg[0x48..0x4C].copy_from_slice(&pba.to_le_bytes());
    cfg
}

#[test]
fn msix_capability() {
    let m = MsixCap::parse(&msix_cfg(0x0002, 0x1000_0001, 0x0000_0801), 0x40).unwrap();
    assert_eq!(
        (m.table_size, m.table_bar, m.table_offset),
        (3, 1, 0x1000_0000)
    );
    assert_eq!((m.pba_bar, m.pba_offset), (1, 0x800));
    assert_eq!(
        MsixCap::parse(&msix_cfg(0x7FF, 0x6, 0), 0x40),
        Err(Error::CapBar {
            offset: 0x40,
            bar: 6
        })
    );
    assert_eq!(
        MsixCap::parse(&msix_cfg(0, 0, 0), 0xFC),
        Err(Error::CapTruncated { offset: 0xFC })
    );
    assert_eq!(
        MsixCap::parse(&msix_cfg(0xFFFF, 0, 0), 0x40)
            .unwrap()
            .table_size,
        2048
    );
}

fn virtio_cfg(
    cap_len: u8,
    cfg_type: u8,
    bar: u8,
    offset: u32,
    length: u32,
    mult: u32,
) -> [u8; CONFIG_LEN] {
    let mut cfg = cfg_with_caps(&[(0x40, CAP_ID_VENDOR, 0)]);
    cfg[0x42] = cap_len;
    cfg[0x43] = cfg_type;
    cfg[0x44] = bar;
    cfg[0x48..0x4C].copy_from_slice(&offset.to_le_bytes());
    cfg[0x4C..0x50].copy_from_slice(&length.to_le_bytes());
    cfg[0x50..0x54].copy_from_slice(&mult.to_le_bytes());
    cfg
}

#[test]
fn virtio_capabilities() {
    let c = VirtioCap::parse(
        &virtio_cfg(20, VIRTIO_CAP_NOTIFY, 4, 0x3000, 0x1000, 4),
        0x40,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (c.bar, c.offset, c.length, c.notify_multiplier),
        (4, 0x3000, 0x1000, 4)
    );
    assert!(c.fits(0x1000, 0x4000));
    assert!(!c.fits(0x1001, 0x4000));
    assert!(!c.fits(4, 0x3800));
    // A notify capability too short for its multiplier, a length past the space.
    assert!(VirtioCap::parse(&virtio_cfg(16, VIRTIO_CAP_NOTIFY, 4, 0, 0, 0), 0x40).is_err());
    assert!(VirtioCap::parse(&virtio_cfg(200, VIRTIO_CAP_COMMON, 4, 0, 0, 0), 0x40).is_err());
    assert!(VirtioCap::parse(&virtio_cfg(8, VIRTIO_CAP_COMMON, 4, 0, 0, 0), 0x40).is_err());
    // Ignored: PCI cfg access, unknown types, BARs above 5.
    assert_eq!(
        VirtioCap::parse(&virtio_cfg(20, VIRTIO_CAP_PCI_CFG, 0, 0, 0, 0), 0x40),
        Ok(None)
    );
    assert_eq!(
        VirtioCap::parse(&virtio_cfg(16, 9, 0, 0, 0, 0), 0x40),
        Ok(None)
    );
    assert_eq!(
        VirtioCap::parse(&virtio_cfg(16, 1, 7, 0, 0, 0), 0x40),
        Ok(None)
    );
    // Offset + length overflowing 32 bits still compares correctly.
    let c = VirtioCap::parse(&virtio_cfg(16, 1, 0, u32::MAX, u32::MAX, 0), 0x40)
        .unwrap()
        .unwrap();
    assert!(!c.fits(4, u64::from(u32::MAX)));
}

#[test]
fn mcfg() {
    let mut body = [0u8; 8 + 32];
    body[8..16].copy_from_slice(&0xB000_0000u64.to_le_bytes());
    body[18] = 0;
    body[19] = 0xFF;
    let e = parse_mcfg(&body[..24]).unwrap().unwrap();
    assert_eq!((e.base, e.start_bus, e.end_bus), (0xB000_0000, 0, 0xFF));
    assert_eq!(e.offset(1, 2, 3), Some(0x10_0000 | 2 << 15 | 3 << 12));
    assert_eq!(e.offset(0, 32, 0), None);
    assert_eq!(parse_mcfg(&body[..20]), Err(Error::Mcfg));
    assert_eq!(parse_mcfg(&body[..4]), Err(Error::Mcfg));
    // Only segment 1 / unaligned base: nothing usable.
    let mut other = body;
    other[16] = 1;
    other[8] = 1;
    assert_eq!(parse_mcfg(&other[..24]), Ok(None));
    let bus5 = Ecam {
        base: 0xE000_0000,
        start_bus: 5,
        end_bus: 5,
    };
    assert_eq!(bus5.offset(4, 0, 0), None);
    assert_eq!(bus5.offset(5, 0, 0), Some(5 << 20));
}
