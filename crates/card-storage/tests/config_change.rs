//! A volume grown while attached, at the vhost-user protocol level (no VM): the backend offers
//! BACKEND_REQ, keeps the channel the front end gives it and sends CONFIG_CHANGE_MSG on a grow
//! (waiting for the answer where the front end asks for replies, as QEMU does); GET_CONFIG then
//! reports the new capacity. A front end without a channel is simply not told; one that fails
//! the change, answers wrongly or has closed the channel is reported, never waited on forever.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use outboard_card_storage::backing::Backing;
use outboard_card_storage::blk::device::VolumeDevice;
use outboard_card_storage::table::VolumeStore;
use outboard_card_storage::throttle::Limits;
use outboard_card_storage::vhost::Server;
use outboard_vhost_wire::{recv, send, Message, NEED_REPLY, REPLY, VERSION};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("outboard-cfgchg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The front end's side of the backend request channel: counts config changes, answers with
/// `status` (0 = done).
struct Watcher {
    changes: AtomicU32,
    fail: bool,
}

impl VhostUserFrontendReqHandler for Watcher {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(std::io::Error::other("refused"));
        }
        Ok(0)
    }
}

/// A store with volume `v` (8 MiB) and a neighbour behind it, `v` attached on a socket.
fn attached(dir: &Dir) -> (VolumeStore, Arc<VolumeDevice>, Server, PathBuf) {
    let path = dir.0.join("store");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut store = VolumeStore::format(&path).unwrap();
    let v = store.create("v", 8 * MIB).unwrap();
    store.create("n", MIB).unwrap();
    let backing = Arc::new(Backing::open(&path).unwrap());
    let dev = Arc::new(VolumeDevice::new(v, backing, None, Limits::default()).unwrap());
    let sock = dir.0.join("v.sock");
    let server = Server::start(dev.clone(), &sock, 1).unwrap();
    (store, dev, server, sock)
}

fn connect(sock: &std::path::Path, extra: VhostUserProtocolFeatures) -> Frontend {
    connect_with(sock, VhostUserProtocolFeatures::REPLY_ACK | extra)
}

fn connect_with(sock: &std::path::Path, extra: VhostUserProtocolFeatures) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "{pf:?}"
    );
    let want = VhostUserProtocolFeatures::CONFIG | extra;
    fe.set_protocol_features(pf & want).unwrap();
    fe.set_features(offered).unwrap();
    fe
}

fn capacity(fe: &mut Frontend) -> u64 {
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(cfg[..8].try_into().unwrap()) * 512
}

fn grow(store: &mut VolumeStore, dev: &VolumeDevice, mib: u64) {
    let v = store.grow("v", mib * MIB).unwrap();
    dev.grow(v).unwrap();
}

#[test]
fn a_grow_is_announced_on_the_backend_request_channel() {
    let dir = Dir::new("announce");
    let (mut store, dev, server, sock) = attached(&dir);
    let mut fe = connect(&sock, VhostUserProtocolFeatures::BACKEND_REQ);
    let watcher = Arc::new(Watcher {
        changes: AtomicU32::new(0),
        fail: false,
    });
    let mut handler = FrontendReqHandler::new(watcher.clone()).unwrap();
    handler.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
    assert_eq!(capacity(&mut fe), 8 * MIB);

    for (round, mib) in [(1, 24), (2, 40)] {
        grow(&mut store, &dev, mib);
        // The front end answers on its own thread, as QEMU's main loop does.
        let answer = std::thread::spawn(move || {
            handler.handle_request().unwrap();
            handler
        });
        assert!(server.config_changed().unwrap());
        handler = answer.join().unwrap();
        assert_eq!(watcher.changes.load(Ordering::SeqCst), round);
        assert_eq!(capacity(&mut fe), mib * MIB);
        assert_eq!(dev.capacity(), mib * MIB);
    }
    let extents = dev.volume().extents.clone();
    assert_eq!(extents.len(), 2, "{extents:?}");
    drop(fe);
    server.stop().unwrap();
}

#[test]
fn a_front_end_without_a_channel_is_not_told() {
    let dir = Dir::new("nochannel");
    let (mut store, dev, server, sock) = attached(&dir);
    // Nobody connected yet.
    assert!(!server.config_changed().unwrap());
    let mut fe = connect(&sock, VhostUserProtocolFeatures::empty());
    grow(&mut store, &dev, 16);
    assert!(!server.config_changed().unwrap());
    assert_eq!(capacity(&mut fe), 16 * MIB, "a new GET_CONFIG sees it");
    drop(fe);

    // The vhost crate's front end never asks for a reply to SET_BACKEND_REQ_FD (QEMU does
    // with REPLY_ACK): the message goes out and is not waited for.
    let mut fe = connect_with(&sock, VhostUserProtocolFeatures::BACKEND_REQ);
    let watcher = Arc::new(Watcher {
        changes: AtomicU32::new(0),
        fail: false,
    });
    let mut handler = FrontendReqHandler::new(watcher.clone()).unwrap();
    fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
    grow(&mut store, &dev, 28);
    assert!(server.config_changed().unwrap());
    handler.handle_request().unwrap();
    assert_eq!(watcher.changes.load(Ordering::SeqCst), 1);
    assert_eq!(capacity(&mut fe), 28 * MIB);
    drop(fe);
    server.stop().unwrap();
}

