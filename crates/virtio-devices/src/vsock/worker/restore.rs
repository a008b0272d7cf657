//! A worker rebuilt from saved state, in a successor VMM (live update: the connections' sockets
//! came along and the connections go on) or in a VMM restoring a snapshot file (the host ends
//! are gone with the old process: the guest is told each connection was reset).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use virtio_queue::QueueT;

use super::{Conn, State, VsockState, Worker, BUF_ALLOC, FIRST_HOST_PORT, MAX_CONNECT_LINE};
use crate::vsock::packet::{Header, HOST_CID, OP_CREDIT_UPDATE, OP_RST, TYPE_STREAM};

impl Worker {
    /// Duplicates of the connections' sockets, in the order of [`Worker::state`].
    pub(in crate::vsock) fn streams(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.sorted()
            .into_iter()
            .map(|c| c.stream.as_fd().try_clone_to_owned())
            .collect()
    }

    /// Loads `state` into this worker, made on the restored queues and not yet run. `streams`
    /// are the sockets of `state.connections`, in order (a live update); `None` resets every
    /// connection towards the guest (a snapshot file). A saved state may be hostile: what
    /// doesn't fit is refused, nothing is trusted beyond the checks here.
    pub(in crate::vsock) fn load(
        &mut self,
        state: VsockState,
        streams: Option<Vec<OwnedFd>>,
    ) -> Result<(), String> {
        if state.cid != self.cid {
            return Err(format!("saved for CID {}, not {}", state.cid, self.cid));
        }
        if let (Some((q, _, _)), Some((avail, used))) = (self.rx.as_mut(), state.rx) {
            q.set_next_avail(avail);
            q.set_next_used(used);
        }
        if let (Some((q, _, _)), Some((avail, used))) = (self.tx.as_mut(), state.tx) {
            q.set_next_avail(avail);
            q.set_next_used(used);
        }
        self.control = state.control.into_iter().collect();
        self.next_host_port = state.next_host_port.max(FIRST_HOST_PORT);
        let Some(streams) = streams else {
            for saved in state.connections.iter().filter(|c| c.handshake.is_none()) {
                self.control.push_back(Header {
                    src_cid: HOST_CID,
                    dst_cid: self.cid,
                    src_port: saved.host_port,
                    dst_port: saved.guest_port,
                    type_: TYPE_STREAM,
                    op: OP_RST,
                    buf_alloc: BUF_ALLOC,
                    ..Default::default()
                });
            }
            return Ok(());
        };
        if streams.len() != state.connections.len() {
            return Err(format!(
                "{} connections saved but {} sockets handed over",
                state.connections.len(),
                streams.len()
            ));
        }
        for (saved, fd) in state.connections.into_iter().zip(streams) {
            let stream = UnixStream::from(fd);
            stream
                .set_nonblocking(true)
                .map_err(|e| format!("connection socket: {e}"))?;
            let conn_state = match (&saved.handshake, saved.established) {
                (Some(_), _) => State::Handshake,
                (None, true) => State::Established,
                (None, false) => State::Connecting,
            };
            let line = saved.handshake.unwrap_or_default();
            let key = (saved.guest_port, saved.host_port);
            if line.len() > MAX_CONNECT_LINE
                || saved.pending_out.len() > BUF_ALLOC as usize
                || (conn_state != State::Handshake && self.by_ports.contains_key(&key))
            {
                return Err(format!(
                    "connection {}:{} is malformed",
                    saved.guest_port, saved.host_port
                ));
            }
            let mut c = Conn::new(stream, conn_state, saved.guest_port, saved.host_port);
            c.peer_buf_alloc = saved.peer_buf_alloc;
            c.peer_fwd_cnt = saved.peer_fwd_cnt;
            c.rx_cnt = saved.rx_cnt;
            c.fwd_cnt = saved.fwd_cnt;
            c.reported_fwd = saved.fwd_cnt;
            c.pending_out = saved.pending_out;
            c.line = line;
            if conn_state == State::Established {
                // The credit the old worker had not reported yet: report it now.
                let update = super::header(self.cid, &c, OP_CREDIT_UPDATE, 0, 0);
                self.control.push_back(update);
            }
            // Registered for input (level-triggered): data that arrived while no worker
            // watched is seen at once.
            self.insert(c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::{ConnState, VsockState, Worker, BUF_ALLOC};
    use crate::vsock::packet::OP_RST;

    fn worker() -> Worker {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        Worker::new(
            3,
            "/nonexistent".into(),
            mem,
            Vec::new(),
            None,
            stop,
            Default::default(),
        )
        .unwrap()
    }

    fn conn(guest_port: u32, host_port: u32) -> ConnState {
        ConnState {
            guest_port,
            host_port,
            established: true,
            handshake: None,
            peer_buf_alloc: 4096,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            pending_out: Vec::new(),
        }
    }

    fn with(connections: Vec<ConnState>) -> VsockState {
        VsockState {
            cid: 3,
            connections,
            ..Default::default()
        }
    }

    fn sockets(
        n: usize,
    ) -> (
        Vec<std::os::fd::OwnedFd>,
        Vec<std::os::unix::net::UnixStream>,
    ) {
        let (ours, peers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .map(|(a, b)| (std::os::fd::OwnedFd::from(a), b))
            .unzip();
        (ours, peers)
    }

    #[test]
    fn hostile_saved_state_is_refused() {
        let other_cid = VsockState {
            cid: 4,
            ..Default::default()
        };
        assert!(worker().load(other_cid, None).is_err());
        let (fds, _peers) = sockets(0);
        assert!(worker().load(with(vec![conn(1, 2)]), Some(fds)).is_err());
        let mut huge = conn(1, 2);
        huge.pending_out = vec![0; BUF_ALLOC as usize + 1];
        let (fds, _peers) = sockets(1);
        assert!(worker().load(with(vec![huge]), Some(fds)).is_err());
        let (fds, _peers) = sockets(2);
        assert!(worker()
            .load(with(vec![conn(1, 2), conn(1, 2)]), Some(fds))
            .is_err());
        let mut long_line = conn(0, 0);
        long_line.handshake = Some(vec![b'C'; 1000]);
        let (fds, _peers) = sockets(1);
        assert!(worker().load(with(vec![long_line]), Some(fds)).is_err());
    }

    #[test]
    fn handed_over_connections_go_on_and_lost_ones_are_reset() {
        let mut w = worker();
        let mut pending = conn(0, 0);
        pending.established = false;
        pending.handshake = Some(b"CONN".to_vec());
        let (fds, _peers) = sockets(2);
        w.load(with(vec![conn(5, 1234), pending.clone()]), Some(fds))
            .unwrap();
        assert_eq!(w.state().connections, vec![conn(5, 1234), pending.clone()]);

        let mut w = worker();
        w.load(with(vec![conn(5, 1234), pending]), None).unwrap();
        assert!(w.state().connections.is_empty());
        let resets: Vec<_> = w.control.iter().filter(|h| h.op == OP_RST).collect();
        assert_eq!(resets.len(), 1, "only the established connection");
        assert_eq!((resets[0].dst_port, resets[0].src_port), (5, 1234));
    }
}
