//! The card's vhost-user-net virtual port (`outboard_card_net::vport`) against a real frontend:
//! outboard-vmm's virtio-net device driven by the test guest. The test reads every frame the
//! guest sends from the port, as the card's dataplane does, and writes it back; the guest's
//! `net-exchange` checks that each sequence-numbered frame returns once.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{exit_code, temp_path, testguest, TIMEOUT};
use outboard_card_net::vport::{VirtualPort, MAX_FRAME};
use outboard_guest_harness::kvm_available;

/// Echoes frames through `port` until `stop`, swapping nothing: the guest accepts its own frames.
fn echo(port: Arc<VirtualPort>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_FRAME + 64];
        let mut echoed = 0;
        while !stop.load(Relaxed) {
            let mut pfd = libc::pollfd {
                fd: port.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one pollfd we own for the call's duration.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            loop {
                match port.read(&mut buf) {
                    Ok(n) => {
                        port.write(&buf[..n]).expect("write back");
                        echoed += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("port read: {e}"),
                }
            }
        }
        echoed
    })
}

#[test]
fn test_guest_frames_cross_the_card_port_and_come_back() {
    const TEST: &str = "test_guest_frames_cross_the_card_port_and_come_back";
    if !kvm_available(TEST) {
        return;
    }
    let socket = temp_path(TEST, ".net.sock");
    let port = Arc::new(VirtualPort::serve(&socket).expect("serve the port"));
    let stop = Arc::new(AtomicBool::new(false));
    let echoer = echo(port.clone(), stop.clone());
    let frames = 200;
    let vm = testguest(Some("net-exchange"))
        .cmdline(&format!(
            "outboard.net_echo=1 outboard.net_frames={frames} outboard.virtio_irq=1"
        ))
        .args([
            "--net",
            &format!("socket={},mac=52:54:00:ca:4d:01", socket.display()),
        ])
        .spawn()
        .unwrap();
    let r = vm.expect_fields("OUTBOARD_NET_RESULT", TIMEOUT);
    assert_eq!(r["ok"], "1", "{r:?}\n{}", vm.stderr());
    assert_eq!(r["received"], frames.to_string());
    assert_eq!((r["lost"].as_str(), r["duplicated"].as_str()), ("0", "0"));
    assert_eq!(exit_code(&vm), 0);
    stop.store(true, Relaxed);
    let echoed = echoer.join().unwrap();
    let c = port.counters();
    assert_eq!(echoed, frames);
    assert_eq!(c.tx_frames.load(Relaxed), frames);
    assert_eq!(c.rx_frames.load(Relaxed), frames);
    assert_eq!(c.tx_malformed.load(Relaxed), 0);
    assert_eq!(c.connections.load(Relaxed), 1);
    // The VMM is gone; the port waits for the next one without complaint.
    std::thread::sleep(Duration::from_millis(50));
    let _ = std::fs::remove_file(&socket);
}
