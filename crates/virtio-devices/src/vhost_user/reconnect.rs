//! Noticing a backend that went away and bringing it back: a monitor thread polls the socket
//! for hang-up, then reconnects with backoff and replays the set-up.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use vmm_sys_util::eventfd::EventFd;

use vhost::vhost_user::Frontend;

use super::{backend_req, deadline, VhostUserDevice, BACKOFF_MAX, BACKOFF_START};

impl VhostUserDevice {
    /// One reconnection attempt: connect, handshake, replay. False if the backend isn't back.
    pub(super) fn try_reconnect(&self) -> bool {
        let Ok(mut frontend) = Frontend::connect(&self.socket, self.num_queues as u64) else {
            return false;
        };
        let mut conn = self.lock();
        let mut st = conn.state.clone();
        let old_config = st.config.clone();
        let fd = Some(frontend.as_raw_fd());
        let shaken = deadline::bounded(fd, || {
            self.handshake(&mut frontend, &mut st, &mut conn.backend_req)
        });
        if let Err(e) = shaken {
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
        // A disk grown while the backend was away: its driver hears of it now.
        if st.active && !old_config.is_empty() && st.config != old_config {
            self.notify_config_later();
        }
        conn.config_stale = false;
        conn.state = st;
        conn.frontend = Some(frontend);
        conn.session_ready = false;
        if conn.state.active && !conn.state.paused {
            if let Err(e) = deadline::bounded(fd, || self.start_vrings(&mut conn)) {
                log::warn!("vhost-user {}: replay failed: {e}", self.socket.display());
                self.counters.backend_errors.inc();
                conn.frontend = None;
                backend_req::close(conn.backend_req.take());
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
        backend_req::close(conn.backend_req.take());
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
                let config = dev.config_evt.as_raw_fd();
                drop(dev);
                let woke = wait(fd, config, &stop, -1);
                let Some(dev) = weak.upgrade() else { return };
                dev.counters.monitor_wakeups.inc();
                if woke.config && dev.config_evt.read().is_ok() {
                    dev.notify_config_now();
                }
                if woke.hup {
                    dev.mark_disconnected();
                }
            }
            None => {
                if !dev.try_reconnect() {
                    drop(dev);
                    let ms = i32::try_from(backoff.as_millis()).unwrap_or(i32::MAX);
                    wait(-1, -1, &stop, ms);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// What woke the monitor.
struct Woke {
    /// The backend hung up.
    hup: bool,
    /// A config change is to be told to the transport.
    config: bool,
}

/// Waits up to `timeout_ms` (-1: forever) for the peer of `fd` to hang up, for `config` to be
/// readable, or for `stop`. A negative fd is ignored by poll(2).
fn wait(fd: RawFd, config: RawFd, stop: &EventFd, timeout_ms: i32) -> Woke {
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
        libc::pollfd {
            fd: config,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `pfds` is a valid array of three pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout_ms) };
    let hup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Woke {
        hup: n > 0 && pfds[0].revents & hup != 0,
        config: n > 0 && pfds[2].revents & libc::POLLIN != 0,
    }
}
