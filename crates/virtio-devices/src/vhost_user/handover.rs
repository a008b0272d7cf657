//! Handing a running device to a successor VMM (live update): the state, the fds, and the
//! successor's side that adopts them without the backend seeing a disconnect.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{deadline, is_disconnect, vu, Conn, Kind, VhostUserDevice, VhostUserState};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestMemoryMmap};

/// Longest wait for in-flight requests before a ring is stopped (a live update's pause).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
use crate::{ActiveQueue, Error};

impl VhostUserDevice {
    /// A successor VMM's device: adopts the connection `socket_fd` (handed over, so the
    /// backend never sees a disconnect), the inflight region and the transport's eventfds, with
    /// the predecessor's `state` (`kicks`/`calls` indexed by queue).
    ///
    /// Nothing is said to the backend here: until the predecessor commits the live update it
    /// may still take the device back (rollback), and a request of ours in the socket would
    /// desynchronise its conversation. The frontend library's view of the negotiated features
    /// is rebuilt on first use (`reteach`). The backend keeps its memory table (the
    /// same memfd pages; vring addresses stay in its labels), so a paused device resumes with
    /// the vring messages only.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        kind: Kind,
        socket: PathBuf,
        num_queues: u16,
        queue_size: u16,
        memory: GuestMemoryMmap,
        state: VhostUserState,
        socket_fd: OwnedFd,
        inflight: Option<OwnedFd>,
        kicks: &[Arc<vmm_sys_util::eventfd::EventFd>],
        calls: &[Arc<vmm_sys_util::eventfd::EventFd>],
    ) -> Result<Arc<Self>, Error> {
        if kicks.len() != usize::from(num_queues) || calls.len() != kicks.len() {
            return Err(Error::EventfdCount {
                queues: usize::from(num_queues),
            });
        }
        let mut queues = Vec::new();
        for v in &state.vrings {
            let (Some(kick), Some(call)) = (kicks.get(v.index), calls.get(v.index)) else {
                return Err(Error::QueueAddress {
                    index: v.index,
                    addr: v.config.desc,
                });
            };
            queues.push(ActiveQueue {
                index: v.index,
                config: v.config,
                kick: kick.clone(),
                call: call.clone(),
            });
        }
        let stream = std::os::unix::net::UnixStream::from(socket_fd);
        let frontend = Frontend::from_stream(stream, u64::from(num_queues));
        let mut conn = Conn::new(Some(frontend));
        conn.session_ready = true;
        conn.state = state;
        conn.inflight_file = inflight.map(File::from);
        conn.queues = queues;
        let dev = Arc::new(
            VhostUserDevice::new(kind, socket, num_queues, queue_size, memory, conn, true)
                .map_err(Error::EventFd)?,
        );
        let _ = dev.me.set(Arc::downgrade(&dev));
        {
            let mut conn = dev.lock();
            if conn.state.active && !conn.state.paused {
                deadline::bounded(conn.fd(), || {
                    dev.reteach(&mut conn)?;
                    dev.start_vrings(&mut conn)
                })?;
            }
        }
        dev.start();
        Ok(dev)
    }

    /// Rebuilds an adopted connection's feature view in the frontend library (it checks
    /// requests against it): GET_FEATURES, the protocol features and, for an active device,
    /// SET_FEATURES. Idempotent for the backend; done once.
    pub(super) fn reteach(&self, conn: &mut Conn) -> Result<(), Error> {
        if !self.reteach.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Conn {
            frontend,
            state,
            backend_req,
            ..
        } = conn;
        let Some(frontend) = frontend.as_mut() else {
            return Ok(());
        };
        frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let protocol = VhostUserProtocolFeatures::from_bits_truncate(state.protocol_features);
        if state.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(protocol)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if state.active {
            frontend
                .set_features(Self::backend_ack(state))
                .map_err(vu("SET_FEATURES"))?;
        }
        // The predecessor's backend request channel dies with it: this process opens its own
        // and reads the configuration again (a change reported in between went to the
        // predecessor, which had stopped speaking to the backend).
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            match self.open_backend_req(frontend, backend_req) {
                Err(e) if is_disconnect(&e) => return Err(e),
                Err(e) => log::warn!(
                    "vhost-user {}: no backend request channel: {e}",
                    self.socket.display()
                ),
                Ok(()) => {}
            }
        }
        self.reteach.store(false, Ordering::SeqCst);
        if self.kind == Kind::Block
            && protocol.contains(VhostUserProtocolFeatures::CONFIG)
            && self.refresh_config(conn)?
        {
            self.notify_config_later();
        }
        Ok(())
    }

    /// Loads the predecessor's state at its pause into a device adopted before it (a live
    /// update prepares its devices while the guest still runs): vring bases, features and
    /// queues as the predecessor last had them. Still nothing is said to the backend unless the
    /// state has running rings.
    pub fn load_handover_state(
        &self,
        state: VhostUserState,
        kicks: &[Arc<vmm_sys_util::eventfd::EventFd>],
        calls: &[Arc<vmm_sys_util::eventfd::EventFd>],
    ) -> Result<(), Error> {
        let mut queues = Vec::new();
        for v in &state.vrings {
            let (Some(kick), Some(call)) = (kicks.get(v.index), calls.get(v.index)) else {
                return Err(Error::QueueAddress {
                    index: v.index,
                    addr: v.config.desc,
                });
            };
            queues.push(ActiveQueue {
                index: v.index,
                config: v.config,
                kick: kick.clone(),
                call: call.clone(),
            });
        }
        let mut conn = self.lock();
        conn.state = state;
        conn.queues = queues;
        if conn.state.active && !conn.state.paused {
            deadline::bounded(conn.fd(), || {
                self.reteach(&mut conn)?;
                self.start_vrings(&mut conn)
            })?;
        }
        Ok(())
    }

    /// Waits (at most [`DRAIN_TIMEOUT`]) until a disk's backend has completed every request the
    /// guest made available. The guest must be paused. Stopping a ring with requests in flight
    /// is legal, but libvhost-user backends (qemu-storage-daemon 7.2) then complete them onto
    /// the call eventfd they just closed and drop the connection. NICs are not drained: a
    /// receive ring always holds idle buffers, and a transmit request may wait for one.
    pub(super) fn drain(&self, conn: &Conn) {
        if self.kind != Kind::Block || conn.frontend.is_none() {
            return;
        }
        // The guest may have been stopped between making a request available and notifying:
        // notify for it (a spurious kick only makes the backend look at the ring).
        for queue in &conn.queues {
            let _ = queue.kick.write(1);
        }
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        for vring in &conn.state.vrings {
            let idx = |addr: u64| {
                self.memory
                    .read_obj::<u16>(vm_memory::GuestAddress(addr + 2))
                    .ok()
            };
            loop {
                let (avail, used) = (idx(vring.config.avail), idx(vring.config.used));
                if avail.is_none() || avail == used || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }

    /// State for a successor VMM or a snapshot.
    pub fn state(&self) -> VhostUserState {
        self.lock().state.clone()
    }

    /// Duplicates of the fds a successor needs besides the transport's eventfds: the socket
    /// and the inflight region.
    pub fn handover_fds(&self) -> std::io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
        let conn = self.lock();
        let dup = |fd: RawFd| -> std::io::Result<OwnedFd> {
            // SAFETY: `fd` is open (owned by `conn`, which is locked); F_DUPFD_CLOEXEC creates
            // a new descriptor or fails.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if new < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `new` was just created and nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(new) })
        };
        let socket = conn
            .frontend
            .as_ref()
            .map(|f| dup(f.as_raw_fd()))
            .transpose()?;
        let inflight = conn
            .inflight_file
            .as_ref()
            .map(|f| dup(f.as_raw_fd()))
            .transpose()?;
        Ok((socket, inflight))
    }
}
