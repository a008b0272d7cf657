//! The dataplane: one worker joins a local VM port to the underlay. The port is a VM's
//! vhost-user-net virtual NIC ([`crate::vport`]) or, for hosts and tests, a TAP device; both are
//! read and written as `virtio-net header ‖ frame`.
//!
//! ```text
//!  TAP read (vnet hdr + up to 64 KiB) ─► classify ─► table.transmit (anti-spoofing) ─►
//!      cut into datagrams, consecutive seqs per (host, flow) ─► trains ─► path per train ─►
//!      Geneve + option (tx timestamp, echo) [+ offload option on the first] ─► UDP GSO send
//!  recvmmsg :6081 (UDP GRO trains) ─► split ─► parse ─► VNI, known sender ─► RTT from echo ─►
//!      probe? answer ─► reorder per (host, flow) ─► reassemble ─► table.receive ─► TAP write
//! ```
//!
//! A path is a UDP socket bound to its own source port (and optionally source address, which
//! policy routing can pin to an uplink). Every packet is received on one socket at
//! [`geneve::PORT`]. Path state (RTT, CE, loss, liveness) is kept per destination host. Probes
//! are OAM packets with an empty frame, answered at once on the same path index, so a path
//! that carries no data still has an RTT and a dead one comes back.
//!
//! Spraying and GSO: the path is chosen per *train* (the datagrams of one UDP GSO send, at
//! most [`Config::train`]), not per datagram; every datagram still has its own sequence
//! number, timestamp and path id, so the receiver's reordering, RTT and loss accounting stay
//! per datagram. With the default train (a whole TSO frame) a flow alternates paths frame by
//! frame, ~64 KiB at a time: at 1 Gbit/s per path that is ~0.5 ms per choice, far below the
//! RTT at which `adaptive` reacts.
//!
//! The sending card is named by the option's `sender` field (a datagram's source address is
//! its path's, and a continuation datagram has no inner header). Echoes are taken from
//! datagrams of a sender mapped in the NIC's network; the inner frame is checked against the
//! table once rebuilt, and must come from a VM of that same sender.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use crate::counters::NicCounters;
use crate::echo::Received;
use crate::flow::{self, FLOW_IDS};
use crate::frag::{self, Frame, Piece, Reassembly};
use crate::geneve::{self, Offload, OutboardOption, ECHO_CE, ECHO_LOSS, ECHO_PROBE_REPLY};
use crate::nic::Nic;
pub use crate::nic::NicSpec;
use crate::path::{self, Paths, Policy, Timing};
use crate::reorder::{self, FlowKey, Reorder};
use crate::sys::{self, Outgoing, Tap};
use crate::table::{Dest, Port, SharedTable, Table};
use crate::vnet::{self, VnetHdr};
use crate::vport::VirtualPort;

/// Messages per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 32;
/// Receive buffer per message: a whole GRO train.
const RX_BUF: usize = 65_536;
/// Socket buffer per UDP socket: a few ms of a 10 Gbit/s burst.
const SOCKET_BUF: usize = 8 << 20;
/// RTT samples above this are stale echoes, not measurements.
const MAX_RTT_US: u32 = 10_000_000;
/// Outer IPv4 + UDP header bytes.
const OUTER_HDRS: usize = 28;

