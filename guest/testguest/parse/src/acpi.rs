//! ACPI tables: RSDP → XSDT (or RSDT) → FADT, MADT, and the DSDT the FADT names.
//!
//! Every table is checked before use (signature, `length` at least a header and at most
//! [`MAX_TABLE_LEN`], checksum over `length` bytes) and only read inside its `length`. FADT fields
//! past the end of a short (old-revision) FADT read as zero, as Linux reads them.

use crate::bytes::{array, checksum_ok, u16_at, u32_at, u64_at, u8_at};
use crate::PhysMem;
use core::fmt;

/// Longest table accepted; a VM's DSDT is a few KiB.
pub const MAX_TABLE_LEN: usize = 1 << 20;
/// Length of the common table header.
pub const HEADER_LEN: usize = 36;

/// Where the BIOS area RSDP scan looks (ACPI 6.5, 5.2.5.1).
const BIOS_AREA: (u64, usize) = (0xE_0000, 0x2_0000);
/// The real-mode segment of the EBDA lives here.
const EBDA_SEGMENT_PTR: u64 = 0x40E;
const EBDA_SCAN_LEN: usize = 1024;
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;

/// A table signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 4]);

impl Sig {
    pub const RSDP: Sig = Sig(*b"RSD ");
    pub const XSDT: Sig = Sig(*b"XSDT");
    pub const RSDT: Sig = Sig(*b"RSDT");
    pub const FADT: Sig = Sig(*b"FACP");
    pub const MADT: Sig = Sig(*b"APIC");
    pub const DSDT: Sig = Sig(*b"DSDT");
    pub const UNKNOWN: Sig = Sig(*b"????");
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            let c = if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Errors finding or validating ACPI tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("No valid RSDP")]
    NoRsdp,
    #[error("Cannot read {sig} at {addr:#x}")]
    Unreadable { sig: Sig, addr: u64 },
    #[error("Bad checksum in {sig} at {addr:#x}")]
    Checksum { sig: Sig, addr: u64 },
    #[error("Bad length {len} of {sig} at {addr:#x}")]
    Length { sig: Sig, addr: u64, len: u32 },
    #[error("Expected {expected} at {addr:#x}, found {found}")]
    Signature {
        expected: Sig,
        found: Sig,
        addr: u64,
    },
    #[error("No {sig} table")]
    Missing { sig: Sig },
    #[error("Malformed MADT entry at offset {offset}")]
    MadtEntry { offset: usize },
}

/// The Root System Description Pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rsdp {
    pub addr: u64,
    pub revision: u8,
    pub rsdt: u32,
    /// Zero before ACPI 2.0.
    pub xsdt: u64,
}

/// Validates an RSDP: `b` holds 20 bytes (ACPI 1.0) or 36 (2.0+).
pub fn parse_rsdp(b: &[u8], addr: u64) -> Result<Rsdp, Error> {
    let unreadable = Error::Unreadable {
        sig: Sig::RSDP,
        addr,
    };
    let v1 = b.get(..RSDP_V1_LEN).ok_or(unreadable)?;
    if &v1[..8] != b"RSD PTR " {
        let found = Sig(array(v1, 0).unwrap_or([0; 4]));
        return Err(Error::Signature {
            expected: Sig::RSDP,
            found,
            addr,
        });
    }
    if !checksum_ok(v1) {
        return Err(Error::Checksum {
            sig: Sig::RSDP,
            addr,
        });
    }
    let revision = v1[15];
    let rsdt = u32_at(v1, 16).unwrap_or(0);
    if revision < 2 {
        return Ok(Rsdp {
            addr,
            revision,
            rsdt,
            xsdt: 0,
        });
    }
    let v2 = b.get(..RSDP_V2_LEN).ok_or(unreadable)?;
    let len = u32_at(v2, 20).unwrap_or(0);
    if (len as usize) < RSDP_V2_LEN {
        return Err(Error::Length {
            sig: Sig::RSDP,
            addr,
            len,
        });
    }
    if !checksum_ok(v2) {
        return Err(Error::Checksum {
            sig: Sig::RSDP,
            addr,
        });
    }
    Ok(Rsdp {
        addr,
        revision,
        rsdt,
        xsdt: u64_at(v2, 24).unwrap_or(0),
    })
}

