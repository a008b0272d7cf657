//! Which bytes of a kernel file end up in guest memory, and where.
//!
//! PCR2 measures the kernel *as placed in guest memory*, so the VMM (reading guest memory back
//! after loading) and a user predicting the value from the file (`outboard attest measure`) must
//! agree on the bytes. This module owns that definition; it follows the loading rules of
//! `linux-loader`, which outboard-vmm uses:
//!
//! | format | measured regions, in order | guest address |
//! |---|---|---|
//! | bzImage (`HdrS` at 0x202) | file bytes after the setup sectors: `[(setup_sects or 4) + 1) × 512, end)` | `kernel_load + 0` |
//! | ELF64 | each `PT_LOAD` program header with `p_filesz > 0`, in header order: `[p_offset, p_offset + p_filesz)` | `kernel_offset (or 0) + p_paddr` |
//! | anything else | the whole file | `kernel_load + 0` |
//!
//! The zero-filled tail of an ELF segment (`p_memsz > p_filesz`) and the bzImage setup code are
//! not measured: the first is zero by construction, the second is not executed by a 64-bit boot
//! (its header fields end up in the zero page, whose content the configuration determines).
//!
//! The kernel file is untrusted input: every offset is bounds-checked.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kernel image is truncated: {what} lies outside the {len}-byte file")]
    Truncated { what: &'static str, len: usize },
    #[error("bzImage setup size exceeds the file")]
    BadSetupSize,
    #[error("ELF kernel is not 64-bit little-endian")]
    UnsupportedElf,
    #[error("ELF kernel has {0} program headers (at most 128 are accepted)")]
    TooManyProgramHeaders(u16),
}

/// Kernel file formats the loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf64,
    Raw,
}

/// One contiguous run of file bytes copied verbatim into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRegion {
    /// Offset of the run in the kernel file.
    pub file_offset: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// Guest address of the run relative to the format's base: `kernel_load` for bzImage and raw
    /// images, the loader's `kernel_offset` (0 when none) for ELF.
    pub guest_offset: u64,
}

/// The regions of a kernel file that are measured, in measurement order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub format: KernelFormat,
    pub regions: Vec<KernelRegion>,
}

const PT_LOAD: u32 = 1;
const MAX_PHDRS: u16 = 128;

impl KernelLayout {
    /// Works out the layout of the kernel file `image`.
    pub fn parse(image: &[u8]) -> Result<KernelLayout, Error> {
        if image.starts_with(b"\x7fELF") {
            return parse_elf(image);
        }
        if image.get(0x202..0x206) == Some(b"HdrS") {
            return parse_bzimage(image);
        }
        Ok(KernelLayout {
            format: KernelFormat::Raw,
            regions: vec![KernelRegion {
                file_offset: 0,
                len: image.len() as u64,
                guest_offset: 0,
            }],
        })
    }

    /// The measured bytes of `image` (which must be the file this layout was parsed from), in
    /// order: what the VMM reads back from guest memory.
    pub fn measured_bytes<'a>(&'a self, image: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.regions.iter().map(move |r| {
            // parse() checked every region against the file; an unrelated file yields nothing.
            usize::try_from(r.file_offset)
                .ok()
                .zip(usize::try_from(r.len).ok())
                .and_then(|(off, len)| image.get(off..off.checked_add(len)?))
                .unwrap_or(&[])
        })
    }

    /// Total measured length.
    pub fn measured_len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

fn parse_bzimage(image: &[u8]) -> Result<KernelLayout, Error> {
    let setup_sects = *image.get(0x1f1).ok_or(Error::Truncated {
        what: "setup_sects",
        len: image.len(),
    })?;
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let setup_size = (usize::from(sects) + 1) * 512;
    let len = image
        .len()
        .checked_sub(setup_size)
        .ok_or(Error::BadSetupSize)?;
    Ok(KernelLayout {
        format: KernelFormat::BzImage,
        regions: vec![KernelRegion {
            file_offset: setup_size as u64,
            len: len as u64,
            guest_offset: 0,
        }],
    })
}

