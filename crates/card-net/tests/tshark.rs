//! Our encapsulation as another implementation reads it: a packet built by
//! `geneve::encapsulate` is written to a pcap file and decoded by tshark's Geneve dissector.
//! Prints `SKIP:` when tshark is not installed.

use std::process::Command;

use outboard_card_net::geneve::{self, OutboardOption};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + UDP around `payload`.
fn outer(payload: &[u8], src_port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0xb]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0xa]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = 0x02; // ECT(0), as the dataplane sends
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 1, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 9, 0, 2]);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&geneve::PORT.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(payload);
    f
}

fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&4u16.to_le_bytes());
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&65535u32.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
    for (i, f) in frames.iter().enumerate() {
        p.extend_from_slice(&(i as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&(f.len() as u32).to_le_bytes());
        p.extend_from_slice(&(f.len() as u32).to_le_bytes());
        p.extend_from_slice(f);
    }
    p
}

#[test]
fn tshark_decodes_our_packets_as_geneve() {
    if Command::new("tshark").arg("--version").output().is_err() {
        eprintln!("SKIP: tshark is not installed (apt-get install -y tshark)");
        return;
    }
    // Inner frame: an ARP request from the VM.
    let mut inner = Vec::new();
    inner.extend_from_slice(&[0xff; 6]);
    inner.extend_from_slice(&[2, 0x0b, 0, 0, 0, 1]);
    inner.extend_from_slice(&0x0806u16.to_be_bytes());
    inner.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0x0b, 0, 0, 0, 1, 192, 168, 77, 1]);
    inner.extend_from_slice(&[0; 6]);
    inner.extend_from_slice(&[192, 168, 77, 2]);
    let opt = OutboardOption {
        seq: 7,
        flow: 99,
        path: 1,
        tx_ts: 1234,
        ..Default::default()
    };
    let mut dgram = Vec::new();
    geneve::encapsulate(4242, false, &opt, &inner, &mut dgram);
    let dir = tempdir();
    let file = dir.join("geneve.pcap");
    std::fs::write(&file, pcap(&[outer(&dgram, 40002)])).unwrap();
    let out = Command::new("tshark")
        .args(["-r", file.to_str().unwrap(), "-V"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "Generic Network Virtualization Encapsulation",
        "Virtual Network Identifier (VNI): 0x001092",
        "Class: Experimental (0xfff0) Type: 0x01 (Non-critical)",
        // seq 7, flow 99, path 1, no echo, tx_ts 1234, echo_ts 0.
        "Option Data: 000000070000006301000000000004d200000000",
        "Address Resolution Protocol (request)",
        "Sender IP address: 192.168.77.1",
    ] {
        assert!(text.contains(want), "tshark output lacks {want:?}:\n{text}");
    }
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("obnet-tshark-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
