//! Checks of the built test guest before it is installed:
//! - [`layout`]: what VMMs rely on when loading it: a fixed-address x86-64 `ET_EXEC` whose
//!   PT_LOADs have paddr == vaddr at or above 1 MiB, an entry inside executable code, and a PVH
//!   note (Xen, type 18) with 4-byte alignment (QEMU aligns the note name to `p_align`);
//! - [`instructions`]: the disassembly (objdump) has no instruction PVM's emulator cannot run,
//!   except inside symbols named `outboard_crash*` (the `crash` command's deliberate one).

use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use std::process::Command;

/// Mnemonics that end a VM under PVM (KVM_EXIT_INTERNAL_ERROR), plus their relatives: the rest
/// of the `0f ae` group (fences, flushes, FXSAVE, MXCSR), and instructions of CPUID features the
/// guest must not assume.
const FORBIDDEN: &[&str] = &[
    "popcnt",
    "cmpxchg16b",
    "xsave",
    "xsave64",
    "xsavec",
    "xsavec64",
    "xsaveopt",
    "xsaveopt64",
    "xsaves",
    "xsaves64",
    "xrstor",
    "xrstor64",
    "xrstors",
    "xrstors64",
    "int3",
    "fwait",
    "wait",
    "mfence",
    "lfence",
    "sfence",
    "clflush",
    "clflushopt",
    "clwb",
    "fxsave",
    "fxsave64",
    "fxrstor",
    "fxrstor64",
    "ldmxcsr",
    "stmxcsr",
    "rdrand",
    "rdseed",
    "movbe",
    "rdpid",
    "rdtscp",
    "(bad)",
];
/// Vector registers: any use means SSE/AVX code, which PVM's emulator lacks.
const FORBIDDEN_REGISTERS: &[&str] = &["%xmm", "%ymm", "%zmm"];
/// Symbols where forbidden instructions are intended.
const ALLOWED_SYMBOL_PREFIX: &str = "outboard_crash";
/// The section holding the 32-bit PVH entry, disassembled as i386 code.
const BOOT32_SECTION: &str = ".boot32";

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const SHF_EXECINSTR: u64 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MIN_LOAD_ADDR: u64 = 0x10_0000;

/// What [`layout`] found.
#[derive(Debug)]
pub struct Layout {
    pub entry: u64,
    pub pvh_entry: u64,
    pub load_start: u64,
    pub load_end: u64,
    /// Names of the executable sections.
    pub code_sections: Vec<String>,
}

fn field<const N: usize>(b: &[u8], off: u64) -> Result<[u8; N]> {
    let off = usize::try_from(off)?;
    b.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .with_context(|| format!("ELF truncated at offset {off:#x}"))
}

fn u16_at(b: &[u8], off: u64) -> Result<u16> {
    field(b, off).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], off: u64) -> Result<u32> {
    field(b, off).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: u64) -> Result<u64> {
    field(b, off).map(u64::from_le_bytes)
}

