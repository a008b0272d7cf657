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

/// Errors of creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Cannot listen on vsock socket {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(UnixListener::try_clone)
            .transpose()
            .map_err(Error::EventFd)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        let worker = worker::Worker::new(
            self.cid,
            self.uds_path.clone(),
            self.memory.clone(),
            queues,
            listener,
            stop,
            self.counters.clone(),
        )
        .map_err(Error::EventFd)?;
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
