//! Measuring the same binary once per host instead of once per launch.
//!
//! A host's attestation service measures the outboard-vmm binary of every VMM that asks it
//! (PCR0). Thousands of VMMs run the same few binaries, and hashing 2 MiB costs several
//! milliseconds of each launch, so [`DigestCache`] remembers a file's SHA-384 under its
//! identity: device, inode, size, and the modification and status-change times in nanoseconds.
//! This is the rule Linux IMA uses to skip re-measuring a file: any write to the inode moves
//! `mtime` and `ctime`, and `ctime` cannot be set from user space (`utimensat` sets it to *now*),
//! so a file changed after it was hashed never matches its old entry. Besides, a binary some
//! process is executing cannot be opened for writing at all (`ETXTBSY`).
//!
//! The file is opened once and identified, hashed and identified again through that descriptor,
//! so a path swapped in the meantime is never confused with the file measured; an entry is only
//! stored when both identities agree.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::pcr::{self, Digest, EventHasher};

/// Most files remembered; past it the cache starts over (a host runs a handful of VMM builds).
const MAX_ENTRIES: usize = 64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: pcr::Error,
    },
    #[error("Cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What makes two looks at a file the same content (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(file: &File, path: &Path) -> Result<Self, Error> {
        let m = file.metadata().map_err(|source| Error::Stat {
            path: path.to_owned(),
            source,
        })?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// SHA-384 digests of files by identity; shared between the service's connections.
#[derive(Debug, Default)]
pub struct DigestCache {
    entries: Mutex<HashMap<FileIdentity, Digest>>,
}

/// A digest and whether it came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub digest: Digest,
    pub cached: bool,
}

impl DigestCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The SHA-384 of the file at `path`.
    pub fn digest(&self, path: &Path) -> Result<FileDigest, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        self.digest_file(file, path)
    }

    /// The SHA-384 of the open `file` (`path` names it in errors). For a process's binary the
    /// caller opens `/proc/<pid>/exe` and checks the process is still the one it means before
    /// calling this.
    pub fn digest_file(&self, mut file: File, path: &Path) -> Result<FileDigest, Error> {
        let before = FileIdentity::of(&file, path)?;
        if let Some(digest) = self.lock().get(&before) {
            return Ok(FileDigest {
                digest: *digest,
                cached: true,
            });
        }
        let mut hasher = EventHasher::new();
        hasher
            .update_from_reader(&mut file)
            .map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
        let digest = hasher.finish();
        if FileIdentity::of(&file, path)? == before {
            let mut entries = self.lock();
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(before, digest);
        }
        Ok(FileDigest {
            digest,
            cached: false,
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileIdentity, Digest>> {
        // A panic while holding the lock leaves a consistent map (insert and clear are atomic
        // from the outside), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pcr::sha384;
    use std::io::Write;
    use std::time::{Duration, SystemTime};

    #[test]
    fn second_look_is_cached_and_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm");
        std::fs::write(&path, b"binary v1").unwrap();
        let cache = DigestCache::new();
        let first = cache.digest(&path).unwrap();
        assert!(!first.cached);
        assert_eq!(first.digest, sha384(b"binary v1"));
        let second = cache.digest(&path).unwrap();
        assert!(second.cached);
        assert_eq!(second.digest, first.digest);
    }

    #[test]
    fn a_write_in_place_is_measured_again_even_with_the_old_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm");
        std::fs::write(&path, b"binary v1").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let cache = DigestCache::new();
        cache.digest(&path).unwrap();
        // Same size, same content length, and mtime put back: only ctime tells.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"binary v2").unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let after = cache.digest(&path).unwrap();
        assert!(
            !after.cached,
            "an in-place write must not hit the old entry"
        );
        assert_eq!(after.digest, sha384(b"binary v2"));
    }

    #[test]
    fn a_replaced_file_is_measured_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm");
        std::fs::write(&path, b"binary v1").unwrap();
        let cache = DigestCache::new();
        cache.digest(&path).unwrap();
        let other = dir.path().join("new");
        std::fs::write(&other, b"binary v2").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let after = cache.digest(&path).unwrap();
        assert!(!after.cached);
        assert_eq!(after.digest, sha384(b"binary v2"));
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let cache = DigestCache::new();
        let err = cache.digest(Path::new("/nonexistent/vmm")).unwrap_err();
        assert!(err.to_string().starts_with("Cannot open"), "{err}");
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::new();
        for i in 0..(MAX_ENTRIES + 5) {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, i.to_string()).unwrap();
            cache.digest(&path).unwrap();
        }
        assert!(cache.len() <= MAX_ENTRIES);
    }
}
