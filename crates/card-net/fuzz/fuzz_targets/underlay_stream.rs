//! A stream of datagrams from the underlay as the receive path handles them: Geneve parsing,
//! the reorder buffer and frame reassembly (hostile fragment flags, sequence numbers and
//! offload options), then the virtio-net header check before a frame would reach the TAP.
//! Nothing may panic, and memory stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_card_net::frag::{Piece, Reassembly, MAX_FRAME};
use outboard_card_net::reorder::{Limits, Reorder};
use outboard_card_net::{geneve, vnet};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        window: 16,
        max_flows: 4,
        max_buffered: 64,
        timeout_us: 50,
    };
    let mut reorder = Reorder::new(limits);
    let mut frames = Reassembly::new(4);
    let mut out = Vec::new();
    // Datagrams are length-prefixed (one byte) in the input; the clock ticks per datagram.
    let mut rest = data;
    let mut now = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (dgram, tail) = tail.split_at(len);
        rest = tail;
        now += 10;
        let Ok(pkt) = geneve::parse(dgram) else {
            continue;
        };
        let Some(opt) = pkt.option else { continue };
        let key = (opt.sender, opt.flow % 8);
        let piece = Piece::new(opt.seq, opt.frag, pkt.offload, pkt.frame);
        reorder.push(key, opt.seq, (key, piece), now, &mut out);
        reorder.poll(now, &mut out);
        assert!(reorder.buffered() <= 64);
        for (key, piece) in out.drain(..) {
            if let Some(f) = frames.push(key, piece, now) {
                assert!(f.buf.len() <= vnet::LEN + MAX_FRAME);
                let hdr = f.offload.map(vnet::VnetHdr::from).unwrap_or_default();
                let _ = hdr.valid_for(f.buf.len() - vnet::LEN);
            }
        }
        assert!(frames.pending() <= 4);
    }
});
