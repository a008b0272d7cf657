//! Executes virtio-blk requests of one volume for one worker thread.
//!
//! Each worker owns an [`Engine`]: an io_uring, its own XTS contexts and bounce buffers.
//!
//! - Plain volumes: reads and writes go straight between the store and guest memory (zero
//!   copy, [`super::direct`]) when the caller lent the engine the guest memory
//!   ([`Engine::use_guest_memory`]) and the buffers meet O_DIRECT alignment; otherwise through
//!   a bounce buffer.
//! - Encrypted volumes: guest memory is never encrypted in place and never handed to the
//!   kernel: writes are encrypted straight from guest memory into an aligned bounce buffer;
//!   reads land in a bounce buffer and are decrypted after completion straight into guest
//!   memory ([`super::crypt`]: XTS out of place, one pass over the data each way).
//! - WRITE_ZEROES: fallocate on plain volumes, encrypted zeros in bounded chunks otherwise
//!   ([`zeroes`]).
//!
//! ```text
//!  enqueue(head, parsed) ──► throttled FIFO ──admit──► dispatch: SQEs pushed (one per extent
//!        │  malformed: status now                         piece; fsync; fallocate)
//!        ▼                                                    │ submit() once per batch
//!   completions ◄── finish: decrypt/copy, status byte ◄── reap(): CQEs, last piece done
//! ```
//!
//! The caller (the vhost-user backend) turns [`Completion`]s into used-ring entries and arms a
//! timer for [`Engine::next_wakeup`] while requests wait for the throttle.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::crypt::{self, Scratch};
use super::device::{Counters, VolumeDevice};
use super::direct::{self, Plan};
use super::pool::BufPool;
use super::request::{defs::*, gather, scatter, Op, Parsed, Range, Request};
use crate::aligned::AlignedBuf;
use crate::throttle::{Admission, Direction};
use crate::xts::{self, Xts, SECTOR};

