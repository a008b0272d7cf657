//! The TAP dataplane: one worker joins a local VM port (a TAP device) to the underlay.
//!
//! ```text
//!  TAP read ─► classify ─► table.transmit (anti-spoofing) ─► seq per (host, flow) ─► path ─►
//!      Geneve + option (tx timestamp, echo of the host's last packet) ─► sendmmsg per path
//!  recvmmsg :6081 ─► parse ─► VNI ─► RTT from echo ─► probe? answer ─► table.receive ─►
//!      reorder per (host, flow) ─► TAP write
//! ```
//!
//! A path is a UDP socket bound to its own source port (and optionally source address, which
//! policy routing can pin to an uplink). Every packet is received on one socket at
//! [`geneve::PORT`]. Path state (RTT, CE, loss, liveness) is kept per destination host. Probes
//! are OAM packets with an empty frame, answered at once on the same path index, so a path
//! that carries no data still has an RTT and a dead one comes back. Echoes are only taken from
//! packets that passed the table's checks, or from replies to our own probes.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use crate::counters::NicCounters;
use crate::flow::{self, FLOW_IDS};
use crate::geneve::{self, OutboardOption, ECHO_CE, ECHO_PROBE_REPLY};
use crate::path::{self, Paths, Policy, Timing};
use crate::reorder::{self, Reorder};
use crate::sys::{self, Tap};
use crate::table::{Dest, Port, Table};

/// Datagrams per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 32;
/// Largest datagram we take from the underlay (jumbo frames fit).
const RX_BUF: usize = 16 * 1024;
/// Socket buffer per UDP socket: a few ms of a 10 Gbit/s burst.
const SOCKET_BUF: usize = 4 << 20;
/// RTT samples above this are stale echoes, not measurements.
const MAX_RTT_US: u32 = 10_000_000;

