//! The outboard-vmm control API server: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! This crate owns the wire: it accepts connections, parses requests (bounded: a hostile client
//! cannot make it allocate without limit or wait forever), routes them to a typed [`ApiRequest`],
//! and turns the handler's answer into a response. What a request *means* is the VMM's business,
//! behind the [`ApiHandler`] trait, so the VMM never sees HTTP and this crate never sees KVM.
//!
//! Each connection gets its own thread, up to [`MAX_CONNECTIONS`]; keep-alive is supported, and an
//! idle or stalled client is dropped after [`IO_TIMEOUT`].

mod http;
mod routes;

pub use routes::{route, ApiRequest, ROUTES};

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send a request or to read a response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is taken by something that is not a stale socket.
    #[error("API socket path {0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// Binding the listening socket failed.
    #[error("Cannot bind API socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Spawning the server thread failed.
    #[error("Cannot start the API server thread")]
    Spawn(#[source] io::Error),
}

/// A successful answer from the handler.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204, no body.
    NoContent,
    /// 200 with a JSON body.
    Json(serde_json::Value),
    /// 200 with a body of another type (e.g. `application/cbor`).
    Bytes {
        /// The Content-Type header.
        content_type: &'static str,
        /// The body.
        body: Vec<u8>,
    },
}

/// A failed request: an HTTP status and a message for the client's `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (4xx for client errors, 5xx for VMM failures).
    pub status: u16,
    /// Short, capitalised description.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed or its values are out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    /// 405: the resource exists but not with this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self {
            status: 405,
            message: message.into(),
        }
    }
    /// 409: the request is valid but not in the VM's current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
    /// 500: the VMM failed to do something it should have been able to do.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
    }
}

/// What the VMM implements to answer API requests. Called from connection threads.
pub trait ApiHandler: Send + Sync + 'static {
    /// Carry out one request.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}

/// A bound, not yet serving, API socket.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path`, replacing a stale socket left by a previous process but nothing else.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::PathInUse(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Bind {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is serving this socket",
                    ),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Wraps an already bound listener (e.g. one handed over by a predecessor VMM).
    pub fn from_listener(listener: UnixListener, path: PathBuf) -> Self {
        Self { listener, path }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, e.g. to hand it to a successor.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Serves requests on a new thread until the process exits.
    pub fn spawn(self, handler: Arc<dyn ApiHandler>) -> Result<JoinHandle<()>, Error> {
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || self.serve(handler))
            .map_err(Error::Spawn)
    }

    fn serve(self, handler: Arc<dyn ApiHandler>) {
        let active = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("API accept failed: {e}");
                    continue;
                }
            };
            // Wait for a slot rather than refuse: clients are few and requests short.
            while active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                std::thread::sleep(Duration::from_millis(5));
            }
            active.fetch_add(1, Ordering::AcqRel);
            let handler = Arc::clone(&handler);
            let active_conn = Arc::clone(&active);
            let spawned = std::thread::Builder::new()
                .name("api-conn".into())
                .spawn(move || {
                    http::serve_connection(stream, handler.as_ref());
                    active_conn.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::AcqRel);
                log::warn!("Cannot spawn API connection thread: {e}");
            }
        }
    }
}
