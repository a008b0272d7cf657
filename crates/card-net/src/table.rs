//! The overlay mapping table: which virtual network (VNI) a local VM port is on, and for each
//! virtual network which host (underlay address) serves each remote VM MAC/IP.
//!
//! It also enforces isolation. On transmit, a VM's frame must carry the port's own MAC and
//! IPv4 address (ARP included), and may only reach MACs mapped in its own VNI. On receive, the
//! VNI must be the port's, and the inner source must be a VM mapped in that VNI with the IPv4
//! address the mapping gives it. Anything else is a [`Drop`] the caller counts.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::flow::{is_group, FrameInfo, Mac, ETHERTYPE_ARP, ETHERTYPE_IPV4};

/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// A table change that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("VNI {0} is out of range")]
    Vni(u32),
    #[error("MAC {0:02x?} is a group address")]
    GroupMac(Mac),
}

/// A local VM's NIC: its virtual network and its only allowed addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub vni: u32,
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Transmit: source MAC/IP is not the port's.
    Spoofed,
    /// Transmit: an ethertype we do not carry (IPv6 until ports get IPv6 addresses).
    Unsupported,
    /// Transmit: a unicast MAC not mapped in the port's VNI.
    UnknownDestination,
    /// Receive: VNI is not the port's.
    WrongVni,
    /// Receive: inner source is not a VM of this VNI, or not with its mapped IP.
    UnknownSource,
    /// Receive: unicast to a MAC that is not the port's.
    NotForUs,
}

/// Where a transmitted frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Host(Ipv4Addr),
    /// Broadcast/multicast: replicated to every host of the VNI.
    Flood(Vec<Ipv4Addr>),
}

#[derive(Debug, Clone, Copy)]
struct Remote {
    ip: Ipv4Addr,
    host: Ipv4Addr,
}

/// The mapping table (set through the card API; one per card).
#[derive(Debug, Default, Clone)]
pub struct Table {
    nets: HashMap<u32, HashMap<Mac, Remote>>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps remote VM `mac`/`ip` in `vni` to the host at `host`.
    pub fn add_remote(
        &mut self,
        vni: u32,
        mac: Mac,
        ip: Ipv4Addr,
        host: Ipv4Addr,
    ) -> Result<(), Error> {
        if vni > MAX_VNI {
            return Err(Error::Vni(vni));
        }
        if is_group(&mac) {
            return Err(Error::GroupMac(mac));
        }
        self.nets
            .entry(vni)
            .or_default()
            .insert(mac, Remote { ip, host });
        Ok(())
    }

    /// Every mapping as (VNI, MAC, IP, host), sorted.
    pub fn list(&self) -> Vec<(u32, Mac, Ipv4Addr, Ipv4Addr)> {
        let mut v: Vec<_> = self
            .nets
            .iter()
            .flat_map(|(vni, n)| n.iter().map(|(mac, r)| (*vni, *mac, r.ip, r.host)))
            .collect();
        v.sort();
        v
    }

    pub fn remove_remote(&mut self, vni: u32, mac: &Mac) -> bool {
        self.nets
            .get_mut(&vni)
            .is_some_and(|n| n.remove(mac).is_some())
    }

