//! vhost-user-blk frontend against a real backend (qemu-storage-daemon): this test plays the
//! guest driver over memfd guest RAM, writes blocks through the vring, kills and restarts the
//! backend, and checks the device reconnects and the next requests complete.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, Driver, Vq};
use outboard_boot::memory::GuestRam;
use outboard_pci::RecordingInterrupts;
use outboard_virtio_devices::transport::{VirtioPciTransport, STATUS_NEEDS_RESET};
use outboard_virtio_devices::vhost_user::{Kind, StartError, VhostUserDevice};
use outboard_virtio_devices::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSD: &str = "qemu-storage-daemon";
const DISK_SIZE: u64 = 4 << 20;
const REQ_OUT: u32 = 1;
const REQ_IN: u32 = 0;

struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(image: &Path, sock: &Path) -> Self {
        Self::spawn(image, sock, None)
    }

    /// A backend whose writes are throttled to `bps` bytes/s, so requests stay in flight.
    fn throttled(image: &Path, sock: &Path, bps: u64) -> Self {
        Self::spawn(image, sock, Some(bps))
    }

    fn spawn(image: &Path, sock: &Path, bps: Option<u64>) -> Self {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new(QSD);
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ));
        let node = match bps {
            Some(bps) => {
                cmd.arg("--object")
                    .arg(format!("throttle-group,id=tg0,x-bps-write={bps}"))
                    .arg("--blockdev")
                    .arg("driver=throttle,node-name=t0,throttle-group=tg0,file=f0");
                "t0"
            }
            None => "f0",
        };
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ));
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        assert!(
            wait_until(Duration::from_secs(10), || sock.exists()),
            "socket never appeared"
        );
        Qsd { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn have_qsd() -> bool {
    Command::new(QSD).arg("--version").output().is_ok()
}

/// Writes a virtio-blk request chain: header, data, status byte. Returns the status address.
fn request(
    mem: &GuestMemoryMmap,
    vq: &mut Vq,
    scratch: u64,
    kind: u32,
    sector: u64,
    data: &[u8],
) -> u64 {
    let hdr = scratch;
    let buf = scratch + 0x1000;
    let status = scratch + 0x3000;
    mem.write_obj(kind, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    if kind == REQ_OUT {
        mem.write_slice(data, GuestAddress(buf)).unwrap();
    }
    vq.push(
        mem,
        &[
            (hdr, 16, false),
            (buf, data.len() as u32, kind == REQ_IN),
            (status, 1, true),
        ],
    );
    status
}

#[test]
fn unreachable_socket_is_a_clear_error() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let err = VhostUserDevice::connect(
        Kind::Block,
        "/nonexistent/outboard.sock".into(),
        1,
        128,
        ram.memory().clone(),
    )
    .unwrap_err();
    assert!(matches!(err, StartError::Connect { .. }));
    assert_eq!(
        err.to_string(),
        "Cannot connect to vhost-user backend /nonexistent/outboard.sock"
    );
}

#[test]
fn write_kill_restart_write() {
    if !have_qsd() {
        eprintln!("SKIP: {QSD} not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let mem = ram.memory().clone();
    let mut qsd = Qsd::start(&image, &sock);

    let dev = VhostUserDevice::connect(Kind::Block, sock.clone(), 2, 256, mem.clone()).unwrap();
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = Arc::new(
        VirtioPciTransport::new(
            "virtio-blk",
            dev.clone(),
            mem.clone(),
            irqs.clone(),
            irqs.clone(),
        )
        .unwrap(),
    );
    let drv = Driver::new(t.clone());
    // Capacity comes from the backend's config space (GET_CONFIG), in 512-byte sectors.
    assert_eq!(drv.r(0x2000, 8), DISK_SIZE / 512);
    drv.negotiate(VIRTIO_F_VERSION_1);
    let mut q0 = Vq::new(0, 256, 0x10_0000);
    let mut q1 = Vq::new(1, 256, 0x20_0000);
    drv.setup_queue(&q0, 0);
    drv.setup_queue(&q1, 1);
    drv.driver_ok();
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
    let kicks = t.kick_fds();
    let calls = t.call_fds();

    // Request 1 on queue 0: 4 KiB at sector 8.
    let data1: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let st = request(&mem, &mut q0, 0x40_0000, REQ_OUT, 8, &data1);
    kicks[0].write(1).unwrap();
    q0.wait_used(&mem, &calls[0], 1).expect("no completion");
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[8 * 512..8 * 512 + 4096], &data1[..]);

    // The backend dies and comes back on the same socket.
    qsd.kill();
    assert!(
        wait_until(Duration::from_secs(5), || !dev.connected()),
        "disconnect not noticed"
    );
    // A request submitted while the backend is away completes after it returns.
    let data2: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    let st2 = request(&mem, &mut q0, 0x50_0000, REQ_OUT, 64, &data2);
    kicks[0].write(1).unwrap();
    let _qsd2 = Qsd::start(&image, &sock);
    assert!(
        wait_until(Duration::from_secs(10), || dev.connected()),
        "no reconnect"
    );
    q0.wait_used(&mem, &calls[0], 2)
        .expect("no completion after reconnect");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st2)).unwrap(), 0);

    // Queue 1 works too, and reads back what queue 0 wrote.
    let st3 = request(&mem, &mut q1, 0x60_0000, REQ_IN, 8, &[0u8; 4096]);
    kicks[1].write(1).unwrap();
    q1.wait_used(&mem, &calls[1], 1)
        .expect("no completion on queue 1");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st3)).unwrap(), 0);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x60_1000)).unwrap();
    assert_eq!(back, data1);

    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[64 * 512..64 * 512 + 4096], &data2[..]);
    assert_eq!(
        drv.status() & STATUS_NEEDS_RESET,
        0,
        "the guest saw no error"
    );
    let counters: std::collections::BTreeMap<_, _> = outboard_devices::Lifecycle::counters(&*t)
        .into_iter()
        .collect();
    eprintln!("counters after 3 I/Os: {counters:?}");
    let state = dev.state();
    eprintln!(
        "protocol features {:#x}, inflight region {:?}",
        state.protocol_features, state.inflight
    );
    assert_eq!(counters["reconnects"], 1);
    // The VMM's only thread for this device woke once: for the hang-up, not for any I/O.
    assert_eq!(counters["monitor_wakeups"], 1);
    assert_eq!(
        counters["vmm_notifications"], 0,
        "kicks never passed through the VMM"
    );

    // Live update: pause the rings (GET_VRING_BASE), hand the connection, inflight region and
    // eventfds to a "successor" that maps guest memory anew, and resume there.
    let paused_at = std::time::Instant::now();
    outboard_devices::Lifecycle::pause(&*t).unwrap();
    let pause_took = paused_at.elapsed();
    let data4: Vec<u8> = (0..4096u32).map(|i| (i * 3 + 5) as u8).collect();
    let st4 = request(&mem, &mut q0, 0x70_0000, REQ_OUT, 128, &data4);
    kicks[0].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q0.used_idx(&mem), 2, "a paused ring must not make progress");
    let state = dev.state();
    assert!(state.paused && state.vrings.len() == 2);
    assert_eq!(state.vrings[0].base, 2, "GET_VRING_BASE: next avail index");
    let transport_state = t.state();
    let (sock_fd, inflight_fd) = dev.handover_fds().unwrap();
    dev.shutdown();
    drop(drv);
    drop(t);
    drop(dev);

    let file = ram.memfd().try_clone().unwrap();
    let mem2 = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        64 << 20,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .unwrap();
    let switch_at = std::time::Instant::now();
    let dev2 = VhostUserDevice::adopt(
        Kind::Block,
        sock.clone(),
        2,
        256,
        mem2.clone(),
        state,
        sock_fd.expect("connected"),
        inflight_fd,
        &kicks,
        &calls,
    )
    .unwrap();
    let irqs2 = Arc::new(RecordingInterrupts::default());
    let t2 = Arc::new(
        VirtioPciTransport::with_eventfds(
            "virtio-blk",
            dev2.clone(),
            mem2.clone(),
            irqs2.clone(),
            irqs2.clone(),
            Some((kicks.clone(), calls.clone())),
        )
        .unwrap(),
    );
    t2.restore_state(transport_state.clone()).unwrap();
    assert_eq!(t2.state(), transport_state);
    outboard_devices::Lifecycle::resume(&*t2).unwrap();
    let switch_took = switch_at.elapsed();
    q0.wait_used(&mem2, &calls[0], 3)
        .expect("no completion after handover");
    assert_eq!(mem2.read_obj::<u8>(GuestAddress(st4)).unwrap(), 0);
    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[128 * 512..128 * 512 + 4096], &data4[..]);
    assert_eq!(t2.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(
        dev2.counters.reconnects.get() + dev2.counters.disconnects.get(),
        0,
        "the backend never saw a disconnect"
    );
    eprintln!(
        "FIGURE pause (GET_VRING_BASE x2): {pause_took:?}; adopt + restore + resume: {switch_took:?}"
    );
    dev2.shutdown();
}

