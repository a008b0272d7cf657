//! The virtual interface: one volume served to one VM as a vhost-user-blk device.
//!
//! The VM's front end (QEMU, outboard-vmm) shares guest memory and the virtqueues with us over
//! the vhost-user socket; kicks and interrupts are eventfds, so the VMM is off the data path.
//! Each queue has its own worker thread (vhost-user-backend's epoll loop) with its own
//! [`Engine`]: its io_uring's completion eventfd and its throttle timerfd are registered as
//! extra listeners of that thread.
//!
//! ```text
//!  kick(q) ─► pop chains, parse, enqueue ─┐
//!  uring eventfd ─► reap completions ─────┼─► used ring + call eventfd (EVENT_IDX aware)
//!  throttle timerfd ─► pump the FIFO ─────┘    re-arm timer at the exact next admission
//! ```
//!
//! FLUSH is an io_uring fdatasync on the backing store, acknowledged only after it returns.
//! On GET_VRING_BASE ([`VhostUserBackend::stop_vring`]) the queue's outstanding requests are
//! completed before the front end gets the ring state, so none is lost across a reconnect.
//!
//! A card that is killed cannot answer GET_VRING_BASE, so we also offer
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: every chain taken from the avail ring is marked in a
//! shared inflight region ([`inflight`]) until it is on the used ring. The front end keeps the
//! region; the next card instance gets it back with SET_INFLIGHT_FD and, on the queue's first
//! event, resubmits the marked chains in submission order and resumes the avail ring after them:
//!
//! ```text
//!  connect ─► GET_INFLIGHT_FD (new region) / SET_INFLIGHT_FD (front end's) ─► splice → slot
//!  first kick of queue q ─► recover(region, used idx) ─► resubmit heads ─► next avail =
//!                           used idx + resubmitted ─► normal service (mark / pre_put / post_put)
//! ```
//!
//! vhost-user-backend 0.24 answers the two inflight messages with "not supported" from a
//! handler it keeps private, so the card answers them itself in a small message splice
//! ([`splice`]) in front of an unmodified `VhostUserDaemon`, rather than forking the handler.
//! Re-executing a block read or write is idempotent, which is what makes resubmission safe.
//! A killed card may also have put chains on the used ring without notifying; with EVENT_IDX
//! the driver would then never hear of them, so a (re)started ring notifies once on its first
//! kick.

mod config;
mod config_change;
pub mod inflight;
mod serve;
mod splice;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::blk::device::VolumeDevice;
use crate::blk::engine::{self, Completion, Engine};
use crate::blk::request::{parse, Desc};

pub use config::{BlkConfig, CONFIG_LEN, SEG_MAX, SIZE_MAX};
pub use serve::{serve, Error as ServeError, Server};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Mem>;

/// The inflight region of the current connection, set by the splice, read by the workers.
pub(crate) type InflightSlot = Arc<Mutex<Option<Arc<inflight::Region>>>>;

