//! Host tests of the ACPI walk, with well-formed and hostile tables.

use super::*;
use crate::FlatMem;
use std::vec;
use std::vec::Vec;

const BASE: u64 = 0xE_0000;
const RSDP_AT: u64 = 0xE_0040;
const XSDT_AT: u64 = 0x10_0000;
const RSDT_AT: u64 = 0x10_0080;
const FADT_AT: u64 = 0x10_0100;
const DSDT_AT: u64 = 0x10_0400;
const MADT_AT: u64 = 0x10_0800;

fn fix_checksum(t: &mut [u8], at: usize) {
    t[at] = 0;
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[at] = 0u8.wrapping_sub(sum);
}

fn sdt(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; HEADER_LEN];
    t[..4].copy_from_slice(sig);
    t[4..8].copy_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(b"OUTBRD");
    t.extend_from_slice(body);
    fix_checksum(&mut t, 9);
    t
}

fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[15] = revision;
    r[16..20].copy_from_slice(&rsdt.to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    fix_checksum(&mut r[..20], 8);
    fix_checksum(&mut r, 32);
    r
}

fn fadt(len: usize, pm1a_cnt: u32, dsdt: u32, flags: u32, sleep_control: u64) -> Vec<u8> {
    let mut body = vec![0u8; len - HEADER_LEN];
    let mut put = |off: usize, b: &[u8]| {
        if off + b.len() <= len {
            body[off - HEADER_LEN..off - HEADER_LEN + b.len()].copy_from_slice(b)
        }
    };
    put(40, &dsdt.to_le_bytes());
    put(56, &0x600u32.to_le_bytes());
    put(64, &pm1a_cnt.to_le_bytes());
    put(76, &0x608u32.to_le_bytes());
    put(88, &[4, 2, 0, 4]);
    put(112, &flags.to_le_bytes());
    put(244, &[SPACE_IO, 8, 0, 1]);
    put(248, &sleep_control.to_le_bytes());
    sdt(b"FACP", if len >= 244 { 5 } else { 1 }, &body)
}

fn madt(entries: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0xFEE0_0000u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    for e in entries {
        body.extend_from_slice(e);
    }
    sdt(b"APIC", 5, &body)
}