/// Errors setting up an engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create an io_uring")]
    Uring(#[source] io::Error),
    #[error("Cannot register the completion eventfd")]
    RegisterEventFd(#[source] io::Error),
    #[error("Cannot set up XTS for the volume")]
    Xts(#[source] xts::Error),
}

/// A finished request: the chain `head` and the bytes written into its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
}

/// Guest memory lent to the engine, kept mapped while zero-copy I/O into it is in flight.
type MemoryOwner = Arc<dyn Any + Send + Sync>;

struct Slot {
    head: u16,
    req: Request,
    buf: Option<AlignedBuf>,
    /// Zero-copy iovecs into guest memory, and that memory kept mapped until completion.
    direct: Option<(Plan, MemoryOwner)>,
    /// Pieces (SQEs) still in flight.
    pending: u32,
    failed: bool,
    /// A WRITE_ZEROES request's progress.
    zeroing: Option<zeroes::ZeroJob>,
}

/// Size of each worker's submission queue.
pub const RING_ENTRIES: u32 = 256;
/// Most bounce-buffer bytes one WRITE_ZEROES request holds at a time (and the size of the
/// shared zero buffer).
pub const ZERO_CHUNK: usize = 1 << 20;

/// One worker's request executor for one volume.
pub struct Engine {
    dev: Arc<VolumeDevice>,
    ring: IoUring,
    xts: Option<Xts>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Requests waiting for the throttle, oldest first, with the time they started waiting.
    throttled: VecDeque<(u16, Request, u64)>,
    done: Vec<Completion>,
    inflight: usize,
    fd: RawFd,
    pool: BufPool,
    /// Guest memory lent by the caller, and the address of the `M` inside it.
    owner: Option<(MemoryOwner, usize)>,
    mem_align: usize,
    /// Data units split across guest buffers pass through here (wiped after each request).
    scratch: Scratch,
    /// Zeros the kernel writes from (plain) or XTS encrypts from; never written.
    zero_buf: Option<AlignedBuf>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dev", &self.dev)
            .field("inflight", &self.inflight)
            .field("throttled", &self.throttled.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine for `dev`; if `eventfd` is given, the ring signals completions on it.
    pub fn new(dev: Arc<VolumeDevice>, eventfd: Option<RawFd>) -> Result<Self, Error> {
        let ring = IoUring::new(RING_ENTRIES).map_err(Error::Uring)?;
        if let Some(fd) = eventfd {
            ring.submitter()
                .register_eventfd(fd)
                .map_err(Error::RegisterEventFd)?;
        }
        let xts = dev.key().map(Xts::new).transpose().map_err(Error::Xts)?;
        let fd = dev.backing().file().as_raw_fd();
        let mem_align = dev.backing().mem_align();
        Ok(Self {
            dev,
            ring,
            xts,
            slots: Vec::new(),
            free: Vec::new(),
            throttled: VecDeque::new(),
            done: Vec::new(),
            inflight: 0,
            fd,
            pool: BufPool::default(),
            owner: None,
            mem_align,
            scratch: crypt::scratch(),
            zero_buf: None,
        })
    }

    /// Lends the engine the guest memory that later calls pass as `&**mem`, so that reads and
    /// writes of a plain volume can go straight to and from it: the engine keeps `mem` (and so
    /// its mappings) alive until every I/O into it has completed. Calls with any other memory
    /// object use bounce buffers.
    pub fn use_guest_memory<M: GuestMemory + Send + Sync + 'static>(&mut self, mem: &Arc<M>) {
        let addr = Arc::as_ptr(mem) as usize;
        if self.owner.as_ref().is_some_and(|(_, a)| *a == addr) {
            return;
        }
        self.owner = Some((mem.clone(), addr));
    }

    /// The lent memory, if `mem` is it.
    fn owner_of<M: GuestMemory>(&self, mem: &M) -> Option<MemoryOwner> {
        let (owner, addr) = self.owner.as_ref()?;
        (*addr == mem as *const M as usize).then(|| owner.clone())
    }

    /// The device this engine serves.
    pub fn device(&self) -> &Arc<VolumeDevice> {
        &self.dev
    }

    /// What the store accepts for WRITE_ZEROES (tests force the fallback through it).
    #[cfg(test)]
    pub(crate) fn zero_support(&self) -> &zeroes::ZeroSupport {
        self.dev.zero_support()
    }

    fn counters(&self) -> &Counters {
        &self.dev.counters
    }

    /// Requests accepted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.inflight + self.throttled.len()
    }

    /// Takes a parsed chain. Malformed chains complete at once; valid ones are throttled
    /// and dispatched (call [`Engine::submit`] after a batch).
    pub fn enqueue<M: GuestMemory>(&mut self, mem: &M, head: u16, parsed: Parsed) {
        match parsed {
            Parsed::NoStatus => {
                Counters::add(&self.counters().errors, 1);
                self.done.push(Completion { head, used_len: 0 });
            }
            Parsed::Fail { status, code } => {
                Counters::add(&self.counters().errors, 1);
                let used_len = if mem.write_obj(code, status).is_ok() {
                    1
                } else {
                    0
                };
                self.done.push(Completion { head, used_len });
            }
            Parsed::Ok(req) => {
                Counters::add(&self.counters().queue_depth, 1);
                let now = self.dev.now_ns();
                self.throttled.push_back((head, req, now));
                self.pump(mem);
            }
        }
    }

    /// Dispatches throttled requests that are now admissible, in order.
    pub fn pump<M: GuestMemory>(&mut self, mem: &M) {
        while let Some((_, req, _)) = self.throttled.front() {
            let now = self.dev.now_ns();
            if let Some((dir, bytes)) = self.throttle_cost(&req.op) {
                if let Admission::Wait(_) = self.dev.throttle().try_admit(now, dir, bytes) {
                    return;
                }
            }
            let (head, req, since) = self.throttled.pop_front().expect("front exists");
            Counters::add(&self.counters().throttled_ns, now.saturating_sub(since));
            self.dispatch(mem, head, req);
        }
    }

    /// Nanoseconds until the throttled head request may go, if any is waiting.
    pub fn next_wakeup(&self) -> Option<u64> {
        let (_, req, _) = self.throttled.front()?;
        let (dir, bytes) = self.throttle_cost(&req.op)?;
        // Ask a copy, so that asking charges nothing.
        let mut t = self.dev.throttle().clone();
        match t.try_admit(self.dev.now_ns(), dir, bytes) {
            Admission::Admit => Some(0),
            Admission::Wait(ns) => Some(ns),
        }
    }

    /// Throttle direction and bytes of an operation; None if it is not throttled. Zeroing a
    /// plain volume's range is a fallocate the store does without moving the bytes, so it
    /// costs one operation like a discard; written zeros (encrypted volumes, or a store that
    /// refused fallocate) cost their bytes.
    fn throttle_cost(&self, op: &Op) -> Option<(Direction, u64)> {
        match op {
            Op::Read { range, .. } => Some((Direction::Read, range.len)),
            Op::Write { range, .. } => Some((Direction::Write, range.len)),
            Op::WriteZeroes { unmap, .. }
                if self.xts.is_none() && self.dev.zero_support().offloaded(*unmap) =>
            {
                Some((Direction::Write, 0))
            }
            Op::WriteZeroes { ranges, .. } => {
                Some((Direction::Write, ranges.iter().map(|r| r.len).sum()))
            }
            Op::Discard(_) => Some((Direction::Write, 0)),
            Op::Flush | Op::GetId { .. } => None,
        }
    }

    fn complete_now<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        req: &Request,
        code: u8,
        data_len: u32,
    ) {
        if code != S_OK {
            Counters::add(&self.counters().errors, 1);
        }
        self.counters()
            .queue_depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let used_len = if mem.write_obj(code, req.status).is_ok() {
            data_len + 1
        } else {
            0
        };
        self.done.push(Completion { head, used_len });
    }

    fn slot(&mut self, head: u16, req: Request, buf: Option<AlignedBuf>) -> usize {
        let slot = Slot {
            head,
            req,
            buf,
            direct: None,
            pending: 0,
            failed: false,
            zeroing: None,
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// A zero-copy plan for a read or write of `range` on a plain volume, if possible.
    fn plan_direct<M: GuestMemory>(
        &self,
        mem: &M,
        data: &[super::request::Segment],
        range: Range,
        access: Permissions,
    ) -> Option<(Plan, MemoryOwner)> {
        if self.xts.is_some() {
            return None;
        }
        let owner = self.owner_of(mem)?;
        let pieces = self.dev.volume().map(range.offset, range.len)?;
        let plan = direct::plan(mem, data, &pieces, self.mem_align, access)?;
        Some((plan, owner))
    }

    fn dispatch<M: GuestMemory>(&mut self, mem: &M, head: u16, req: Request) {
        match &req.op {
            Op::Read { range, data } => {
                let range = *range;
                if let Some(d) = self.plan_direct(mem, data, range, Permissions::Write) {
                    return self.rw_direct(mem, head, req, d, false);
                }
                let mut buf = self.pool.get(range.len as usize);
                let ptr = buf.as_mut_ptr();
                let idx = self.slot(head, req, Some(buf));
                self.rw(mem, idx, &[range], ptr, false);
            }
            Op::Write { range, data } => {
                let range = *range;
                if let Some(d) = self.plan_direct(mem, data, range, Permissions::Read) {
                    return self.rw_direct(mem, head, req, d, true);
                }
                let mut buf = self.pool.get(range.len as usize);
                let out = &mut buf.as_mut_slice()[..range.len as usize];
                let ok = match self.xts.as_mut() {
                    Some(x) => {
                        let first = range.offset / SECTOR as u64;
                        crypt::encrypt_from_guest(x, mem, data, first, out, &mut self.scratch)
                            .is_ok()
                    }
                    None => gather(mem, data, out).is_ok(),
                };
                if !ok {
                    self.pool.put(buf);
                    return self.complete_now(mem, head, &req, S_IOERR, 0);
                }
                let ptr = buf.as_mut_ptr();
                let idx = self.slot(head, req, Some(buf));
                self.rw(mem, idx, &[range], ptr, true);
            }
            _ => self.dispatch_other(mem, head, req),
        }
    }

    /// Pushes the pieces of a zero-copy plan: one SQE per extent piece, straight into (reads)
    /// or out of (writes) guest memory.
    fn rw_direct<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        req: Request,
        direct: (Plan, MemoryOwner),
        write: bool,
    ) {
        Counters::add(&self.counters().zero_copy, 1);
        let idx = self.slot(head, req, None);
        let mut sqes = Vec::with_capacity(direct.0.pieces.len());
        for p in &direct.0.pieces {
            let fd = types::Fd(self.fd);
            let iov = &direct.0.iovs[p.first];
            let sqe = match (p.count, write) {
                (1, false) => opcode::Read::new(fd, iov.iov_base.cast(), p.len)
                    .offset(p.phys)
                    .build(),
                (1, true) => opcode::Write::new(fd, iov.iov_base.cast(), p.len)
                    .offset(p.phys)
                    .build(),
                (n, false) => opcode::Readv::new(fd, iov, n as u32).offset(p.phys).build(),
                (n, true) => opcode::Writev::new(fd, iov, n as u32)
                    .offset(p.phys)
                    .build(),
            };
            sqes.push((p.len, sqe));
        }
        // The iovec array lives in the slot (its heap buffer does not move) until the last
        // piece completes.
        if let Some(slot) = self.slots[idx].as_mut() {
            slot.direct = Some(direct);
        }
        for (len, sqe) in sqes {
            self.push(idx, len, sqe);
        }
        self.finish_if_idle(mem, idx);
    }

    /// Requests other than reads and writes: GET_ID, FLUSH, DISCARD, WRITE_ZEROES.
    fn dispatch_other<M: GuestMemory>(&mut self, mem: &M, head: u16, req: Request) {
        match req.op.clone() {
            Op::GetId { data, len } => {
                let id = *self.dev.serial();
                let code = if scatter(mem, &data, &id[..len as usize]).is_ok() {
                    S_OK
                } else {
                    S_IOERR
                };
                self.complete_now(mem, head, &req, code, if code == S_OK { len } else { 0 });
            }
            Op::Flush => {
                let idx = self.slot(head, req, None);
                let sqe = opcode::Fsync::new(types::Fd(self.fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                self.push(idx, 0, sqe);
            }
            Op::Read { .. } | Op::Write { .. } => self.dispatch(mem, head, req),
            Op::WriteZeroes { .. } => {
                let idx = self.slot(head, req, None);
                self.dispatch_zeroes(mem, idx);
            }
            Op::Discard(ranges) => {
                let idx = self.slot(head, req, None);
                let mut pieces = Vec::new();
                for r in &ranges {
                    // Ranges were checked against the volume by the parser.
                    pieces.extend(self.dev.volume().map(r.offset, r.len).unwrap_or_default());
                }
                for (phys, len) in pieces {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    let sqe = opcode::Fallocate::new(types::Fd(self.fd), len)
                        .offset(phys)
                        .mode(mode)
                        .build();
                    self.push(idx, 0, sqe);
                }
                self.finish_if_idle(mem, idx);
            }
        }
    }

    /// Pushes reads or writes of `ranges` (volume byte ranges, laid out back to back in the
    /// buffer at `base`) for slot `idx`.
    fn rw<M: GuestMemory>(
        &mut self,
        mem: &M,
        idx: usize,
        ranges: &[Range],
        base: *mut u8,
        write: bool,
    ) {
        let mut at = 0usize;
        for r in ranges {
            // The parser checked every range against the volume's size, which its extents
            // cover; a range they do not map fails the request rather than leaving it hanging.
            let Some(pieces) = self.dev.volume().map(r.offset, r.len) else {
                if let Some(slot) = self.slots[idx].as_mut() {
                    slot.failed = true;
                }
                break;
            };
            for (phys, len) in pieces {
                let ptr = base.wrapping_add(at);
                let sqe = if write {
                    opcode::Write::new(types::Fd(self.fd), ptr, len as u32)
                        .offset(phys)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(self.fd), ptr, len as u32)
                        .offset(phys)
                        .build()
                };
                self.push(idx, len as u32, sqe);
                at += len as usize;
            }
        }
        self.finish_if_idle(mem, idx);
    }

    /// Queues `sqe` for slot `idx`; `expect` is the result that means success (bytes for
    /// reads and writes, 0 for the others), carried in the upper half of user_data.
    fn push(&mut self, idx: usize, expect: u32, sqe: squeue::Entry) {
        let sqe = sqe.user_data((expect as u64) << 32 | idx as u64);
        loop {
            // SAFETY: every buffer an SQE points to is owned by slot `idx` (a bounce buffer, or
            // iovecs into guest memory whose mapping the slot keeps alive through its owner
            // Arc) or by the engine (its zero buffer), and neither is freed before all the
            // pieces have completed (Drop waits for in-flight pieces), so the memory stays valid
            // for the kernel throughout.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            // Queue full: hand what we have to the kernel, which empties the SQ.
            if let Err(e) = self.ring.submit() {
                log::warn!("io_uring submit failed: {e}");
            }
        }
        if let Some(slot) = self.slots[idx].as_mut() {
            if slot.pending == 0 {
                self.inflight += 1;
            }
            slot.pending += 1;
        }
    }

    fn finish_if_idle<M: GuestMemory>(&mut self, mem: &M, idx: usize) {
        if self.slots[idx].as_ref().is_some_and(|s| s.pending == 0) {
            self.finish(mem, idx);
        }
    }

    /// Submits everything pushed since the last call (one syscall per batch).
    pub fn submit(&mut self) -> io::Result<usize> {
        // Skip the syscall when there is nothing to hand over and no completion is stuck in
        // the kernel's overflow list or task work.
        let mut sq = self.ring.submission();
        if sq.is_empty() && !sq.cq_overflow() && !sq.taskrun() {
            return Ok(0);
        }
        sq.sync();
        drop(sq);
        self.ring.submit()
    }

    /// Submits and blocks until at least one piece completes (for callers without an event
    /// loop: tests, the load generator).
    pub fn submit_and_wait(&mut self) -> io::Result<usize> {
        if self.inflight == 0 {
            return self.ring.submit();
        }
        self.ring.submit_and_wait(1)
    }

    /// Collects finished I/O, completes requests, and returns everything completed so far.
    pub fn reap<M: GuestMemory>(&mut self, mem: &M) -> Vec<Completion> {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, res) in cqes {
            let idx = (user_data & 0xffff_ffff) as usize;
            let expect = (user_data >> 32) as i32;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            // Pieces complete whole or not at all: the volume lies inside the store, so a short
            // transfer means the store changed under us, and is an I/O error like any other.
            let refused = res < 0 && slot.zeroing.as_mut().is_some_and(|z| z.refusal(res));
            // A refused fallocate mode is not a failure: the request goes on another way.
            if res != expect && !refused {
                if res < 0 {
                    log::warn!(
                        "I/O on {:?} failed: {}",
                        self.dev,
                        io::Error::from_raw_os_error(-res)
                    );
                }
                slot.failed = true;
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                self.inflight -= 1;
                if slot.zeroing.is_some() {
                    self.zeroes_progress(mem, idx);
                } else {
                    self.finish(mem, idx);
                }
            }
        }
        self.pump(mem);
        std::mem::take(&mut self.done)
    }

    /// Completes slot `idx` whose pieces are all done.
    fn finish<M: GuestMemory>(&mut self, mem: &M, idx: usize) {
        let Some(mut slot) = self.slots[idx].take() else {
            return;
        };
        self.free.push(idx);
        let c = &self.dev.counters;
        let mut data_len = 0u32;
        let mut code = if slot.failed { S_IOERR } else { S_OK };
        match &slot.req.op {
            Op::Read { range, .. } if !slot.failed && slot.direct.is_some() => {
                data_len = range.len as u32;
                Counters::add(&c.read_ops, 1);
                Counters::add(&c.read_bytes, range.len);
            }
            Op::Read { range, data } if !slot.failed => {
                let buf = slot.buf.as_ref().expect("bounced reads have a buffer");
                let src = &buf.as_slice()[..range.len as usize];
                let ok = match self.xts.as_mut() {
                    Some(x) => {
                        let first = range.offset / SECTOR as u64;
                        crypt::decrypt_to_guest(x, mem, data, first, src, &mut self.scratch).is_ok()
                    }
                    None => scatter(mem, data, src).is_ok(),
                };
                if ok {
                    data_len = range.len as u32;
                    Counters::add(&c.read_ops, 1);
                    Counters::add(&c.read_bytes, range.len);
                } else {
                    code = S_IOERR;
                }
            }
            Op::Write { range, .. } if !slot.failed => {
                Counters::add(&c.write_ops, 1);
                Counters::add(&c.write_bytes, range.len);
            }
            Op::Flush if !slot.failed => Counters::add(&c.flushes, 1),
            Op::Discard(_) if !slot.failed => Counters::add(&c.discards, 1),
            Op::WriteZeroes { .. } if !slot.failed => Counters::add(&c.write_zeroes, 1),
            _ => {}
        }
        if let Some(buf) = slot.buf.take() {
            self.pool.put(buf);
        }
        let head = slot.head;
        let req = slot.req;
        self.complete_now(mem, head, &req, code, data_len);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The kernel may still write into bounce buffers: wait for every piece before they
        // are freed.
        let mut pieces: u64 = self.slots.iter().flatten().map(|s| s.pending as u64).sum();
        while pieces > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Cannot wait: leak the buffers rather than let the kernel write into
                    // freed memory.
                    for slot in self.slots.iter_mut().flatten() {
                        std::mem::forget(slot.buf.take());
                        std::mem::forget(slot.direct.take());
                    }
                    std::mem::forget(self.zero_buf.take());
                    return;
                }
            }
            pieces = pieces.saturating_sub(self.ring.completion().count() as u64);
        }
    }
}

#[cfg(test)]
mod tests;
pub(crate) mod zeroes;
