//! Parses back the tables `write_tables` produced, as a guest would.

use super::*;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// Reads a whole SDT at `addr`, checking signature and checksum.
fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = read(mem, addr, 36);
    assert_eq!(&header[0..4], signature);
    let len = u32_at(&header, 4) as usize;
    let bytes = read(mem, addr, len);
    assert_eq!(
        sum(&bytes),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert_eq!(&bytes[10..16], &OEM_ID);
    bytes
}

#[test]
fn rsdp_points_to_xsdt_with_fadt_and_madt() {
    let mem = mem();
    let tables = write_tables(&mem, 2).unwrap();
    assert_eq!(tables.rsdp, 0xe_0000);
    let rsdp = read(&mem, tables.rsdp, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[0..20]), 0);
    assert_eq!(sum(&rsdp), 0);
    assert_eq!(rsdp[15], 2);
    assert_eq!(u64_at(&rsdp, 24), tables.xsdt);

    let xsdt = table(&mem, tables.xsdt, b"XSDT");
    assert_eq!(xsdt.len(), 36 + 16);
    assert_eq!(u64_at(&xsdt, 36), tables.fadt);
    assert_eq!(u64_at(&xsdt, 44), tables.madt);
}

#[test]
fn fadt_is_a_full_acpi_pc_with_pm1_at_0x600() {
    let mem = mem();
    let tables = write_tables(&mem, 1).unwrap();
    let fadt = table(&mem, tables.fadt, b"FACP");
    assert_eq!(fadt.len(), 276);
    assert_eq!(u16_at(&fadt, 46), 9, "SCI_INT");
    assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD: ACPI always enabled");
    assert_eq!(u32_at(&fadt, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(&fadt, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(fadt[88], 4, "PM1_EVT_LEN");
    assert_eq!(fadt[89], 2, "PM1_CNT_LEN");
    assert_eq!(u32_at(&fadt, 112) & (1 << 20), 0, "not HW_REDUCED_ACPI");
    assert_eq!(u16_at(&fadt, 109) & 0x2, 0x2, "8042 present");
    assert_eq!(u64_at(&fadt, 132), tables.facs);
    assert_eq!(u64_at(&fadt, 140), tables.dsdt);
    // X_PM1a_EVT_BLK and X_PM1a_CNT_BLK: system I/O GAS.
    assert_eq!((fadt[148], fadt[149]), (1, 32));
    assert_eq!(u64_at(&fadt, 152), 0x600);
    assert_eq!((fadt[172], fadt[173]), (1, 16));
    assert_eq!(u64_at(&fadt, 176), 0x604);

    let facs = read(&mem, tables.facs, 64);
    assert_eq!(&facs[0..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
    assert_eq!(tables.facs % 64, 0);
}

#[test]
fn dsdt_has_s5_and_com1() {
    let mem = mem();
    let tables = write_tables(&mem, 1).unwrap();
    let dsdt = table(&mem, tables.dsdt, b"DSDT");
    let aml = &dsdt[36..];
    let s5 = aml
        .windows(4)
        .position(|w| w == b"_S5_")
        .expect("_S5_ present");
    // NameOp before the name; then PackageOp, PkgLength, NumElements, BytePrefix 5.
    assert_eq!(aml[s5 - 1], 0x08);
    assert_eq!(aml[s5 + 4], 0x12);
    assert_eq!(aml[s5 + 6], 4);
    assert_eq!(&aml[s5 + 7..s5 + 9], &[0x0a, 5]);
    assert!(aml.windows(4).any(|w| w == b"COM1"));
    // EISAID("PNP0501") encodes as 0x0105d041.
    assert!(aml.windows(4).any(|w| w == 0x0105_d041u32.to_le_bytes()));
    // IO descriptor for 0x3f8, length 8.
    assert!(aml
        .windows(8)
        .any(|w| w == [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic() {
    for cpus in [1usize, 2, 8] {
        let mem = mem();
        let tables = write_tables(&mem, cpus).unwrap();
        let madt = table(&mem, tables.madt, b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let mut off = 44;
        let mut apic_ids = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            match kind {
                0 => {
                    assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                    apic_ids.push(madt[off + 3]);
                }
                1 => ioapics.push(u32_at(&madt, off + 4)),
                2 => overrides.push((madt[off + 3], u32_at(&madt, off + 4))),
                _ => {}
            }
            off += len;
        }
        assert_eq!(apic_ids, (0..cpus as u8).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![0xfec0_0000]);
        assert_eq!(overrides, vec![(0, 2), (9, 9)]);
    }
}

#[test]
fn too_many_cpus_is_an_error() {
    assert!(matches!(
        write_tables(&mem(), 300),
        Err(Error::TooManyCpus(300))
    ));
}

#[test]
fn extras_go_into_the_dsdt_and_xsdt() {
    let mem = mem();
    let mut extra = Sdt::new(*b"MCFG", 44, 1, OEM_ID, *b"OBVMMCFG", OEM_REVISION);
    extra.append_slice(&[0u8; 16]);
    let extras = AcpiExtras {
        dsdt_aml: b"\x10\x0a\\_SB_XTRA".to_vec(),
        tables: vec![extra.as_slice().to_vec()],
    };
    let tables = write_tables_with(&mem, 1, &extras).unwrap();
    let xsdt = table(&mem, tables.xsdt, b"XSDT");
    assert_eq!(xsdt.len(), 36 + 24, "FADT, MADT and the extra table");
    let mcfg = table(&mem, u64_at(&xsdt, 52), b"MCFG");
    assert_eq!(mcfg.len(), 60);
    let dsdt = table(&mem, tables.dsdt, b"DSDT");
    assert!(dsdt.ends_with(b"XTRA"));
}
