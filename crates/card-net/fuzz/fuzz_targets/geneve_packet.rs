//! A datagram from the underlay: Geneve parsing, then the inner frame's classification and
//! the receive checks, as the dataplane runs them. Nothing may panic; a packet that parses
//! must re-encode to the same header fields.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use outboard_card_net::{flow, geneve, table};

fuzz_target!(|data: &[u8]| {
    let Ok(pkt) = geneve::parse(data) else { return };
    if let Some(opt) = pkt.option {
        let mut buf = Vec::new();
        geneve::encapsulate(pkt.vni, pkt.oam, &opt, pkt.frame, &mut buf);
        let again = geneve::parse(&buf).expect("our own encoding parses");
        assert_eq!(
            (again.vni, again.oam, again.option, again.frame),
            (pkt.vni, pkt.oam, Some(opt), pkt.frame)
        );
    }
    if let Some(info) = flow::classify(pkt.frame) {
        let mut t = table::Table::new();
        let _ = t.add_remote(
            pkt.vni,
            info.src,
            Ipv4Addr::new(192, 168, 0, 2),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        let port = table::Port {
            vni: 7,
            mac: [2, 0, 0, 0, 0, 1],
            ip: Ipv4Addr::new(192, 168, 0, 1),
        };
        let _ = t.receive(&port, pkt.vni, &info);
        let _ = t.transmit(&port, &info);
    }
});
