//! The backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): a socket pair whose other
//! end the backend gets with SET_BACKEND_REQ_FD, on which it says CONFIG_CHANGE_MSG when a
//! disk's capacity changed (a volume grown live by the card).
//!
//! ```text
//!  session set-up ─► socketpair, SET_BACKEND_REQ_FD ─► thread serving our end
//!  backend: CONFIG_CHANGE_MSG ─► GET_CONFIG on the main channel ─► config cache updated
//!           ─► transport: config generation + config interrupt ─► reply 0 (if asked)
//!  anything else ─► reply "failed" (if asked); oversized, truncated or slow ─► channel closed
//! ```
//!
//! Every new session (connect, reconnect, a live update's successor at its first word to the
//! backend) opens a new channel; the previous one is shut down, which ends its thread. The
//! thread holds only a weak reference to the device and sleeps in poll(2) between messages; a
//! message must arrive whole within [`REPLY_TIMEOUT`] once it has started. A paused or
//! handed-over device must not speak on the main channel, so a change reported then is
//! answered at once and read again when the device resumes (or by the successor).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Weak;

use outboard_vhost_wire::{recv, send, Message, NEED_REPLY, REPLY, VERSION};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use super::{deadline, vu, Conn, Kind, VhostUserDevice, BLK_CONFIG_SIZE, REPLY_TIMEOUT};
use crate::Error;

/// CONFIG_CHANGE_MSG, the one backend request served.
pub(super) const CONFIG_CHANGE_MSG: u32 = 2;
/// Reply payload for a request not served (any non-zero value means failure).
const FAILED: u64 = 1;
/// The header's version bits.
const VERSION_MASK: u32 = 0x3;