/// Checks the ELF's load layout and finds its entries.
pub fn layout(elf: &[u8]) -> Result<Layout> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "Not an ELF file");
    ensure!(
        elf.get(4..6) == Some(&[2, 1]),
        "Not a 64-bit little-endian ELF"
    );
    ensure!(
        u16_at(elf, 16)? == 2,
        "Not ET_EXEC (a position-independent build needs relocating)"
    );
    ensure!(u16_at(elf, 18)? == 62, "Not an x86-64 ELF");
    let entry = u64_at(elf, 24)?;
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 32)?,
        u64::from(u16_at(elf, 54)?),
        u64::from(u16_at(elf, 56)?),
    );
    let mut loads = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (kind, flags) = (u32_at(elf, ph)?, u32_at(elf, ph + 4)?);
        let (offset, vaddr, paddr) = (
            u64_at(elf, ph + 8)?,
            u64_at(elf, ph + 16)?,
            u64_at(elf, ph + 24)?,
        );
        let (filesz, memsz, align) = (
            u64_at(elf, ph + 32)?,
            u64_at(elf, ph + 40)?,
            u64_at(elf, ph + 48)?,
        );
        match kind {
            PT_LOAD => {
                ensure!(paddr == vaddr, "PT_LOAD at {vaddr:#x} has paddr {paddr:#x}");
                ensure!(
                    paddr >= MIN_LOAD_ADDR,
                    "PT_LOAD at {paddr:#x} is below 1 MiB"
                );
                ensure!(
                    memsz >= filesz && offset.saturating_add(filesz) <= elf.len() as u64,
                    "PT_LOAD at {paddr:#x} is malformed"
                );
                loads.push((paddr, paddr + memsz, flags & PF_X != 0));
            }
            PT_DYNAMIC | PT_INTERP => {
                bail!("The guest must be static: it has PT_DYNAMIC or PT_INTERP")
            }
            PT_NOTE => {
                ensure!(align == 4, "PT_NOTE alignment is {align}, QEMU needs 4");
                if let Some(e) = find_pvh_note(elf, offset, filesz)? {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    let in_code = |addr: u64| {
        loads
            .iter()
            .any(|(start, end, x)| *x && (*start..*end).contains(&addr))
    };
    ensure!(in_code(entry), "Entry {entry:#x} is not in executable code");
    let pvh_entry = pvh_entry.context("No PVH note (Xen, XEN_ELFNOTE_PHYS32_ENTRY)")?;
    ensure!(
        in_code(pvh_entry),
        "PVH entry {pvh_entry:#x} is not in executable code"
    );
    Ok(Layout {
        entry,
        pvh_entry,
        load_start: loads.iter().map(|l| l.0).min().context("No PT_LOAD")?,
        load_end: loads.iter().map(|l| l.1).max().context("No PT_LOAD")?,
        code_sections: code_sections(elf)?,
    })
}

/// The PVH entry in a note segment, if it has one.
fn find_pvh_note(elf: &[u8], offset: u64, size: u64) -> Result<Option<u64>> {
    let align4 = |n: u64| (n + 3) & !3;
    let mut at = offset;
    while at + 12 <= offset + size {
        let (namesz, descsz, kind) = (
            u64::from(u32_at(elf, at)?),
            u64::from(u32_at(elf, at + 4)?),
            u32_at(elf, at + 8)?,
        );
        let name = at + 12;
        let desc = name + align4(namesz);
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 && field::<4>(elf, name)? == *b"Xen\0" {
            return Ok(Some(match descsz {
                8 => u64_at(elf, desc)?,
                4 => u32_at(elf, desc)?.into(),
                n => bail!("PVH note descriptor is {n} bytes, QEMU reads 8 and linux-loader 4"),
            }));
        }
        at = desc + align4(descsz);
    }
    Ok(None)
}

/// Names of the sections with SHF_EXECINSTR.
fn code_sections(elf: &[u8]) -> Result<Vec<String>> {
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(elf, 40)?,
        u64::from(u16_at(elf, 58)?),
        u64::from(u16_at(elf, 60)?),
        u64::from(u16_at(elf, 62)?),
    );
    let strtab = u64_at(elf, shoff + shstrndx * shentsize + 24)?;
    let mut names = Vec::new();
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        if u64_at(elf, sh + 8)? & SHF_EXECINSTR == 0 {
            continue;
        }
        let start = usize::try_from(strtab + u64::from(u32_at(elf, sh)?))?;
        let rest = elf.get(start..).context("Section name outside the file")?;
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .context("Unterminated section name")?;
        names.push(String::from_utf8_lossy(&rest[..len]).into_owned());
    }
    Ok(names)
}

