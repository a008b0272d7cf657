//! The inflight region (vhost-user `INFLIGHT_SHMFD`, split virtqueues): shared memory that
//! records which descriptor chains the card has taken from the avail ring and not yet put on
//! the used ring. The front end keeps the region's fd, so it outlives a card that is killed;
//! the next card instance maps it (SET_INFLIGHT_FD) and resubmits what was in flight.
//!
//! Layout per queue (64-byte aligned), as in the vhost-user specification:
//!
//! ```text
//!  0 features u64 | 8 version u16 | 10 desc_num u16 | 12 last_batch_head u16 | 14 used_idx u16
//!  16 + 16·i: DescStateSplit { inflight u8, padding [u8; 5], next u16, counter u64 }
//! ```
//!
//! Life of one descriptor head:
//!
//! ```text
//!  popped ─► counter = n; inflight = 1 ─► request runs ─► last_batch_head = head
//!        ─► used ring (elem + idx) ─► inflight = 0 ─► used_idx = ring's used idx
//! ```
//!
//! A kill between publishing and clearing leaves `used_idx` behind the ring's: recovery clears
//! `last_batch_head`, then every descriptor still marked is resubmitted in counter order, and
//! the next avail index is `used idx + resubmitted` (each popped chain is either used or marked).

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemory, VolatileMemory};

use crate::blk::request::Desc;

/// Errors creating or mapping a region.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create the inflight memfd")]
    Create(#[source] io::Error),
    #[error("Cannot map the inflight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("Inflight region of {size} bytes is too small for {queues} queues of {queue_size}")]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
    },
    #[error("Inflight geometry is invalid: {queues} queues of {queue_size}")]
    Geometry { queues: u16, queue_size: u16 },
}

/// Bounds on what a front end may ask for (our device has at most 64 queues of 1024).
const MAX_QUEUES: u16 = 64;
const MAX_QUEUE_SIZE: u16 = 1024;
const HEADER: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Bytes per queue for `queue_size` descriptors.
pub fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// One mapped inflight region (all queues of one device).
pub struct Region {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl Region {
    /// A zeroed region for GET_INFLIGHT_FD, its fd and the reply describing it.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Self, File, VhostUserInflight), Error> {
        if !(1..=MAX_QUEUES).contains(&num_queues) || !(1..=MAX_QUEUE_SIZE).contains(&queue_size) {
            return Err(Error::Geometry {
                queues: num_queues,
                queue_size,
            });
        }
        let size = queue_bytes(queue_size) * usize::from(num_queues);
        // SAFETY: the name is a valid NUL-terminated string and the call touches no other memory.
        let fd = unsafe { libc::memfd_create(c"outboard-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(Error::Create)?;
        let info = VhostUserInflight::new(size as u64, 0, num_queues, queue_size);
        let region = Self::map(&file, &info)?;
        for q in 0..num_queues {
            let base = region.base(q);
            region.put(base + 8, VERSION);
            region.put(base + 10, queue_size);
        }
        Ok((region, file, info))
    }

    /// Maps the region a front end hands back with SET_INFLIGHT_FD.
    pub fn map(file: &File, info: &VhostUserInflight) -> Result<Self, Error> {
        let (queues, queue_size) = (info.num_queues, info.queue_size);
        if !(1..=MAX_QUEUES).contains(&queues) || !(1..=MAX_QUEUE_SIZE).contains(&queue_size) {
            return Err(Error::Geometry { queues, queue_size });
        }
        let need = queue_bytes(queue_size) as u64 * u64::from(queues);
        if info.mmap_size < need {
            return Err(Error::TooSmall {
                size: info.mmap_size,
                queues,
                queue_size,
            });
        }
        let file = file.try_clone().map_err(Error::Create)?;
        let map = MmapRegion::from_file(FileOffset::new(file, info.mmap_offset), need as usize)
            .map_err(Error::Map)?;
        Ok(Self {
            map,
            num_queues: queues,
            queue_size,
        })
    }

    fn base(&self, q: u16) -> usize {
        queue_bytes(self.queue_size) * usize::from(q)
    }

    fn put<T: vm_memory::ByteValued>(&self, off: usize, v: T) {
        // The offsets are computed from the validated geometry, so they are in the mapping.
        let _ = self.map.as_volatile_slice().write_obj(v, off);
    }

    fn get<T: vm_memory::ByteValued + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .read_obj(off)
            .unwrap_or_default()
    }

    /// The view of queue `q`, if the region covers it.
    pub fn queue(&self, q: usize) -> Option<QueueState<'_>> {
        let q = u16::try_from(q).ok().filter(|q| *q < self.num_queues)?;
        Some(QueueState {
            region: self,
            base: self.base(q),
        })
    }
}

/// The inflight state of one queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueState<'a> {
    region: &'a Region,
    base: usize,
}

