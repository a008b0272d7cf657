//! The vhost-user front end against a scripted backend (the real front end code, a backend
//! written here message by message, since no real backend misbehaves on demand): a disk grown
//! by its backend (CONFIG_CHANGE_MSG on the backend request channel) reaches the driver as a
//! new capacity and a config interrupt; hostile backend requests are refused or end the
//! channel, never the VMM; a backend that never answers is an error within the reply timeout.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_until, Driver};
use outboard_boot::memory::GuestRam;
use outboard_pci::RecordingInterrupts;
use outboard_vhost_wire::{recv, send, Message, NEED_REPLY, REPLY, VERSION};
use outboard_virtio_devices::transport::VirtioPciTransport;
use outboard_virtio_devices::vhost_user::{Kind, StartError, VhostUserDevice, REPLY_TIMEOUT};
use outboard_virtio_devices::{Error, VIRTIO_F_VERSION_1};

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_CONFIG: u32 = 24;
const CONFIG_CHANGE_MSG: u32 = 2;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// REPLY_ACK (3), BACKEND_REQ (5), CONFIG (9).
const PROTOCOL: u64 = (1 << 3) | (1 << 5) | (1 << 9);
const SECTORS: u64 = 8192;

/// What the scripted backend shares with the test.
#[derive(Default)]
struct Shared {
    /// Capacity in sectors that GET_CONFIG reports.
    capacity: u64,
    /// The backend request channel the front end gave.
    channel: Option<UnixStream>,
    config_reads: u32,
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("obvd-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Answers the front end's requests on one connection until it closes.
fn scripted_backend(listener: UnixListener, shared: Arc<Mutex<Shared>>) {
    std::thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        while let Ok(Some(mut msg)) = recv(&s) {
            let req = msg.request();
            let answer = |payload: &[u8]| Message::new(req, VERSION | REPLY, payload);
            let reply = match req {
                GET_FEATURES => Some(answer(
                    &(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES).to_le_bytes(),
                )),
                GET_PROTOCOL_FEATURES => Some(answer(&PROTOCOL.to_le_bytes())),
                GET_CONFIG => {
                    let mut sh = shared.lock().unwrap();
                    sh.config_reads += 1;
                    let mut payload = msg.payload().to_vec();
                    let cap = sh.capacity.to_le_bytes();
                    if payload.len() >= 12 + 8 {
                        payload[12..20].copy_from_slice(&cap);
                    }
                    Some(answer(&payload))
                }
                _ => {
                    if req == SET_BACKEND_REQ_FD {
                        let f = msg.files.pop().expect("SET_BACKEND_REQ_FD carries an fd");
                        shared.lock().unwrap().channel =
                            Some(UnixStream::from(std::os::fd::OwnedFd::from(f)));
                    }
                    (msg.flags() & NEED_REPLY != 0).then(|| answer(&0u64.to_le_bytes()))
                }
            };
            if let Some(r) = reply {
                if send(&s, &r).is_err() {
                    return;
                }
            }
        }
    });
}

/// Sends `msg` on the backend request channel and returns the front end's reply status.
fn ask(channel: &UnixStream, msg: &Message) -> Option<u64> {
    send(channel, msg).unwrap();
    let r = recv(channel).ok()??;
    assert_eq!(r.flags() & REPLY, REPLY);
    assert_eq!(r.request(), msg.request());
    Some(u64::from_le_bytes(r.payload().get(..8)?.try_into().ok()?))
}

#[test]
fn a_grown_disk_reaches_the_driver_and_hostile_requests_are_refused() {
    let sock = scratch("grow");
    let listener = UnixListener::bind(&sock).unwrap();
    let shared = Arc::new(Mutex::new(Shared {
        capacity: SECTORS,
        ..Default::default()
    }));
    scripted_backend(listener, shared.clone());
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory().clone();
    let dev = VhostUserDevice::connect(Kind::Block, sock.clone(), 1, 128, mem.clone()).unwrap();
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = Arc::new(
        VirtioPciTransport::new("virtio-blk", dev.clone(), mem, irqs.clone(), irqs).unwrap(),
    );
    let drv = Driver::new(t.clone());
    assert_eq!(drv.r(0x2000, 8), SECTORS);
    let channel = shared
        .lock()
        .unwrap()
        .channel
        .take()
        .expect("the front end gave a backend request channel");
    channel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let generation = t.state().config_generation;

    // Grown: the front end reads the configuration again, the driver sees it with a new
    // generation and the config-change ISR bit.
    shared.lock().unwrap().capacity = 2 * SECTORS;
    let change = Message::new(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
    assert_eq!(ask(&channel, &change), Some(0));
    assert_eq!(drv.r(0x2000, 8), 2 * SECTORS);
    let st = t.state();
    assert_ne!(st.config_generation, generation);
    assert_eq!(st.isr & 2, 2, "config-change ISR bit");
    assert_eq!(dev.counters.config_changes.get(), 1);

    // Requests we don't serve, and malformed ones, get a failure reply.
    for bad in [
        Message::new(1, VERSION | NEED_REPLY, &[]),
        Message::new(u32::MAX, VERSION | NEED_REPLY, &[0; 40]),
        Message::new(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[1, 2, 3]),
        Message::new(CONFIG_CHANGE_MSG, 0x2 | NEED_REPLY, &[]),
    ] {
        let status = ask(&channel, &bad);
        assert!(matches!(status, Some(s) if s != 0), "{bad:?}: {status:?}");
    }
    let reads = shared.lock().unwrap().config_reads;
    assert_eq!(reads, 2, "only the real change made the front end ask");

    // An oversized message ends the channel (its stream can't be trusted), not the device.
    let mut huge = Message::new(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
    huge.bytes[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    send(&channel, &huge).unwrap();
    assert!(matches!(recv(&channel), Ok(None)), "the channel is closed");
    assert!(dev.connected());
    assert_eq!(drv.r(0x2000, 8), 2 * SECTORS);
    dev.shutdown();
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_backend_that_never_answers_fails_within_the_reply_timeout() {
    let sock = scratch("silent");
    let listener = UnixListener::bind(&sock).unwrap();
    // Accepts and keeps the connection open, never reading or answering.
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            keep.lock().unwrap().push(s);
        }
    });
    let ram = GuestRam::new(16 << 20).unwrap();
    let start = Instant::now();
    let err = VhostUserDevice::connect(Kind::Block, sock.clone(), 1, 128, ram.memory().clone())
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= REPLY_TIMEOUT && took < REPLY_TIMEOUT + Duration::from_secs(5),
        "{took:?}"
    );
    let StartError::Handshake { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(
            source,
            Error::NoReply {
                request: "GET_FEATURES"
            }
        ),
        "{source}"
    );
    assert_eq!(
        source.to_string(),
        format!(
            "vhost-user backend gave no answer to GET_FEATURES within {}s",
            REPLY_TIMEOUT.as_secs()
        )
    );
    assert!(wait_until(Duration::from_secs(1), || !held
        .lock()
        .unwrap()
        .is_empty()));
    let _ = std::fs::remove_file(&sock);
}
