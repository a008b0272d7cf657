//! virtio-vsock in the VMM, with the hybrid Unix-socket model for the host side:
//!
//! * guest connects to host port P → the VMM connects to the Unix socket `<uds_path>_P`;
//! * a host process connects to `<uds_path>` and writes `CONNECT <port>\n` → the VMM opens a
//!   connection to guest port `<port>` and answers `OK <host port>\n` once the guest accepts.
//!
//! Unlike the vhost-user devices this one is emulated: a worker thread owns the epoll set
//! (queue kicks, the listener, every connection) and moves bytes. Credit-based flow control
//! (virtio 1.2 §5.10.6.3) bounds what each side may send.
//!
//! Connection states:
//!
//! ```text
//!  host accept ─► Handshake ─CONNECT n─► Connecting ─guest RESPONSE─► Established
//!  guest REQUEST ─connect ok─────────────────────────────────────────► Established
//!  Established ─RST / SHUTDOWN both / host EOF / error─► removed (RST or SHUTDOWN to the guest)
//! ```
//!
//! Paused, the worker is parked with all its state ([`VsockState`]: queue positions, every
//! connection's flow-control counters and unsent bytes, pending control packets). A live update
//! hands the listener and the connections' sockets to the successor, which rebuilds the worker
//! ([`VsockDevice::adopt`], [`VsockDevice::load_state`]): host peers and the guest carry on. A
//! snapshot restored in a new process listens on the path again, but the host ends of the
//! connections died with the old process: the guest gets an RST for each.

pub mod packet;
mod worker;

pub use worker::{ConnState, VsockState};

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use outboard_devices::Counter;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{ActiveQueue, Error, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;

/// Errors of creating the vsock device and of restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Cannot listen on vsock socket {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Saved vsock state does not fit: {0}")]
    BadState(String),
    #[error("Saved vsock state is malformed")]
    Malformed(#[source] serde_json::Error),
    #[error("Cannot set up the vsock worker")]
    Worker(#[source] std::io::Error),
}

/// Per-device counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub host_connections: Counter,
    pub guest_connections: Counter,
    pub refused: Counter,
    pub rx_bytes: Counter,
    pub tx_bytes: Counter,
    pub bad_packets: Counter,
}

/// The vsock device.
pub struct VsockDevice {
    cid: u64,
    uds_path: PathBuf,
    memory: GuestMemoryMmap,
    listener: Mutex<Option<UnixListener>>,
    running: Mutex<Option<(JoinHandle<worker::Worker>, Arc<EventFd>)>>,
    /// The worker while paused: all connection and queue state, no thread.
    parked: Mutex<Option<worker::Worker>>,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("cid", &self.cid)
            .field("uds_path", &self.uds_path)
            .finish_non_exhaustive()
    }
}