#[test]
fn requests_in_flight_survive_a_backend_kill() {
    if !have_qsd() {
        eprintln!("SKIP: {QSD} not installed");
        return;
    }
    const N: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let mem = ram.memory().clone();
    // 64 KiB/s: the 256 KiB written below take seconds, so most requests are in flight (or
    // not yet taken) when the backend dies.
    let mut qsd = Qsd::throttled(&image, &sock, 64 * 1024);
    let dev = VhostUserDevice::connect(Kind::Block, sock.clone(), 2, 256, mem.clone()).unwrap();
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = Arc::new(
        VirtioPciTransport::new("virtio-blk", dev.clone(), mem.clone(), irqs.clone(), irqs)
            .unwrap(),
    );
    let drv = Driver::new(t.clone());
    drv.negotiate(VIRTIO_F_VERSION_1);
    let mut q0 = Vq::new(0, 256, 0x10_0000);
    drv.setup_queue(&q0, 0);
    drv.driver_ok();

    // 64 writes of 4 KiB queued at once, then the backend is killed while working on them.
    let pattern =
        |i: u64| -> Vec<u8> { (0..4096u64).map(|b| (b * 31 + i * 7 + 1) as u8).collect() };
    let mut statuses = Vec::new();
    for i in 0..N {
        statuses.push(request(
            &mem,
            &mut q0,
            0x40_0000 + i * 0x4000,
            REQ_OUT,
            i * 8,
            &pattern(i),
        ));
    }
    t.kick_fds()[0].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    qsd.kill();
    let done_before = q0.used_idx(&mem);
    let _qsd2 = Qsd::start(&image, &sock);
    if q0.wait_used(&mem, &t.call_fds()[0], N as u16).is_none() {
        let counters = outboard_devices::Lifecycle::counters(&*t);
        panic!(
            "{} of {N} requests completed after the restart ({done_before} before); {counters:?}",
            q0.used_idx(&mem)
        );
    }
    for (i, st) in statuses.iter().enumerate() {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(*st)).unwrap(),
            0,
            "request {i}"
        );
    }
    let file = std::fs::read(&image).unwrap();
    for i in 0..N {
        let at = (i * 8 * 512) as usize;
        assert_eq!(
            &file[at..at + 4096],
            &pattern(i)[..],
            "block of request {i}"
        );
    }
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
    eprintln!("{done_before} of {N} requests had completed when the backend was killed");
}