impl VhostUserDevice {
    /// Opens a backend request channel on `frontend` (BACKEND_REQ negotiated) and starts its
    /// thread; the previous channel, if any, is shut down.
    pub(super) fn open_backend_req(
        &self,
        frontend: &mut Frontend,
        conn_channel: &mut Option<UnixStream>,
    ) -> Result<(), Error> {
        let (ours, theirs) = UnixStream::pair().map_err(Error::Channel)?;
        // A message started must arrive whole in bounded time, and a reply must not block on
        // a backend that stopped reading.
        ours.set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| ours.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(Error::Channel)?;
        frontend
            .set_backend_request_fd(&theirs)
            .map_err(vu("SET_BACKEND_REQ_FD"))?;
        drop(theirs);
        let keep = ours.try_clone().map_err(Error::Channel)?;
        if let Some(old) = conn_channel.replace(keep) {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        let weak = self.me.get().cloned().unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name("vhost-user-backend-req".into())
            .spawn(move || serve(ours, weak));
        if let Err(e) = spawned {
            log::error!("Cannot start the vhost-user backend request thread: {e}");
            if let Some(c) = conn_channel.take() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        Ok(())
    }

    /// The backend said its configuration changed: read it again and tell the driver. Returns
    /// whether the change was taken (false: the backend gets a failure reply).
    fn backend_config_changed(&self) -> bool {
        if self.kind != Kind::Block {
            // A net device's config space is the VMM's own.
            return false;
        }
        let changed = {
            let mut conn = self.lock();
            if self.stop.load(Ordering::SeqCst) {
                // Handed over: the successor reads the configuration itself.
                return false;
            }
            if conn.frontend.is_none() || conn.state.paused || self.reteach.load(Ordering::SeqCst) {
                conn.config_stale = true;
                return true;
            }
            match deadline::bounded(conn.fd(), || self.refresh_config(&mut conn)) {
                Ok(changed) => changed,
                Err(e) => {
                    self.request_failed(&mut conn, &e);
                    log::warn!(
                        "vhost-user {}: cannot read the changed configuration: {e}",
                        self.socket.display()
                    );
                    return false;
                }
            }
        };
        self.counters.config_changes.inc();
        if changed {
            self.notify_config_now();
        }
        true
    }

    /// GET_CONFIG into the cache; returns whether the configuration differs. A reply of the
    /// wrong size is refused (the cache keeps the old configuration).
    pub(super) fn refresh_config(&self, conn: &mut Conn) -> Result<bool, Error> {
        conn.config_stale = false;
        if self.kind != Kind::Block {
            return Ok(false);
        }
        let Some(frontend) = conn.frontend.as_mut() else {
            return Err(Error::Disconnected);
        };
        let buf = [0u8; BLK_CONFIG_SIZE];
        let got = frontend
            .get_config(
                0,
                BLK_CONFIG_SIZE as u32,
                VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map_err(vu("GET_CONFIG"));
        let (_, config) = got?;
        if config.len() != BLK_CONFIG_SIZE {
            return Err(Error::ConfigSize { len: config.len() });
        }
        let changed = config != conn.state.config;
        conn.state.config = config;
        Ok(changed)
    }

    /// Calls the transport's notifier (no device lock may be held).
    pub(super) fn notify_config_now(&self) {
        let notifier = self
            .notifier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(n) = notifier {
            n();
        }
    }

    /// Has the monitor thread call the notifier (for callers holding the device's lock, or
    /// called by the transport under its own).
    pub(super) fn notify_config_later(&self) {
        let _ = self.config_evt.write(1);
    }
}

/// Serves one channel until the backend closes it, it is replaced, or the backend misbehaves;
/// then shuts it down (the device keeps a copy of the socket), so the backend sees it end.
fn serve(sock: UnixStream, dev: Weak<VhostUserDevice>) {
    serve_messages(&sock, &dev);
    let _ = sock.shutdown(std::net::Shutdown::Both);
}

fn serve_messages(sock: &UnixStream, dev: &Weak<VhostUserDevice>) {
    loop {
        if !wait_readable(sock) {
            return;
        }
        let msg = match recv(sock) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                // Oversized, truncated or too slow: the stream can't be trusted any more.
                log::warn!("vhost-user backend request channel closed: {e}");
                return;
            }
        };
        let taken = match check(&msg) {
            Some(CONFIG_CHANGE_MSG) => dev.upgrade().is_some_and(|d| d.backend_config_changed()),
            _ => {
                log::warn!(
                    "vhost-user backend request {} refused (flags {:#x})",
                    msg.request(),
                    msg.flags()
                );
                false
            }
        };
        if let Some(reply) = reply(&msg, taken) {
            if let Err(e) = send(sock, &reply) {
                log::warn!("vhost-user backend request channel closed: {e}");
                return;
            }
        }
    }
}

/// The request a message makes if it is one we serve, well formed: a request (not a reply) of
/// version 1 with no payload.
fn check(msg: &Message) -> Option<u32> {
    let flags = msg.flags();
    let ok = flags & VERSION_MASK == VERSION
        && flags & REPLY == 0
        && msg.payload().is_empty()
        && msg.files.is_empty();
    (ok && msg.request() == CONFIG_CHANGE_MSG).then_some(CONFIG_CHANGE_MSG)
}

/// The answer to `msg`, where one was asked for: 0 if `taken`, else a failure.
fn reply(msg: &Message, taken: bool) -> Option<Message> {
    if msg.flags() & NEED_REPLY == 0 || msg.flags() & REPLY != 0 {
        return None;
    }
    let status: u64 = if taken { 0 } else { FAILED };
    Some(Message::new(
        msg.request(),
        VERSION | REPLY,
        &status.to_le_bytes(),
    ))
}

/// Sleeps until `sock` has data or was shut down (true), or poll fails (false).
fn wait_readable(sock: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Shuts a channel down so that its thread ends.
pub(super) fn close(channel: Option<UnixStream>) {
    if let Some(c) = channel {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_config_change_is_served() {
        let ok = Message::new(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
        assert_eq!(check(&ok), Some(CONFIG_CHANGE_MSG));
        for bad in [
            Message::new(CONFIG_CHANGE_MSG, VERSION | REPLY, &[]),
            Message::new(CONFIG_CHANGE_MSG, 0x2, &[]),
            Message::new(CONFIG_CHANGE_MSG, VERSION, &[1, 2, 3]),
            Message::new(1, VERSION | NEED_REPLY, &[]),
            Message::new(u32::MAX, VERSION, &[]),
        ] {
            assert_eq!(check(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_only_when_asked_and_say_failure_as_non_zero() {
        let asked = Message::new(9, VERSION | NEED_REPLY, &[]);
        let r = reply(&asked, false).unwrap();
        assert_eq!((r.request(), r.flags()), (9, VERSION | REPLY));
        assert_eq!(r.payload(), &FAILED.to_le_bytes());
        let r = reply(&asked, true).unwrap();
        assert_eq!(r.payload(), &0u64.to_le_bytes());
        assert!(reply(&Message::new(2, VERSION, &[]), true).is_none());
        assert!(reply(&Message::new(2, VERSION | REPLY | NEED_REPLY, &[]), true).is_none());
    }
}
