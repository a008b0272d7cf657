//! A vhost-user-net backend that echoes every frame the guest transmits back into its receive
//! queue, built on rust-vmm's `vhost-user-backend` (no vhost-user-net backend is installed
//! here). It reads and writes guest memory itself, as any out-of-process backend does.
//!
//! Shared by this crate's frontend test and outboard-vmm's guest tests, which include it with
//! `#[path]`.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
pub const RX: usize = 0;
pub const TX: usize = 1;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The echo: frames taken from TX wait here until the guest posts RX buffers.
#[derive(Default)]
pub struct Echo {
    mem: Mutex<Option<Mem>>,
    /// Held while the rings are worked on: GET_VRING_BASE waits for it (`stop_vring`), so a
    /// ring is never stopped between a pop and its `add_used`.
    busy: Mutex<()>,
    pending: Mutex<VecDeque<Vec<u8>>>,
    pub echoed: Mutex<u32>,
}

impl Echo {
    fn pump(&self, vrings: &[VringRwLock<Mem>]) -> io::Result<()> {
        let _busy = self.busy.lock().unwrap();
        let Some(mem) = self.mem.lock().unwrap().clone() else {
            return Ok(());
        };
        let m = mem.memory();
        let mut pending = self.pending.lock().unwrap();
        loop {
            // Popped in a statement of its own: the vring's write lock must be released
            // before add_used takes it again.
            let next = vrings[TX]
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(m.clone());
            let Some(tx) = next else {
                break;
            };
            let mut frame = Vec::new();
            for d in tx.clone() {
                let mut buf = vec![0u8; d.len() as usize];
                m.read_slice(&mut buf, d.addr()).map_err(io::Error::other)?;
                frame.extend_from_slice(&buf);
            }
            vrings[TX]
                .add_used(tx.head_index(), 0)
                .map_err(io::Error::other)?;
            pending.push_back(frame);
        }
        while !pending.is_empty() {
            let Some(rx) = vrings[RX]
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(m.clone())
            else {
                break;
            };
            let frame = pending.pop_front().unwrap_or_default();
            let mut left = &frame[..];
            for d in rx.clone().filter(|d| d.is_write_only()) {
                let n = left.len().min(d.len() as usize);
                m.write_slice(&left[..n], d.addr())
                    .map_err(io::Error::other)?;
                left = &left[n..];
            }
            vrings[RX]
                .add_used(rx.head_index(), frame.len() as u32)
                .map_err(io::Error::other)?;
            *self.echoed.lock().unwrap() += 1;
        }
        vrings[TX].signal_used_queue()?;
        vrings[RX].signal_used_queue()
    }
}

impl VhostUserBackend for Echo {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        drop(self.busy.lock().unwrap());
        Ok(())
    }
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if usize::from(device_event) <= TX {
            self.pump(vrings)?;
        }
        Ok(())
    }
}

/// Serves `echo` on `socket` (one frontend session) from a thread.
pub fn serve(socket: PathBuf, echo: Arc<Echo>) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&socket);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("echo-net".into(), echo, mem).unwrap();
    // Bind before returning, so the VMM finds the socket.
    let mut listener = vhost::vhost_user::Listener::new(&socket, true).unwrap();
    std::thread::spawn(move || {
        let _ = daemon.start(&mut listener);
        let _ = daemon.wait();
    })
}