/// The dataplane could not start or its I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the TAP device")]
    Tap(#[source] sys::Error),
    #[error("Cannot serve the vhost-user-net port")]
    VirtualPort(#[source] crate::vport::Error),
    #[error("A vhost-user NIC needs offloads (the guest negotiates TSO)")]
    VhostWithoutOffload,
    #[error("Cannot bind UDP socket {addr}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("Bad path set")]
    Paths(#[source] path::Error),
    #[error("Underlay MTU {0} out of range (576 to 65535)")]
    Mtu(usize),
    #[error("Underlay receive failed")]
    Receive(#[source] io::Error),
    #[error("TAP read failed")]
    TapRead(#[source] io::Error),
    #[error("Poll failed")]
    Poll(#[source] io::Error),
}

/// One path: the local end of its outer UDP socket.
#[derive(Debug, Clone, Copy)]
pub struct PathSpec {
    pub local: SocketAddrV4,
}

/// Everything a dataplane worker needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The VM side: a TAP device or a vhost-user-net socket.
    pub nic: NicSpec,
    pub port: Port,
    /// This card's underlay address, as mapped in the peers' tables.
    pub host: Ipv4Addr,
    pub table: SharedTable,
    pub paths: Vec<PathSpec>,
    /// Where Geneve is received (normally 0.0.0.0:6081).
    pub listen: SocketAddrV4,
    pub policy: Policy,
    pub timing: Timing,
    pub reorder: reorder::Limits,
    /// TAP virtio-net header with checksum/TSO offload, UDP GSO and GRO. Off: one frame of at
    /// most the TAP MTU per datagram, as a plain userspace tunnel.
    pub offload: bool,
    /// Underlay IP MTU: outer datagrams are cut to fit it.
    pub underlay_mtu: usize,
    /// Most datagrams sent on one path choice (0: as many as one GSO send takes).
    pub train: usize,
}

/// Datagrams queued for one path: one datagram, or a GSO train of `count`.
#[derive(Debug)]
struct Queued {
    to: SocketAddrV4,
    buf: Vec<u8>,
    segment: u16,
    count: usize,
}

/// A running (or ready) dataplane.
#[derive(Debug)]
pub struct Dataplane {
    cfg: Config,
    nic: Nic,
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    /// The worker's copy of the shared table, and the generation it was taken at.
    table: Table,
    table_generation: u64,
    hosts: HashSet<Ipv4Addr>,
    /// Path state per destination host: a path congested or cut towards one host may be fine
    /// towards another.
    paths: HashMap<Ipv4Addr, Paths>,
    /// Fresh path state to copy for a host.
    template: Paths,
    counters: Arc<NicCounters>,
    reorder: Reorder<(Option<FlowKey>, Piece)>,
    reassembly: Reassembly,
    seqs: HashMap<Ipv4Addr, Vec<u32>>,
    /// Next path sequence number per (destination host, path).
    tx_path_seqs: HashMap<Ipv4Addr, Vec<u32>>,
    /// What each sending host's datagrams told us, per path.
    received: HashMap<Ipv4Addr, Received>,
    epoch: Instant,
    batches: Vec<Vec<Queued>>,
    /// Largest outer datagram payload.
    segment: usize,
    /// Datagrams per train.
    train: usize,
    gso: bool,
}

fn bind(addr: SocketAddrV4, gro: bool) -> Result<UdpSocket, Error> {
    let e = |source| Error::Bind { addr, source };
    let s = UdpSocket::bind(addr).map_err(e)?;
    s.set_nonblocking(true).map_err(e)?;
    sys::set_buffers(&s, SOCKET_BUF).map_err(e)?;
    sys::enable_ecn(&s).map_err(e)?;
    if gro {
        sys::enable_gro(&s).map_err(e)?;
    }
    Ok(s)
}

impl Dataplane {
    /// Opens the TAP and the sockets in the calling thread's network namespace.
    pub fn new(cfg: Config) -> Result<Self, Error> {
        if !(576..=65_535).contains(&cfg.underlay_mtu) {
            return Err(Error::Mtu(cfg.underlay_mtu));
        }
        let nic = match &cfg.nic {
            NicSpec::Tap(name) => Nic::Tap(Tap::open(name, cfg.offload).map_err(Error::Tap)?),
            // A guest negotiates TSO with the port whatever the card's settings.
            NicSpec::VhostUser(_) if !cfg.offload => return Err(Error::VhostWithoutOffload),
            NicSpec::VhostUser(path) => {
                Nic::Vhost(VirtualPort::serve(path).map_err(Error::VirtualPort)?)
            }
        };
        let rx = bind(cfg.listen, cfg.offload)?;
        let tx = cfg
            .paths
            .iter()
            .map(|p| bind(p.local, false))
            .collect::<Result<Vec<_>, _>>()?;
        let template =
            Paths::new(cfg.paths.len(), cfg.policy, cfg.timing, 0).map_err(Error::Paths)?;
        let table = cfg.table.snapshot();
        let paths = table
            .hosts(cfg.port.vni)
            .into_iter()
            .map(|h| (h, template.clone()))
            .collect();
        let segment = cfg.underlay_mtu - OUTER_HDRS;
        let most = sys::GSO_MAX_SEGMENTS.min(sys::GSO_MAX_BYTES / segment);
        let train = match cfg.train {
            0 => most,
            n => n.min(most),
        };
        Ok(Self {
            counters: Arc::new(NicCounters::new(cfg.paths.len())),
            reorder: Reorder::new(cfg.reorder),
            reassembly: Reassembly::new(cfg.reorder.max_flows),
            batches: (0..cfg.paths.len()).map(|_| Vec::new()).collect(),
            hosts: table.hosts(cfg.port.vni).into_iter().collect(),
            table_generation: cfg.table.generation(),
            table,
            gso: cfg.offload,
            segment,
            train: if cfg.offload { train } else { 1 },
            cfg,
            nic,
            rx,
            tx,
            paths,
            template,
            seqs: HashMap::new(),
            tx_path_seqs: HashMap::new(),
            received: HashMap::new(),
            epoch: Instant::now(),
        })
    }

    /// The TAP's name or the vhost-user socket's path.
    pub fn nic_name(&self) -> String {
        self.nic.name()
    }

    /// The virtual port's counters, when the NIC is one.
    pub fn port_counters(&self) -> Option<&crate::vport::PortCounters> {
        match &self.nic {
            Nic::Vhost(v) => Some(v.counters()),
            Nic::Tap(_) => None,
        }
    }

    pub fn counters(&self) -> Arc<NicCounters> {
        Arc::clone(&self.counters)
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Takes a fresh copy of the shared table when the API changed it.
    fn refresh_table(&mut self) {
        let g = self.cfg.table.generation();
        if g != self.table_generation {
            self.table = self.cfg.table.snapshot();
            self.table_generation = g;
            self.hosts = self.table.hosts(self.cfg.port.vni).into_iter().collect();
        }
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        let fds = [self.nic.raw_fd(), self.rx.as_raw_fd()];
        let mut ready = Vec::new();
        let mut frame = vec![0u8; vnet::LEN + frag::MAX_FRAME];
        let mut bufs = vec![vec![0u8; RX_BUF]; BATCH];
        let mut meta = Vec::new();
        let mut pieces = Vec::new();
        let mut probes = Vec::new();
        let mut due = Vec::new();
        while !stop.load(Relaxed) {
            sys::poll_readable(&fds, 1, &mut ready).map_err(Error::Poll)?;
            self.refresh_table();
            if ready[0] {
                self.drain_nic(&mut frame)?;
            }
            if ready[1] {
                loop {
                    let n =
                        sys::recv_batch(&self.rx, &mut bufs, &mut meta).map_err(Error::Receive)?;
                    for (i, m) in meta.iter().enumerate().take(n) {
                        let ce = m.tos & 3 == 3;
                        let seg = if m.segment == 0 { m.len } else { m.segment };
                        if m.len == 0 || seg == 0 {
                            // Truncated: larger than its buffer.
                            self.counters.rx_malformed.fetch_add(1, Relaxed);
                            continue;
                        }
                        for d in bufs[i][..m.len].chunks(seg) {
                            self.receive(d, m.src, ce, &mut pieces);
                        }
                    }
                    self.counters
                        .reorder_depth
                        .record(self.reorder.buffered() as u64);
                    self.deliver(&mut pieces);
                    if n < BATCH {
                        break;
                    }
                }
            }
            let now = self.now_us();
            // Gaps are checked every wake-up, at worst each millisecond.
            let (received, window) = (&self.received, self.cfg.reorder.timeout_us);
            self.reorder.poll_with(
                now,
                |key| received.get(&Ipv4Addr::from(key.0))?.horizon(now, window),
                &mut pieces,
            );
            self.deliver(&mut pieces);
            self.reassembly
                .expire(now, 10 * self.cfg.reorder.timeout_us.max(1000));
            for (host, paths) in &mut self.paths {
                paths.poll(now, &mut probes);
                due.extend(probes.iter().map(|&p| (*host, p)));
            }
            for (host, p) in due.drain(..) {
                self.send_probe(host, p, now);
            }
            self.flush();
            self.publish();
        }
        Ok(())
    }

    fn drain_nic(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        for _ in 0..BATCH {
            let len = match self.nic.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::TapRead(e)),
            };
            if self.nic.vnet_hdr() {
                let Some(hdr) = VnetHdr::parse(&buf[..len]) else {
                    self.counters.tx_errors.fetch_add(1, Relaxed);
                    continue;
                };
                let frame = &buf[vnet::LEN..len];
                if !hdr.valid_for(frame.len()) {
                    self.counters.tx_errors.fetch_add(1, Relaxed);
                    continue;
                }
                let offload = (!hdr.is_plain()).then(|| Offload::from(hdr));
                self.encapsulate(frame, offload);
            } else {
                self.encapsulate(&buf[..len], None);
            }
        }
        self.flush();
        Ok(())
    }

    fn encapsulate(&mut self, frame: &[u8], offload: Option<Offload>) {
        let Some(info) = flow::classify(frame) else {
            self.counters.tx_errors.fetch_add(1, Relaxed);
            return;
        };
        let dest = match self.table.transmit(&self.cfg.port, &info) {
            Ok(d) => d,
            Err(d) => return self.counters.count_drop(d),
        };
        self.counters.tx_packets.fetch_add(1, Relaxed);
        self.counters
            .tx_bytes
            .fetch_add(frame.len() as u64, Relaxed);
        let hosts = match dest {
            Dest::Host(h) => vec![h],
            Dest::Flood(hs) => hs,
        };
        let first_hdr = if offload.is_some() {
            geneve::HEADER_LEN_OFFLOAD
        } else {
            geneve::HEADER_LEN
        };
        let cuts = if self.cfg.offload {
            frag::cut(frame.len(), first_hdr, geneve::HEADER_LEN, self.segment)
        } else {
            // Without offloads a frame is one datagram, as large as the TAP MTU makes it.
            vec![(0, frame.len())]
        };
        let n = cuts.len();
        let now = self.now_us();
        let flow_id = info.flow_id();
        for host in hosts {
            let seqs = self
                .seqs
                .entry(host)
                .or_insert_with(|| vec![0; FLOW_IDS as usize]);
            let seq0 = seqs[flow_id as usize];
            seqs[flow_id as usize] = seq0.wrapping_add(n as u32);
            let mut echo = self.received.get_mut(&host).and_then(Received::take_echo);
            let npaths = self.template.len();
            let path_seqs = self
                .tx_path_seqs
                .entry(host)
                .or_insert_with(|| vec![0; npaths]);
            let template = &self.template;
            let paths = self
                .paths
                .entry(host)
                .or_insert_with(|| template.restarted(now));
            let mut i = 0;
            // Trains of equal length (46 datagrams go as 23 + 23, not 44 + 2), so a frame's
            // halves weigh the same whichever path each takes.
            let most = if self.gso { self.train } else { 1 };
            let train_len = n.div_ceil(n.div_ceil(most));
            for train in cuts.chunks(train_len) {
                let path = paths.choose_batch(info.hash, train.len());
                let mut buf = Vec::with_capacity(train.len() * self.segment);
                for &(a, b) in train {
                    let path_seq = path_seqs[path];
                    path_seqs[path] = path_seq.wrapping_add(1);
                    let mut opt = OutboardOption {
                        path_seq,
                        seq: seq0.wrapping_add(i as u32),
                        flow: flow_id,
                        path: path as u8,
                        tx_ts: timestamp(now),
                        frag: frag::flags(i, n),
                        sender: u32::from(self.cfg.host),
                        ..Default::default()
                    };
                    if let Some((p, e)) = echo.take() {
                        let held = now.saturating_sub(e.at_us) as u32;
                        opt.echo_ts = timestamp_nonzero(e.tx_ts.wrapping_add(held));
                        opt.echo_path = p as u8;
                        opt.echo_flags = e.flags;
                    }
                    let off = if i == 0 { offload.as_ref() } else { None };
                    geneve::push_header(&mut buf, self.cfg.port.vni, false, &opt, off);
                    buf.extend_from_slice(&frame[a..b]);
                    i += 1;
                }
                self.batches[path].push(Queued {
                    to: SocketAddrV4::new(host, geneve::PORT),
                    buf,
                    segment: if train.len() > 1 {
                        self.segment as u16
                    } else {
                        0
                    },
                    count: train.len(),
                });
            }
        }
    }

    /// Probes `path` towards `host`. In OAM packets the option's `flow` carries the probed
    /// host's underlay address, echoed back in the reply.
    fn send_probe(&mut self, host: Ipv4Addr, path: usize, now: u64) {
        let opt = OutboardOption {
            path_seq: self.next_path_seq(host, path),
            path: path as u8,
            flow: u32::from(host),
            tx_ts: timestamp(now),
            sender: u32::from(self.cfg.host),
            ..Default::default()
        };
        let mut buf = Vec::new();
        geneve::encapsulate(self.cfg.port.vni, true, &opt, &[], &mut buf);
        self.queue_one(path, SocketAddrV4::new(host, geneve::PORT), buf);
        self.counters.paths[path].probes.fetch_add(1, Relaxed);
    }

    fn next_path_seq(&mut self, host: Ipv4Addr, path: usize) -> u32 {
        let n = self.template.len();
        let v = self.tx_path_seqs.entry(host).or_insert_with(|| vec![0; n]);
        let s = v[path];
        v[path] = s.wrapping_add(1);
        s
    }

    /// Notes a datagram from `host` on `path` (sequence gaps are losses, counted).
    fn track_path_seq(&mut self, host: Ipv4Addr, path: usize, seq: u32, sent_ts: u32) {
        let n = self.template.len();
        if path >= n || !self.hosts.contains(&host) {
            return;
        }
        let now = self.now_us();
        let r = self
            .received
            .entry(host)
            .or_insert_with(|| Received::new(n));
        let lost = r.on_datagram(path, seq, sent_ts, now);
        self.counters.paths[path].rx_lost.fetch_add(lost, Relaxed);
    }

    fn queue_one(&mut self, path: usize, to: SocketAddrV4, buf: Vec<u8>) {
        self.batches[path].push(Queued {
            to,
            buf,
            segment: 0,
            count: 1,
        });
    }

    /// Feeds the echo in `opt` (if any) from `host` to that host's path state.
    fn take_echo(&mut self, host: Ipv4Addr, opt: &OutboardOption, now: u64) {
        let p = usize::from(opt.echo_path);
        let Some(paths) = self.paths.get_mut(&host) else {
            return;
        };
        if opt.echo_ts == 0 || p >= paths.len() {
            return;
        }
        let rtt = timestamp(now).wrapping_sub(opt.echo_ts);
        if rtt >= MAX_RTT_US {
            return;
        }
        let ce = opt.echo_flags & ECHO_CE != 0;
        paths.on_echo(p, u64::from(rtt), ce, now);
        if opt.echo_flags & ECHO_LOSS != 0 {
            paths.on_reported_loss(p, 1);
        }
        self.counters.paths[p].rtt_us.record(u64::from(rtt));
        if ce {
            self.counters.paths[p].ecn_ce_echoed.fetch_add(1, Relaxed);
        }
    }

    fn receive(
        &mut self,
        dgram: &[u8],
        src: SocketAddrV4,
        ce: bool,
        out: &mut Vec<(Option<FlowKey>, Piece)>,
    ) {
        let pkt = match geneve::parse(dgram) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("Dropping datagram from {src}: {e}");
                self.counters.rx_malformed.fetch_add(1, Relaxed);
                return;
            }
        };
        if pkt.vni != self.cfg.port.vni {
            return self.counters.count_drop(crate::table::Drop::WrongVni);
        }
        let now = self.now_us();
        let Some(opt) = pkt.option else {
            // A plain Geneve frame (no sequence): checked and delivered as it is; the sending
            // host is whatever the table maps its source VM to.
            let piece = Piece::new(0, 0, pkt.offload, pkt.frame);
            return out.push((None, piece));
        };
        if let Some(c) = self.counters.paths.get(usize::from(opt.path)) {
            c.rx_packets.fetch_add(1, Relaxed);
            c.rx_bytes.fetch_add(dgram.len() as u64, Relaxed);
            if ce {
                c.ecn_ce.fetch_add(1, Relaxed);
            }
        }
        self.track_path_seq(
            Ipv4Addr::from(opt.sender),
            usize::from(opt.path),
            opt.path_seq,
            opt.tx_ts,
        );
        if pkt.oam {
            return self.receive_oam(&opt, src, now);
        }
        let host = Ipv4Addr::from(opt.sender);
        if !self.hosts.contains(&host) {
            return self.counters.count_drop(crate::table::Drop::UnknownSource);
        }
        self.take_echo(host, &opt, now);
        let n = self.template.len();
        self.received
            .entry(host)
            .or_insert_with(|| Received::new(n))
            .record_echo(usize::from(opt.path), opt.tx_ts, ce, now);
        let key = (u32::from(host), opt.flow % FLOW_IDS);
        let piece = Piece::new(opt.seq, opt.frag, pkt.offload, pkt.frame);
        let sent = Some(opt.tx_ts);
        self.reorder
            .push_sent(key, opt.seq, (Some(key), piece), now, sent, out);
    }

    fn receive_oam(&mut self, opt: &OutboardOption, src: SocketAddrV4, now: u64) {
        if opt.echo_flags & ECHO_PROBE_REPLY != 0 {
            // Only a host we probe has path state: a reply naming another is ignored.
            return self.take_echo(Ipv4Addr::from(opt.flow), opt, now);
        }
        // Answer at once, on the path index it came on, straight to its sender.
        let path = usize::from(opt.path) % self.template.len();
        let reply = OutboardOption {
            path_seq: self.next_path_seq(Ipv4Addr::from(opt.sender), path),
            path: path as u8,
            flow: opt.flow,
            tx_ts: timestamp(now),
            echo_ts: timestamp_nonzero(opt.tx_ts),
            echo_path: opt.path,
            echo_flags: ECHO_PROBE_REPLY,
            sender: u32::from(self.cfg.host),
            ..Default::default()
        };
        let mut buf = Vec::new();
        geneve::encapsulate(self.cfg.port.vni, true, &reply, &[], &mut buf);
        self.queue_one(path, SocketAddrV4::new(*src.ip(), geneve::PORT), buf);
    }

    /// Rebuilds frames from in-sequence pieces, checks them and writes them to the TAP.
    fn deliver(&mut self, pieces: &mut Vec<(Option<FlowKey>, Piece)>) {
        let now = self.now_us();
        for (key, piece) in pieces.drain(..) {
            let frame = match key {
                None => Some(Frame {
                    offload: piece.offload,
                    buf: piece.buf,
                }),
                Some(key) => self.reassembly.push(key, piece, now),
            };
            if let Some(f) = frame {
                self.write_frame(key, f);
            }
        }
    }

    fn write_frame(&mut self, key: Option<FlowKey>, mut f: Frame) {
        let frame = &f.buf[vnet::LEN..];
        let Some(info) = flow::classify(frame) else {
            self.counters.rx_malformed.fetch_add(1, Relaxed);
            return;
        };
        let host = match self.table.receive(&self.cfg.port, self.cfg.port.vni, &info) {
            Ok(h) => h,
            Err(d) => return self.counters.count_drop(d),
        };
        if key.is_some_and(|k| k.0 != u32::from(host)) {
            // A VM mapped to one host, in datagrams from another.
            return self.counters.count_drop(crate::table::Drop::UnknownSource);
        }
        let hdr = f.offload.map(VnetHdr::from).unwrap_or_default();
        if !hdr.valid_for(frame.len()) {
            self.counters.rx_malformed.fetch_add(1, Relaxed);
            return;
        }
        self.counters.rx_packets.fetch_add(1, Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(frame.len() as u64, Relaxed);
        let r = if self.nic.vnet_hdr() {
            let mut h = [0u8; vnet::LEN];
            hdr.write(&mut h);
            f.buf[..vnet::LEN].copy_from_slice(&h);
            self.nic.write(&f.buf)
        } else if hdr.is_plain() {
            self.nic.write(frame)
        } else {
            // A peer with offloads sent a frame this TAP cannot take (no vnet header).
            Err(io::Error::from(io::ErrorKind::Unsupported))
        };
        if let Err(e) = r {
            log::debug!("TAP write failed: {e}");
            self.counters.rx_tap_drops.fetch_add(1, Relaxed);
        }
    }

    fn flush(&mut self) {
        for p in 0..self.batches.len() {
            let batch = std::mem::take(&mut self.batches[p]);
            let mut sent = 0;
            while sent < batch.len() {
                let end = (sent + BATCH).min(batch.len());
                let msgs: Vec<Outgoing<'_>> = batch[sent..end]
                    .iter()
                    .map(|q| Outgoing {
                        to: q.to,
                        data: &q.buf,
                        segment: q.segment,
                    })
                    .collect();
                match sys::send_batch(&self.tx[p], &msgs) {
                    Ok(n) if n > 0 => {
                        self.count_sent(p, &batch[sent..sent + n]);
                        sent += n;
                    }
                    Ok(_) => break,
                    Err(e) if batch[sent].segment > 0 && gso_unsupported(&e) => {
                        // No UDP GSO here (old kernel, odd device): send datagram by datagram
                        // from now on.
                        log::warn!("UDP GSO send failed ({e}); falling back to single datagrams");
                        self.gso = false;
                        self.send_split(p, &batch[sent]);
                        sent += 1;
                    }
                    Err(e) => {
                        // Unreachable uplink, full socket buffer: the packet is lost like on a
                        // wire; the path's echoes stop and adaptive moves away from it.
                        log::debug!("Send on path {p} failed: {e}");
                        self.counters.tx_errors.fetch_add(1, Relaxed);
                        sent += 1;
                    }
                }
            }
            let mut batch = batch;
            batch.clear();
            self.batches[p] = batch;
        }
    }

    fn count_sent(&self, p: usize, qs: &[Queued]) {
        let c = &self.counters.paths[p];
        let datagrams: usize = qs.iter().map(|q| q.count).sum();
        let bytes: usize = qs.iter().map(|q| q.buf.len() + q.count * OUTER_HDRS).sum();
        c.tx_packets.fetch_add(datagrams as u64, Relaxed);
        c.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Sends a GSO train as single datagrams.
    fn send_split(&self, p: usize, q: &Queued) {
        for d in q.buf.chunks(usize::from(q.segment)) {
            let msg = Outgoing {
                to: q.to,
                data: d,
                segment: 0,
            };
            if sys::send_batch(&self.tx[p], &[msg]).is_err() {
                self.counters.tx_errors.fetch_add(1, Relaxed);
            }
        }
        self.count_sent(p, std::slice::from_ref(q));
    }

    fn publish(&self) {
        let c = &self.counters;
        let s = self.reorder.stats;
        c.reorder_timeouts.store(s.timeouts, Relaxed);
        c.reorder_overflows.store(s.overflows, Relaxed);
        c.reorder_late.store(s.late, Relaxed);
        c.reorder_max_depth.store(s.max_depth, Relaxed);
        let f = self.reassembly.stats;
        c.frames_reassembled.store(f.reassembled, Relaxed);
        c.frames_incomplete
            .store(f.incomplete + f.oversized, Relaxed);
        c.frag_orphans.store(f.orphans, Relaxed);
        c.gso.store(u64::from(self.gso), Relaxed);
        for (i, pc) in c.paths.iter().enumerate() {
            let losses = self
                .paths
                .values()
                .filter_map(|p| p.state(i))
                .map(|st| st.losses)
                .sum();
            pc.losses.store(losses, Relaxed);
            let weight = self
                .paths
                .values()
                .filter(|p| p.policy() == Policy::Adaptive)
                .map(|p| p.weight(i))
                .fold(None, |a: Option<f64>, w| Some(a.map_or(w, |a| a.min(w))));
            pc.weight_milli
                .store(weight.map_or(1000, |w| (w * 1000.0) as u64), Relaxed);
        }
    }
}

fn gso_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// Transmit timestamp: µs, wrapping, never 0 (0 means "no echo").
fn timestamp(now_us: u64) -> u32 {
    timestamp_nonzero(now_us as u32)
}

fn timestamp_nonzero(t: u32) -> u32 {
    t.max(1)
}