    /// Every host serving a VM of `vni`, once each, sorted.
    pub fn hosts(&self, vni: u32) -> Vec<Ipv4Addr> {
        let mut hosts: Vec<Ipv4Addr> = self
            .nets
            .get(&vni)
            .map(|n| n.values().map(|r| r.host).collect())
            .unwrap_or_default();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Checks a frame from the local VM and finds where it goes.
    pub fn transmit(&self, port: &Port, f: &FrameInfo) -> Result<Dest, Drop> {
        if f.src != port.mac {
            return Err(Drop::Spoofed);
        }
        match f.ethertype {
            ETHERTYPE_IPV4 if f.src_ip != Some(port.ip) => return Err(Drop::Spoofed),
            // ARP probes (RFC 5227) announce sender 0.0.0.0.
            ETHERTYPE_ARP
                if f.src_ip != Some(port.ip) && f.src_ip != Some(Ipv4Addr::UNSPECIFIED) =>
            {
                return Err(Drop::Spoofed)
            }
            ETHERTYPE_IPV4 | ETHERTYPE_ARP => {}
            _ => return Err(Drop::Unsupported),
        }
        if is_group(&f.dst) {
            let hosts = self.hosts(port.vni);
            return if hosts.is_empty() {
                Err(Drop::UnknownDestination)
            } else {
                Ok(Dest::Flood(hosts))
            };
        }
        self.nets
            .get(&port.vni)
            .and_then(|n| n.get(&f.dst))
            .map(|r| Dest::Host(r.host))
            .ok_or(Drop::UnknownDestination)
    }

    /// Checks a decapsulated frame for the local port; returns the sending host.
    pub fn receive(&self, port: &Port, vni: u32, f: &FrameInfo) -> Result<Ipv4Addr, Drop> {
        if vni != port.vni {
            return Err(Drop::WrongVni);
        }
        let remote = self
            .nets
            .get(&vni)
            .and_then(|n| n.get(&f.src))
            .ok_or(Drop::UnknownSource)?;
        match f.ethertype {
            ETHERTYPE_IPV4 | ETHERTYPE_ARP if f.src_ip != Some(remote.ip) => {
                if !(f.ethertype == ETHERTYPE_ARP && f.src_ip == Some(Ipv4Addr::UNSPECIFIED)) {
                    return Err(Drop::UnknownSource);
                }
            }
            ETHERTYPE_IPV4 | ETHERTYPE_ARP => {}
            _ => return Err(Drop::UnknownSource),
        }
        if f.dst != port.mac && !is_group(&f.dst) {
            return Err(Drop::NotForUs);
        }
        Ok(remote.host)
    }
}

/// The card's table shared between the API (which edits it) and dataplane workers (which
/// take a copy whenever its generation moves, so the packet path never waits on a lock).
#[derive(Debug, Clone, Default)]
pub struct SharedTable(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    table: Mutex<Table>,
    generation: AtomicU64,
}

impl SharedTable {
    pub fn new(table: Table) -> Self {
        Self(Arc::new(Shared {
            table: Mutex::new(table),
            generation: AtomicU64::new(1),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the table; workers pick the change up within a poll interval.
    pub fn edit<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let r = f(&mut self.lock());
        self.0.generation.fetch_add(1, Ordering::Release);
        r
    }

    /// Changes with every edit.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Table {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{classify, tests::udp_frame};

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];
    const C: Mac = [2, 0, 0, 0, 0, 3];
    const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
    const HOST_C: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 3);

    fn setup() -> (Table, Port) {
        let mut t = Table::new();
        t.add_remote(7, B, Ipv4Addr::new(192, 168, 0, 2), HOST_B)
            .unwrap();
        // C lives in another virtual network, on another host.
        t.add_remote(8, C, Ipv4Addr::new(192, 168, 0, 3), HOST_C)
            .unwrap();
        let port = Port {
            vni: 7,
            mac: A,
            ip: Ipv4Addr::new(192, 168, 0, 1),
        };
        (t, port)
    }

    fn info(src: Mac, dst: Mac, sip: [u8; 4]) -> FrameInfo {
        classify(&udp_frame(src, dst, sip, [192, 168, 0, 9], 5)).unwrap()
    }

    #[test]
    fn transmit_to_mapped_vm_only_in_own_vni() {
        let (t, p) = setup();
        assert_eq!(
            t.transmit(&p, &info(A, B, [192, 168, 0, 1])),
            Ok(Dest::Host(HOST_B))
        );
        assert_eq!(
            t.transmit(&p, &info(A, C, [192, 168, 0, 1])),
            Err(Drop::UnknownDestination)
        );
        assert_eq!(
            t.transmit(&p, &info(A, [0xff; 6], [192, 168, 0, 1])),
            Ok(Dest::Flood(vec![HOST_B]))
        );
    }

    #[test]
    fn transmit_spoofing_dropped() {
        let (t, p) = setup();
        assert_eq!(
            t.transmit(&p, &info(B, B, [192, 168, 0, 1])),
            Err(Drop::Spoofed)
        );
        assert_eq!(
            t.transmit(&p, &info(A, B, [192, 168, 0, 2])),
            Err(Drop::Spoofed)
        );
        let mut v6 = udp_frame(A, B, [0; 4], [0; 4], 1);
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(
            t.transmit(&p, &classify(&v6).unwrap()),
            Err(Drop::Unsupported)
        );
    }

    #[test]
    fn receive_checks_vni_source_and_destination() {
        let (t, p) = setup();
        assert_eq!(t.receive(&p, 7, &info(B, A, [192, 168, 0, 2])), Ok(HOST_B));
        assert_eq!(
            t.receive(&p, 8, &info(B, A, [192, 168, 0, 2])),
            Err(Drop::WrongVni)
        );
        // C is a VM of VNI 8 pretending to be in 7.
        assert_eq!(
            t.receive(&p, 7, &info(C, A, [192, 168, 0, 3])),
            Err(Drop::UnknownSource)
        );
        // B with another VM's IP.
        assert_eq!(
            t.receive(&p, 7, &info(B, A, [192, 168, 0, 3])),
            Err(Drop::UnknownSource)
        );
        assert_eq!(
            t.receive(&p, 7, &info(B, C, [192, 168, 0, 2])),
            Err(Drop::NotForUs)
        );
    }

    #[test]
    fn bad_table_entries_rejected() {
        let mut t = Table::new();
        assert_eq!(
            t.add_remote(1 << 24, B, Ipv4Addr::LOCALHOST, HOST_B),
            Err(Error::Vni(1 << 24))
        );
        assert!(t
            .add_remote(1, [0xff; 6], Ipv4Addr::LOCALHOST, HOST_B)
            .is_err());
        t.add_remote(1, B, Ipv4Addr::LOCALHOST, HOST_B).unwrap();
        assert_eq!(t.list(), vec![(1, B, Ipv4Addr::LOCALHOST, HOST_B)]);
        assert!(t.remove_remote(1, &B));
        assert!(!t.remove_remote(1, &B));
        assert!(t.hosts(1).is_empty());
        let shared = SharedTable::new(t);
        let g = shared.generation();
        shared
            .edit(|t| t.add_remote(2, C, Ipv4Addr::LOCALHOST, HOST_C))
            .unwrap();
        assert!(shared.generation() > g);
        assert_eq!(shared.snapshot().hosts(2), vec![HOST_C]);
    }
}