/// The RSDP at `hint` if that one is valid, else the first found in the EBDA or the BIOS area.
pub fn locate_rsdp<M: PhysMem>(mem: &M, hint: Option<u64>) -> Result<Rsdp, Error> {
    if let Some(addr) = hint {
        let bytes = mem
            .read(addr, RSDP_V2_LEN)
            .or_else(|| mem.read(addr, RSDP_V1_LEN));
        if let Some(rsdp) = bytes.and_then(|b| parse_rsdp(b, addr).ok()) {
            return Ok(rsdp);
        }
    }
    let ebda = mem
        .read(EBDA_SEGMENT_PTR, 2)
        .and_then(|b| u16_at(b, 0))
        .map(|seg| u64::from(seg) << 4);
    let regions = [
        ebda.filter(|a| (0x400..0xA_0000).contains(a))
            .map(|a| (a, EBDA_SCAN_LEN)),
        Some(BIOS_AREA),
    ];
    for (base, len) in regions.into_iter().flatten() {
        let Some(area) = mem.read(base, len) else {
            continue;
        };
        for off in (0..area.len().saturating_sub(RSDP_V1_LEN - 1)).step_by(16) {
            let end = area.len().min(off + RSDP_V2_LEN);
            if let Ok(rsdp) = parse_rsdp(&area[off..end], base + off as u64) {
                return Ok(rsdp);
            }
        }
    }
    Err(Error::NoRsdp)
}

/// A validated system description table (header plus body, exactly `length` bytes).
#[derive(Debug, Clone, Copy)]
pub struct Sdt<'a> {
    pub addr: u64,
    bytes: &'a [u8],
}

impl<'a> Sdt<'a> {
    /// Validates the table in `bytes` (which may run past its `length`).
    pub fn parse(bytes: &'a [u8], addr: u64) -> Result<Self, Error> {
        let hdr = bytes.get(..HEADER_LEN).ok_or(Error::Unreadable {
            sig: Sig::UNKNOWN,
            addr,
        })?;
        let sig = Sig(array(hdr, 0).unwrap_or([0; 4]));
        let len = u32_at(hdr, 4).unwrap_or(0);
        if (len as usize) < HEADER_LEN || len as usize > MAX_TABLE_LEN {
            return Err(Error::Length { sig, addr, len });
        }
        let bytes = bytes
            .get(..len as usize)
            .ok_or(Error::Length { sig, addr, len })?;
        if !checksum_ok(bytes) {
            return Err(Error::Checksum { sig, addr });
        }
        Ok(Sdt { addr, bytes })
    }

    /// Reads and validates the table at `addr`, which must carry signature `expected`.
    pub fn load<M: PhysMem>(mem: &'a M, addr: u64, expected: Sig) -> Result<Self, Error> {
        let hdr = mem.read(addr, HEADER_LEN).ok_or(Error::Unreadable {
            sig: expected,
            addr,
        })?;
        let found = Sig(array(hdr, 0).unwrap_or([0; 4]));
        if found != expected {
            return Err(Error::Signature {
                expected,
                found,
                addr,
            });
        }
        let len = u32_at(hdr, 4).unwrap_or(0);
        if (len as usize) < HEADER_LEN || len as usize > MAX_TABLE_LEN {
            return Err(Error::Length {
                sig: expected,
                addr,
                len,
            });
        }
        let bytes = mem.read(addr, len as usize).ok_or(Error::Unreadable {
            sig: expected,
            addr,
        })?;
        Sdt::parse(bytes, addr)
    }

    pub fn signature(&self) -> Sig {
        Sig(array(self.bytes, 0).unwrap_or([0; 4]))
    }

    pub fn revision(&self) -> u8 {
        self.bytes[8]
    }

    /// The whole table, header included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The table after its header (for the DSDT: the AML).
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// The tables the guest uses, found from an RSDP. A missing or broken FADT, MADT or DSDT is kept
/// as its error so the caller can report it and go on with the rest.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    pub rsdp: Rsdp,
    /// The XSDT, or the RSDT when there is no usable XSDT.
    pub root: Sdt<'a>,
    pub fadt: Result<Fadt, Error>,
    pub madt: Result<Madt<'a>, Error>,
    pub dsdt: Result<Sdt<'a>, Error>,
}

