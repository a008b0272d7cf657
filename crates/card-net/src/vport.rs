//! A VM's virtual NIC on the card: a vhost-user-net backend (rust-vmm `vhost-user-backend`)
//! that the dataplane reads and writes like a TAP opened with a virtio-net header, so one
//! worker loop serves VMs and hosts alike.
//!
//! ```text
//!  VMM / QEMU ──vhost-user socket──► daemon thread: guest kicks TX ─► `ready` eventfd
//!                                                                        │ poll
//!  dataplane thread:  read()  ◄── pops the TX ring, guest memory ─► 10-byte vnet hdr + frame
//!                     write() ──► 10-byte vnet hdr + frame ─► an RX chain, used ring, call fd
//! ```
//!
//! The TX ring is the queue: frames stay in guest memory until the dataplane has room for them,
//! so a slow underlay back-pressures the guest instead of growing a buffer here. The rings'
//! handles are taken from the first event of each connection (vhost-user-backend keeps them
//! private) and dropped when the connection ends; a VMM that reconnects (restart, live update
//! with a new connection) gets fresh ones.
//!
//! Offloads: the guest may send 64 KiB TCP segments with a partial checksum (`HOST_TSO*`,
//! `CSUM`) and accepts them (`GUEST_TSO*`, `GUEST_CSUM`), exactly what a TAP with
//! `TUNSETOFFLOAD` does, so frames cross the overlay whole. The guest is hostile: a chain that
//! is write-only, too long, shorter than its header, outside guest memory or with a header
//! inconsistent with its frame ([`VnetHdr::valid_for`]) is returned unused and counted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vnet::{self, VnetHdr};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Queue indices of the one queue pair.
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: usize = 256;
/// virtio-net header with `VIRTIO_F_VERSION_1`: the 10-byte header plus `num_buffers`.
const VIRTIO_HDR: usize = 12;
/// Largest frame a guest may send or be given: a 64 KiB TSO segment plus its Ethernet header.
pub const MAX_FRAME: usize = 65_536 + 14;
/// Used-ring signals are batched: one per this many TX frames (and one when the ring is empty).
const SIGNAL_EVERY: u64 = 32;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_VERSION_1: u64 = 1 << 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("Cannot start the port's thread")]
    Thread(#[source] io::Error),
}

/// Per-port counters (all monotonic).
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames taken from the guest's TX ring and handed to the dataplane.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains refused (see the module documentation); the guest gets them back unused.
    pub tx_malformed: AtomicU64,
    /// Frames placed in the guest's RX ring.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames dropped because the guest had posted no receive buffer.
    pub rx_no_buffer: AtomicU64,
    /// Frames dropped because they did not fit the guest's buffer or used an offload it did
    /// not accept.
    pub rx_dropped: AtomicU64,
    /// vhost-user connections accepted.
    pub connections: AtomicU64,
}

/// What the daemon thread and the dataplane share.
struct Shared {
    mem: Mutex<Option<Mem>>,
    vrings: Mutex<Option<Vec<VringRwLock<Mem>>>>,
    acked_features: AtomicU64,
    /// Written when the guest kicks TX; the dataplane polls it.
    ready: EventFd,
    counters: PortCounters,
    /// TX frames since the last used-ring signal.
    unsignalled: AtomicU64,
    /// Held while the dataplane works on a ring: GET_VRING_BASE waits for it (`stop_vring`),
    /// so a ring is never stopped between a pop and its `add_used`.
    busy: Mutex<()>,
    stop: AtomicBool,
}

