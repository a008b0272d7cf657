//! PCI configuration access and enumeration: ECAM when the MCFG table names one, else the legacy
//! 0xCF8/0xCFC ports; bus 0 and the buses behind PCI-to-PCI bridges; memory BARs (sized by
//! writing all-ones, assigned from `outboard.pci_mmio=` when firmware left them at zero); MSI-X
//! tables. The decoding is in `outboard_testguest_parse::pci`.

use crate::mem::Mmio;
use crate::{arch, platform, println};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use outboard_testguest_parse::pci::{
    self as decode, BarKind, Ecam, MsixCap, BARS, CONFIG_LEN, MSIX_ENABLE, MSIX_ENTRY_LEN,
    MSIX_FUNCTION_MASK,
};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;
/// Where unassigned BARs go when the command line names no window: QEMU's 32-bit PCI hole.
const DEFAULT_MMIO_WINDOW: u64 = 0xC000_0000;
const HEADER_TYPE_BRIDGE: u8 = 1;
const SECONDARY_BUS: usize = 0x19;
/// Buses walked at most (bridges may claim nonsense bus numbers).
const MAX_BUSES: usize = 32;

/// A function's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

fn ecam() -> Option<Ecam> {
    platform::get().and_then(|p| p.ecam)
}

/// The access method, for the `pci` command's summary.
pub fn access_name() -> &'static str {
    if ecam().is_some() {
        "ecam"
    } else {
        "legacy"
    }
}

fn ecam_window(bdf: Bdf) -> Option<Mmio> {
    let e = ecam()?;
    Mmio::new(
        e.base.checked_add(e.offset(bdf.bus, bdf.dev, bdf.func)?)?,
        4096,
    )
}

fn legacy_address(bdf: Bdf, off: usize) -> u32 {
    1 << 31
        | u32::from(bdf.bus) << 16
        | u32::from(bdf.dev) << 11
        | u32::from(bdf.func) << 8
        | (off as u32 & 0xFC)
}

pub fn read32(bdf: Bdf, off: usize) -> u32 {
    match ecam() {
        Some(_) => ecam_window(bdf).map_or(u32::MAX, |w| w.read32(off as u64 & 0xFFC)),
        None => {
            arch::outl(CONFIG_ADDRESS, legacy_address(bdf, off));
            arch::inl(CONFIG_DATA)
        }
    }
}

pub fn write32(bdf: Bdf, off: usize, v: u32) {
    match ecam() {
        Some(_) => {
            if let Some(w) = ecam_window(bdf) {
                w.write32(off as u64 & 0xFFC, v);
            }
        }
        None => {
            arch::outl(CONFIG_ADDRESS, legacy_address(bdf, off));
            arch::outl(CONFIG_DATA, v);
        }
    }
}

pub fn read16(bdf: Bdf, off: usize) -> u16 {
    (read32(bdf, off & !3) >> ((off & 2) * 8)) as u16
}

/// A true 16-bit write: read-modify-write of the dword would write back RW1C status bits.
pub fn write16(bdf: Bdf, off: usize, v: u16) {
    match ecam() {
        Some(_) => {
            if let Some(w) = ecam_window(bdf) {
                w.write16(off as u64 & 0xFFE, v);
            }
        }
        None => {
            arch::outl(CONFIG_ADDRESS, legacy_address(bdf, off));
            arch::outw(CONFIG_DATA + (off as u16 & 2), v);
        }
    }
}

/// The first 256 bytes of a function's configuration space.
pub fn snapshot(bdf: Bdf) -> [u8; CONFIG_LEN] {
    let mut cfg = [0u8; CONFIG_LEN];
    for (i, d) in cfg.chunks_exact_mut(4).enumerate() {
        d.copy_from_slice(&read32(bdf, i * 4).to_le_bytes());
    }
    cfg
}

/// Calls `f` for every function present: bus 0, then buses behind bridges (bounded, each bus
/// once).
pub fn for_each_function(mut f: impl FnMut(Bdf, &[u8; CONFIG_LEN])) {
    let mut pending = [0u8; MAX_BUSES];
    let mut seen = [false; 256];
    let (mut head, mut tail) = (0, 1);
    seen[0] = true;
    while head < tail {
        let bus = pending[head];
        head += 1;
        for dev in 0..32 {
            for func in 0..8 {
                let bdf = Bdf { bus, dev, func };
                if read16(bdf, decode::VENDOR_ID) == 0xFFFF {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let cfg = snapshot(bdf);
                f(bdf, &cfg);
                let header = cfg[decode::HEADER_TYPE];
                if header & 0x7F == HEADER_TYPE_BRIDGE {
                    let secondary = cfg[SECONDARY_BUS];
                    if secondary != 0 && !seen[usize::from(secondary)] && tail < MAX_BUSES {
                        seen[usize::from(secondary)] = true;
                        pending[tail] = secondary;
                        tail += 1;
                    }
                }
                if func == 0 && header & 0x80 == 0 {
                    break;
                }
            }
        }
    }
}

/// The first function with this vendor and device ID.
pub fn find(vendor: u16, device: u16) -> Option<Bdf> {
    let mut found = None;
    let want = u32::from(device) << 16 | u32::from(vendor);
    for_each_function(|bdf, cfg| {
        if found.is_none() && cfg[..4] == want.to_le_bytes() {
            found = Some(bdf);
        }
    });
    found
}

/// A memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub base: u64,
    pub size: u64,
    pub is64: bool,
}

