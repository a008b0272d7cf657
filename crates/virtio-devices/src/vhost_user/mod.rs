//! vhost-user frontend devices (block and net): the device work runs in a backend process that
//! maps guest memory (the memfd regions) and is kicked and calls through eventfds KVM owns.
//!
//! The VMM speaks to the backend only to set things up. Everything a backend needs to resume
//! is kept in [`VhostUserState`] (plain data, serde) plus three kinds of fds (the socket, the
//! inflight region, and the transport's kick/call eventfds), so the set-up can be replayed on a
//! new connection and handed to a successor VMM.
//!
//! ```text
//!            connect + handshake                    DRIVER_OK
//!   start ───────────────────────► connected ─────────────────────► running
//!                                     ▲  │ HUP / silent               │ HUP / silent  │ pause(): GET_VRING_BASE
//!                                     │  ▼                            ▼               ▼
//!                   reconnect + replay disconnected ◄───────────── (rings)         paused ──resume()──► running
//! ```
//!
//! ("silent": no answer within [`REPLY_TIMEOUT`]; at boot that fails the device instead.)
//!
//! A monitor thread (holding only a weak reference) polls the socket for hang-up; it then
//! reconnects with backoff and replays features, memory table, inflight fd and the vrings with
//! bases taken from the used index in guest memory; a libvhost-user backend resubmits what the
//! inflight region says was in flight. The guest sees a delay, not an error.
//!
//! A live update hands the connection to a successor VMM (`handover.rs`); a snapshot restored
//! in a new process connects afresh and starts the saved rings at the used index in guest
//! memory (`restore.rs`).
//!
//! Every conversation with the backend is bounded by [`REPLY_TIMEOUT`] (`deadline.rs`): a
//! backend that accepts the connection and then says nothing fails the boot with
//! [`Error::NoReply`], and once the device runs it is dropped like a backend that hung up (the
//! monitor reconnects). A disk's backend may report a changed capacity on the backend request
//! channel (`backend_req.rs`); each session opens its own.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use outboard_devices::Counter;
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{ActiveQueue, ConfigNotifier, Error, QueueConfig, VirtioDevice, TYPE_BLOCK, TYPE_NET};

mod backend_req;
mod deadline;
mod handover;
mod reconnect;
mod restore;
mod session;

/// Size of `struct virtio_blk_config` in virtio 1.2 (up to `write_zeroes_may_unmap`).
const BLK_CONFIG_SIZE: usize = 60;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
/// Features needing a control queue, which a vhost-user net device here doesn't have.
const NET_CTRL_FEATURES: u64 =
    (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23);
const PROTOCOL_WANTED: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);
/// Longest a conversation with a backend may take (one request, or a set-up's sequence of
/// them), and longest wait for the rest of a backend request once it started.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Which virtio device the backend implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Block,
    Net { mac: Option<[u8; 6]> },
}

/// A vring as the backend was (or will be) told about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    pub index: usize,
    pub config: QueueConfig,
    /// Next avail index for SET_VRING_BASE.
    pub base: u16,
}

/// The inflight region's geometry (the region itself is an fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightInfo {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// Everything needed to replay the set-up on a new connection or in a successor VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    pub backend_features: u64,
    pub protocol_features: u64,
    pub acked_features: u64,
    pub active: bool,
    pub paused: bool,
    pub vrings: Vec<VringState>,
    pub inflight: Option<InflightInfo>,
    pub config: Vec<u8>,
    /// The memory table the backend holds. Its `userspace_addr`s are labels shared with the
    /// backend (vring addresses are given in them), so a successor mapping guest memory
    /// elsewhere keeps using these rather than remapping a running backend.
    pub mem_table: Vec<MemRegionLabel>,
}

/// One region of the memory table as the backend knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegionLabel {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub userspace_addr: u64,
}

/// Per-device counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub disconnects: Counter,
    pub reconnects: Counter,
    pub config_reads: Counter,
    pub config_writes: Counter,
    pub backend_errors: Counter,
    /// Wake-ups of the monitor thread (hang-ups, config changes and shutdown, never per I/O).
    pub monitor_wakeups: Counter,
    /// CONFIG_CHANGE_MSGs taken from the backend.
    pub config_changes: Counter,
    /// Conversations the backend did not answer within [`REPLY_TIMEOUT`].
    pub timeouts: Counter,
}

