//! virtio-vsock with the hybrid Unix-socket model: this test plays the guest driver (its own
//! vsock stack, packet by packet) against host processes on the Unix sockets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use common::{Driver, Vq};
use outboard_boot::memory::GuestRam;
use outboard_pci::{PciDevice, RecordingInterrupts};
use outboard_virtio_devices::transport::{VirtioPciTransport, STATUS_NEEDS_RESET};
use outboard_virtio_devices::vsock::packet::*;
use outboard_virtio_devices::vsock::VsockDevice;
use outboard_virtio_devices::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const CID: u64 = 3;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x60_0000;

struct Guest {
    mem: GuestMemoryMmap,
    rx: Vq,
    tx: Vq,
    rx_call: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    rx_kick: Arc<EventFd>,
    rx_seen: u16,
    tx_n: u64,
    rx_n: u64,
}

impl Guest {
    fn give_rx_buffer(&mut self) {
        let addr = RX_BUFS + (self.rx_n % 64) * 0x1000;
        self.rx_n += 1;
        self.rx.push(&self.mem, &[(addr, 4096, true)]);
        self.rx_kick.write(1).unwrap();
    }

    /// Next packet from the device (waits for it), and refills one RX buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let want = self.rx_seen.wrapping_add(1);
        self.rx
            .wait_used(&self.mem, &self.rx_call, want)
            .expect("no RX packet");
        let slot = self.rx.used + 4 + 8 * u64::from(self.rx_seen % self.rx.size);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
        self.rx_seen = want;
        let addr: u64 = self
            .mem
            .read_obj(GuestAddress(self.rx.desc + 16 * u64::from(id)))
            .unwrap();
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        let h = Header::parse(b[..HDR_LEN].try_into().unwrap());
        self.give_rx_buffer();
        (h, b[HDR_LEN..].to_vec())
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let addr = TX_BUFS + (self.tx_n % 64) * 0x1000;
        self.tx_n += 1;
        let mut b = h.bytes().to_vec();
        b.extend_from_slice(payload);
        self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
        self.tx.push(&self.mem, &[(addr, b.len() as u32, false)]);
        self.tx_kick.write(1).unwrap();
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

#[test]
fn host_and_guest_initiated_streams_echo() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let ram = GuestRam::new(32 << 20).unwrap();
    let mem = ram.memory().clone();
    let dev = Arc::new(VsockDevice::new(CID, uds.clone(), mem.clone()).unwrap());
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = Arc::new(
        VirtioPciTransport::new("vsock", dev.clone(), mem.clone(), irqs.clone(), irqs).unwrap(),
    );
    let drv = Driver::new(t.clone());
    let mut cid = [0u8; 8];
    t.bar_read(0, 0x2000, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    drv.negotiate(VIRTIO_F_VERSION_1);
    let rx = Vq::new(0, 256, 0x10_0000);
    let tx = Vq::new(1, 256, 0x20_0000);
    let evq = Vq::new(2, 256, 0x30_0000);
    drv.setup_queue(&rx, 0);
    drv.setup_queue(&tx, 1);
    drv.setup_queue(&evq, 2);
    drv.driver_ok();
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
    let (kicks, calls) = (t.kick_fds(), t.call_fds());
    let mut g = Guest {
        mem: mem.clone(),
        rx,
        tx,
        rx_call: calls[0].clone(),
        tx_kick: kicks[1].clone(),
        rx_kick: kicks[0].clone(),
        rx_seen: 0,
        tx_n: 0,
        rx_n: 0,
    };
    for _ in 0..8 {
        g.give_rx_buffer();
    }

    // Host-initiated: CONNECT 1234 reaches the guest as a REQUEST.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (OP_REQUEST, 1234, CID, HOST_CID)
    );
    let host_port = req.src_port;
    g.send(hdr(OP_RESPONSE, 1234, host_port, 0), &[]);
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    host.write_all(b"hello guest").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"hello guest"[..]));
    g.send(hdr(OP_RW, 1234, host_port, data.len() as u32), &data);
    let mut back = [0u8; 11];
    host.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello guest");

    // Paused, the device moves nothing; its state lists the connection; resumed, it catches up.
    outboard_devices::Lifecycle::pause(&*t).unwrap();
    host.write_all(b"while paused").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.rx.used_idx(&g.mem), g.rx_seen, "no packet while paused");
    let state = dev.state().expect("parked state");
    assert_eq!(state.connections.len(), 1);
    assert_eq!(
        (state.connections[0].guest_port, state.connections[0].rx_cnt),
        (1234, 11)
    );
    outboard_devices::Lifecycle::resume(&*t).unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"while paused"[..]));

    // Guest-initiated: port 5000 maps to <uds>_5000.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    g.send(hdr(OP_REQUEST, 40000, 5000, 0), &[]);
    let (resp, _) = g.recv();
    assert_eq!(
        (resp.op, resp.dst_port, resp.src_port),
        (OP_RESPONSE, 40000, 5000)
    );
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    g.send(hdr(OP_RW, 40000, 5000, 4), b"ping");
    let mut ping = [0u8; 4];
    server.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"ping");
    server.write_all(b"pong").unwrap();
    let (rw, data) = g.recv();
    assert_eq!(
        (rw.op, rw.dst_port, data.as_slice()),
        (OP_RW, 40000, &b"pong"[..])
    );

    // The host closing its end shuts the stream down towards the guest.
    drop(server);
    let (sd, _) = g.recv();
    assert_eq!((sd.op, sd.dst_port, sd.flags), (OP_SHUTDOWN, 40000, 3));

    // No listener on the port: refused with RST. Garbage packets are counted, not fatal.
    g.send(hdr(OP_REQUEST, 40001, 5001, 0), &[]);
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 40001));
    g.send(
        Header {
            src_cid: 7,
            ..hdr(OP_RW, 1, 2, 0)
        },
        &[],
    );
    let (rst, _) = g.recv();
    assert_eq!(rst.op, OP_RST);
    let bad = hdr(OP_RW, 1234, host_port, 1000);
    g.send(bad, b"short");
    // The connection still works after the malformed packet.
    host.write_all(b"again").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"again"[..]));
    // Bulk host → guest beyond the guest's 64 KiB of credit: the device stalls until the
    // guest's CREDIT_UPDATE and the bytes arrive complete and in order.
    let bulk: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut host = host.try_clone().unwrap();
        let bulk = bulk.clone();
        std::thread::spawn(move || host.write_all(&bulk).unwrap())
    };
    // The guest consumes its whole credit (64 KiB less the 28 bytes so far) without telling
    // the device: the device must stop exactly there.
    let credit = 65536 - 28;
    let mut got = Vec::new();
    while got.len() < credit {
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.dst_port), (OP_RW, 1234));
        got.extend_from_slice(&data);
    }
    assert_eq!(got.len(), credit, "the device overran the guest's credit");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.rx.used_idx(&g.mem), g.rx_seen, "stalled without credit");
    while got.len() < bulk.len() {
        let mut upd = hdr(OP_CREDIT_UPDATE, 1234, host_port, 0);
        upd.fwd_cnt = 28 + got.len() as u32;
        g.send(upd, &[]);
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.dst_port), (OP_RW, 1234));
        got.extend_from_slice(&data);
    }
    writer.join().unwrap();
    assert!(got == bulk, "bulk stream corrupted");

    let counters: std::collections::BTreeMap<_, _> = outboard_devices::Lifecycle::counters(&*t)
        .into_iter()
        .collect();
    assert_eq!(counters["bad_packets"], 2);
    assert_eq!(counters["refused"], 1);
    assert_eq!(counters["host_connections"], 1);
    assert_eq!(counters["guest_connections"], 1);
}
