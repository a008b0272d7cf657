//! vhost-user-net frontend against a small echo backend built on rust-vmm's
//! `vhost-user-backend` (no ready vhost-user-net backend is installed here): frames the guest
//! transmits on TX come back on RX, passing through the vring set-up the frontend did.

mod common;
#[path = "common/net_echo.rs"]
mod net_echo;

use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, Driver, Vq};
use net_echo::{serve, Echo, RX, TX};
use outboard_boot::memory::GuestRam;
use outboard_pci::{PciDevice, RecordingInterrupts};
use outboard_virtio_devices::transport::{VirtioPciTransport, STATUS_NEEDS_RESET};
use outboard_virtio_devices::vhost_user::{Kind, VhostUserDevice};
use outboard_virtio_devices::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn frames_echo_through_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let backend = Arc::new(Echo::default());
    let _server = serve(sock.clone(), backend.clone());
    assert!(wait_until(Duration::from_secs(5), || sock.exists()));

    let ram = GuestRam::new(32 << 20).unwrap();
    let mem = ram.memory().clone();
    let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    let dev =
        VhostUserDevice::connect(Kind::Net { mac: Some(mac) }, sock, 2, 256, mem.clone()).unwrap();
    let irqs = Arc::new(RecordingInterrupts::default());
    let t = Arc::new(
        VirtioPciTransport::new(
            "virtio-net",
            dev.clone(),
            mem.clone(),
            irqs.clone(),
            irqs.clone(),
        )
        .unwrap(),
    );
    let drv = Driver::new(t.clone());
    let features = drv.negotiate(VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 16));
    assert_eq!(
        features,
        VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 16),
        "MAC and STATUS offered"
    );
    let mut cfg = [0u8; 8];
    t.bar_read(0, 0x2000, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");

    let mut rx = Vq::new(0, 256, 0x10_0000);
    let mut tx = Vq::new(1, 256, 0x20_0000);
    drv.setup_queue(&rx, 0);
    drv.setup_queue(&tx, 1);
    drv.driver_ok();
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
    let (kicks, calls) = (t.kick_fds(), t.call_fds());

    for n in 0..8u16 {
        let rx_buf = 0x40_0000 + u64::from(n) * 0x1000;
        let tx_buf = 0x60_0000 + u64::from(n) * 0x1000;
        rx.push(&mem, &[(rx_buf, 2048, true)]);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(&n.to_be_bytes());
        frame.resize(12 + 60, 0x5a);
        mem.write_slice(&frame, GuestAddress(tx_buf)).unwrap();
        tx.push(&mem, &[(tx_buf, frame.len() as u32, false)]);
        kicks[TX].write(1).unwrap();
        rx.wait_used(&mem, &calls[RX], n + 1)
            .expect("no echoed frame");
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(rx_buf)).unwrap();
        assert_eq!(got, frame, "frame {n}");
        let used_len: u32 = mem
            .read_obj(GuestAddress(rx.used + 4 + 8 * u64::from(n % 256) + 4))
            .unwrap();
        assert_eq!(used_len as usize, frame.len());
    }
    assert_eq!(*backend.echoed.lock().unwrap(), 8);

    // The driver resets the device and sets it up again with rings elsewhere (a guest
    // reboot or driver reload): the backend follows.
    drv.negotiate(VIRTIO_F_VERSION_1);
    let mut rx = Vq::new(0, 128, 0x80_0000);
    let mut tx = Vq::new(1, 128, 0x90_0000);
    drv.setup_queue(&rx, 0);
    drv.setup_queue(&tx, 1);
    drv.driver_ok();
    assert_eq!(drv.status() & STATUS_NEEDS_RESET, 0);
    rx.push(&mem, &[(0xa0_0000, 2048, true)]);
    let frame = [0x42u8; 12 + 60];
    mem.write_slice(&frame, GuestAddress(0xa1_0000)).unwrap();
    tx.push(&mem, &[(0xa1_0000, frame.len() as u32, false)]);
    kicks[TX].write(1).unwrap();
    rx.wait_used(&mem, &calls[RX], 1)
        .expect("no echo after the reset");
    let mut got = [0u8; 12 + 60];
    mem.read_slice(&mut got, GuestAddress(0xa0_0000)).unwrap();
    assert_eq!(got, frame);
    assert_eq!(t.counters.vmm_notifications.get(), 0);
    dev.shutdown();
}