impl VsockDevice {
    /// Listens on `uds_path` (a stale socket file is replaced).
    pub fn new(cid: u64, uds_path: PathBuf, memory: GuestMemoryMmap) -> Result<Self, StartError> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| StartError::Listen {
                path: uds_path.clone(),
                source,
            })?;
        Ok(VsockDevice {
            cid,
            uds_path,
            memory,
            listener: Mutex::new(Some(listener)),
            running: Mutex::new(None),
            parked: Mutex::new(None),
            counters: Arc::new(Counters::default()),
        })
    }

    /// A live-update successor's device on the predecessor's listening socket (so the path
    /// never stops answering). Its state comes with [`VsockDevice::load_state`].
    pub fn adopt(
        cid: u64,
        uds_path: PathBuf,
        memory: GuestMemoryMmap,
        listener: std::os::fd::OwnedFd,
    ) -> Result<Self, StartError> {
        let listener = UnixListener::from(listener);
        listener.set_nonblocking(true).map_err(StartError::Worker)?;
        Ok(VsockDevice {
            cid,
            uds_path,
            memory,
            listener: Mutex::new(Some(listener)),
            running: Mutex::new(None),
            parked: Mutex::new(None),
            counters: Arc::new(Counters::default()),
        })
    }

    /// A duplicate of the listening socket, for a successor VMM.
    pub fn listener_fd(&self) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        let listener = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        listener
            .as_ref()
            .map(|l| l.as_fd().try_clone_to_owned())
            .transpose()
    }

    /// Duplicates of the connections' sockets, in the order of the saved state's
    /// `connections` (the device must be paused; none when it never ran).
    pub fn streams(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        let parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        parked
            .as_ref()
            .map_or(Ok(Vec::new()), worker::Worker::streams)
    }

    /// Loads `saved` (the device part of a saved transport; null if the device never ran)
    /// onto `queues`, the restored transport's: the worker is rebuilt and stays parked until
    /// [`VirtioDevice::resume`]. `streams` as in a live update (the connections go on) or
    /// `None` for a snapshot file (each connection is reset towards the guest).
    pub fn load_state(
        &self,
        saved: &serde_json::Value,
        queues: Vec<ActiveQueue>,
        streams: Option<Vec<std::os::fd::OwnedFd>>,
    ) -> Result<(), StartError> {
        if saved.is_null() {
            return Ok(());
        }
        let state: VsockState =
            serde_json::from_value(saved.clone()).map_err(StartError::Malformed)?;
        self.reset();
        let mut worker = self.new_worker(queues).map_err(StartError::Worker)?;
        worker.load(state, streams).map_err(StartError::BadState)?;
        *self.parked.lock().unwrap_or_else(PoisonError::into_inner) = Some(worker);
        Ok(())
    }

    /// A worker for `queues`, with its own stop eventfd and a handle on the host-side listener
    /// (when bound); activation and restore both start from one.
    fn new_worker(&self, queues: Vec<ActiveQueue>) -> std::io::Result<worker::Worker> {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(UnixListener::try_clone)
            .transpose()?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        worker::Worker::new(
            self.cid,
            self.uds_path.clone(),
            self.memory.clone(),
            queues,
            listener,
            stop,
            self.counters.clone(),
        )
    }

    /// Stops the worker thread and returns the worker (parked state).
    fn stop_worker(&self) -> Option<worker::Worker> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (handle, stop) = running?;
        let _ = stop.write(1);
        handle.join().ok()
    }

    fn spawn(&self, worker: worker::Worker) -> Result<(), Error> {
        let stop = worker.stop_fd();
        let handle = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run())
            .map_err(Error::EventFd)?;
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some((handle, stop));
        Ok(())
    }

    /// Queue positions and connections (the sockets themselves are fds).
    pub fn state(&self) -> Option<worker::VsockState> {
        let parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        parked.as_ref().map(worker::Worker::state)
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn num_queues(&self) -> usize {
        3
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, _offset: u64, _data: &[u8]) {}

    fn activate(&self, _features: u64, queues: Vec<ActiveQueue>) -> Result<(), Error> {
        self.stop_worker();
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let worker = self.new_worker(queues).map_err(Error::EventFd)?;
        self.spawn(worker)
    }

    fn reset(&self) {
        self.stop_worker();
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Parks the worker: no packet moves until [`VirtioDevice::resume`].
    fn pause(&self) -> Result<(), Error> {
        if let Some(worker) = self.stop_worker() {
            *self.parked.lock().unwrap_or_else(PoisonError::into_inner) = Some(worker);
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), Error> {
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match parked {
            Some(worker) => self.spawn(worker),
            None => Ok(()),
        }
    }

    fn save(&self) -> serde_json::Value {
        self.state()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or_default()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("host_connections", c.host_connections.get()),
            ("guest_connections", c.guest_connections.get()),
            ("refused", c.refused.get()),
            ("rx_bytes", c.rx_bytes.get()),
            ("tx_bytes", c.tx_bytes.get()),
            ("bad_packets", c.bad_packets.get()),
        ]
    }
}
