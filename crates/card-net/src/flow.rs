//! Inner Ethernet frame classification: addresses for anti-spoofing and forwarding, and the
//! flow hash that picks a `hash` path and the sequence space of a flow. Frames come from VMs,
//! so every field is read with bounds checks; a frame too short to classify is `None`.

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Number of flow ids (sequence spaces) per destination host; flows hashing to one id share it.
pub const FLOW_IDS: u32 = 4096;

/// What the card needs to know about an inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    /// IPv4 source, or the ARP sender protocol address.
    pub src_ip: Option<Ipv4Addr>,
    /// Flow hash: IPv4 5-tuple (ports for TCP/UDP), else MACs and ethertype.
    pub hash: u32,
}

impl FrameInfo {
    /// Flow id carried in the Geneve option.
    pub fn flow_id(&self) -> u32 {
        self.hash % FLOW_IDS
    }
}

/// True for broadcast and multicast destinations (group bit).
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn mix(mut h: u32, data: &[u8]) -> u32 {
    // FNV-1a: cheap, deterministic across hosts, good enough to spread buckets.
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

const FNV_SEED: u32 = 0x811c_9dc5;

/// Classifies a frame; `None` when it is shorter than its headers claim.
pub fn classify(frame: &[u8]) -> Option<FrameInfo> {
    let eth = frame.get(..ETH_HLEN)?;
    let dst: Mac = eth[0..6].try_into().ok()?;
    let src: Mac = eth[6..12].try_into().ok()?;
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let l3 = &frame[ETH_HLEN..];
    let (src_ip, hash) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(l3.first()? & 0x0f) * 4;
            if ihl < 20 || l3.len() < ihl {
                return None;
            }
            let proto = l3[9];
            let addrs = &l3[12..20];
            let mut h = mix(FNV_SEED, addrs);
            h = mix(h, &[proto]);
            let frag = u16::from_be_bytes([l3[6], l3[7]]) & 0x3fff != 0;
            if (proto == 6 || proto == 17) && !frag {
                if let Some(ports) = l3.get(ihl..ihl + 4) {
                    h = mix(h, ports);
                }
            }
            (Some(Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15])), h)
        }
        ETHERTYPE_ARP => {
            let spa = l3.get(14..18)?;
            let ip = Ipv4Addr::new(spa[0], spa[1], spa[2], spa[3]);
            (Some(ip), mix(mix(FNV_SEED, &src), &dst))
        }
        _ => (None, mix(mix(mix(FNV_SEED, &src), &dst), &eth[12..14])),
    };
    Some(FrameInfo {
        dst,
        src,
        ethertype,
        src_ip,
        hash,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet + IPv4 + UDP frame (checksums not filled: nothing here reads them).
    pub(crate) fn udp_frame(src: Mac, dst: Mac, sip: [u8; 4], dip: [u8; 4], sport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&sip);
        ip[16..20].copy_from_slice(&dip);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&9u16.to_be_bytes());
        f.extend_from_slice(&[0, 8, 0, 0]);
        f
    }

    #[test]
    fn ipv4_udp_hash_depends_on_ports() {
        let a = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1000,
        );
        let b = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1001,
        );
        let ia = classify(&a).unwrap();
        let ib = classify(&b).unwrap();
        assert_eq!(ia.src_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_ne!(ia.hash, ib.hash);
        assert_eq!(ia.hash, classify(&a).unwrap().hash);
        assert!(ia.flow_id() < FLOW_IDS);
    }

    #[test]
    fn truncated_frames_are_none() {
        let a = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1,
        );
        assert!(classify(&a[..13]).is_none());
        assert!(classify(&a[..20]).is_none());
        let mut bad_ihl = a.clone();
        bad_ihl[14] = 0x4f; // 60-byte IP header in a 28-byte packet
        assert!(classify(&bad_ihl).is_none());
        for len in 0..a.len() {
            let _ = classify(&a[..len]);
        }
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:0b:00:00:00:ff"),
            Some([2, 0x0b, 0, 0, 0, 0xff])
        );
        for bad in [
            "",
            "02:0b:00:00:00",
            "02:0b:00:00:00:ff:01",
            "2:0b:00:00:00:ff",
            "zz:0b:00:00:00:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn group_bit() {
        assert!(is_group(&[0xff; 6]));
        assert!(is_group(&[0x33, 0x33, 0, 0, 0, 1]));
        assert!(!is_group(&[2, 0, 0, 0, 0, 1]));
    }
}