/// Disassembles every executable section and fails on a forbidden instruction.
pub fn instructions(elf_path: &Path) -> Result<()> {
    let elf =
        std::fs::read(elf_path).with_context(|| format!("Cannot read {}", elf_path.display()))?;
    let sections = layout(&elf)?.code_sections;
    let mut violations = Vec::new();
    let (mut count, mut allowed) = (0usize, 0usize);
    for section in &sections {
        let mut cmd = Command::new("objdump");
        cmd.args(["-d", "--no-show-raw-insn", "-j", section]);
        if section == BOOT32_SECTION {
            cmd.args(["-M", "i386"]);
        }
        let out = cmd.arg(elf_path).output().context(
            "Cannot run objdump, which checks the test guest's instructions: install binutils (apt-get install binutils)",
        )?;
        if !out.status.success() {
            bail!(
                "objdump -d -j {section} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let scan = scan(&text);
        count += scan.instructions;
        allowed += scan.allowed;
        violations.extend(scan.violations);
    }
    if !violations.is_empty() {
        let shown: Vec<&str> = violations.iter().take(20).map(String::as_str).collect();
        bail!(
            "The test guest has {} instruction(s) PVM cannot emulate (allowed only in {ALLOWED_SYMBOL_PREFIX}* symbols):\n  {}",
            violations.len(),
            shown.join("\n  ")
        );
    }
    ensure!(count > 0, "objdump found no instructions in {sections:?}");
    println!(
        "xtask guest: instruction check passed: {count} instructions in {}, none PVM cannot emulate ({allowed} deliberate in {ALLOWED_SYMBOL_PREFIX}*)",
        sections.join(" ")
    );
    Ok(())
}

/// Result of scanning one objdump listing.
#[derive(Debug, Default)]
struct Scan {
    instructions: usize,
    allowed: usize,
    violations: Vec<String>,
}

/// Scans `objdump -d --no-show-raw-insn` output.
fn scan(listing: &str) -> Scan {
    let mut scan = Scan::default();
    let mut symbol = String::new();
    for line in listing.lines() {
        // "0000000000100301 <outboard_crash_popcnt>:" starts a symbol.
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, n)| n)
        {
            symbol = name.to_owned();
            continue;
        }
        // "  100301:\tpopcnt %rax,%rax" is an instruction.
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) || addr.trim().is_empty() {
            continue;
        }
        scan.instructions += 1;
        let insn = insn.trim();
        let operands_start = insn.find(" <").unwrap_or(insn.len());
        let code = &insn[..operands_start];
        let bad_mnemonic = code
            .split(|c: char| c.is_whitespace() || c == ',')
            .any(|t| FORBIDDEN.contains(&t));
        let bad_register = FORBIDDEN_REGISTERS.iter().any(|r| code.contains(r));
        if bad_mnemonic || bad_register {
            if symbol.starts_with(ALLOWED_SYMBOL_PREFIX) {
                scan.allowed += 1;
            } else {
                scan.violations.push(format!(
                    "{:#x} in {symbol}: {insn}",
                    u64::from_str_radix(addr.trim(), 16).unwrap_or(0)
                ));
            }
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "
target/guest/testguest:     file format elf64-x86-64

Disassembly of section .text:

0000000000100050 <outboard_linux_entry64>:
  100050:\tcli
  100051:\tlock cmpxchg %rcx,(%rdx)
  100055:\tcall   100301 <outboard_crash_popcnt>
  10005a:\tcmovbe %rax,%r14

0000000000100301 <outboard_crash_popcnt>:
  100301:\tpopcnt %rax,%rax
  100306:\tret
";

    #[test]
    fn clean_listing_passes_and_counts_the_deliberate_one() {
        let s = scan(LISTING);
        assert_eq!((s.instructions, s.allowed), (6, 1));
        assert!(s.violations.is_empty(), "{:?}", s.violations);
    }

    #[test]
    fn forbidden_instructions_outside_crash_symbols_fail() {
        let bad = "0000000000100000 <f>:\n  100000:\tlock cmpxchg16b (%rdi)\n  100005:\tint3\n  100006:\tmovaps %xmm0,(%rsp)\n  10000a:\tfwait\n";
        let s = scan(bad);
        assert_eq!(s.violations.len(), 4, "{:?}", s.violations);
        assert!(s.violations[0].starts_with("0x100000 in f:"));
    }
}