/// Walks RSDP → XSDT/RSDT → FADT, MADT, DSDT.
pub fn walk<M: PhysMem>(mem: &M, rsdp: Rsdp) -> Result<Tables<'_>, Error> {
    let xsdt = match rsdp.xsdt {
        0 => Err(Error::Missing { sig: Sig::XSDT }),
        addr => Sdt::load(mem, addr, Sig::XSDT),
    };
    let root = match (xsdt, rsdp.rsdt) {
        (Ok(x), _) => x,
        (Err(e), 0) => return Err(e),
        (Err(_), rsdt) => Sdt::load(mem, rsdt.into(), Sig::RSDT)?,
    };
    let fadt = find(mem, &root, Sig::FADT).map(|t| Fadt::parse(&t));
    let dsdt = match &fadt {
        Ok(f) if f.dsdt != 0 => Sdt::load(mem, f.dsdt, Sig::DSDT),
        Ok(_) => Err(Error::Missing { sig: Sig::DSDT }),
        Err(e) => Err(*e),
    };
    let madt = find(mem, &root, Sig::MADT).and_then(|t| Madt::parse(&t));
    Ok(Tables {
        rsdp,
        root,
        fadt,
        madt,
        dsdt,
    })
}

/// Physical addresses listed by a root table (8-byte entries in an XSDT, 4-byte in an RSDT).
pub fn root_entries<'a>(root: &Sdt<'a>) -> impl Iterator<Item = u64> + 'a {
    let size = if root.signature() == Sig::XSDT { 8 } else { 4 };
    root.body().chunks_exact(size).map(move |e| match size {
        8 => u64_at(e, 0).unwrap_or(0),
        _ => u64::from(u32_at(e, 0).unwrap_or(0)),
    })
}

/// The first valid table with signature `sig` listed by `root`; entries that can't be read are
/// skipped, but a table with the right signature that fails validation is an error.
pub fn find<'m, M: PhysMem>(mem: &'m M, root: &Sdt<'_>, sig: Sig) -> Result<Sdt<'m>, Error> {
    for addr in root_entries(root) {
        let Some(hdr) = mem.read(addr, HEADER_LEN) else {
            continue;
        };
        if hdr[..4] == sig.0 {
            return Sdt::load(mem, addr, sig);
        }
    }
    Err(Error::Missing { sig })
}

/// Address space of a Generic Address Structure.
pub const SPACE_MEMORY: u8 = 0;
/// Address space of a Generic Address Structure.
pub const SPACE_IO: u8 = 1;

/// A Generic Address Structure (ACPI 6.5, 5.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    pub access_size: u8,
    pub address: u64,
}

impl Gas {
    /// An I/O port register of `bytes` bytes (how pre-2.0 FADT fields describe registers).
    pub fn io(port: u32, bytes: u8) -> Option<Gas> {
        (port != 0).then_some(Gas {
            space: SPACE_IO,
            bit_width: bytes.saturating_mul(8),
            bit_offset: 0,
            access_size: 0,
            address: port.into(),
        })
    }

    fn at(b: &[u8], off: usize) -> Option<Gas> {
        let g = b.get(off..off + 12)?;
        let gas = Gas {
            space: g[0],
            bit_width: g[1],
            bit_offset: g[2],
            access_size: g[3],
            address: u64_at(g, 4)?,
        };
        (gas.address != 0).then_some(gas)
    }
}

/// FADT flag: hardware-reduced ACPI (no PM1 blocks; sleep through SLEEP_CONTROL_REG).
pub const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: the PM timer counts 32 bits (else 24).
pub const FADT_TMR_VAL_EXT: u32 = 1 << 8;

/// The FADT fields the guest uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fadt {
    pub revision: u8,
    pub flags: u32,
    /// X_DSDT when set, else DSDT.
    pub dsdt: u64,
    pub pm1a_cnt: Option<Gas>,
    pub pm1b_cnt: Option<Gas>,
    pub pm_timer: Option<Gas>,
    pub sleep_control: Option<Gas>,
}

impl Fadt {
    /// Reads the FADT; fields past the end of a short table count as zero (absent).
    pub fn parse(t: &Sdt<'_>) -> Fadt {
        let b = t.bytes();
        let u8f = |off| u8_at(b, off).unwrap_or(0);
        let u32f = |off| u32_at(b, off).unwrap_or(0);
        let x_dsdt = u64_at(b, 140).unwrap_or(0);
        let pm1_cnt_len = u8f(89).max(2);
        Fadt {
            revision: t.revision(),
            flags: u32f(112),
            dsdt: if x_dsdt != 0 { x_dsdt } else { u32f(40).into() },
            pm1a_cnt: Gas::at(b, 172).or_else(|| Gas::io(u32f(64), pm1_cnt_len)),
            pm1b_cnt: Gas::at(b, 184).or_else(|| Gas::io(u32f(68), pm1_cnt_len)),
            pm_timer: Gas::at(b, 208).or_else(|| Gas::io(u32f(76), u8f(91).max(4))),
            sleep_control: Gas::at(b, 244),
        }
    }

