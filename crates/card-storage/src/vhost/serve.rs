//! Serving a backend on a vhost-user socket, one front-end connection at a time, until stopped.
//!
//! ```text
//!  listen ─► accept ─► connected (daemon threads run the queues) ─► front end leaves ─┐
//!    ▲                        │ stop(): shut the connection down                      │
//!    └────────────────────────┴───────────────── (not stopped) ◄──────────────────────┘
//! ```
//!
//! Each connection gets fresh queues; the socket keeps listening in between, so a front end
//! can reconnect (QEMU `reconnect-ms`). Stopping drops the backend and with it the volume's
//! key material (zeroized) once no thread holds the device any more.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{splice, BlkBackend, Error as BackendError};
use crate::blk::device::VolumeDevice;

/// Errors while serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create the backend")]
    Backend(#[from] BackendError),
    #[error("Cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("Cannot create the vhost-user daemon")]
    Daemon(#[source] DaemonError),
    #[error("vhost-user connection on {path} failed")]
    Serve {
        path: String,
        #[source]
        source: DaemonError,
    },
    #[error("Cannot set up the connection splice")]
    Splice(#[source] std::io::Error),
    #[error("Cannot start the server thread")]
    Thread(#[source] std::io::Error),
}

/// vhost-user-backend's error, which does not implement `std::error::Error` itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(String);

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        Self(e.to_string())
    }
}

#[derive(Default)]
struct Control {
    stop: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The connected front end's backend, for config changes.
    backend: Mutex<Option<Arc<BlkBackend>>>,
}

/// A listener on a fresh abstract socket (no file to clean up) with a connection already queued.
fn private_pair() -> std::io::Result<(Listener, UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "outboard-card-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

fn run(
    dev: Arc<VolumeDevice>,
    listener: &mut Listener,
    socket: &Path,
    queues: usize,
    once: bool,
    ctl: &Control,
) -> Result<(), Error> {
    while !ctl.stop.load(Ordering::Acquire) {
        let backend = Arc::new(BlkBackend::new(dev.clone(), queues)?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("outboard-card-blk".to_owned(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.into()))?;
        backend.register_listeners(&daemon.get_epoll_handlers())?;
        let serve_err = |source: vhost_user_backend::Error| Error::Serve {
            path: socket.display().to_string(),
            source: source.into(),
        };
        let Some(front) = listener.accept().map_err(|source| Error::Listen {
            path: socket.to_owned(),
            source,
        })?
        else {
            continue;
        };
        // The daemon serves a private socket; the splice in between answers the inflight
        // messages it does not support.
        let (mut inner_listener, inner) = private_pair().map_err(Error::Splice)?;
        daemon.start(&mut inner_listener).map_err(serve_err)?;
        // Before the splice runs: a front end told of its backend request channel can be sent a
        // config change from then on.
        *ctl.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(backend.clone());
        let splice = splice::spawn(
            front,
            inner,
            backend.inflight_slot(),
            backend.backend_req_slot(),
        )
        .map_err(Error::Splice)?;
        *ctl.connection.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        // stop() may have run between the check above and publishing the handle.
        if ctl.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        log::info!("Front end connected to {}", socket.display());
        let result = daemon.wait();
        *ctl.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *ctl.backend.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // The daemon may end first (stop, or a protocol error): the front end must see that.
        splice.close();
        log::info!(
            "Front end disconnected from {} ({} in-flight requests resubmitted)",
            socket.display(),
            backend.resubmitted()
        );
        // Disconnects are the normal end of a connection, not an error of the card.
        if let Err(e) = result {
            log::warn!("vhost-user connection on {} ended: {e}", socket.display());
        }
        if once {
            break;
        }
    }
    Ok(())
}

/// Serves `dev` on the Unix socket `socket` (replacing a stale one) in this thread. With
/// `once`, returns after the first connection ends; otherwise serves forever.
pub fn serve(
    dev: Arc<VolumeDevice>,
    socket: &Path,
    queues: usize,
    once: bool,
) -> Result<(), Error> {
    let mut listener = Listener::new(socket, true).map_err(|source| Error::Listen {
        path: socket.to_owned(),
        source,
    })?;
    run(
        dev,
        &mut listener,
        socket,
        queues,
        once,
        &Control::default(),
    )
}

/// A volume served in the background until [`Server::stop`].
pub struct Server {
    ctl: Arc<Control>,
    socket: PathBuf,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Server {
    /// Starts serving `dev` on `socket` in a new thread; the socket exists when this returns.
    pub fn start(dev: Arc<VolumeDevice>, socket: &Path, queues: usize) -> Result<Self, Error> {
        let mut listener = Listener::new(socket, true).map_err(|source| Error::Listen {
            path: socket.to_owned(),
            source,
        })?;
        // Fail now, not in the thread, on a bad queue count.
        BlkBackend::new(dev.clone(), queues)?;
        let ctl = Arc::new(Control::default());
        let c = ctl.clone();
        let path = socket.to_owned();
        let thread = std::thread::Builder::new()
            .name("vhost-blk-server".into())
            .spawn(move || run(dev, &mut listener, &path, queues, false, &c))
            .map_err(Error::Thread)?;
        Ok(Self {
            ctl,
            socket: socket.to_owned(),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Tells the connected front end (if any) that the device's configuration changed, e.g.
    /// its capacity after a grow. False if no front end is connected or it gave no backend
    /// request channel; a front end reads the configuration anew when it connects.
    pub fn config_changed(&self) -> std::io::Result<bool> {
        let backend = self
            .ctl
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match backend {
            Some(b) => b.config_changed(),
            None => Ok(false),
        }
    }

    /// Disconnects the front end (if any), stops listening and waits for the server thread.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.ctl.stop.store(true, Ordering::Release);
        if let Some(h) = self
            .ctl
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
        // Unblock a pending accept with a connection of our own, dropped at once.
        let _ = UnixStream::connect(&self.socket);
        // A panicked server thread has nothing left to clean up.
        let result = thread.join().unwrap_or(Ok(()));
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