/// A front end speaking the wire protocol the way QEMU does where it matters here: with
/// REPLY_ACK it asks for a reply to SET_BACKEND_REQ_FD.
struct RawFrontEnd(UnixStream);

impl RawFrontEnd {
    fn connect(sock: &std::path::Path) -> Self {
        let fe = Self(UnixStream::connect(sock).unwrap());
        fe.request(3, 0, &[], None); // SET_OWNER
        let offered = fe.u64_reply(1); // GET_FEATURES
        let pf = VhostUserProtocolFeatures::from_bits_truncate(fe.u64_reply(15));
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ;
        fe.request(16, 0, &(pf & want).bits().to_le_bytes(), None);
        fe.request(2, 0, &offered.to_le_bytes(), None); // SET_FEATURES
        fe
    }

    fn request(&self, code: u32, flags: u32, payload: &[u8], file: Option<File>) {
        let mut m = Message::new(code, VERSION | flags, payload);
        m.files.extend(file);
        send(&self.0, &m).unwrap();
    }

    fn u64_reply(&self, code: u32) -> u64 {
        self.request(code, 0, &[], None);
        let r = recv(&self.0).unwrap().unwrap();
        assert_eq!((r.request(), r.flags() & REPLY), (code, REPLY));
        u64::from_le_bytes(r.payload()[..8].try_into().unwrap())
    }

    /// SET_BACKEND_REQ_FD with a reply asked for; returns our end of the channel.
    fn backend_channel(&self) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(theirs));
        self.request(21, NEED_REPLY, &[], Some(file));
        let r = recv(&self.0).unwrap().unwrap();
        assert_eq!(r.request(), 21);
        assert_eq!(u64::from_le_bytes(r.payload()[..8].try_into().unwrap()), 0);
        ours
    }

    fn capacity(&self) -> u64 {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&8u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&[0u8; 8]);
        self.request(24, 0, &p, None); // GET_CONFIG
        let r = recv(&self.0).unwrap().unwrap();
        assert_eq!(r.request(), 24);
        u64::from_le_bytes(r.payload()[12..20].try_into().unwrap()) * 512
    }
}

/// Answers one backend request on `chan` with `status`; returns its request code and flags.
fn answer(chan: &UnixStream, status: u64) -> (u32, u32) {
    let m = recv(chan).unwrap().unwrap();
    if m.flags() & NEED_REPLY != 0 {
        send(
            chan,
            &Message::new(m.request(), VERSION | REPLY, &status.to_le_bytes()),
        )
        .unwrap();
    }
    (m.request(), m.flags())
}

#[test]
fn a_front_end_that_asks_for_replies_is_waited_for() {
    let dir = Dir::new("waited");
    let (mut store, dev, server, sock) = attached(&dir);
    let fe = RawFrontEnd::connect(&sock);
    let chan = fe.backend_channel();
    assert_eq!(fe.capacity(), 8 * MIB);

    grow(&mut store, &dev, 12);
    let front = std::thread::spawn(move || {
        let got = answer(&chan, 0);
        (got, chan)
    });
    assert!(server.config_changed().unwrap());
    let ((code, flags), chan) = front.join().unwrap();
    assert_eq!(
        (code, flags & NEED_REPLY),
        (2, NEED_REPLY),
        "CONFIG_CHANGE_MSG"
    );
    assert_eq!(fe.capacity(), 12 * MIB);

    // A front end that fails the change: reported, and the device has grown regardless.
    grow(&mut store, &dev, 16);
    let front = std::thread::spawn(move || {
        answer(&chan, 1);
        chan
    });
    let err = server.config_changed().unwrap_err();
    assert!(
        err.to_string().contains("failed the configuration change"),
        "{err}"
    );
    let chan = front.join().unwrap();
    assert_eq!(fe.capacity(), 16 * MIB);

    // A reply to someone else's request is refused; a late one is not taken for the next.
    let front = std::thread::spawn(move || {
        let m = recv(&chan).unwrap().unwrap();
        send(
            &chan,
            &Message::new(7, VERSION | REPLY, &0u64.to_le_bytes()),
        )
        .unwrap();
        assert_eq!(m.request(), 2);
        chan
    });
    assert!(server.config_changed().is_err());
    let chan = front.join().unwrap();
    send(
        &chan,
        &Message::new(2, VERSION | REPLY, &0u64.to_le_bytes()),
    )
    .unwrap();
    let front = std::thread::spawn(move || {
        answer(&chan, 0);
        chan
    });
    assert!(server.config_changed().unwrap());
    let chan = front.join().unwrap();

    // A front end that closed its end of the channel: an error, not a hang.
    drop(chan);
    assert!(server.config_changed().is_err());
    drop(fe);
    server.stop().unwrap();
}