/// Errors setting up a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Queue count must be 1..=64, got {0}")]
    QueueCount(usize),
    #[error("Cannot create an eventfd or timerfd")]
    Fd(#[source] io::Error),
    #[error("Cannot create an I/O engine")]
    Engine(#[source] engine::Error),
    #[error("Cannot register a worker listener")]
    Register(#[source] io::Error),
}

struct Worker {
    engine: Engine,
    uring_evt: EventFd,
    timer: TimerFd,
    /// The queue this worker serves, kept so that stop_vring can complete requests.
    vring: Option<Vring>,
    /// When the armed timer is due (device clock, ns), so that an idle worker makes no
    /// timerfd syscalls and a late wake-up can be measured.
    timer_due: Option<u64>,
    /// The inflight region this queue has recovered from and now records into.
    region: Option<Arc<inflight::Region>>,
    /// Submission counter for the inflight region (orders resubmission).
    counter: u64,
    /// Chains resubmitted from the inflight region on this connection.
    resubmitted: u64,
    /// The ring was (re)started: a previous card instance, or this one before a ring stop, may
    /// have put chains on the used ring and never notified the driver.
    owes_notification: bool,
}

/// A vhost-user-blk backend for one attached volume.
pub struct BlkBackend {
    dev: Arc<VolumeDevice>,
    num_queues: usize,
    queue_size: usize,
    workers: Vec<Mutex<Worker>>,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    /// The front end's backend request channel, for config changes (see [`config_change`]).
    backend_req: config_change::Slot,
    inflight: InflightSlot,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("dev", &self.dev)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: usize = 1024;

impl BlkBackend {
    /// A backend for `dev` with `num_queues` queues, one worker thread each.
    pub fn new(dev: Arc<VolumeDevice>, num_queues: usize) -> Result<Self, Error> {
        if num_queues == 0 || num_queues > 64 {
            return Err(Error::QueueCount(num_queues));
        }
        let workers = (0..num_queues)
            .map(|_| {
                let uring_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::Fd)?;
                let timer = TimerFd::new().map_err(|e| Error::Fd(e.into()))?;
                set_nonblocking(timer.as_raw_fd()).map_err(Error::Fd)?;
                let engine =
                    Engine::new(dev.clone(), Some(uring_evt.as_raw_fd())).map_err(Error::Engine)?;
                Ok(Mutex::new(Worker {
                    engine,
                    uring_evt,
                    timer,
                    vring: None,
                    timer_due: None,
                    region: None,
                    counter: 1,
                    resubmitted: 0,
                    owes_notification: true,
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            dev,
            num_queues,
            queue_size: MAX_QUEUE_SIZE,
            workers,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            backend_req: config_change::Slot::default(),
            inflight: InflightSlot::default(),
        })
    }

    /// The attached volume.
    pub fn device(&self) -> &Arc<VolumeDevice> {
        &self.dev
    }

    /// Where the splice puts the connection's inflight region.
    pub(crate) fn inflight_slot(&self) -> InflightSlot {
        self.inflight.clone()
    }

    /// Chains resubmitted from the inflight region since this connection started.
    pub fn resubmitted(&self) -> u64 {
        (0..self.num_queues)
            .map(|q| self.worker(q).resubmitted)
            .sum()
    }

    /// On the first event after a new inflight region appears: bring it in line with the used
    /// ring, resubmit what it says was in flight (in submission order) and resume the avail
    /// ring after them.
    fn recover(&self, q: usize, w: &mut Worker, vring: &Vring, mem: &GuestMemoryMmap<()>) {
        let current = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(region) = current else { return };
        if w.region.as_ref().is_some_and(|r| Arc::ptr_eq(r, &region)) {
            return;
        }
        w.region = Some(region.clone());
        let Some(state) = region.queue(q) else { return };
        let (table, size, used) = {
            let g = vring.get_ref();
            let queue = g.get_queue();
            (queue.desc_table(), queue.size(), queue.next_used())
        };
        let (heads, next) = state.recover(used);
        log::debug!("Queue {q}: used index {used}, {} in flight", heads.len());
        w.counter = next;
        if heads.is_empty() {
            return;
        }
        log::info!("Queue {q}: resubmitting {} in-flight requests", heads.len());
        vring.set_queue_next_avail(used.wrapping_add(heads.len() as u16));
        for head in heads {
            let descs =
                inflight::chain_at(mem, GuestAddress(table), size, head).unwrap_or_default();
            let parsed = parse(descs, mem, self.dev.capacity());
            w.engine.enqueue(mem, head, parsed);
            w.resubmitted += 1;
        }
    }

    fn uring_event(&self) -> u16 {
        self.num_queues as u16 + 1
    }

    fn timer_event(&self) -> u16 {
        self.num_queues as u16 + 2
    }

    /// Registers each worker's io_uring eventfd and timerfd with its epoll loop. Call once,
    /// after creating the daemon and before serving.
    pub fn register_listeners(
        &self,
        handlers: &[Arc<vhost_user_backend::VringEpollHandler<Arc<BlkBackend>>>],
    ) -> Result<(), Error> {
        for (i, h) in handlers.iter().enumerate() {
            let w = self.worker(i);
            h.register_listener(
                w.uring_evt.as_raw_fd(),
                EventSet::IN,
                u64::from(self.uring_event()),
            )
            .map_err(Error::Register)?;
            h.register_listener(
                w.timer.as_raw_fd(),
                EventSet::IN,
                u64::from(self.timer_event()),
            )
            .map_err(Error::Register)?;
        }
        Ok(())
    }

    fn worker(&self, i: usize) -> MutexGuard<'_, Worker> {
        // Worker state stays consistent across a panic in another holder (none is expected).
        self.workers[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pops every available chain of `vring`, parses and enqueues it.
    fn drain_queue(
        &self,
        q: usize,
        w: &mut Worker,
        vring: &Vring,
        mem: &GuestMemoryMmap<()>,
    ) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if let Some(state) = w.region.as_ref().and_then(|r| r.queue(q)) {
                    state.mark(head, w.counter);
                    w.counter += 1;
                }
                let descs = chain.map(|d| Desc {
                    addr: d.addr(),
                    len: d.len(),
                    writable: d.is_write_only(),
                });
                let parsed = parse(descs, mem, self.dev.capacity());
                w.engine.enqueue(mem, head, parsed);
            }
            // With EVENT_IDX, chains that arrived while notifications were off need another pass.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Submits queued I/O, collects completions, publishes them and re-arms the timer.
    fn progress(
        &self,
        q: usize,
        w: &mut Worker,
        vring: &Vring,
        mem: &GuestMemoryMmap<()>,
    ) -> io::Result<()> {
        w.engine.pump(mem);
        w.engine.submit()?;
        let done = w.engine.reap(mem);
        w.engine.submit()?;
        publish(vring, &done, w.region.as_deref().and_then(|r| r.queue(q)))?;
        match w.engine.next_wakeup() {
            // The timer (an hrtimer, no slack) wakes the worker at the exact nanosecond the
            // throttle's head request becomes admissible; zero would disarm the timerfd, so
            // wait at least a microsecond. Re-arming for the same instant is skipped.
            Some(ns) => {
                let ns = ns.max(1_000);
                let due = self.dev.now_ns() + ns;
                if w.timer_due.is_none_or(|d| d.abs_diff(due) > 1_000) {
                    w.timer
                        .reset(Duration::from_nanos(ns), None)
                        .map_err(io::Error::other)?;
                    w.timer_due = Some(due);
                }
            }
            None if w.timer_due.is_some() => {
                w.timer.clear().map_err(io::Error::other)?;
                w.timer_due = None;
            }
            None => {}
        }
        Ok(())
    }
}

/// A stale timer event (the timer was re-armed or disarmed after it fired) must not block the
/// worker in read(), so the timerfd is non-blocking.
fn set_nonblocking(fd: std::os::unix::io::RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a file descriptor we own reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a file descriptor we own only changes its status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts completions on the used ring; with an inflight region, each one in the order that
/// survives a kill at any point (see [`inflight`]).
fn publish(
    vring: &Vring,
    done: &[Completion],
    inflight: Option<inflight::QueueState<'_>>,
) -> io::Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    for c in done {
        if let Some(s) = inflight {
            s.pre_put(c.head);
        }
        vring
            .add_used(c.head, c.used_len)
            .map_err(io::Error::other)?;
        if let Some(s) = inflight {
            s.post_put(c.head, vring.get_ref().get_queue().next_used());
        }
    }
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// A card killed between putting chains on the used ring and notifying leaves the driver's
/// `used_event` behind the used index: with EVENT_IDX, no later completion crosses it again
/// (until the index wraps) and the driver waits forever. So the first kick of a (re)started
/// ring notifies once, whatever EVENT_IDX says; an extra interrupt only makes the driver look.
fn notify_once(w: &mut Worker, vring: &Vring) -> io::Result<()> {
    if w.owes_notification && vring.get_ref().get_call().is_some() {
        vring.signal_used_queue()?;
        w.owes_notification = false;
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ];
        bits.iter().fold(
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            |acc, b| acc | 1u64 << b,
        )
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Built from the device each time: a live grow changes the capacity.
        let config = BlkConfig::for_volume(
            self.dev.capacity(),
            self.num_queues as u16,
            self.dev.encrypted(),
        )
        .to_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it the worker threads never leave their epoll loop and the daemon cannot be
        // dropped when the front end disconnects.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        if q >= self.num_queues {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mem = mem.memory();
        let mut w = self.worker(q);
        let Some(vring) = w.vring.clone() else {
            return Ok(());
        };
        // Complete everything accepted so far (including throttled requests), so the ring
        // state handed back to the front end has no request in limbo.
        while w.engine.outstanding() > 0 {
            if let Some(ns) = w.engine.next_wakeup() {
                std::thread::sleep(Duration::from_nanos(ns));
                w.engine.pump(&*mem);
            }
            w.engine.submit_and_wait()?;
            let done = w.engine.reap(&*mem);
            publish(&vring, &done, w.region.as_deref().and_then(|r| r.queue(q)))?;
        }
        w.timer.clear().map_err(io::Error::other)?;
        w.timer_due = None;
        w.owes_notification = true;
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("Unexpected event set {evset:?}")));
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        // An owned reference, lent to the engine so that plain volumes' I/O can go straight
        // to and from guest memory while keeping the mapping alive.
        let mem = mem.memory().into_inner();
        // `vrings` holds only this thread's queues (one: queue `thread_id`), and queue events
        // carry the index within it.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let mut w = self.worker(thread_id);
        if w.vring.is_none() {
            w.vring = Some(vring.clone());
        }
        w.engine.use_guest_memory(&mem);
        match device_event {
            0 => {
                self.recover(thread_id, &mut w, vring, &mem);
                self.drain_queue(thread_id, &mut w, vring, &mem)?;
                self.progress(thread_id, &mut w, vring, &mem)?;
                return notify_once(&mut w, vring);
            }
            e if e == self.uring_event() => {
                // Non-blocking: an empty counter just means we already caught up.
                let _ = w.uring_evt.read();
            }
            e if e == self.timer_event() => {
                let _ = w.timer.wait();
                if let Some(due) = w.timer_due.take() {
                    let late = self.dev.now_ns().saturating_sub(due);
                    self.dev
                        .counters
                        .wake_late_max_ns
                        .fetch_max(late, Ordering::Relaxed);
                }
            }
            _ => return Ok(()),
        }
        self.progress(thread_id, &mut w, vring, &mem)
    }
}

#[cfg(test)]
mod tests;