impl Shared {
    fn vring(&self, index: usize) -> Option<VringRwLock<Mem>> {
        let guard = self.vrings.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().and_then(|v| v.get(index).cloned())
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The vhost-user side (runs on the daemon's thread).
#[derive(Clone)]
struct Backend(Arc<Shared>);

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        drop(self.0.busy.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.0.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        {
            let mut saved = self.0.vrings.lock().unwrap_or_else(|p| p.into_inner());
            if saved.is_none() {
                *saved = Some(vrings.to_vec());
            }
        }
        // TX: frames to take. RX: buffers posted, which only matters to a dataplane that
        // retries on its next frame anyway, so both just wake it.
        if usize::from(device_event) <= TX {
            self.0.ready.write(1)?;
        }
        Ok(())
    }
}

/// A VM's NIC: read and write it as a TAP with a [`vnet::LEN`]-byte virtio-net header.
pub struct VirtualPort {
    shared: Arc<Shared>,
    socket: PathBuf,
}

impl VirtualPort {
    /// Listens on `socket` (replacing a stale one) and serves one VMM at a time from a thread.
    pub fn serve(socket: &Path) -> Result<Self, Error> {
        let mut listener = Listener::new(socket, true).map_err(|source| Error::Listen {
            path: socket.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared {
            mem: Mutex::new(None),
            vrings: Mutex::new(None),
            acked_features: AtomicU64::new(0),
            ready: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            counters: PortCounters::default(),
            unsignalled: AtomicU64::new(0),
            busy: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let name = socket.display().to_string();
        std::thread::Builder::new()
            .name("vport".into())
            .spawn(move || run(&thread_shared, &mut listener, &name))
            .map_err(Error::Thread)?;
        Ok(Self {
            shared,
            socket: socket.to_owned(),
        })
    }

    pub fn name(&self) -> String {
        self.socket.display().to_string()
    }

    /// Frames always carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        true
    }

    pub fn counters(&self) -> &PortCounters {
        &self.shared.counters
    }

    /// The next frame the guest sent, as `vnet hdr ‖ frame` in `buf`; `WouldBlock` when there
    /// is none (poll [`AsRawFd::as_raw_fd`] for more).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rearmed = false;
        loop {
            match self.pop_tx(buf)? {
                Some(Some(n)) => return Ok(n),
                // A malformed chain, given back: try the next.
                Some(None) => {}
                None if rearmed => {
                    self.signal_tx();
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                // Reset the wake-up, then look once more: a kick between the pop above and
                // the reset would otherwise be lost.
                None => {
                    let _ = self.shared.ready.read();
                    rearmed = true;
                }
            }
        }
    }

    /// Pops one TX chain: `None` when the ring is empty (or not set up), `Some(None)` for a
    /// refused chain, `Some(Some(len))` for a frame copied into `buf`.
    fn pop_tx(&self, buf: &mut [u8]) -> io::Result<Option<Option<usize>>> {
        let _busy = self.shared.busy.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(vring), Some(mem)) = (self.shared.vring(TX), self.shared.memory()) else {
            return Ok(None);
        };
        let m = mem.memory();
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(m.clone());
        let Some(chain) = chain else {
            return Ok(None);
        };
        let head = chain.head_index();
        let copied = copy_tx_chain(&*m, chain, buf);
        vring.add_used(head, 0).map_err(io::Error::other)?;
        if self.shared.unsignalled.fetch_add(1, Relaxed) + 1 >= SIGNAL_EVERY {
            self.signal_tx();
        }
        let c = &self.shared.counters;
        Ok(Some(match copied {
            Some(n) => {
                c.tx_frames.fetch_add(1, Relaxed);
                c.tx_bytes.fetch_add((n - vnet::LEN) as u64, Relaxed);
                Some(n)
            }
            None => {
                c.tx_malformed.fetch_add(1, Relaxed);
                None
            }
        }))
    }

    fn signal_tx(&self) {
        if self.shared.unsignalled.swap(0, Relaxed) > 0 {
            if let Some(vring) = self.shared.vring(TX) {
                let _ = vring.signal_used_queue();
            }
        }
    }

    /// Delivers `vnet hdr ‖ frame` to the guest. A frame the guest has no room for, or with an
    /// offload it did not accept, is dropped and counted (as a full TAP queue drops), so the
    /// return is always the length given unless the header itself is missing.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let hdr =
            VnetHdr::parse(buf).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let frame = &buf[vnet::LEN..];
        let c = &self.shared.counters;
        if !self.accepts(&hdr) || frame.len() > MAX_FRAME {
            c.rx_dropped.fetch_add(1, Relaxed);
            return Ok(buf.len());
        }
        let _busy = self.shared.busy.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(vring), Some(mem)) = (self.shared.vring(RX), self.shared.memory()) else {
            c.rx_no_buffer.fetch_add(1, Relaxed);
            return Ok(buf.len());
        };
        let m = mem.memory();
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(m.clone());
        let Some(chain) = chain else {
            c.rx_no_buffer.fetch_add(1, Relaxed);
            return Ok(buf.len());
        };
        let head = chain.head_index();
        let mut header = [0u8; VIRTIO_HDR];
        let mut legacy = [0u8; vnet::LEN];
        hdr.write(&mut legacy);
        header[..vnet::LEN].copy_from_slice(&legacy);
        header[vnet::LEN..].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        let written = write_rx_chain(&*m, chain, &header, frame);
        let used = written.map_or(0, |n| n as u32);
        vring.add_used(head, used).map_err(io::Error::other)?;
        match written {
            Some(_) => {
                c.rx_frames.fetch_add(1, Relaxed);
                c.rx_bytes.fetch_add(frame.len() as u64, Relaxed);
            }
            None => {
                c.rx_dropped.fetch_add(1, Relaxed);
            }
        }
        vring.signal_used_queue()?;
        Ok(buf.len())
    }

    /// Whether the guest negotiated what `hdr` asks of it.
    fn accepts(&self, hdr: &VnetHdr) -> bool {
        let acked = self.shared.acked_features.load(Relaxed);
        let csum_ok = hdr.flags & vnet::F_NEEDS_CSUM == 0 || acked & F_GUEST_CSUM != 0;
        let gso_ok = match hdr.gso_type & !vnet::GSO_ECN {
            vnet::GSO_NONE => true,
            vnet::GSO_TCPV4 => acked & F_GUEST_TSO4 != 0,
            vnet::GSO_TCPV6 => acked & F_GUEST_TSO6 != 0,
            _ => false,
        };
        let ecn_ok = hdr.gso_type & vnet::GSO_ECN == 0 || acked & F_GUEST_ECN != 0;
        csum_ok && gso_ok && ecn_ok
    }
}

impl std::fmt::Debug for VirtualPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualPort")
            .field("socket", &self.socket)
            .field("counters", &self.shared.counters)
            .finish()
    }
}

