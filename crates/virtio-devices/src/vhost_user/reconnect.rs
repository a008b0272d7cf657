//! Noticing a backend that went away and bringing it back: a monitor thread polls the socket
//! for hang-up, then reconnects with backoff and replays the set-up.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use vhost::vhost_user::Frontend;
use vmm_sys_util::eventfd::EventFd;

use super::{VhostUserDevice, BACKOFF_MAX, BACKOFF_START};

impl VhostUserDevice {
    /// One reconnection attempt: connect, handshake, replay. False if the backend isn't back.
    pub(super) fn try_reconnect(&self) -> bool {
        let Ok(mut frontend) = Frontend::connect(&self.socket, self.num_queues as u64) else {
            return false;
        };
        let mut conn = self.lock();
        let mut st = conn.state.clone();
        if let Err(e) = self.handshake(&mut frontend, &mut st) {
            log::warn!(
                "vhost-user {}: handshake after reconnect failed: {e}",
                self.socket.display()
            );
            self.counters.backend_errors.inc();
            return false;
        }
        if st.active && !st.paused {
            self.bases_from_used_ring(&mut st);
        }
        conn.state = st;
        conn.frontend = Some(frontend);
        conn.session_ready = false;
        if conn.state.active && !conn.state.paused {
            if let Err(e) = self.start_vrings(&mut conn) {
                log::warn!("vhost-user {}: replay failed: {e}", self.socket.display());
                self.counters.backend_errors.inc();
                conn.frontend = None;
                return false;
            }
        }
        self.counters.reconnects.inc();
        log::info!("vhost-user {}: reconnected", self.socket.display());
        true
    }

    /// The connection's fd, if connected.
    pub(super) fn socket_fd(&self) -> Option<RawFd> {
        self.lock().frontend.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub(super) fn mark_disconnected(&self) {
        let mut conn = self.lock();
        conn.session_ready = false;
        if conn.frontend.take().is_some() {
            self.counters.disconnects.inc();
            log::warn!("vhost-user {}: backend disconnected", self.socket.display());
        }
    }
}

/// Watches the socket for hang-up and reconnects with backoff. It sleeps in poll(2) on the
/// socket and the stop eventfd, so it wakes only when the backend goes away (never per I/O).
/// Holds only a weak reference while waiting: all state lives in the device.
pub(super) fn monitor(weak: Weak<VhostUserDevice>, stop: Arc<EventFd>) {
    let mut backoff = BACKOFF_START;
    loop {
        let Some(dev) = weak.upgrade() else { return };
        if dev.stop.load(Ordering::SeqCst) {
            return;
        }
        match dev.socket_fd() {
            Some(fd) => {
                backoff = BACKOFF_START;
                drop(dev);
                let hup = wait(fd, &stop, -1);
                let Some(dev) = weak.upgrade() else { return };
                dev.counters.monitor_wakeups.inc();
                if hup {
                    dev.mark_disconnected();
                }
            }
            None => {
                if !dev.try_reconnect() {
                    drop(dev);
                    let ms = i32::try_from(backoff.as_millis()).unwrap_or(i32::MAX);
                    wait(-1, &stop, ms);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Waits up to `timeout_ms` (-1: forever) for the peer of `fd` to hang up (true) or for
/// `stop` (false). A negative `fd` is ignored by poll(2).
fn wait(fd: RawFd, stop: &EventFd, timeout_ms: i32) -> bool {
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `pfds` is a valid array of two pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
    let hup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    n > 0 && pfds[0].revents & hup != 0
}