fn read_u16(b: &[u8], off: usize, what: &'static str) -> Result<u16, Error> {
    let s = b
        .get(off..off + 2)
        .ok_or(Error::Truncated { what, len: b.len() })?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn read_u32(b: &[u8], off: usize, what: &'static str) -> Result<u32, Error> {
    let s = b
        .get(off..off + 4)
        .ok_or(Error::Truncated { what, len: b.len() })?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_u64(b: &[u8], off: usize, what: &'static str) -> Result<u64, Error> {
    let s = b
        .get(off..off + 8)
        .ok_or(Error::Truncated { what, len: b.len() })?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn parse_elf(image: &[u8]) -> Result<KernelLayout, Error> {
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian)
    if image.get(4) != Some(&2) || image.get(5) != Some(&1) {
        return Err(Error::UnsupportedElf);
    }
    let phoff = read_u64(image, 0x20, "e_phoff")?;
    let phentsize = read_u16(image, 0x36, "e_phentsize")?;
    let phnum = read_u16(image, 0x38, "e_phnum")?;
    if phnum > MAX_PHDRS {
        return Err(Error::TooManyProgramHeaders(phnum));
    }
    if phnum > 0 && phentsize < 56 {
        return Err(Error::UnsupportedElf);
    }
    let mut regions = Vec::new();
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|v| usize::try_from(v).ok())
            .filter(|v| v.checked_add(56).is_some_and(|end| end <= image.len()))
            .ok_or(Error::Truncated {
                what: "program header",
                len: image.len(),
            })?;
        let p_type = read_u32(image, at, "p_type")?;
        let p_offset = read_u64(image, at + 8, "p_offset")?;
        let p_paddr = read_u64(image, at + 24, "p_paddr")?;
        let p_filesz = read_u64(image, at + 32, "p_filesz")?;
        if p_type != PT_LOAD || p_filesz == 0 {
            continue;
        }
        let in_file = p_offset
            .checked_add(p_filesz)
            .is_some_and(|end| end <= image.len() as u64);
        if !in_file {
            return Err(Error::Truncated {
                what: "PT_LOAD segment",
                len: image.len(),
            });
        }
        regions.push(KernelRegion {
            file_offset: p_offset,
            len: p_filesz,
            guest_offset: p_paddr,
        });
    }
    Ok(KernelLayout {
        format: KernelFormat::Elf64,
        regions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_segments(segs: &[(u32, u64, u64, u64)]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56 * segs.len()];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(ty, off, paddr, filesz)) in segs.iter().enumerate() {
            let at = 64 + 56 * i;
            f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
        }
        f.resize(4096, 0xaa);
        f
    }

    #[test]
    fn elf_measures_load_segments_in_order() {
        let f = elf_with_segments(&[
            (1, 1024, 0x10_0000, 100),
            (4, 0, 0, 10),
            (1, 2048, 0x20_0000, 50),
        ]);
        let l = KernelLayout::parse(&f).unwrap();
        assert_eq!(l.format, KernelFormat::Elf64);
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[1].guest_offset, 0x20_0000);
        assert_eq!(l.measured_len(), 150);
    }

    #[test]
    fn elf_segment_past_end_is_rejected() {
        let f = elf_with_segments(&[(1, 4000, 0, 1000)]);
        assert!(matches!(
            KernelLayout::parse(&f),
            Err(Error::Truncated { .. })
        ));
        let f = elf_with_segments(&[(1, u64::MAX, 0, 2)]);
        assert!(KernelLayout::parse(&f).is_err());
    }

    #[test]
    fn bzimage_skips_setup_sectors() {
        let mut f = vec![0u8; 8192];
        f[0x1f1] = 3;
        f[0x202..0x206].copy_from_slice(b"HdrS");
        let l = KernelLayout::parse(&f).unwrap();
        assert_eq!(l.format, KernelFormat::BzImage);
        assert_eq!(l.regions[0].file_offset, 2048);
        assert_eq!(l.measured_len(), 8192 - 2048);
        f.truncate(0x300);
        assert!(matches!(KernelLayout::parse(&f), Err(Error::BadSetupSize)));
    }

    #[test]
    fn anything_else_is_raw() {
        let l = KernelLayout::parse(b"hello").unwrap();
        assert_eq!(l.format, KernelFormat::Raw);
        assert_eq!(
            l.measured_bytes(b"hello").collect::<Vec<_>>(),
            vec![b"hello"]
        );
    }
}