struct Conn {
    frontend: Option<Frontend>,
    /// Features, memory table and inflight region were sent on this connection.
    session_ready: bool,
    state: VhostUserState,
    inflight_file: Option<File>,
    queues: Vec<ActiveQueue>,
    /// Our end of this connection's backend request channel (shut down to end its thread).
    backend_req: Option<UnixStream>,
    /// The backend reported a config change while the device couldn't ask for it (paused or
    /// disconnected): read again on resume.
    config_stale: bool,
}

impl Conn {
    /// The connection's socket, if connected.
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.frontend.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn new(frontend: Option<Frontend>) -> Self {
        Conn {
            frontend,
            session_ready: false,
            state: VhostUserState::default(),
            inflight_file: None,
            queues: Vec::new(),
            backend_req: None,
            config_stale: false,
        }
    }
}

/// A virtio-blk or virtio-net device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: Kind,
    socket: PathBuf,
    num_queues: usize,
    queue_size: u16,
    memory: GuestMemoryMmap,
    conn: Mutex<Conn>,
    /// An adopted connection whose negotiated features the frontend library doesn't know yet
    /// (see `handover.rs`); changed under the `conn` lock.
    reteach: AtomicBool,
    stop: AtomicBool,
    stop_evt: Arc<EventFd>,
    /// Written when the transport must be told of a config change by the monitor thread.
    config_evt: EventFd,
    notifier: Mutex<Option<ConfigNotifier>>,
    /// This device, for the threads it starts.
    me: OnceLock<Weak<Self>>,
    monitor: Mutex<Option<JoinHandle<()>>>,
    pub counters: Counters,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Errors of creating a vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Cannot connect to vhost-user backend {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user backend {} failed the handshake", path.display())]
    Handshake {
        path: PathBuf,
        #[source]
        source: Error,
    },
    #[error("vhost-user backend {} offers {offered} queues, {wanted} configured", path.display())]
    QueueCount {
        path: PathBuf,
        offered: u64,
        wanted: usize,
    },
    #[error("vhost-user block backend {} lacks the CONFIG protocol feature", path.display())]
    NoConfig { path: PathBuf },
    #[error("Cannot create eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Whether `e` means the connection is gone (replayed on reconnect) rather than the backend
/// refusing a request (a device error).
fn is_disconnect(e: &Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        Error::Disconnected | Error::NoReply { .. } => true,
        Error::VhostUser {
            source: vhost::Error::VhostUserProtocol(u),
            ..
        } => matches!(
            u,
            U::Disconnected
                | U::PartialMessage
                | U::SocketError(_)
                | U::SocketBroken(_)
                | U::SocketRetry(_)
                | U::SocketConnect(_)
        ),
        _ => false,
    }
}

fn vu(request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::VhostUser { request, source }
}

impl VhostUserDevice {
    /// Connects to `socket`, negotiates, and starts the monitor thread that reconnects.
    pub fn connect(
        kind: Kind,
        socket: PathBuf,
        num_queues: u16,
        queue_size: u16,
        memory: GuestMemoryMmap,
    ) -> Result<Arc<Self>, StartError> {
        let frontend = Frontend::connect(&socket, u64::from(num_queues)).map_err(|source| {
            StartError::Connect {
                path: socket.clone(),
                source,
            }
        })?;
        let dev = Arc::new(
            VhostUserDevice::new(
                kind,
                socket.clone(),
                num_queues,
                queue_size,
                memory,
                Conn::new(None),
                false,
            )
            .map_err(StartError::EventFd)?,
        );
        // Before the handshake: the backend request channel's thread needs it.
        let _ = dev.me.set(Arc::downgrade(&dev));
        {
            let mut conn = dev.lock();
            let mut frontend = frontend;
            let Conn {
                state, backend_req, ..
            } = &mut *conn;
            let offered = deadline::bounded(Some(frontend.as_raw_fd()), || {
                dev.handshake(&mut frontend, state, backend_req)?;
                let protocol =
                    VhostUserProtocolFeatures::from_bits_truncate(state.protocol_features);
                if !protocol.contains(VhostUserProtocolFeatures::MQ) {
                    return Ok(None);
                }
                frontend
                    .get_queue_num()
                    .map_err(vu("GET_QUEUE_NUM"))
                    .map(Some)
            })
            .map_err(|source| StartError::Handshake {
                path: socket.clone(),
                source,
            })?;
            if let Some(offered) = offered {
                if offered < u64::from(num_queues) {
                    return Err(StartError::QueueCount {
                        path: socket,
                        offered,
                        wanted: dev.num_queues,
                    });
                }
            }
            if kind == Kind::Block && conn.state.config.len() != BLK_CONFIG_SIZE {
                return Err(StartError::NoConfig { path: socket });
            }
            conn.frontend = Some(frontend);
        }
        dev.start();
        Ok(dev)
    }

