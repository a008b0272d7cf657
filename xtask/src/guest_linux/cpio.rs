//! The initramfs archive: a tree of entries collected in memory, written as a newc ("070701")
//! cpio archive, which is the format the kernel's initramfs unpacker reads.
//!
//! Output is deterministic: entries are written sorted by path (so every directory comes before
//! what it holds), with inode numbers in that order, owner root and one fixed mtime. Two builds
//! from the same inputs give the same bytes, which keeps the image cache meaningful.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Every entry's modification time: 2000-01-01, a fixed point so that the archive is reproducible.
const MTIME: u32 = 946_684_800;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Where a regular file's bytes come from.
#[derive(Debug)]
pub enum Data {
    Bytes(Vec<u8>),
    /// Read from the host when the archive is written, so large files are not held twice.
    Host(PathBuf),
}

#[derive(Debug)]
enum Kind {
    Dir,
    File(Data),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug)]
struct Entry {
    perm: u32,
    kind: Kind,
}

/// An archive being assembled. Paths are absolute in the guest (`/bin/busybox`); parent
/// directories are created as needed.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
    /// Written after every other entry: the guest sees it only if the whole archive unpacked
    /// (the kernel stops unpacking at the first error, e.g. when guest memory runs out).
    last: Option<String>,
}

impl Archive {
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = normalise(path)?;
        self.add_parents(&path)?;
        match self.entries.get(&path) {
            Some(Entry {
                kind: Kind::Dir, ..
            }) => Ok(()),
            Some(_) => bail!("Archive path {path} is already a non-directory"),
            None => {
                self.entries.insert(
                    path,
                    Entry {
                        perm: 0o755,
                        kind: Kind::Dir,
                    },
                );
                Ok(())
            }
        }
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Data) -> Result<()> {
        self.insert(path, perm, Kind::File(data))
    }

    /// Adds a file that is written after all others, so its presence proves a complete unpack.
    pub fn last_file(&mut self, path: &str, perm: u32, data: Data) -> Result<()> {
        self.file(path, perm, data)?;
        self.last = Some(normalise(path)?);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, 0o777, Kind::Symlink(target.to_string()))
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, perm, Kind::CharDev { major, minor })
    }

    #[cfg(test)]
    pub fn contains(&self, path: &str) -> bool {
        normalise(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    fn insert(&mut self, path: &str, perm: u32, kind: Kind) -> Result<()> {
        let path = normalise(path)?;
        self.add_parents(&path)?;
        if self.entries.contains_key(&path) {
            bail!("Archive path {path} added twice");
        }
        self.entries.insert(path, Entry { perm, kind });
        Ok(())
    }

    fn add_parents(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !parent.is_empty() {
                self.dir(parent)?;
            }
        }
        Ok(())
    }

    /// Writes the archive, followed by the trailer, to `out`.
    pub fn write_to<W: Write>(&self, out: &mut W) -> Result<()> {
        let mut writer = NewcWriter { out, offset: 0 };
        let last = self
            .last
            .as_ref()
            .and_then(|p| self.entries.get_key_value(p));
        let in_order = self
            .entries
            .iter()
            .filter(|(p, _)| Some(*p) != self.last.as_ref());
        for (ino, (path, entry)) in in_order.chain(last).enumerate() {
            let ino = u32::try_from(ino + 1).context("Too many archive entries")?;
            let (mode, data, rdev): (u32, Vec<u8>, (u32, u32)) = match &entry.kind {
                Kind::Dir => (S_IFDIR | entry.perm, Vec::new(), (0, 0)),
                Kind::File(Data::Bytes(bytes)) => (S_IFREG | entry.perm, bytes.clone(), (0, 0)),
                Kind::File(Data::Host(host)) => {
                    let bytes = std::fs::read(host)
                        .with_context(|| format!("Cannot read {}", host.display()))?;
                    (S_IFREG | entry.perm, bytes, (0, 0))
                }
                Kind::Symlink(target) => {
                    (S_IFLNK | entry.perm, target.clone().into_bytes(), (0, 0))
                }
                Kind::CharDev { major, minor } => {
                    (S_IFCHR | entry.perm, Vec::new(), (*major, *minor))
                }
            };
            let nlink = if matches!(entry.kind, Kind::Dir) {
                2
            } else {
                1
            };
            writer.entry(&path[1..], ino, mode, nlink, rdev, &data)?;
        }
        writer.entry("TRAILER!!!", 0, 0, 1, (0, 0), &[])?;
        Ok(())
    }
}

