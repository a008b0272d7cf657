use super::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

const VRING_DESC_F_WRITE: u16 = 2;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
    Descriptor::new(addr, len, if write { VRING_DESC_F_WRITE } else { 0 }, 0)
}

/// A TSO frame's virtio header (12 bytes, `num_buffers` 0) and a 100-byte frame.
fn tx_fixture(m: &GuestMemoryMmap) -> (VnetHdr, Vec<u8>) {
    let hdr = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: vnet::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let mut legacy = [0u8; vnet::LEN];
    hdr.write(&mut legacy);
    let mut virtio = legacy.to_vec();
    virtio.extend_from_slice(&[0, 0]);
    let frame: Vec<u8> = (0..100u8).collect();
    // Header split across two descriptors, frame in a third.
    m.write_slice(&virtio[..5], GuestAddress(0x1000)).unwrap();
    m.write_slice(&virtio[5..], GuestAddress(0x2000)).unwrap();
    m.write_slice(&frame, GuestAddress(0x3000)).unwrap();
    (hdr, frame)
}

#[test]
fn tx_chain_becomes_legacy_header_and_frame() {
    let m = mem();
    let (hdr, frame) = tx_fixture(&m);
    let chain = vec![
        desc(0x1000, 5, false),
        desc(0x2000, 7, false),
        desc(0x3000, 100, false),
    ];
    let mut buf = vec![0u8; MAX_FRAME + 64];
    let n = copy_tx_chain(&m, chain.into_iter(), &mut buf).expect("valid chain");
    assert_eq!(n, vnet::LEN + frame.len());
    assert_eq!(VnetHdr::parse(&buf), Some(hdr));
    assert_eq!(&buf[vnet::LEN..n], &frame[..]);
}

#[test]
fn hostile_tx_chains_are_refused() {
    let m = mem();
    tx_fixture(&m);
    let mut buf = vec![0u8; MAX_FRAME + 64];
    let cases: Vec<(&str, Vec<Descriptor>)> = vec![
        (
            "write-only",
            vec![desc(0x1000, 5, false), desc(0x2000, 7, true)],
        ),
        ("shorter than the header", vec![desc(0x1000, 5, false)]),
        (
            "no Ethernet header",
            vec![
                desc(0x1000, 5, false),
                desc(0x2000, 7, false),
                desc(0x3000, 4, false),
            ],
        ),
        (
            "outside guest memory",
            vec![
                desc(0x1000, 5, false),
                desc(0x2000, 7, false),
                desc(1 << 20, 100, false),
            ],
        ),
        (
            "longer than a TSO frame",
            vec![
                desc(0x1000, 5, false),
                desc(0x2000, 7, false),
                desc(0, 0xF_0000, false),
            ],
        ),
        (
            // The checksum field lies past a 40-byte frame.
            "header inconsistent with the frame",
            vec![
                desc(0x1000, 5, false),
                desc(0x2000, 7, false),
                desc(0x3000, 40, false),
            ],
        ),
    ];
    for (what, chain) in cases {
        assert_eq!(
            copy_tx_chain(&m, chain.into_iter(), &mut buf),
            None,
            "{what}"
        );
    }
    // A buffer smaller than the chain: refused, never overrun.
    let mut small = vec![0u8; 50];
    let chain = vec![
        desc(0x1000, 5, false),
        desc(0x2000, 7, false),
        desc(0x3000, 100, false),
    ];
    assert_eq!(copy_tx_chain(&m, chain.into_iter(), &mut small), None);
}

#[test]
fn rx_frame_straddles_descriptors() {
    let m = mem();
    let header: Vec<u8> = (100..112u8).collect();
    let frame: Vec<u8> = (0..50u8).collect();
    // 8 bytes of header, then 4 header + 10 frame, then the rest.
    let chain = vec![
        desc(0x1000, 8, true),
        desc(0x2000, 14, true),
        desc(0x3000, 4096, true),
    ];
    let n = write_rx_chain(&m, chain.into_iter(), &header, &frame).unwrap();
    assert_eq!(n, 62);
    let mut back = vec![0u8; 8];
    m.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
    assert_eq!(back, header[..8]);
    let mut back = vec![0u8; 14];
    m.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
    assert_eq!(&back[..4], &header[8..]);
    assert_eq!(&back[4..], &frame[..10]);
    let mut back = vec![0u8; 40];
    m.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
    assert_eq!(back, frame[10..]);
}

#[test]
fn rx_chain_too_small_or_read_only_is_refused() {
    let m = mem();
    let header = [0u8; VIRTIO_HDR];
    let frame = [7u8; 200];
    let small = vec![desc(0x1000, 100, true)];
    assert_eq!(write_rx_chain(&m, small.into_iter(), &header, &frame), None);
    let read_only = vec![desc(0x1000, 4096, false)];
    assert_eq!(
        write_rx_chain(&m, read_only.into_iter(), &header, &frame),
        None
    );
    let outside = vec![desc((1 << 20) - 10, 4096, true)];
    assert_eq!(
        write_rx_chain(&m, outside.into_iter(), &header, &frame),
        None
    );
}
