//! The bridge from the API server's connection threads to the control thread: requests are
//! queued with a reply channel and the control loop is woken through an eventfd, so every change
//! of VM state happens on the control thread, in order.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use outboard_api_server::{ApiError, ApiHandler, ApiRequest, ApiResponse};
use vmm_sys_util::eventfd::EventFd;

/// How long a connection waits for the control thread (a VM build reads the kernel from disk).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) type Reply = Result<ApiResponse, ApiError>;

/// One queued request.
pub(crate) struct ApiMessage {
    pub request: ApiRequest,
    pub reply: SyncSender<Reply>,
}

/// The [`ApiHandler`] given to the API server.
pub struct ApiBridge {
    queue: Mutex<Sender<ApiMessage>>,
    wake: EventFd,
}

impl std::fmt::Debug for ApiBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiBridge").finish_non_exhaustive()
    }
}

impl ApiBridge {
    pub(crate) fn new(wake: EventFd) -> (Self, Receiver<ApiMessage>) {
        let (tx, rx) = mpsc::channel();
        (
            ApiBridge {
                queue: Mutex::new(tx),
                wake,
            },
            rx,
        )
    }
}

impl ApiHandler for ApiBridge {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(ApiMessage { request, reply });
        if sent.is_err() {
            return Err(ApiError::conflict("The VMM is shutting down"));
        }
        let _ = self.wake.write(1);
        match answer.recv_timeout(REPLY_TIMEOUT) {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(ApiError::internal("The VMM did not answer in time"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(ApiError::conflict("The VMM is shutting down"))
            }
        }
    }
}