/// The dataplane could not start or its I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the TAP device")]
    Tap(#[source] sys::Error),
    #[error("Cannot bind UDP socket {addr}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("Bad path set")]
    Paths(#[source] path::Error),
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
    pub tap: String,
    pub port: Port,
    pub table: Table,
    pub paths: Vec<PathSpec>,
    /// Where Geneve is received (normally 0.0.0.0:6081).
    pub listen: SocketAddrV4,
    pub policy: Policy,
    pub timing: Timing,
    pub reorder: reorder::Limits,
}

/// The last packet received from a host, to echo in the next one sent to it.
#[derive(Debug, Clone, Copy)]
struct Echo {
    tx_ts: u32,
    path: u8,
    flags: u8,
    at_us: u64,
}

/// A running (or ready) dataplane.
#[derive(Debug)]
pub struct Dataplane {
    cfg: Config,
    tap: Tap,
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    /// Path state per destination host: a path congested or cut towards one host may be fine
    /// towards another.
    paths: HashMap<Ipv4Addr, Paths>,
    /// Fresh path state to copy for a host.
    template: Paths,
    counters: Arc<NicCounters>,
    reorder: Reorder<Vec<u8>>,
    seqs: HashMap<Ipv4Addr, Vec<u32>>,
    echoes: HashMap<Ipv4Addr, Echo>,
    epoch: Instant,
    batches: Vec<Vec<(SocketAddrV4, Vec<u8>)>>,
}

fn bind(addr: SocketAddrV4) -> Result<UdpSocket, Error> {
    let s = UdpSocket::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    s.set_nonblocking(true)
        .map_err(|source| Error::Bind { addr, source })?;
    sys::set_buffers(&s, SOCKET_BUF).map_err(|source| Error::Bind { addr, source })?;
    sys::enable_ecn(&s).map_err(|source| Error::Bind { addr, source })?;
    Ok(s)
}

impl Dataplane {
    /// Opens the TAP and the sockets in the calling thread's network namespace.
    pub fn new(cfg: Config) -> Result<Self, Error> {
        let tap = Tap::open(&cfg.tap).map_err(Error::Tap)?;
        let rx = bind(cfg.listen)?;
        let tx = cfg
            .paths
            .iter()
            .map(|p| bind(p.local))
            .collect::<Result<Vec<_>, _>>()?;
        let template =
            Paths::new(cfg.paths.len(), cfg.policy, cfg.timing, 0).map_err(Error::Paths)?;
        let paths = cfg
            .table
            .hosts(cfg.port.vni)
            .into_iter()
            .map(|h| (h, template.clone()))
            .collect();
        Ok(Self {
            counters: Arc::new(NicCounters::new(cfg.paths.len())),
            reorder: Reorder::new(cfg.reorder),
            batches: vec![Vec::new(); cfg.paths.len()],
            cfg,
            tap,
            rx,
            tx,
            paths,
            template,
            seqs: HashMap::new(),
            echoes: HashMap::new(),
            epoch: Instant::now(),
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn counters(&self) -> Arc<NicCounters> {
        Arc::clone(&self.counters)
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        let fds = [self.tap.file().as_raw_fd(), self.rx.as_raw_fd()];
        let mut ready = Vec::new();
        let mut frame = vec![0u8; 65536];
        let mut bufs = vec![vec![0u8; RX_BUF]; BATCH];
        let mut meta = Vec::new();
        let mut out = Vec::new();
        let mut probes = Vec::new();
        while !stop.load(Relaxed) {
            sys::poll_readable(&fds, 1, &mut ready).map_err(Error::Poll)?;
            if ready[0] {
                self.drain_tap(&mut frame)?;
            }
            if ready[1] {
                loop {
                    let n =
                        sys::recv_batch(&self.rx, &mut bufs, &mut meta).map_err(Error::Receive)?;
                    for (i, m) in meta.iter().enumerate().take(n) {
                        self.receive(&bufs[i][..m.len], m.src, m.tos & 3 == 3, &mut out);
                    }
                    self.counters
                        .reorder_depth
                        .record(self.reorder.buffered() as u64);
                    self.deliver(&mut out);
                    if n < BATCH {
                        break;
                    }
                }
            }
            let now = self.now_us();
            // Gap timeouts are checked every wake-up, at worst each millisecond.
            self.reorder.poll(now, &mut out);
            self.deliver(&mut out);
            let mut due = Vec::new();
            for (host, paths) in &mut self.paths {
                paths.poll(now, &mut probes);
                due.extend(probes.iter().map(|&p| (*host, p)));
            }
            for (host, p) in due {
                self.send_probe(host, p, now);
            }
            self.flush();
            self.publish();
        }
        Ok(())
    }

    fn drain_tap(&mut self, frame: &mut [u8]) -> Result<(), Error> {
        for _ in 0..BATCH {
            let len = match self.tap.file().read(frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::TapRead(e)),
            };
            self.encapsulate(&frame[..len]);
        }
        self.flush();
        Ok(())
    }

    fn encapsulate(&mut self, frame: &[u8]) {
        let Some(info) = flow::classify(frame) else {
            self.counters.tx_errors.fetch_add(1, Relaxed);
            return;
        };
        let dest = match self.cfg.table.transmit(&self.cfg.port, &info) {
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
        let now = self.now_us();
        for host in hosts {
            let flow_id = info.flow_id();
            let seqs = self
                .seqs
                .entry(host)
                .or_insert_with(|| vec![0; FLOW_IDS as usize]);
            let seq = seqs[flow_id as usize];
            seqs[flow_id as usize] = seq.wrapping_add(1);
            let template = &self.template;
            let path = self
                .paths
                .entry(host)
                .or_insert_with(|| template.restarted(now))
                .choose(info.hash);
            let mut opt = OutboardOption {
                seq,
                flow: flow_id,
                path: path as u8,
                tx_ts: timestamp(now),
                ..Default::default()
            };
            if let Some(e) = self.echoes.remove(&host) {
                opt.echo_ts =
                    timestamp_nonzero(e.tx_ts.wrapping_add(now.saturating_sub(e.at_us) as u32));
                opt.echo_path = e.path;
                opt.echo_flags = e.flags;
            }
            let mut buf = Vec::with_capacity(geneve::HEADER_LEN + frame.len());
            geneve::encapsulate(self.cfg.port.vni, false, &opt, frame, &mut buf);
            self.batches[path].push((SocketAddrV4::new(host, geneve::PORT), buf));
        }
    }

    /// Probes `path` towards `host`. In OAM packets the option's `flow` carries the probed
    /// host's underlay address, echoed back in the reply, so the reply finds its path state
    /// whichever source address it comes from.
    fn send_probe(&mut self, host: Ipv4Addr, path: usize, now: u64) {
        let opt = OutboardOption {
            path: path as u8,
            flow: u32::from(host),
            tx_ts: timestamp(now),
            ..Default::default()
        };
        let mut buf = Vec::new();
        geneve::encapsulate(self.cfg.port.vni, true, &opt, &[], &mut buf);
        self.batches[path].push((SocketAddrV4::new(host, geneve::PORT), buf));
        self.counters.paths[path].probes.fetch_add(1, Relaxed);
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
        self.counters.paths[p].rtt_us.record(u64::from(rtt));
        if ce {
            self.counters.paths[p].ecn_ce_echoed.fetch_add(1, Relaxed);
        }
    }

    fn receive(&mut self, dgram: &[u8], src: SocketAddrV4, ce: bool, out: &mut Vec<Vec<u8>>) {
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
        let n = self.template.len();
        if let Some(opt) = pkt.option {
            if let Some(c) = self.counters.paths.get(usize::from(opt.path)) {
                c.rx_packets.fetch_add(1, Relaxed);
                c.rx_bytes.fetch_add(dgram.len() as u64, Relaxed);
                if ce {
                    c.ecn_ce.fetch_add(1, Relaxed);
                }
            }
        }
        if pkt.oam {
            let Some(opt) = pkt.option else { return };
            if opt.echo_flags & ECHO_PROBE_REPLY != 0 {
                // Only a host we probe has path state: a reply naming another is ignored.
                self.take_echo(Ipv4Addr::from(opt.flow), &opt, now);
            } else {
                // Answer at once, on the path index it came on, straight to its sender.
                let path = usize::from(opt.path) % n;
                let reply = OutboardOption {
                    path: path as u8,
                    flow: opt.flow,
                    tx_ts: timestamp(now),
                    echo_ts: timestamp_nonzero(opt.tx_ts),
                    echo_path: opt.path,
                    echo_flags: ECHO_PROBE_REPLY,
                    ..Default::default()
                };
                let mut buf = Vec::new();
                geneve::encapsulate(self.cfg.port.vni, true, &reply, &[], &mut buf);
                self.batches[path].push((SocketAddrV4::new(*src.ip(), geneve::PORT), buf));
            }
            return;
        }
        let Some(info) = flow::classify(pkt.frame) else {
            self.counters.rx_malformed.fetch_add(1, Relaxed);
            return;
        };
        let host = match self.cfg.table.receive(&self.cfg.port, pkt.vni, &info) {
            Ok(h) => h,
            Err(d) => return self.counters.count_drop(d),
        };
        self.counters.rx_packets.fetch_add(1, Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(pkt.frame.len() as u64, Relaxed);
        match pkt.option {
            Some(opt) => {
                self.take_echo(host, &opt, now);
                // A CE mark not yet echoed stays pending while the echoed path is the same.
                let pending_ce = self
                    .echoes
                    .get(&host)
                    .is_some_and(|e| e.path == opt.path && e.flags & ECHO_CE != 0);
                let echo = Echo {
                    tx_ts: opt.tx_ts,
                    path: opt.path,
                    flags: if ce || pending_ce { ECHO_CE } else { 0 },
                    at_us: now,
                };
                self.echoes.insert(host, echo);
                let key = (u32::from(host), opt.flow % FLOW_IDS);
                self.reorder
                    .push(key, opt.seq, pkt.frame.to_vec(), now, out);
            }
            None => out.push(pkt.frame.to_vec()),
        }
    }

    fn deliver(&mut self, out: &mut Vec<Vec<u8>>) {
        for f in out.drain(..) {
            if let Err(e) = self.tap.file().write(&f) {
                log::debug!("TAP write failed: {e}");
                self.counters.rx_tap_drops.fetch_add(1, Relaxed);
            }
        }
    }

    fn flush(&mut self) {
        for (p, batch) in self.batches.iter_mut().enumerate() {
            let mut sent = 0;
            while sent < batch.len() {
                let end = (sent + BATCH).min(batch.len());
                let msgs: Vec<(SocketAddrV4, &[u8])> = batch[sent..end]
                    .iter()
                    .map(|(a, b)| (*a, b.as_slice()))
                    .collect();
                match sys::send_batch(&self.tx[p], &msgs) {
                    Ok(n) if n > 0 => {
                        let c = &self.counters.paths[p];
                        c.tx_packets.fetch_add(n as u64, Relaxed);
                        let bytes: usize = msgs[..n].iter().map(|(_, b)| b.len()).sum();
                        c.tx_bytes.fetch_add(bytes as u64, Relaxed);
                        sent += n;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        // Unreachable uplink, full socket buffer: the packet is lost like on a
                        // wire; the path's echoes stop and adaptive moves away from it.
                        log::debug!("Send on path {p} failed: {e}");
                        self.counters.tx_errors.fetch_add(1, Relaxed);
                        sent += 1;
                    }
                }
            }
            batch.clear();
        }
    }

    fn publish(&self) {
        let c = &self.counters;
        let s = self.reorder.stats;
        c.reorder_timeouts.store(s.timeouts, Relaxed);
        c.reorder_overflows.store(s.overflows, Relaxed);
        c.reorder_late.store(s.late, Relaxed);
        c.reorder_max_depth.store(s.max_depth, Relaxed);
        for (i, pc) in c.paths.iter().enumerate() {
            let losses = self
                .paths
                .values()
                .filter_map(|p| p.state(i))
                .map(|st| st.losses)
                .sum();
            pc.losses.store(losses, Relaxed);
        }
    }
}

/// Transmit timestamp: µs, wrapping, never 0 (0 means "no echo").
fn timestamp(now_us: u64) -> u32 {
    timestamp_nonzero(now_us as u32)
}

fn timestamp_nonzero(t: u32) -> u32 {
    t.max(1)
}
