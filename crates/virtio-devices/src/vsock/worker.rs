//! The vsock worker thread: one epoll set over the queue kicks, the host listener and every
//! connection; RX (host → guest) is driven by readable connections and queued control
//! packets, TX (guest → host) by the TX kick.
//!
//! A connection is in the epoll set only while there is something to wait for: readable data
//! that the guest has credit and buffers for, or output still to flush. A readable connection
//! leaves the set and waits in the `ready` queue until RX buffers take its data, so neither a
//! guest without buffers nor a hung-up peer makes the thread spin.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{self, Header, Segment, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE};
use super::packet::{OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM};
use super::Counters;
use crate::ActiveQueue;

mod restore;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_LISTENER: u64 = 3;
const FIRST_CONN_TOKEN: u64 = 16;
/// What we tell the guest it may have in flight towards a host socket.
const BUF_ALLOC: u32 = 256 * 1024;
const FIRST_HOST_PORT: u32 = 1 << 30;
const MAX_CONNECT_LINE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshake,
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    guest_port: u32,
    host_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    reported_fwd: u32,
    pending_out: Vec<u8>,
    line: Vec<u8>,
    queued: bool,
    /// Out of guest credit: waits for a credit update, not for the socket.
    stalled: bool,
    registered: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, state: State, guest_port: u32, host_port: u32) -> Self {
        Conn {
            stream,
            state,
            guest_port,
            host_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            reported_fwd: 0,
            pending_out: Vec::new(),
            line: Vec::new(),
            queued: false,
            stalled: false,
            registered: None,
        }
    }

    /// Bytes the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

pub(super) struct Worker {
    cid: u64,
    uds_path: PathBuf,
    mem: GuestMemoryMmap,
    rx: Option<(Queue, Arc<EventFd>, Arc<EventFd>)>,
    tx: Option<(Queue, Arc<EventFd>, Arc<EventFd>)>,
    listener: Option<UnixListener>,
    stop: Arc<EventFd>,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_host_port: u32,
    control: VecDeque<Header>,
    ready: VecDeque<u64>,
    counters: Arc<Counters>,
}

/// One connection's flow-control state, for a snapshot (its socket is an fd).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnState {
    pub guest_port: u32,
    pub host_port: u32,
    pub established: bool,
    /// A host connection still sending its `CONNECT` line: what came so far (format v3).
    #[serde(default)]
    pub handshake: Option<Vec<u8>>,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    pub pending_out: Vec<u8>,
}

/// The worker's state: queue positions and connections (in the order their sockets are
/// handed over, see `VsockDevice::streams`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub cid: u64,
    /// (next avail, next used) of the RX and TX queues.
    pub rx: Option<(u16, u16)>,
    pub tx: Option<(u16, u16)>,
    pub connections: Vec<ConnState>,
    /// Control packets not yet given to the guest (format v3).
    #[serde(default)]
    pub control: Vec<Header>,
    /// The host port the next host-initiated connection gets (format v3).
    #[serde(default)]
    pub next_host_port: u32,
}

