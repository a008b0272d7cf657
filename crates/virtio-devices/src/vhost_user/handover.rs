//! Handing a running device to a successor VMM (live update): the state, the fds, and the
//! successor's side that adopts them without the backend seeing a disconnect.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{vu, Conn, Counters, Kind, VhostUserDevice, VhostUserState};
use crate::{ActiveQueue, Error};

impl VhostUserDevice {
    /// A successor VMM's device: adopts the connection `socket_fd` (handed over, so the
    /// backend never sees a disconnect), the inflight region and the transport's eventfds, with
    /// the predecessor's `state` (`kicks`/`calls` indexed by queue). Guest memory is mapped anew here, so if the rings were
    /// running (`state.active`, not paused) the memory table and vring addresses are sent
    /// again; a paused device waits for [`crate::VirtioDevice::resume`].
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
        let mut frontend = Frontend::from_stream(
            std::os::unix::net::UnixStream::from(socket_fd),
            u64::from(num_queues),
        );
        // The frontend library tracks negotiated features itself: teach it again. These
        // requests are idempotent for a running backend.
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
                .set_features(Self::backend_ack(&state))
                .map_err(vu("SET_FEATURES"))?;
        }
        let dev = Arc::new(VhostUserDevice {
            kind,
            socket,
            num_queues: usize::from(num_queues),
            queue_size,
            memory,
            conn: Mutex::new(Conn {
                frontend: Some(frontend),
                session_ready: true,
                state,
                inflight_file: inflight.map(File::from),
                queues,
            }),
            stop: AtomicBool::new(false),
            stop_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?),
            monitor: Mutex::new(None),
            counters: Counters::default(),
        });
        {
            let mut conn = dev.lock();
            if conn.state.active && !conn.state.paused {
                dev.start_vrings(&mut conn)?;
            }
        }
        dev.start();
        Ok(dev)
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