impl AsRawFd for VirtualPort {
    /// Readable when the guest has sent frames.
    fn as_raw_fd(&self) -> RawFd {
        self.shared.ready.as_raw_fd()
    }
}

impl Drop for VirtualPort {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
    }
}

/// A listener on a fresh abstract socket (no file to clean up) with a connection queued.
fn private_pair() -> io::Result<(Listener, UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "outboard-card-net-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

fn run(shared: &Arc<Shared>, listener: &mut Listener, name: &str) {
    while !shared.stop.load(Relaxed) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            match VhostUserDaemon::new("outboard-card-net".into(), Backend(shared.clone()), mem) {
                Ok(d) => d,
                Err(e) => {
                    log::error!("vhost-user-net {name}: {e}");
                    return;
                }
            };
        let front = match listener.accept() {
            Ok(Some(front)) => front,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("vhost-user-net {name}: accept failed: {e}");
                continue;
            }
        };
        // The daemon serves a private socket; the relay in between repairs a QEMU quirk.
        let relay = match private_pair().and_then(|(mut inner_listener, inner)| {
            daemon
                .start(&mut inner_listener)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Relay::spawn(front, inner)
        }) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("vhost-user-net {name}: cannot serve the front end: {e}");
                continue;
            }
        };
        shared.counters.connections.fetch_add(1, Relaxed);
        log::info!("vhost-user-net {name}: front end connected");
        if let Err(e) = daemon.wait() {
            log::info!("vhost-user-net {name}: connection ended: {e}");
        }
        relay.close();
        // The rings and memory belonged to that connection.
        *shared.vrings.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *shared.mem.lock().unwrap_or_else(|p| p.into_inner()) = None;
        shared.acked_features.store(0, Relaxed);
    }
}

/// Copies a TX chain (`virtio hdr ‖ frame`, read-only descriptors) into `buf` as
/// `vnet hdr ‖ frame`; `None` when the chain is refused.
fn copy_tx_chain<M, C>(mem: &M, chain: C, buf: &mut [u8]) -> Option<usize>
where
    M: Bytes<vm_memory::GuestAddress>,
    C: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    // Gather `virtio hdr ‖ frame` at buf[2..]: the 12-byte header then shrinks to 10 in place.
    let shift = VIRTIO_HDR - vnet::LEN;
    let room = buf.len().min(VIRTIO_HDR + MAX_FRAME + shift);
    let mut len = shift;
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        let n = d.len() as usize;
        let end = len.checked_add(n).filter(|e| *e <= room)?;
        mem.read_slice(&mut buf[len..end], d.addr()).ok()?;
        len = end;
    }
    if len < shift + VIRTIO_HDR {
        return None;
    }
    let hdr = VnetHdr::parse(&buf[shift..])?;
    let frame_len = len - shift - VIRTIO_HDR;
    if !hdr.valid_for(frame_len) || frame_len < 14 {
        return None;
    }
    let mut legacy = [0u8; vnet::LEN];
    hdr.write(&mut legacy);
    // `num_buffers` (the header's last two bytes) is meaningless on TX: drop it by moving the
    // 10 header bytes up against the frame.
    buf[shift + 2..shift + 2 + vnet::LEN].copy_from_slice(&legacy);
    buf.copy_within(shift + 2..len, 0);
    Some(len - shift - 2)
}

/// Writes `header ‖ frame` into an RX chain's write-only descriptors; `None` when the chain is
/// malformed or too small (the guest then gets it back with length 0).
fn write_rx_chain<M, C>(mem: &M, chain: C, header: &[u8], frame: &[u8]) -> Option<usize>
where
    M: Bytes<vm_memory::GuestAddress>,
    C: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let total = header.len() + frame.len();
    let mut at = 0usize;
    for d in chain {
        if at == total {
            break;
        }
        if !d.is_write_only() {
            return None;
        }
        let n = (d.len() as usize).min(total - at);
        let mut done = 0;
        // The header and the frame may straddle one descriptor.
        while done < n {
            let pos = at + done;
            let (src, off) = if pos < header.len() {
                (header, pos)
            } else {
                (frame, pos - header.len())
            };
            let k = (n - done).min(src.len() - off);
            let addr = d.addr().checked_add(done as u64)?;
            mem.write_slice(&src[off..off + k], addr).ok()?;
            done += k;
        }
        at += n;
    }
    (at == total).then_some(total)
}

mod relay;
#[cfg(test)]
mod tests;

use relay::Relay;