/// A packet header from the host side of connection `c`.
fn header(cid: u64, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.host_port,
        dst_port: c.guest_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

fn queue(q: &ActiveQueue) -> Option<Queue> {
    let mut queue = Queue::new(super::QUEUE_SIZE).ok()?;
    queue.set_size(q.config.size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.config.desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.config.avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.config.used);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    Some(queue)
}

impl Worker {
    pub(super) fn new(
        cid: u64,
        uds_path: PathBuf,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        listener: Option<UnixListener>,
        stop: Arc<EventFd>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let find = |i: usize| {
            queues
                .iter()
                .find(|q| q.index == i)
                .and_then(|q| queue(q).map(|queue| (queue, q.kick.clone(), q.call.clone())))
        };
        let (rx, tx) = (find(0), find(1));
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        if let Some((_, kick, _)) = &rx {
            add(kick.as_raw_fd(), TOKEN_RX)?;
        }
        if let Some((_, kick, _)) = &tx {
            add(kick.as_raw_fd(), TOKEN_TX)?;
        }
        if let Some(l) = &listener {
            add(l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        Ok(Worker {
            cid,
            uds_path,
            mem,
            rx,
            tx,
            listener,
            stop,
            epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            counters,
        })
    }

    /// Serves until the stop eventfd fires; returns itself (all the device's state) so the
    /// device can park it while paused and run it again.
    pub(super) fn stop_fd(&self) -> Arc<EventFd> {
        self.stop.clone()
    }

    pub(super) fn state(&self) -> VsockState {
        let pos = |q: &Option<(Queue, Arc<EventFd>, Arc<EventFd>)>| {
            q.as_ref().map(|(q, _, _)| (q.next_avail(), q.next_used()))
        };
        VsockState {
            cid: self.cid,
            rx: pos(&self.rx),
            tx: pos(&self.tx),
            connections: self
                .sorted()
                .into_iter()
                .map(|c| ConnState {
                    guest_port: c.guest_port,
                    host_port: c.host_port,
                    established: c.state == State::Established,
                    handshake: (c.state == State::Handshake).then(|| c.line.clone()),
                    peer_buf_alloc: c.peer_buf_alloc,
                    peer_fwd_cnt: c.peer_fwd_cnt,
                    rx_cnt: c.rx_cnt,
                    fwd_cnt: c.fwd_cnt,
                    pending_out: c.pending_out.clone(),
                })
                .collect(),
            control: self.control.iter().copied().collect(),
            next_host_port: self.next_host_port,
        }
    }

    /// The connections in token order (the order of [`Worker::state`] and
    /// [`Worker::streams`]).
    fn sorted(&self) -> Vec<&Conn> {
        let mut tokens: Vec<&u64> = self.conns.keys().collect();
        tokens.sort();
        tokens.into_iter().map(|t| &self.conns[t]).collect()
    }

    pub(super) fn run(mut self) -> Self {
        let mut events = vec![EpollEvent::default(); 64];
        // A restored or resumed worker may have packets waiting on either side already.
        self.process_tx();
        self.process_rx();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: epoll failed, device stops: {e}");
                    return self;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return self;
                    }
                    TOKEN_RX => {
                        if let Some((_, kick, _)) = &self.rx {
                            let _ = kick.read();
                        }
                    }
                    TOKEN_TX => {
                        if let Some((_, kick, _)) = &self.tx {
                            let _ = kick.read();
                        }
                        self.process_tx();
                    }
                    TOKEN_LISTENER => self.accept(),
                    token => self.conn_event(token, ev.event_set()),
                }
            }
            self.process_rx();
        }
    }

    fn header(&self, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
        header(self.cid, c, op, flags, len)
    }

    /// Puts a connection in or out of the epoll set as its state requires.
    fn update_interest(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut want = EventSet::empty();
        if !c.queued && !c.stalled && c.state != State::Connecting {
            want |= EventSet::IN;
        }
        if !c.pending_out.is_empty() {
            want |= EventSet::OUT;
        }
        let fd = c.stream.as_raw_fd();
        let op = match (c.registered, want.is_empty()) {
            (None, true) => return,
            (None, false) => ControlOperation::Add,
            (Some(_), true) => ControlOperation::Delete,
            (Some(cur), false) if cur == want => return,
            (Some(_), false) => ControlOperation::Modify,
        };
        if self.epoll.ctl(op, fd, EpollEvent::new(want, token)).is_ok() {
            c.registered = (!want.is_empty()).then_some(want);
        }
    }

    fn insert(&mut self, conn: Conn) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        if conn.state != State::Handshake {
            self.by_ports
                .insert((conn.guest_port, conn.host_port), token);
        }
        self.conns.insert(token, conn);
        self.update_interest(token);
        token
    }

    fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            if c.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            let key = (c.guest_port, c.host_port);
            if self.by_ports.get(&key) == Some(&token) {
                self.by_ports.remove(&key);
            }
        }
        self.ready.retain(|t| *t != token);
    }

    fn accept(&mut self) {
        let mut accepted = Vec::new();
        if let Some(listener) = &self.listener {
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    accepted.push(stream);
                }
            }
        }
        for stream in accepted {
            self.counters.host_connections.inc();
            self.insert(Conn::new(stream, State::Handshake, 0, 0));
        }
    }

    fn conn_event(&mut self, token: u64, events: EventSet) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if events.contains(EventSet::OUT) && !c.pending_out.is_empty() {
            match c.stream.write(&c.pending_out) {
                Ok(n) => {
                    c.pending_out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return self.reset_conn(token),
            }
            self.maybe_credit_update(token);
        }
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let readable = events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP);
        match c.state {
            State::Handshake if readable => self.handshake(token),
            State::Established if readable && !c.queued => {
                c.queued = true;
                self.ready.push_back(token);
            }
            _ => {}
        }
        self.update_interest(token);
    }

    /// Reads the host's `CONNECT <port>\n` and asks the guest to accept.
    fn handshake(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match c.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if c.line.len() < MAX_CONNECT_LINE => c.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                _ => return self.remove(token),
            }
        }
        let port = std::str::from_utf8(&c.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            let _ = c.stream.write_all(b"ERROR bad CONNECT line\n");
            return self.remove(token);
        };
        let mut host_port = self.next_host_port;
        while self.by_ports.contains_key(&(port, host_port)) {
            host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let Some(mut c) = self.conns.remove(&token) else {
            return;
        };
        c.guest_port = port;
        c.host_port = host_port;
        c.state = State::Connecting;
        self.by_ports.insert((port, host_port), token);
        let req = self.header(&c, OP_REQUEST, 0, 0);
        self.conns.insert(token, c);
        self.control.push_back(req);
    }

    fn reset_conn(&mut self, token: u64) {
        if let Some(c) = self.conns.get(&token) {
            let rst = self.header(c, OP_RST, 0, 0);
            self.control.push_back(rst);
        }
        self.remove(token);
    }

    fn maybe_credit_update(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.fwd_cnt.wrapping_sub(c.reported_fwd) >= BUF_ALLOC / 4 {
            c.reported_fwd = c.fwd_cnt;
            let h = self.header(&self.conns[&token], OP_CREDIT_UPDATE, 0, 0);
            self.control.push_back(h);
        }
    }

    fn chain_segments(q: &mut Queue, mem: &GuestMemoryMmap) -> Option<(u16, Vec<Segment>)> {
        let chain = q.pop_descriptor_chain(mem)?;
        let segs = chain
            .clone()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        Some((chain.head_index(), segs))
    }

    fn process_tx(&mut self) {
        let Some((mut q, kick, call)) = self.tx.take() else {
            return;
        };
        let mut used = false;
        while let Some((head, segs)) = Self::chain_segments(&mut q, &self.mem) {
            match packet::read_packet(&self.mem, &segs) {
                Ok((h, payload)) => self.handle_tx(h, payload),
                Err(e) => {
                    log::debug!("vsock: bad TX packet: {e}");
                    self.counters.bad_packets.inc();
                }
            }
            let _ = q.add_used(&self.mem, head, 0);
            used = true;
        }
        if used {
            let _ = call.write(1);
        }
        self.tx = Some((q, kick, call));
    }

    fn handle_tx(&mut self, h: Header, payload: Vec<u8>) {
        let reply_rst = |w: &mut Self| {
            if h.op != OP_RST {
                w.control.push_back(Header {
                    src_cid: HOST_CID,
                    dst_cid: w.cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    type_: TYPE_STREAM,
                    op: OP_RST,
                    buf_alloc: BUF_ALLOC,
                    ..Default::default()
                });
            }
        };
        if h.type_ != TYPE_STREAM || h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.counters.bad_packets.inc();
            return reply_rst(self);
        }
        let key = (h.src_port, h.dst_port);
        let token = self.by_ports.get(&key).copied();
        if h.op == OP_REQUEST {
            if token.is_some() {
                return reply_rst(self);
            }
            let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), h.dst_port));
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(stream) => {
                    let mut c = Conn::new(stream, State::Established, h.src_port, h.dst_port);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    let resp = self.header(&c, OP_RESPONSE, 0, 0);
                    self.insert(c);
                    self.control.push_back(resp);
                    self.counters.guest_connections.inc();
                }
                Err(_) => {
                    self.counters.refused.inc();
                    reply_rst(self);
                }
            }
            return;
        }
        let Some(token) = token else {
            return reply_rst(self);
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.host_port);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    return self.reset_conn(token);
                }
            }
            OP_RW if c.state == State::Established => {
                self.counters.tx_bytes.add(payload.len() as u64);
                let mut rest = &payload[..];
                if c.pending_out.is_empty() {
                    match c.stream.write(rest) {
                        Ok(n) => {
                            rest = &rest[n..];
                            c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => return self.reset_conn(token),
                    }
                }
                if c.pending_out.len() + rest.len() > BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    self.counters.bad_packets.inc();
                    return self.reset_conn(token);
                }
                c.pending_out.extend_from_slice(rest);
                self.maybe_credit_update(token);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let upd = header(self.cid, c, OP_CREDIT_UPDATE, 0, 0);
                self.control.push_back(upd);
            }
            OP_SHUTDOWN => {
                if h.flags & (packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND)
                    == packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND
                {
                    return self.reset_conn(token);
                }
                if h.flags & packet::SHUTDOWN_SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            OP_RST => return self.remove(token),
            _ => return self.reset_conn(token),
        }
        // New credit may let a stalled connection send again.
        if let Some(c) = self.conns.get_mut(&token) {
            if c.stalled && c.peer_credit() > 0 {
                c.stalled = false;
                c.queued = true;
                self.ready.push_back(token);
            }
        }
        self.update_interest(token);
    }

    /// Fills RX buffers: control packets first, then data from ready connections.
    fn process_rx(&mut self) {
        let Some((mut q, kick, call)) = self.rx.take() else {
            return;
        };
        let mut used = false;
        while !(self.control.is_empty() && self.ready.is_empty()) {
            let Some((head, segs)) = Self::chain_segments(&mut q, &self.mem) else {
                break;
            };
            let written = match self.control.pop_front() {
                Some(h) => Some(packet::write_packet(&self.mem, &segs, &h, &[])),
                None => self.next_data(&segs),
            };
            match written {
                None => {
                    q.go_to_previous_position();
                    break;
                }
                Some(Ok(len)) => {
                    let _ = q.add_used(&self.mem, head, len);
                }
                Some(Err(e)) => {
                    log::debug!("vsock: cannot fill RX buffer: {e}");
                    self.counters.bad_packets.inc();
                    let _ = q.add_used(&self.mem, head, 0);
                }
            }
            used = true;
        }
        if used {
            let _ = call.write(1);
        }
        self.rx = Some((q, kick, call));
    }

    /// One RW (or end-of-stream) packet from the first ready connection that has data and
    /// credit, written into `segs`; `None` if no connection has anything now.
    fn next_data(&mut self, segs: &[Segment]) -> Option<Result<u32, packet::Error>> {
        let mut buf = vec![0u8; packet::rx_capacity(segs)];
        while let Some(token) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            let credit = c.peer_credit() as usize;
            if c.state != State::Established || credit == 0 || buf.is_empty() {
                c.queued = false;
                c.stalled = credit == 0;
                self.update_interest(token);
                continue;
            }
            let want = buf.len().min(credit);
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    let flags = packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND;
                    let h = header(self.cid, c, OP_SHUTDOWN, flags, 0);
                    self.remove(token);
                    return Some(packet::write_packet(&self.mem, segs, &h, &[]));
                }
                Ok(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let h = header(self.cid, c, OP_RW, 0, n as u32);
                    self.ready.push_back(token);
                    self.counters.rx_bytes.add(n as u64);
                    return Some(packet::write_packet(&self.mem, segs, &h, &buf[..n]));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.queued = false;
                    self.update_interest(token);
                }
                Err(_) => self.reset_conn(token),
            }
        }
        None
    }
}
