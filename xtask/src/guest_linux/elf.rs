//! Reads what the dynamic loader needs from a 64-bit little-endian ELF file: its program
//! interpreter (PT_INTERP), the libraries it needs (DT_NEEDED) and its search path
//! (DT_RUNPATH / DT_RPATH). That is how the image builder finds the shared libraries fio needs
//! without running anything from the packages it extracted. Every offset is bounds-checked:
//! a malformed file gives an error, never a panic.

use anyhow::{bail, Context, Result};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// The dynamic-linking facts of one ELF object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    pub interp: Option<String>,
    pub needed: Vec<String>,
    /// DT_RUNPATH, or DT_RPATH where there is no RUNPATH, split at ':'.
    pub runpath: Vec<String>,
}

/// Whether `bytes` starts like an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

pub fn dynamic_info(bytes: &[u8]) -> Result<DynamicInfo> {
    if !is_elf(bytes) {
        bail!("Not an ELF file");
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        bail!("Not a 64-bit little-endian ELF file");
    }
    let phoff = u64_at(bytes, 0x20)?;
    let phentsize = u64::from(u16_at(bytes, 0x36)?);
    let phnum = u64::from(u16_at(bytes, 0x38)?);
    if phentsize < 56 {
        bail!("Bad program header size {phentsize}");
    }
    let mut loads = Vec::new();
    let mut dynamic = None;
    let mut info = DynamicInfo::default();
    for i in 0..phnum {
        let ph = to_usize(phoff + i * phentsize)?;
        let p_type = u32_at(bytes, ph)?;
        let offset = u64_at(bytes, ph + 8)?;
        let vaddr = u64_at(bytes, ph + 16)?;
        let filesz = u64_at(bytes, ph + 32)?;
        match p_type {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_INTERP => {
                let raw = slice(bytes, offset, filesz)?;
                info.interp = Some(c_str(raw, 0)?);
            }
            _ => {}
        }
    }
    let Some((dyn_offset, dyn_size)) = dynamic else {
        return Ok(info); // statically linked
    };
    let table = slice(bytes, dyn_offset, dyn_size)?;
    let mut strtab_vaddr = None;
    let (mut needed, mut runpath, mut rpath) = (Vec::new(), None, None);
    for entry in table.chunks_exact(16) {
        let tag = u64_at(entry, 0)?;
        let val = u64_at(entry, 8)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            DT_RUNPATH => runpath = Some(val),
            DT_RPATH => rpath = Some(val),
            _ => {}
        }
    }
    let strtab_vaddr = strtab_vaddr.context("Dynamic section without DT_STRTAB")?;
    // DT_STRTAB holds a virtual address: find the file offset through the PT_LOAD segments.
    let strtab = loads
        .iter()
        .find(|(vaddr, _, filesz)| strtab_vaddr >= *vaddr && strtab_vaddr - vaddr < *filesz)
        .map(|(vaddr, offset, _)| strtab_vaddr - vaddr + offset)
        .context("DT_STRTAB is outside every loaded segment")?;
    let string = |index: u64| -> Result<String> {
        let start = to_usize(strtab.checked_add(index).context("Bad string offset")?)?;
        c_str(bytes, start)
    };
    info.needed = needed.into_iter().map(string).collect::<Result<_>>()?;
    if let Some(index) = runpath.or(rpath) {
        info.runpath = string(index)?
            .split(':')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
    }
    Ok(info)
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).context("Offset out of range")
}

fn slice(bytes: &[u8], offset: u64, len: u64) -> Result<&[u8]> {
    let start = to_usize(offset)?;
    let end = start
        .checked_add(to_usize(len)?)
        .context("Offset out of range")?;
    bytes.get(start..end).context("Segment outside the file")
}

fn c_str(bytes: &[u8], start: usize) -> Result<String> {
    let rest = bytes.get(start..).context("String outside the file")?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .context("Unterminated string")?;
    String::from_utf8(rest[..end].to_vec()).context("String is not UTF-8")
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16> {
    let raw = bytes.get(at..at + 2).context("Header outside the file")?;
    Ok(u16::from_le_bytes([raw[0], raw[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32> {
    let raw = bytes.get(at..at + 4).context("Header outside the file")?;
    Ok(u32::from_le_bytes(raw.try_into()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64> {
    let raw = bytes.get(at..at + 8).context("Header outside the file")?;
    Ok(u64::from_le_bytes(raw.try_into()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF: header, PT_LOAD over the whole file, PT_INTERP, PT_DYNAMIC.
    fn tiny_elf() -> Vec<u8> {
        let strtab = b"\0libfoo.so.1\0libbar.so.2\0$ORIGIN/../lib:/opt\0/lib64/ld.so\0";
        let (ph, strtab_off) = (64usize, 64 + 3 * 56);
        let interp_off = strtab_off + 45;
        let dyn_off = (strtab_off + strtab.len()).next_multiple_of(8);
        let dynamic: [(u64, u64); 5] = [
            (DT_NEEDED, 1),
            (DT_NEEDED, 13),
            (DT_STRTAB, 0x1000 + strtab_off as u64),
            (DT_RUNPATH, 25),
            (0, 0),
        ];
        let mut b = vec![0u8; dyn_off + dynamic.len() * 16];
        b[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        b[0x20..0x28].copy_from_slice(&(ph as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let len = b.len() as u64;
        let headers = [
            (PT_LOAD, 0u64, 0x1000u64, len),
            (PT_INTERP, interp_off as u64, 0, 13),
            (PT_DYNAMIC, dyn_off as u64, 0, 80),
        ];
        for (i, (t, off, vaddr, size)) in headers.into_iter().enumerate() {
            let at = ph + i * 56;
            b[at..at + 4].copy_from_slice(&t.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            b[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        }
        b[strtab_off..strtab_off + strtab.len()].copy_from_slice(strtab);
        for (i, (tag, val)) in dynamic.into_iter().enumerate() {
            let at = dyn_off + i * 16;
            b[at..at + 8].copy_from_slice(&tag.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&val.to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_interp_needed_and_runpath() {
        let info = dynamic_info(&tiny_elf()).unwrap();
        assert_eq!(info.interp.as_deref(), Some("/lib64/ld.so"));
        assert_eq!(info.needed, ["libfoo.so.1", "libbar.so.2"]);
        assert_eq!(info.runpath, ["$ORIGIN/../lib", "/opt"]);
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        let elf = tiny_elf();
        for len in 0..elf.len() {
            let _ = dynamic_info(&elf[..len]); // must not panic
        }
        assert!(dynamic_info(b"#!/bin/sh\n").is_err());
        let mut big_endian = elf.clone();
        big_endian[5] = 2;
        assert!(dynamic_info(&big_endian).is_err());
    }

    #[test]
    fn reads_the_host_shell() {
        // Any dynamically linked host binary will do: it proves the parser on a real file.
        let bytes = std::fs::read("/bin/sh").unwrap();
        let info = dynamic_info(&bytes).unwrap();
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
    }
}
