//! What a card learns from the datagrams a peer sends it, per path, and tells the peer back:
//! timestamp echoes (one pending per path, piggybacked on the next datagram to that peer,
//! with the CE mark and a loss flag), path sequence gaps (a path is FIFO, so a gap is a loss)
//! and the reorder horizon (everything sent before it has arrived or is lost).

use crate::geneve::{ECHO_CE, ECHO_LOSS};

/// The last packet received from a host on one path, to echo in a packet sent to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Echo {
    pub tx_ts: u32,
    pub flags: u8,
    pub at_us: u64,
}

/// Echoes waiting per path for one host, taken in turn: every path gets RTT, CE and loss
/// feedback, not only the one whose datagram happened to arrive last.
#[derive(Debug, Clone)]
pub(crate) struct Echoes {
    slots: Vec<Option<Echo>>,
    next: usize,
}

impl Echoes {
    pub fn new(paths: usize) -> Self {
        Self {
            slots: vec![None; paths],
            next: 0,
        }
    }

    /// Records a datagram received on `path`; a CE mark not yet echoed stays pending.
    pub fn record(&mut self, path: usize, tx_ts: u32, ce: bool, now: u64) {
        let Some(slot) = self.slots.get_mut(path) else {
            return;
        };
        let pending_ce = slot.is_some_and(|e| e.flags & ECHO_CE != 0);
        *slot = Some(Echo {
            tx_ts,
            flags: if ce || pending_ce { ECHO_CE } else { 0 },
            at_us: now,
        });
    }

    /// The next pending echo, round robin over paths.
    pub fn take(&mut self) -> Option<(usize, Echo)> {
        let n = self.slots.len();
        for i in 0..n {
            let p = (self.next + i) % n;
            if let Some(e) = self.slots[p].take() {
                self.next = p + 1;
                return Some((p, e));
            }
        }
        None
    }
}

/// Receive-side state about one peer.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    echoes: Echoes,
    /// Next expected path sequence number per path.
    expected: Vec<Option<u32>>,
    /// Datagrams found missing per path, not yet echoed.
    lost: Vec<u64>,
    /// Newest transmit timestamp delivered per path, and when.
    latest: Vec<Option<(u32, u64)>>,
}

impl Received {
    pub fn new(paths: usize) -> Self {
        Self {
            echoes: Echoes::new(paths),
            expected: vec![None; paths],
            lost: vec![0; paths],
            latest: vec![None; paths],
        }
    }

    /// Notes a datagram (data or control) that came on `path`; returns how many datagrams
    /// before it on that path never arrived. A step back is a restarted peer or a duplicate,
    /// not a loss.
    pub fn on_datagram(&mut self, path: usize, path_seq: u32, sent_ts: u32, now: u64) -> u64 {
        if path >= self.expected.len() {
            return 0;
        }
        self.latest[path] = Some((sent_ts, now));
        let mut lost = 0;
        if let Some(e) = self.expected[path] {
            let gap = path_seq.wrapping_sub(e);
            if gap >= 1 << 31 {
                return 0;
            }
            if gap < 1 << 20 {
                lost = u64::from(gap);
                self.lost[path] += lost;
            }
        }
        self.expected[path] = Some(path_seq.wrapping_add(1));
        lost
    }

    /// Notes a data datagram to echo.
    pub fn record_echo(&mut self, path: usize, tx_ts: u32, ce: bool, now: u64) {
        self.echoes.record(path, tx_ts, ce, now);
    }

    /// The next echo to send, flagged [`ECHO_LOSS`] when its path lost datagrams since.
    pub fn take_echo(&mut self) -> Option<(usize, Echo)> {
        let (p, mut e) = self.echoes.take()?;
        if std::mem::take(&mut self.lost[p]) > 0 {
            e.flags |= ECHO_LOSS;
        }
        Some((p, e))
    }

    /// The oldest, over the paths that delivered within `window_us`, of the newest transmit
    /// timestamp each delivered. A path quiet for longer (unused, dead, or queued beyond the
    /// reorder timeout anyway) does not hold it back.
    pub fn horizon(&self, now: u64, window_us: u64) -> Option<u32> {
        let mut h: Option<u32> = None;
        for (ts, at) in self.latest.iter().flatten() {
            if now.saturating_sub(*at) <= window_us {
                let older = |m: u32| (ts.wrapping_sub(m) as i32) < 0;
                h = Some(h.map_or(*ts, |m| if older(m) { *ts } else { m }));
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_take_paths_in_turn_and_keep_ce() {
        let mut e = Echoes::new(3);
        assert!(e.take().is_none());
        e.record(0, 10, true, 1);
        e.record(0, 11, false, 2);
        e.record(2, 12, false, 3);
        e.record(7, 1, false, 3); // no such path: ignored
        let (p, first) = e.take().unwrap();
        assert_eq!((p, first.tx_ts, first.flags), (0, 11, ECHO_CE));
        e.record(0, 13, false, 4);
        assert_eq!(e.take().unwrap().0, 2, "path 2 before path 0 again");
        assert_eq!(e.take().unwrap().0, 0);
        assert!(e.take().is_none());
    }

    #[test]
    fn path_gaps_are_losses_echoed_once() {
        let mut r = Received::new(2);
        assert_eq!(r.on_datagram(0, 10, 100, 1), 0);
        assert_eq!(r.on_datagram(0, 11, 101, 2), 0);
        assert_eq!(r.on_datagram(0, 14, 104, 3), 2, "12 and 13 lost");
        assert_eq!(r.on_datagram(0, 12, 102, 4), 0, "a step back is no loss");
        assert_eq!(r.on_datagram(9, 1, 1, 4), 0, "no such path");
        r.record_echo(0, 104, false, 5);
        assert_eq!(r.take_echo().unwrap().1.flags, ECHO_LOSS);
        r.record_echo(0, 105, false, 6);
        assert_eq!(r.take_echo().unwrap().1.flags, 0, "reported once");
    }

    #[test]
    fn horizon_is_the_slowest_recent_path() {
        let mut r = Received::new(3);
        assert_eq!(r.horizon(0, 10), None);
        r.on_datagram(0, 0, 500, 100);
        r.on_datagram(1, 0, 480, 100);
        r.on_datagram(2, 0, 10, 50); // quiet since 50: not waited for
        assert_eq!(r.horizon(100, 10), Some(480));
        // Wrapping timestamps: u32::MAX is older than 5.
        r.on_datagram(0, 1, 5, 101);
        r.on_datagram(1, 1, u32::MAX, 101);
        assert_eq!(r.horizon(101, 10), Some(u32::MAX));
    }
}
