//! Telling the front end that the device's configuration changed (a volume grown live), over
//! the vhost-user backend request channel.
//!
//! With `VHOST_USER_PROTOCOL_F_BACKEND_REQ` the front end hands us one end of a socket pair
//! (SET_BACKEND_REQ_FD). vhost-user-backend 0.24 passes it to the backend as the vhost crate's
//! `Backend`, which (vhost 0.18) cannot send CONFIG_CHANGE_MSG, so the splice keeps a copy of
//! the socket in a [`Slot`] and the message is written here:
//!
//! ```text
//!  grow ─► CONFIG_CHANGE_MSG (need reply) ─► front end: GET_CONFIG on the main channel,
//!                                            new capacity → virtio config interrupt → guest
//!        ◄─ reply (0 = done) ◄─────────────┘
//! ```
//!
//! A reply is asked for only where the front end negotiated REPLY_ACK, which it shows by asking
//! for one on SET_BACKEND_REQ_FD itself; otherwise the message is sent and not waited for.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboard_vhost_wire::{recv, send, Message, NEED_REPLY, REPLY, VERSION};

/// SET_BACKEND_REQ_FD, front end to backend.
pub(crate) const SET_BACKEND_REQ_FD: u32 = 21;
/// CONFIG_CHANGE_MSG, backend to front end.
const CONFIG_CHANGE_MSG: u32 = 2;
/// How long a front end may take to re-read the configuration and answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Stale replies read before giving up on a channel (a front end flooding it is broken).
const MAX_STALE: usize = 16;

/// The front end's backend request channel.
#[derive(Debug)]
pub(crate) struct Channel {
    sock: UnixStream,
    /// The front end answers requests that ask for it (REPLY_ACK).
    reply_ack: bool,
}

/// The current connection's backend request channel, if the front end gave one.
pub(crate) type Slot = Arc<Mutex<Option<Channel>>>;

/// Keeps a copy of SET_BACKEND_REQ_FD's socket.
pub(crate) fn keep(slot: &Slot, msg: &Message) {
    let channel = msg
        .files
        .first()
        .and_then(|f| f.try_clone().ok())
        .map(|f| Channel {
            sock: UnixStream::from(std::os::fd::OwnedFd::from(f)),
            reply_ack: msg.flags() & NEED_REPLY != 0,
        });
    if let Some(c) = &channel {
        log::debug!(
            "Front end gave a backend request channel (replies: {})",
            c.reply_ack
        );
    }
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = channel;
}

/// Sends CONFIG_CHANGE_MSG and waits for the front end's answer. Returns false if the front end
/// gave no backend request channel (it reads the configuration again on its next connection).
pub(crate) fn notify(slot: &Slot) -> io::Result<bool> {
    let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    let Some(Channel { sock, reply_ack }) = guard.as_ref() else {
        return Ok(false);
    };
    // A reply that came after an earlier timeout (or that a front end sent unasked) must not
    // be taken for this one's.
    sock.set_nonblocking(true)?;
    let stale = drain(sock);
    sock.set_nonblocking(false)?;
    stale?;
    if !reply_ack {
        send(sock, &Message::new(CONFIG_CHANGE_MSG, VERSION, &[]))?;
        return Ok(true);
    }
    let msg = Message::new(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
    send(sock, &msg)?;
    sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let reply = recv(sock)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "Front end closed the backend request channel",
        )
    })?;
    let status = reply
        .payload()
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    match (reply.request(), reply.flags() & REPLY != 0, status) {
        (CONFIG_CHANGE_MSG, true, Some(0)) => Ok(true),
        (CONFIG_CHANGE_MSG, true, Some(s)) => Err(io::Error::other(format!(
            "Front end failed the configuration change (status {s})"
        ))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "Bad reply to CONFIG_CHANGE_MSG",
        )),
    }
}

fn drain(sock: &UnixStream) -> io::Result<()> {
    for _ in 0..MAX_STALE {
        match recv(sock) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "Front end floods the backend request channel",
    ))
}

impl super::BlkBackend {
    /// Where the splice keeps the connection's backend request channel.
    pub(crate) fn backend_req_slot(&self) -> Slot {
        self.backend_req.clone()
    }

    /// Tells the front end that the configuration (the capacity) changed and, where it answers
    /// requests (REPLY_ACK), waits until it has read it again. False if the front end gave no
    /// channel to tell it on.
    pub fn config_changed(&self) -> io::Result<bool> {
        notify(&self.backend_req)
    }
}
