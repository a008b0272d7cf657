//! ACPI tables: RSDP → XSDT → {FADT → (FACS, DSDT), MADT}, written into the BIOS area.
//!
//! The platform is a full (not hardware-reduced) ACPI PC, because the Debian cloud kernel needs
//! the MADT for SMP and powers off through PM1a: FADT with PM1a event/control blocks at I/O 0x600
//! and 0x604, SCI on IRQ 9, no SMI command port (ACPI is always enabled), and a DSDT with `\_S5_`
//! (SLP_TYPa = 5) and COM1. The MADT lists one enabled local APIC per vCPU (APIC ID = index) and
//! the IOAPIC, with the usual ISA overrides (timer on GSI 2, SCI level-triggered).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{
    ACPI_END, ACPI_START, COM1_IRQ, COM1_PORT, IOAPIC_START, LAPIC_START, PM1A_CNT_LEN,
    PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, S5_SLP_TYP, SCI_IRQ,
};

pub const OEM_ID: [u8; 6] = *b"OUTBRD";
const OEM_REVISION: u32 = 1;

/// Errors of building and writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables need {needed} bytes but the BIOS area has {available}")]
    NoSpace { needed: u64, available: u64 },
    #[error("Cannot write ACPI table {0}")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    #[error("{0} vCPUs do not fit in the MADT (at most 255)")]
    TooManyCpus(usize),
}

/// MADT flag: the platform also has dual 8259 PICs (Linux then masks them).
const MADT_PCAT_COMPAT: u32 = 1;
/// Offset of the MADT flags field.
const MADT_FLAGS_OFFSET: usize = 40;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x1 | (0x3 << 2);
/// IA-PC boot architecture flags: 8042 present; no VGA; no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn iso(source: u8, gsi: u32, flags: u16) -> InterruptSourceOverride {
    InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source,
        gsi,
        flags,
    }
}

fn checksum_fix(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT's AML: `\_S5_` and COM1.
pub fn dsdt_aml() -> Vec<u8> {
    let mut aml_bytes = Vec::new();
    let s5 = aml::Package::new(vec![&S5_SLP_TYP, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut aml_bytes);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    aml::Scope::new("\\_SB_".into(), vec![&com1]).to_aml_bytes(&mut aml_bytes);
    aml_bytes
}

fn dsdt(extra_aml: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"OBVMDSDT", OEM_REVISION);
    table.append_slice(&dsdt_aml());
    table.append_slice(extra_aml);
    table.as_slice().to_vec()
}

/// Tables and AML of devices described elsewhere (the PCI root complex in crates/pci, which
/// depends on this crate): AML appended to the DSDT body, whole tables (header and checksum
/// included) added to the XSDT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiExtras {
    pub dsdt_aml: Vec<u8>,
    pub tables: Vec<Vec<u8>>,
}

fn facs() -> Vec<u8> {
    let mut facs = vec![0u8; 64];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    facs[32] = 2; // version
    facs
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let io_gas = |port: u16, len: u8| {
        GAS::new(
            AddressSpace::SystemIo,
            len * 8,
            0,
            if len == 2 {
                AccessSize::WordAccess
            } else {
                AccessSize::DwordAccess
            },
            u64::from(port),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, *b"OBVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sci_int = (SCI_IRQ as u16).into();
    builder.smi_cmd = 0.into();
    builder.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    builder.pm1_evt_len = PM1A_EVT_LEN;
    builder.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    builder.pm1_cnt_len = PM1A_CNT_LEN;
    builder.x_pm1a_evt_blk = io_gas(PM1A_EVT_PORT, PM1A_EVT_LEN);
    builder.x_pm1a_cnt_blk = io_gas(PM1A_CNT_PORT, PM1A_CNT_LEN);
    builder.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    to_bytes(&builder.finalize())
}

fn madt(cpus: usize) -> Result<Vec<u8>, Error> {
    if cpus > 255 {
        return Err(Error::TooManyCpus(cpus));
    }
    let mut madt = MADT::new(
        OEM_ID,
        *b"OBVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus as u8 {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    // The PIT's IRQ 0 is wired to IOAPIC pin 2, as on every PC.
    madt.add_structure(iso(0, 2, 0));
    madt.add_structure(iso(SCI_IRQ as u8, SCI_IRQ, INTI_ACTIVE_HIGH_LEVEL));
    madt.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    let mut bytes = to_bytes(&madt);
    bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4]
        .copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    checksum_fix(&mut bytes);
    Ok(bytes)
}

/// Addresses of the tables written, for boot_params and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub facs: u64,
    pub dsdt: u64,
    pub madt: u64,
}

struct Placer<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl Placer<'_> {
    fn place(&mut self, name: &'static str, bytes: &[u8], align: u64) -> Result<u64, Error> {
        let addr = (self.next + align - 1) & !(align - 1);
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(Error::NoSpace {
                needed: end - ACPI_START,
                available: ACPI_END - ACPI_START,
            });
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Write(name, e))?;
        self.next = end;
        Ok(addr)
    }
}

/// Builds all tables for `cpus` vCPUs and writes them from [`ACPI_START`]; the RSDP comes first
/// (at 0xE0000, where a BIOS-area scan finds it).
pub fn write_tables(mem: &GuestMemoryMmap, cpus: usize) -> Result<AcpiTables, Error> {
    write_tables_with(mem, cpus, &AcpiExtras::default())
}

/// [`write_tables`] with `extras` in the DSDT and the XSDT.
pub fn write_tables_with(
    mem: &GuestMemoryMmap,
    cpus: usize,
    extras: &AcpiExtras,
) -> Result<AcpiTables, Error> {
    let mut placer = Placer {
        mem,
        next: ACPI_START + Rsdp::len() as u64,
    };
    let dsdt = placer.place("DSDT", &dsdt(&extras.dsdt_aml), 16)?;
    let facs = placer.place("FACS", &facs(), 64)?;
    let fadt = placer.place("FACP", &fadt(dsdt, facs), 16)?;
    let madt = placer.place("APIC", &madt(cpus)?, 16)?;
    let mut xsdt = XSDT::new(OEM_ID, *b"OBVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    for table in &extras.tables {
        xsdt.add_entry(placer.place("extra", table, 16)?);
    }
    let xsdt = placer.place("XSDT", &to_bytes(&xsdt), 16)?;
    let rsdp = Rsdp::new(OEM_ID, xsdt);
    mem.write_slice(&to_bytes(&rsdp), GuestAddress(ACPI_START))
        .map_err(|e| Error::Write("RSDP", e))?;
    Ok(AcpiTables {
        rsdp: ACPI_START,
        xsdt,
        fadt,
        facs,
        dsdt,
        madt,
    })
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