impl QueueState<'_> {
    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.region.queue_size).then(|| self.base + HEADER + DESC * usize::from(head))
    }

    /// Records that `head` was taken from the avail ring as the `counter`-th request.
    pub fn mark(&self, head: u16, counter: u64) {
        let Some(d) = self.desc(head) else { return };
        self.region.put(d + 8, counter);
        fence(Ordering::SeqCst);
        self.region.put(d, 1u8);
    }

    /// Before `head` goes on the used ring.
    pub fn pre_put(&self, head: u16) {
        if head < self.region.queue_size {
            self.region.put(self.base + 12, head);
            fence(Ordering::SeqCst);
        }
    }

    /// After `head` is on the used ring, whose index is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        let Some(d) = self.desc(head) else { return };
        fence(Ordering::SeqCst);
        self.region.put(d, 0u8);
        fence(Ordering::SeqCst);
        self.region.put(self.base + 14, used_idx);
    }

    /// Brings the region in line with the used ring (index `used_idx`) and returns the heads
    /// still in flight in submission order, and the next counter value.
    pub fn recover(&self, used_idx: u16) -> (Vec<u16>, u64) {
        if self.region.get::<u16>(self.base + 14) != used_idx {
            // Killed after publishing last_batch_head but before clearing it.
            let last: u16 = self.region.get(self.base + 12);
            if let Some(d) = self.desc(last) {
                self.region.put(d, 0u8);
            }
            fence(Ordering::SeqCst);
            self.region.put(self.base + 14, used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.region.queue_size)
            .filter_map(|h| {
                let d = self.desc(h)?;
                (self.region.get::<u8>(d) == 1).then(|| (self.region.get::<u64>(d + 8), h))
            })
            .collect();
        inflight.sort_unstable();
        let next = inflight.last().map_or(1, |(c, _)| c.saturating_add(1));
        (inflight.into_iter().map(|(_, h)| h).collect(), next)
    }
}

/// Reads the descriptor chain at `head` of the table at `table` (`size` entries), following one
/// level of indirection; `None` for a malformed chain (loop, out of range, nested indirect).
pub fn chain_at<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Option<Vec<Desc>> {
    let (mut table, mut size, mut idx, mut indirect) = (table, u32::from(size), head, false);
    let mut out = Vec::new();
    // A chain visits each descriptor of its table at most once.
    for _ in 0..(2 * 65536) {
        if u32::from(idx) >= size {
            return None;
        }
        let at = table.checked_add(u64::from(idx) * DESC as u64)?;
        let addr: u64 = mem.read_obj(at).ok()?;
        let len: u32 = mem.read_obj(at.checked_add(8)?).ok()?;
        let flags: u16 = mem.read_obj(at.checked_add(12)?).ok()?;
        let next: u16 = mem.read_obj(at.checked_add(14)?).ok()?;
        if flags & F_INDIRECT != 0 {
            if indirect || len == 0 || !len.is_multiple_of(DESC as u32) || len / DESC as u32 > 65536
            {
                return None;
            }
            (table, size, idx, indirect) = (GuestAddress(addr), len / DESC as u32, 0, true);
            continue;
        }
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Some(out);
        }
        if out.len() > size as usize {
            return None;
        }
        idx = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn survives_remap_and_recovers_in_counter_order() {
        let (region, file, info) = Region::create(2, 8).unwrap();
        assert_eq!(info.mmap_size, 2 * 192);
        let q = region.queue(1).unwrap();
        q.mark(5, 1);
        q.mark(2, 2);
        q.mark(7, 3);
        q.pre_put(2);
        // Killed here in a first run: 2 is on the used ring (idx 1) but still marked.
        drop(region);
        let again = Region::map(&file, &info).unwrap();
        let (heads, next) = again.queue(1).unwrap().recover(1);
        assert_eq!(heads, vec![5, 7]);
        assert_eq!(next, 4);
        assert!(again.queue(0).unwrap().recover(0).0.is_empty());
        assert!(again.queue(2).is_none());
    }

    #[test]
    fn completed_requests_are_not_resubmitted() {
        let (region, _file, _) = Region::create(1, 4).unwrap();
        let q = region.queue(0).unwrap();
        q.mark(3, 1);
        q.pre_put(3);
        q.post_put(3, 1);
        q.mark(9, 2); // out of range: ignored
        assert_eq!(q.recover(1), (vec![], 1));
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let (_r, file, info) = Region::create(1, 4).unwrap();
        let big = VhostUserInflight::new(info.mmap_size, 0, 4, 4);
        assert!(matches!(
            Region::map(&file, &big),
            Err(Error::TooSmall { .. })
        ));
        assert!(Region::create(0, 4).is_err());
        assert!(Region::create(65535, 65535).is_err());
    }

    #[test]
    fn chains_direct_indirect_and_malformed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let put = |i: u64, table: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(table + 16 * i);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        };
        put(0, 0x1000, 0x4000, 16, F_NEXT, 1);
        put(1, 0x1000, 0x5000, 1, F_WRITE, 0);
        let c = chain_at(&mem, GuestAddress(0x1000), 4, 0).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c[1].writable);
        put(2, 0x1000, 0x2000, 32, F_INDIRECT, 0);
        put(0, 0x2000, 0x4000, 16, F_NEXT, 1);
        put(1, 0x2000, 0x5000, 1, F_WRITE, 0);
        assert_eq!(chain_at(&mem, GuestAddress(0x1000), 4, 2).unwrap().len(), 2);
        put(3, 0x1000, 0x4000, 16, F_NEXT, 3); // a loop
        assert!(chain_at(&mem, GuestAddress(0x1000), 4, 3).is_none());
        assert!(chain_at(&mem, GuestAddress(0x1000), 4, 4).is_none());
    }
}