    /// A device around `conn`, not yet watched (see [`Self::start`]).
    fn new(
        kind: Kind,
        socket: PathBuf,
        num_queues: u16,
        queue_size: u16,
        memory: GuestMemoryMmap,
        conn: Conn,
        reteach: bool,
    ) -> std::io::Result<Self> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(VhostUserDevice {
            kind,
            socket,
            num_queues: usize::from(num_queues),
            queue_size,
            memory,
            conn: Mutex::new(conn),
            reteach: AtomicBool::new(reteach),
            stop: AtomicBool::new(false),
            stop_evt: Arc::new(evt()?),
            config_evt: evt()?,
            notifier: Mutex::new(None),
            me: OnceLock::new(),
            monitor: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    /// The device for `--disk socket=…` (virtio-blk over vhost-user).
    pub fn disk(
        cfg: &crate::options::DiskConfig,
        memory: GuestMemoryMmap,
    ) -> Result<Arc<Self>, StartError> {
        Self::connect(
            Kind::Block,
            cfg.socket.clone(),
            cfg.num_queues,
            cfg.queue_size,
            memory,
        )
    }

    /// The device for `--net socket=…` (virtio-net over vhost-user).
    pub fn net(
        cfg: &crate::options::NetConfig,
        memory: GuestMemoryMmap,
    ) -> Result<Arc<Self>, StartError> {
        Self::connect(
            Kind::Net { mac: cfg.mac },
            cfg.socket.clone(),
            cfg.num_queues,
            cfg.queue_size,
            memory,
        )
    }

    /// Starts the thread that watches the socket and reconnects.
    /// (Already done by the constructors; a second call does nothing.)
    pub fn start(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
        let mut monitor = self.monitor.lock().unwrap_or_else(PoisonError::into_inner);
        if monitor.is_some() {
            return;
        }
        let weak = Arc::downgrade(self);
        let stop = self.stop_evt.clone();
        let handle = std::thread::Builder::new()
            .name("vhost-user-monitor".into())
            .spawn(move || reconnect::monitor(weak, stop));
        match handle {
            Ok(h) => *monitor = Some(h),
            Err(e) => log::error!("Cannot start the vhost-user monitor: {e}"),
        }
    }

    /// Stops the monitor thread (waits for it) and the backend request channel: after a live
    /// update's commit the successor alone speaks to the backend.
    pub fn shutdown(&self) {
        {
            // Under the lock: a backend request being served finishes first, none starts.
            let mut conn = self.lock();
            self.stop.store(true, Ordering::SeqCst);
            backend_req::close(conn.backend_req.take());
        }
        let _ = self.stop_evt.write(1);
        let handle = self
            .monitor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn connected(&self) -> bool {
        self.lock().frontend.is_some()
    }

    /// Drops a connection that can't be trusted any more (the backend stopped answering, or
    /// a reply came late and the conversation is out of step). Shutting the socket down wakes
    /// the monitor, which reconnects and replays.
    fn lose_connection(&self, conn: &mut Conn) {
        if let Some(f) = conn.frontend.take() {
            // SAFETY: `f` owns this open socket until it is dropped below; shutdown(2) changes
            // no memory of ours.
            unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_RDWR) };
            self.counters.disconnects.inc();
            log::warn!(
                "vhost-user {}: connection lost or silent, reconnecting",
                self.socket.display()
            );
        }
        conn.session_ready = false;
        backend_req::close(conn.backend_req.take());
    }

    /// Sorts a failed request: a lost connection is dropped (the monitor replays the set-up
    /// later) and counted; the error is returned either way.
    fn request_failed(&self, conn: &mut Conn, e: &Error) -> bool {
        let lost = is_disconnect(e);
        if matches!(e, Error::NoReply { .. }) {
            self.counters.timeouts.inc();
            self.counters.backend_errors.inc();
        } else if !lost {
            // A hang-up is counted as a disconnect, not as an error of the backend.
            self.counters.backend_errors.inc();
        }
        if lost {
            self.lose_connection(conn);
        }
        lost
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_evt.write(1);
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        backend_req::close(conn.backend_req.take());
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        match self.kind {
            Kind::Block => TYPE_BLOCK,
            Kind::Net { .. } => TYPE_NET,
        }
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let backend = self.lock().state.backend_features;
        let backend = backend & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match self.kind {
            Kind::Block => backend,
            Kind::Net { mac } => {
                let mut f = (backend & !NET_CTRL_FEATURES) | NET_F_STATUS;
                if mac.is_some() {
                    f |= NET_F_MAC;
                }
                f
            }
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.counters.config_reads.inc();
        let local;
        let conn = self.lock();
        let bytes: &[u8] = match self.kind {
            Kind::Block => &conn.state.config,
            Kind::Net { mac } => {
                // mac, status (LINK_UP), max_virtqueue_pairs.
                let mut c = mac.unwrap_or_default().to_vec();
                c.extend_from_slice(&1u16.to_le_bytes());
                c.extend_from_slice(&((self.num_queues / 2) as u16).to_le_bytes());
                local = c;
                &local
            }
        };
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        self.counters.config_writes.inc();
        let mut conn = self.lock();
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if self.kind != Kind::Block || off + data.len() > conn.state.config.len() {
            return;
        }
        conn.state.config[off..off + data.len()].copy_from_slice(data);
        let r = deadline::bounded(conn.fd(), || {
            self.reteach(&mut conn)?;
            match conn.frontend.as_mut() {
                Some(f) => f
                    .set_config(off as u32, VhostUserConfigFlags::WRITABLE, data)
                    .map_err(vu("SET_CONFIG")),
                None => Ok(()),
            }
        });
        if let Err(e) = r {
            self.request_failed(&mut conn, &e);
        }
    }

    fn activate(&self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), Error> {
        let mut conn = self.lock();
        for q in &queues {
            for addr in [q.config.desc, q.config.avail, q.config.used] {
                self.hva(addr).map_err(|_| Error::QueueAddress {
                    index: q.index,
                    addr,
                })?;
            }
        }
        conn.state.acked_features = features;
        conn.state.vrings = queues
            .iter()
            .map(|q| VringState {
                index: q.index,
                config: q.config,
                base: 0,
            })
            .collect();
        conn.queues = queues;
        // A new driver instance may have negotiated other features.
        conn.session_ready = false;
        conn.state.active = true;
        conn.state.paused = false;
        if conn.frontend.is_none() {
            // The monitor replays this when the backend is back.
            return Ok(());
        }
        let r = deadline::bounded(conn.fd(), || {
            self.reteach(&mut conn)?;
            self.start_vrings(&mut conn)
        });
        match r {
            // A backend dying (or going silent) mid-set-up is a disconnect (the monitor
            // replays), not a guest error.
            Err(e) => {
                if self.request_failed(&mut conn, &e) {
                    log::warn!(
                        "vhost-user {}: set-up interrupted: {e}",
                        self.socket.display()
                    );
                    return Ok(());
                }
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }

    fn reset(&self) {
        let mut conn = self.lock();
        if conn.state.active {
            let indices: Vec<usize> = conn.state.vrings.iter().map(|v| v.index).collect();
            let r = deadline::bounded(conn.fd(), || {
                let mut first_error = Ok(());
                if let Some(f) = conn.frontend.as_mut() {
                    for i in indices {
                        // Stops the ring; the base is irrelevant after a reset.
                        let r = f.get_vring_base(i).map_err(vu("GET_VRING_BASE"));
                        if let Err(e) = r {
                            if is_disconnect(&e) {
                                return Err(e);
                            }
                            first_error = first_error.and(Err(e));
                        }
                    }
                }
                first_error
            });
            if let Err(e) = r {
                self.request_failed(&mut conn, &e);
            }
        }
        conn.state.active = false;
        conn.state.paused = false;
        conn.state.vrings.clear();
        conn.session_ready = false;
        conn.state.inflight = None;
        conn.inflight_file = None;
        conn.queues.clear();
    }

    fn pause(&self) -> Result<(), Error> {
        let mut conn = self.lock();
        if !conn.state.active || conn.state.paused {
            return Ok(());
        }
        self.drain(&conn);
        let conn: &mut Conn = &mut conn;
        let mut bases = Vec::with_capacity(conn.state.vrings.len());
        let r = deadline::bounded(conn.fd(), || {
            if let Some(f) = conn.frontend.as_mut() {
                for vring in &conn.state.vrings {
                    let base = f
                        .get_vring_base(vring.index)
                        .map_err(vu("GET_VRING_BASE"))?;
                    bases.push(base as u16);
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            if !self.request_failed(conn, &e) {
                return Err(e);
            }
            // Gone or silent: as if it had crashed just before the pause.
            bases.clear();
        }
        let state = &mut conn.state;
        if bases.len() == state.vrings.len() && !bases.is_empty() {
            for (vring, base) in state.vrings.iter_mut().zip(bases) {
                vring.base = base;
            }
        } else {
            self.bases_from_used_ring(state);
        }
        state.paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), Error> {
        let mut conn = self.lock();
        if !conn.state.paused {
            return Ok(());
        }
        conn.state.paused = false;
        if conn.frontend.is_none() {
            return Ok(());
        }
        let mut changed = false;
        let r = deadline::bounded(conn.fd(), || {
            self.reteach(&mut conn)?;
            if conn.config_stale {
                changed = self.refresh_config(&mut conn)?;
            }
            self.start_vrings(&mut conn)
        });
        if changed {
            self.notify_config_later();
        }
        match r {
            // The monitor replays on the next connection.
            Err(e) if self.request_failed(&mut conn, &e) => Ok(()),
            other => other,
        }
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).unwrap_or_default()
    }

    fn set_config_notifier(&self, notifier: ConfigNotifier) {
        *self.notifier.lock().unwrap_or_else(PoisonError::into_inner) = Some(notifier);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("config_changes", c.config_changes.get()),
            ("timeouts", c.timeouts.get()),
            ("disconnects", c.disconnects.get()),
            ("reconnects", c.reconnects.get()),
            ("config_reads", c.config_reads.get()),
            ("config_writes", c.config_writes.get()),
            ("backend_errors", c.backend_errors.get()),
            ("monitor_wakeups", c.monitor_wakeups.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_addresses_translate_through_the_backend_labels() {
        let st = VhostUserState {
            mem_table: vec![
                MemRegionLabel {
                    guest_phys_addr: 0,
                    size: 0xc000_0000,
                    userspace_addr: 0x7f00_0000_0000,
                },
                MemRegionLabel {
                    guest_phys_addr: 0x1_0000_0000,
                    size: 0x4000_0000,
                    userspace_addr: 0x7e00_0000_0000,
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            VhostUserDevice::label(&st, 0x10_0000).unwrap(),
            0x7f00_0010_0000
        );
        assert_eq!(
            VhostUserDevice::label(&st, 0x1_0000_1000).unwrap(),
            0x7e00_0000_1000
        );
        assert!(
            VhostUserDevice::label(&st, 0xc000_0000).is_err(),
            "the hole"
        );
        assert!(VhostUserDevice::label(&st, u64::MAX).is_err());
    }

    #[test]
    fn socket_failures_are_disconnects_refusals_are_not() {
        use vhost::vhost_user::Error as U;
        let wrap = |u| Error::VhostUser {
            request: "SET_VRING_NUM",
            source: vhost::Error::VhostUserProtocol(u),
        };
        assert!(is_disconnect(&wrap(U::Disconnected)));
        assert!(is_disconnect(&wrap(U::SocketBroken(
            std::io::Error::other("x")
        ))));
        assert!(is_disconnect(&Error::Disconnected));
        assert!(!is_disconnect(&wrap(U::InvalidParam)));
        assert!(!is_disconnect(&wrap(U::BackendInternalError)));
        assert!(!is_disconnect(&Error::QueueAddress { index: 0, addr: 0 }));
    }

    #[test]
    fn backend_is_acked_only_its_own_features() {
        let st = VhostUserState {
            backend_features: (1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            acked_features: (1 << 32) | NET_F_MAC | NET_F_STATUS,
            ..Default::default()
        };
        assert_eq!(
            VhostUserDevice::backend_ack(&st),
            (1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        );
    }
}