/// Sizes (and, if unassigned, places) the memory BARs of a type-0 function. Memory decoding is
/// off while a BAR holds all-ones, so the probe never shadows anything.
pub fn memory_bars(bdf: Bdf) -> [Option<Bar>; BARS] {
    let mut bars = [None; BARS];
    let command = read16(bdf, decode::COMMAND);
    write16(bdf, decode::COMMAND, command & !decode::COMMAND_MEMORY);
    let mut i = 0;
    while i < BARS {
        let off = decode::BAR0 + 4 * i;
        let lo = read32(bdf, off);
        let kind = decode::bar_kind(lo);
        let is64 = kind == BarKind::Mem64 && i + 1 < BARS;
        if kind == BarKind::Mem32 || is64 {
            let hi = if is64 { read32(bdf, off + 4) } else { 0 };
            write32(bdf, off, u32::MAX);
            let lo_mask = read32(bdf, off);
            let hi_mask = if is64 {
                write32(bdf, off + 4, u32::MAX);
                let m = read32(bdf, off + 4);
                write32(bdf, off + 4, hi);
                Some(m)
            } else {
                None
            };
            write32(bdf, off, lo);
            if let Some(size) = decode::mem_bar_size(lo_mask, hi_mask) {
                let mut base = decode::mem_bar_base(lo, hi);
                if base == 0 {
                    base = assign(bdf, off, size, is64).unwrap_or(0);
                }
                bars[i] = Some(Bar { base, size, is64 });
            }
        }
        i += if is64 { 2 } else { 1 };
    }
    write16(
        bdf,
        decode::COMMAND,
        command | decode::COMMAND_MEMORY | decode::COMMAND_BUS_MASTER,
    );
    bars
}

static NEXT_MMIO: AtomicU64 = AtomicU64::new(0);

/// Places an unassigned BAR in the window (naturally aligned, below 4 GiB).
fn assign(bdf: Bdf, off: usize, size: u64, is64: bool) -> Option<u64> {
    let window = platform::get()
        .and_then(|p| p.cmdline().get_u64("outboard.pci_mmio").ok().flatten())
        .unwrap_or(DEFAULT_MMIO_WINDOW);
    let next = NEXT_MMIO.load(Ordering::Relaxed).max(window);
    let base = next.checked_add(size - 1)? & !(size - 1);
    let end = base.checked_add(size)?;
    if end > platform::MAPPED_END {
        println!("outboard-testguest: pci {bdf}: no room for a {size:#x} BAR");
        return None;
    }
    NEXT_MMIO.store(end, Ordering::Relaxed);
    write32(bdf, off, base as u32);
    if is64 {
        write32(bdf, off + 4, (base >> 32) as u32);
    }
    println!("outboard-testguest: pci {bdf}: assigned BAR at {off:#x} to {base:#x}+{size:#x}");
    Some(base)
}

/// An MSI-X table, mapped.
#[derive(Debug, Clone, Copy)]
pub struct Msix {
    pub bdf: Bdf,
    pub cap: MsixCap,
    pub table: Mmio,
}

/// Local APIC MSI address (fixed delivery, physical destination).
pub const MSI_ADDRESS: u32 = 0xFEE0_0000;

impl Msix {
    /// The MSI-X capability of `cfg`, with its table in one of `bars`.
    pub fn find(bdf: Bdf, cfg: &[u8], bars: &[Option<Bar>; BARS]) -> Option<Msix> {
        let cap = decode::capabilities(cfg)
            .filter_map(Result::ok)
            .find(|c| c.id == decode::CAP_ID_MSIX)?;
        let cap = MsixCap::parse(cfg, cap.offset).ok()?;
        let bar = bars[usize::from(cap.table_bar)]?;
        let len = u64::from(cap.table_size) * u64::from(MSIX_ENTRY_LEN);
        if u64::from(cap.table_offset) + len > bar.size {
            return None;
        }
        let table = Mmio::new(bar.base.checked_add(cap.table_offset.into())?, len)?;
        Some(Msix { bdf, cap, table })
    }

    fn control_offset(&self) -> usize {
        usize::from(self.cap.offset) + 2
    }

    /// Turns MSI-X on (function mask off): the device then signals through its table only.
    pub fn enable(&self) {
        let control = read16(self.bdf, self.control_offset());
        write16(
            self.bdf,
            self.control_offset(),
            (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK,
        );
    }

    /// Programs table entry `index` (ignored past the table): message address and data, and the
    /// per-vector mask bit.
    pub fn program(&self, index: u16, address: u64, data: u32, masked: bool) {
        if index >= self.cap.table_size {
            return;
        }
        let at = u64::from(index) * u64::from(MSIX_ENTRY_LEN);
        self.table.write32(at + 12, 1);
        self.table.write32(at, address as u32);
        self.table.write32(at + 4, (address >> 32) as u32);
        self.table.write32(at + 8, data);
        self.table.write32(at + 12, u32::from(masked));
    }

    /// Entry `index` pointing at the boot CPU's local APIC with `vector`, unmasked.
    pub fn program_lapic(&self, index: u16, apic_id: u32, vector: u8) {
        let address = u64::from(MSI_ADDRESS) | u64::from(apic_id & 0xFF) << 12;
        self.program(index, address, u32::from(vector), false);
    }
}
