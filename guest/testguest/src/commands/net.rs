//! `net-exchange`: sends `outboard.net_frames=` (32) frames of ethertype 0x88B5 carrying a
//! sequence number to `outboard.net_dst=` (broadcast) and counts the frames that come back.
//! With `outboard.net_echo=1` every frame is expected back (a host echo backend) within
//! `outboard.net_timeout_ms=` (5000) of the last send, at most 16 outstanding at a time.
//!
//! Result: `OUTBOARD_NET_RESULT ok=<0|1> sent=<n> received=<n> lost=<n> duplicated=<n>
//! out_of_order=<n> unknown=<n> other=<frames not ours> mac=<guest MAC>`.

use super::Env;
use crate::println;
use crate::virtio::net::Net;
use crate::virtio::{packet, Deadline};
use outboard_testguest_parse::netframe::{self, Tracker};

const NAME: &str = "net-exchange";
/// Frames in flight towards an echo backend: fewer than the receive buffers, so nothing drops.
const ECHO_WINDOW: u32 = 16;

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

pub fn run(env: &Env) {
    let Some(frames) = env.param_u64(NAME, "outboard.net_frames", 32) else {
        return;
    };
    let Some(echo) = env.param_u64(NAME, "outboard.net_echo", 0) else {
        return;
    };
    let Some(timeout_ms) = env.param_u64(NAME, "outboard.net_timeout_ms", 5000) else {
        return;
    };
    let dst = match env.cmdline().get("outboard.net_dst") {
        None => netframe::BROADCAST,
        Some(s) => match netframe::parse_mac(s) {
            Some(mac) => mac,
            None => {
                println!("OUTBOARD_GUEST_ERROR {NAME}: bad MAC in outboard.net_dst");
                return;
            }
        },
    };
    let frames = frames.min(netframe::MAX_FRAMES as u64) as u32;
    let echo = echo != 0;
    let mut net = match Net::open() {
        Ok(n) => n,
        Err(e) => {
            println!("OUTBOARD_GUEST_ERROR {NAME}: {e}");
            return;
        }
    };
    println!(
        "outboard-testguest: net {}: mac={} msix={}",
        net.dev.bdf,
        Mac(net.mac),
        net.dev.msix.map_or(0, |m| m.cap.table_size)
    );
    let mut tracker = Tracker::new(frames);
    let mut other = 0u32;
    let mut sent = 0u32;
    let mut frame = [0u8; netframe::FRAME_LEN];
    let mut rx = [0u8; packet::BUF_LEN as usize];
    let timeout_ns = timeout_ms.saturating_mul(1_000_000);
    let mut deadline = Deadline::new(env.clock, timeout_ns);
    let mut failure = None;
    loop {
        let mut progressed = false;
        let outstanding = sent - tracker.received.min(sent);
        let may_send = sent < frames && (!echo || outstanding < ECHO_WINDOW);
        if may_send {
            netframe::build(&mut frame, dst, net.mac, sent);
            match net.send(&frame) {
                Ok(true) => {
                    sent += 1;
                    progressed = true;
                    deadline = Deadline::new(env.clock, timeout_ns);
                }
                Ok(false) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match net.recv(&mut rx) {
            Ok(Some(f)) => match netframe::parse(f).inspect(|_| progressed = true) {
                Some(seq) => {
                    tracker.record(seq);
                    deadline = Deadline::new(env.clock, timeout_ns);
                }
                None => {
                    other += 1;
                    progressed = true;
                }
            },
            Ok(None) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if !progressed {
            crate::irq::wait();
        }
        let all_back = !echo || tracker.received >= frames;
        let tx_done = sent == frames && net.queues.tx_in_flight().unwrap_or(1) == 0;
        if (tx_done && all_back) || deadline.expired() {
            break;
        }
    }
    crate::irq::report();
    if let Err(e) = net.dev.check() {
        failure = Some(e);
    }
    let ok = failure.is_none()
        && sent == frames
        && (!echo || (tracker.lost() == 0 && tracker.duplicated == 0 && tracker.unknown == 0));
    println!(
        "OUTBOARD_NET_RESULT ok={} sent={sent} received={} lost={} duplicated={} out_of_order={} unknown={} other={other} mac={} irqs={}{}",
        u8::from(ok),
        tracker.received,
        if echo { tracker.lost() } else { 0 },
        tracker.duplicated,
        tracker.out_of_order,
        tracker.unknown,
        Mac(net.mac),
        crate::irq::device_interrupts(),
        if failure.is_some() { " error=device" } else { "" }
    );
    if let Some(e) = failure {
        println!("outboard-testguest: {NAME}: {e}");
    }
    let _ = net.dev.reset();
}