    pub fn hw_reduced(&self) -> bool {
        self.flags & FADT_HW_REDUCED != 0
    }
}

/// A processor local APIC (MADT type 0) or x2APIC (type 9) entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    pub uid: u32,
    pub apic_id: u32,
    pub x2apic: bool,
    /// Flags bit 0: the CPU is usable now.
    pub enabled: bool,
}

/// One MADT interrupt controller structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadtEntry {
    Cpu(Cpu),
    /// Type 5: a 64-bit local APIC address replacing the header's.
    LapicOverride(u64),
    Other {
        kind: u8,
    },
}

/// The MADT: local APIC address and the interrupt controller structures.
#[derive(Debug, Clone, Copy)]
pub struct Madt<'a> {
    lapic_addr: u32,
    pub flags: u32,
    entries: &'a [u8],
}

impl<'a> Madt<'a> {
    pub fn parse(t: &Sdt<'a>) -> Result<Self, Error> {
        let b = t.bytes();
        let length_error = Error::Length {
            sig: Sig::MADT,
            addr: t.addr,
            len: b.len() as u32,
        };
        let lapic_addr = u32_at(b, HEADER_LEN).ok_or(length_error)?;
        let flags = u32_at(b, HEADER_LEN + 4).ok_or(length_error)?;
        Ok(Madt {
            lapic_addr,
            flags,
            entries: &b[HEADER_LEN + 8..],
        })
    }

    /// The structures in order; a malformed one yields an error and ends the walk.
    pub fn entries(&self) -> MadtEntries<'a> {
        MadtEntries {
            bytes: self.entries,
            off: 0,
        }
    }

    /// The enabled processors (type 0 and type 9 with flag bit 0), up to the first malformed entry.
    pub fn enabled_cpus(&self) -> impl Iterator<Item = Cpu> + 'a {
        self.entries()
            .map_while(Result::ok)
            .filter_map(|e| match e {
                MadtEntry::Cpu(cpu) if cpu.enabled => Some(cpu),
                _ => None,
            })
    }

    /// Physical address of the local APIC, after any type 5 override.
    pub fn lapic_addr(&self) -> u64 {
        let over = self.entries().map_while(Result::ok).find_map(|e| match e {
            MadtEntry::LapicOverride(a) => Some(a),
            _ => None,
        });
        over.unwrap_or(self.lapic_addr.into())
    }
}

/// Iterator over MADT structures; see [`Madt::entries`].
#[derive(Debug, Clone)]
pub struct MadtEntries<'a> {
    bytes: &'a [u8],
    off: usize,
}

impl Iterator for MadtEntries<'_> {
    type Item = Result<MadtEntry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.off..).filter(|r| !r.is_empty())?;
        let offset = self.off + HEADER_LEN + 8;
        let kind = rest[0];
        let len = usize::from(u8_at(rest, 1).unwrap_or(0));
        let min = match kind {
            0 => 8,
            5 => 12,
            9 => 16,
            _ => 2,
        };
        if len < min || len > rest.len() {
            self.off = self.bytes.len();
            return Some(Err(Error::MadtEntry { offset }));
        }
        let e = &rest[..len];
        self.off += len;
        let field32 = |off| u32_at(e, off).unwrap_or(0);
        Some(Ok(match kind {
            0 => MadtEntry::Cpu(Cpu {
                uid: e[2].into(),
                apic_id: e[3].into(),
                x2apic: false,
                enabled: field32(4) & 1 != 0,
            }),
            9 => MadtEntry::Cpu(Cpu {
                uid: field32(12),
                apic_id: field32(4),
                x2apic: true,
                enabled: field32(8) & 1 != 0,
            }),
            5 => MadtEntry::LapicOverride(u64_at(e, 4).unwrap_or(0)),
            kind => MadtEntry::Other { kind },
        }))
    }
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