/// Accepts `/a/b` or `a/b`, returns `/a/b`; rejects empty components, `.` and `..`.
fn normalise(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("Bad archive path {path:?}");
    }
    Ok(format!("/{trimmed}"))
}

struct NewcWriter<'a, W: Write> {
    out: &'a mut W,
    offset: u64,
}

impl<W: Write> NewcWriter<'_, W> {
    fn entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let size = u32::try_from(data.len()).context("File too large for a newc archive")?;
        let namesize = u32::try_from(name.len() + 1).context("Name too long")?;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check.
        let fields = [
            ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .context("Cannot write the archive")?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// newc aligns both the name and the data to 4 bytes.
    fn pad(&mut self) -> Result<()> {
        let zeros = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0; 3][..zeros])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, (rdev major, minor), data)
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back into its entries, checking alignment.
    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (mode, size, rdev, namesize) = (
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
            );
            assert_eq!(field(5), MTIME);
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (offset + 110 + namesize).next_multiple_of(4) - offset;
            let data = bytes[data_start..data_start + size].to_vec();
            let next = (offset + data_start + size).next_multiple_of(4) - offset;
            offset += next;
            bytes = &bytes[next..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn writes_sorted_entries_with_parents_and_alignment() {
        let mut archive = Archive::default();
        archive
            .file("/usr/bin/fio", 0o755, Data::Bytes(b"abcde".to_vec()))
            .unwrap();
        archive.symlink("/lib64/ld.so", "/lib/ld.so").unwrap();
        archive.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        archive
            .file("/init", 0o755, Data::Bytes(b"#!/bin/sh\n".to_vec()))
            .unwrap();
        archive
            .last_file("/dev/done", 0o644, Data::Bytes(Vec::new()))
            .unwrap();
        let mut bytes = Vec::new();
        archive.write_to(&mut bytes).unwrap();
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib64",
                "lib64/ld.so",
                "usr",
                "usr/bin",
                "usr/bin/fio",
                "dev/done"
            ]
        );
        assert_eq!(entries[1].1, S_IFCHR | 0o600);
        assert_eq!(entries[1].2, (5, 1));
        assert_eq!(entries[4].1, S_IFLNK | 0o777);
        assert_eq!(entries[4].3, b"/lib/ld.so");
        assert_eq!(entries[7].1, S_IFREG | 0o755);
        assert_eq!(entries[7].3, b"abcde");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
    }

    #[test]
    fn output_is_deterministic() {
        let build = |order: &[&str]| {
            let mut archive = Archive::default();
            for name in order {
                archive
                    .file(name, 0o644, Data::Bytes(name.as_bytes().to_vec()))
                    .unwrap();
            }
            let mut bytes = Vec::new();
            archive.write_to(&mut bytes).unwrap();
            bytes
        };
        assert_eq!(
            build(&["/a/x", "/b", "/a/y"]),
            build(&["/b", "/a/y", "/a/x"])
        );
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut archive = Archive::default();
        for bad in ["", "/", "/a/../b", "/a//b", "./x"] {
            assert!(
                archive.file(bad, 0o644, Data::Bytes(Vec::new())).is_err(),
                "{bad:?}"
            );
        }
        archive.file("/a", 0o644, Data::Bytes(Vec::new())).unwrap();
        assert!(archive.file("/a", 0o644, Data::Bytes(Vec::new())).is_err());
        assert!(archive
            .file("/a/b", 0o644, Data::Bytes(Vec::new()))
            .is_err());
        assert!(archive.contains("/a"));
    }
}