fn lapic(apic_id: u8, flags: u32) -> Vec<u8> {
    let mut e = vec![0, 8, apic_id, apic_id];
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn x2apic(apic_id: u32, flags: u32) -> Vec<u8> {
    let mut e = vec![9, 16, 0, 0];
    e.extend_from_slice(&apic_id.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e.extend_from_slice(&apic_id.to_le_bytes());
    e
}

struct Image(Vec<u8>);

impl Image {
    /// A BIOS area plus the first 64 KiB above 1 MiB, with a complete, valid table set.
    fn good() -> Image {
        let mut img = Image(vec![0u8; 0x3_0000]);
        img.put(RSDP_AT, &rsdp(2, RSDT_AT as u32, XSDT_AT));
        let mut xsdt_body = Vec::new();
        for a in [FADT_AT, MADT_AT] {
            xsdt_body.extend_from_slice(&a.to_le_bytes());
        }
        img.put(XSDT_AT, &sdt(b"XSDT", 1, &xsdt_body));
        let mut rsdt_body = Vec::new();
        for a in [FADT_AT as u32, MADT_AT as u32] {
            rsdt_body.extend_from_slice(&a.to_le_bytes());
        }
        img.put(RSDT_AT, &sdt(b"RSDT", 1, &rsdt_body));
        img.put(FADT_AT, &fadt(276, 0x604, DSDT_AT as u32, 0, 0));
        img.put(
            DSDT_AT,
            &sdt(b"DSDT", 2, b"\x08_S5_\x12\x06\x04\x0a\x05\x0a\x05\x00\x00"),
        );
        let cpus = [
            lapic(0, 1),
            lapic(1, 1),
            lapic(2, 0),
            x2apic(300, 1),
            x2apic(301, 2),
        ];
        let refs: Vec<&[u8]> = cpus.iter().map(Vec::as_slice).collect();
        img.put(MADT_AT, &madt(&refs));
        img
    }

    fn put(&mut self, addr: u64, b: &[u8]) {
        let off = (addr - BASE) as usize;
        self.0[off..off + b.len()].copy_from_slice(b);
    }

    fn mem(&self) -> FlatMem<'_> {
        FlatMem {
            base: BASE,
            bytes: &self.0,
        }
    }
}

#[test]
fn walks_a_complete_table_set() {
    let img = Image::good();
    let mem = img.mem();
    let rsdp = locate_rsdp(&mem, Some(RSDP_AT)).unwrap();
    assert_eq!(rsdp.xsdt, XSDT_AT);
    let t = walk(&mem, rsdp).unwrap();
    assert_eq!(t.root.signature(), Sig::XSDT);
    let fadt = t.fadt.unwrap();
    assert_eq!(fadt.pm1a_cnt, Gas::io(0x604, 2));
    assert_eq!(fadt.pm1b_cnt, None);
    assert_eq!(fadt.pm_timer, Gas::io(0x608, 4));
    assert!(!fadt.hw_reduced());
    assert_eq!(t.dsdt.unwrap().body()[1..5], *b"_S5_");
    let madt = t.madt.unwrap();
    let ids: Vec<u32> = madt.enabled_cpus().map(|c| c.apic_id).collect();
    assert_eq!(ids, [0, 1, 300]);
    assert_eq!(madt.lapic_addr(), 0xFEE0_0000);
}

#[test]
fn scans_for_the_rsdp_when_the_hint_is_missing_or_bad() {
    let img = Image::good();
    let mem = img.mem();
    assert_eq!(locate_rsdp(&mem, None).unwrap().addr, RSDP_AT);
    assert_eq!(locate_rsdp(&mem, Some(0xE_0010)).unwrap().addr, RSDP_AT);
    assert_eq!(locate_rsdp(&mem, Some(u64::MAX - 4)).unwrap().addr, RSDP_AT);
}

#[test]
fn rejects_rsdps_with_bad_checksums() {
    let mut img = Image::good();
    let mut r = rsdp(2, 0, XSDT_AT);
    r[32] ^= 0xff; // extended checksum area
    img.put(RSDP_AT, &r);
    assert_eq!(locate_rsdp(&img.mem(), Some(RSDP_AT)), Err(Error::NoRsdp));
    let mut r = rsdp(0, RSDT_AT as u32, 0);
    r[8] ^= 1;
    img.put(RSDP_AT, &r);
    assert_eq!(
        parse_rsdp(&r, 1),
        Err(Error::Checksum {
            sig: Sig::RSDP,
            addr: 1
        })
    );
    assert!(parse_rsdp(&r[..19], 1).is_err());
}

#[test]
fn falls_back_to_the_rsdt_when_the_xsdt_is_bad() {
    let mut img = Image::good();
    img.put(XSDT_AT + 9, &[0x55]);
    let mem = img.mem();
    let t = walk(&mem, locate_rsdp(&mem, None).unwrap()).unwrap();
    assert_eq!(t.root.signature(), Sig::RSDT);
    assert_eq!(t.madt.unwrap().enabled_cpus().count(), 3);
}

#[test]
fn rejects_lengths_past_memory_or_out_of_range() {
    let mut img = Image::good();
    let mem_end = BASE + img.0.len() as u64;
    // The MADT claims to run past the end of memory.
    img.put(MADT_AT + 4, &((mem_end - MADT_AT + 1) as u32).to_le_bytes());
    let mem = img.mem();
    let t = walk(&mem, locate_rsdp(&mem, None).unwrap()).unwrap();
    assert_eq!(
        t.madt.unwrap_err(),
        Error::Unreadable {
            sig: Sig::MADT,
            addr: MADT_AT
        }
    );
    for len in [0u32, 35, (MAX_TABLE_LEN + 1) as u32, u32::MAX] {
        let mut img = Image::good();
        img.put(DSDT_AT + 4, &len.to_le_bytes());
        let mem = img.mem();
        let t = walk(&mem, locate_rsdp(&mem, None).unwrap()).unwrap();
        assert_eq!(
            t.dsdt.unwrap_err(),
            Error::Length {
                sig: Sig::DSDT,
                addr: DSDT_AT,
                len
            }
        );
    }
}

#[test]
fn reports_bad_checksums_and_signatures() {
    let mut img = Image::good();
    img.put(MADT_AT + 40, &[7]);
    img.put(DSDT_AT, b"SSDT");
    let mem = img.mem();
    let t = walk(&mem, locate_rsdp(&mem, None).unwrap()).unwrap();
    assert_eq!(
        t.madt.unwrap_err(),
        Error::Checksum {
            sig: Sig::MADT,
            addr: MADT_AT
        }
    );
    assert!(matches!(
        t.dsdt,
        Err(Error::Signature {
            expected: Sig::DSDT,
            ..
        })
    ));
    assert!(t.fadt.is_ok());
}

#[test]
fn skips_unreadable_root_entries() {
    let mut img = Image::good();
    let mut body = Vec::new();
    for a in [0, u64::MAX, 0x5000_0000, MADT_AT] {
        body.extend_from_slice(&a.to_le_bytes());
    }
    img.put(XSDT_AT, &sdt(b"XSDT", 1, &body));
    let mem = img.mem();
    let t = walk(&mem, locate_rsdp(&mem, None).unwrap()).unwrap();
    assert_eq!(t.fadt.unwrap_err(), Error::Missing { sig: Sig::FADT });
    assert!(t.dsdt.is_err());
    assert!(t.madt.is_ok());
}

#[test]
fn malformed_madt_entries_end_the_walk() {
    for bad in [
        &[0u8, 0][..],
        &[0, 7, 0, 0, 0, 0, 0],
        &[9, 8, 0, 0, 0, 0, 0, 0],
        &[0, 200, 1],
        &[4],
    ] {
        let good = lapic(0, 1);
        let m = madt(&[&good, bad, &good]);
        let t = Sdt::parse(&m, 1).unwrap();
        let madt = Madt::parse(&t).unwrap();
        let entries: Vec<_> = madt.entries().collect();
        assert_eq!(entries.len(), 2, "{bad:?}");
        assert!(matches!(entries[1], Err(Error::MadtEntry { offset: 52 })));
        assert_eq!(madt.enabled_cpus().count(), 1);
    }
    let short = sdt(b"APIC", 1, &[0; 4]);
    assert!(matches!(
        Madt::parse(&Sdt::parse(&short, 1).unwrap()),
        Err(Error::Length { .. })
    ));
}

#[test]
fn short_fadt_reads_missing_fields_as_absent() {
    let f = fadt(116, 0xb004, 0x1234, 0, 0);
    let fadt = Fadt::parse(&Sdt::parse(&f, 1).unwrap());
    assert_eq!(fadt.dsdt, 0x1234);
    assert_eq!(fadt.pm1a_cnt, Gas::io(0xb004, 2));
    assert_eq!(fadt.sleep_control, None);
    let tiny = sdt(b"FACP", 1, &[]);
    let fadt = Fadt::parse(&Sdt::parse(&tiny, 1).unwrap());
    assert_eq!((fadt.dsdt, fadt.pm1a_cnt, fadt.flags), (0, None, 0));
}

#[test]
fn hw_reduced_fadt_has_a_sleep_control_register() {
    let f = fadt(276, 0, 0, FADT_HW_REDUCED, 0x3c0);
    let fadt = Fadt::parse(&Sdt::parse(&f, 1).unwrap());
    assert!(fadt.hw_reduced());
    assert_eq!(fadt.pm1a_cnt, None);
    let sc = fadt.sleep_control.unwrap();
    assert_eq!((sc.space, sc.bit_width, sc.address), (SPACE_IO, 8, 0x3c0));
}

#[test]
fn sdt_parse_bounds_everything() {
    assert!(Sdt::parse(&[0u8; 35], 1).is_err());
    let t = sdt(b"TEST", 1, &[1, 2, 3]);
    let mut longer = t.clone();
    longer.extend_from_slice(&[9; 10]);
    assert_eq!(Sdt::parse(&longer, 1).unwrap().body(), [1, 2, 3]);
    assert!(Sdt::parse(&t[..t.len() - 1], 1).is_err());
}

#[test]
fn survives_every_single_byte_corruption() {
    let good = Image::good();
    let ranges = [
        (RSDP_AT, 36),
        (XSDT_AT, 0x220),
        (DSDT_AT, 0x40),
        (MADT_AT, 0x80),
    ];
    for at in ranges
        .iter()
        .flat_map(|(a, len)| (a - BASE) as usize..(a - BASE) as usize + len)
    {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut img = Image(good.0.clone());
            img.0[at] ^= flip;
            let mem = img.mem();
            let Ok(rsdp) = locate_rsdp(&mem, Some(RSDP_AT)) else {
                continue;
            };
            let Ok(t) = walk(&mem, rsdp) else { continue };
            if let Ok(madt) = t.madt {
                assert!(madt.enabled_cpus().count() <= madt.entries().count());
            }
            if let Ok(dsdt) = t.dsdt {
                let _ = crate::aml::find_s5(dsdt.body());
            }
        }
    }
}
