//! Receiver-side reordering: packets of one flow sprayed over paths of different delay arrive
//! out of order; TCP in the VM would read that as loss. Each flow (sending host, flow id) gets
//! a small window of slots indexed by sequence number; a gap is waited for at most `timeout`,
//! then skipped (counted). Memory is bounded: `window` slots per flow, `max_flows` flows and
//! `max_buffered` packets in all; overflowing any of them flushes in order instead of dropping.
//!
//! Per flow:
//!
//! ```text
//!  seq == next ──► deliver, then every consecutive buffered one
//!  next < seq < next+window ──► buffer (duplicate: dropped)
//!  seq >= next+window, or buffer full ──► flush buffered in order, continue after seq
//!  seq < next (late, after a skip) ──► deliver at once (TCP copes with it)
//!  oldest buffered waited `timeout` ──► skip the gap (timeout counted)
//!  every path delivered something sent after the first held one ──► skip the gap at once
//! ```
//!
//! The last rule is the fast one: a path is FIFO, so once each path in use has delivered a
//! datagram sent later than the first packet held after a gap, the gap's packets (sent
//! before it) are lost, not late ([`Reorder::poll_with`] gets that horizon from the caller).
//! The timeout, which must exceed the paths' delay skew, is only the fallback.

use std::collections::HashMap;

/// Flow key: sending host (IPv4 as u32) and flow id.
pub type FlowKey = (u32, u32);

/// Limits of the reorder buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub window: u32,
    pub max_flows: usize,
    pub max_buffered: usize,
    pub timeout_us: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // A window of 2048 datagrams is ~2.9 MB: 10 ms of skew at 2 Gbit/s.
        Self {
            window: 2048,
            max_flows: 256,
            max_buffered: 16_384,
            timeout_us: 10_000,
        }
    }
}

/// What happened, for the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Gaps skipped: after the timeout, or once every path was past them.
    pub timeouts: u64,
    /// Flushes forced by a full window, buffer or flow table.
    pub overflows: u64,
    pub duplicates: u64,
    /// Packets delivered after their gap was already skipped.
    pub late: u64,
    /// Largest number of packets held for one flow.
    pub max_depth: u64,
}

#[derive(Debug)]
struct Flow<T> {
    next: u32,
    /// Held packets: (packet, arrival µs, sender's transmit timestamp).
    slots: Vec<Option<(T, u64, Option<u32>)>>,
    held: usize,
    last_us: u64,
    /// No held packet arrived before this (a lower bound, so `poll` scans the slots only
    /// when a timeout may be due).
    oldest_us: u64,
}

/// Per-flow reorder buffer over packets of type `T`.
#[derive(Debug)]
pub struct Reorder<T> {
    limits: Limits,
    flows: HashMap<FlowKey, Flow<T>>,
    buffered: usize,
    pub stats: Stats,
}

impl<T> Reorder<T> {
    pub fn new(mut limits: Limits) -> Self {
        // A power of two, so slot = seq % window stays continuous across the u32 wrap.
        limits.window = limits.window.clamp(1, 4096).next_power_of_two();
        limits.max_flows = limits.max_flows.max(1);
        Self {
            limits,
            flows: HashMap::new(),
            buffered: 0,
            stats: Stats::default(),
        }
    }

    /// Packets held now.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Accepts packet `seq` of `key`; in-order packets are appended to `out`.
    pub fn push(&mut self, key: FlowKey, seq: u32, pkt: T, now_us: u64, out: &mut Vec<T>) {
        self.push_sent(key, seq, pkt, now_us, None, out);
    }

    /// [`Reorder::push`] of a packet the sender stamped `sent_ts` (µs, wrapping).
    pub fn push_sent(
        &mut self,
        key: FlowKey,
        seq: u32,
        pkt: T,
        now_us: u64,
        sent_ts: Option<u32>,
        out: &mut Vec<T>,
    ) {
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= self.limits.max_flows {
                self.evict(out);
            }
            let slots = (0..self.limits.window).map(|_| None).collect();
            self.flows.insert(
                key,
                Flow {
                    next: seq,
                    slots,
                    held: 0,
                    last_us: now_us,
                    oldest_us: now_us,
                },
            );
        }
        let window = self.limits.window;
        let flow = self.flows.get_mut(&key).expect("flow inserted above");
        flow.last_us = now_us;
        let ahead = seq.wrapping_sub(flow.next);
        if ahead > u32::MAX / 2 {
            self.stats.late += 1;
            out.push(pkt);
            return;
        }
        if ahead == 0 {
            out.push(pkt);
            flow.next = seq.wrapping_add(1);
            self.buffered -= drain(flow, out);
            return;
        }
        if ahead >= window || self.buffered >= self.limits.max_buffered {
            self.stats.overflows += 1;
            self.buffered -= flush(flow, out);
            out.push(pkt);
            flow.next = seq.wrapping_add(1);
            return;
        }
        let slot = &mut flow.slots[(seq % window) as usize];
        if slot.is_some() {
            self.stats.duplicates += 1;
            return;
        }
        *slot = Some((pkt, now_us, sent_ts));
        if flow.held == 0 {
            flow.oldest_us = now_us;
        }
        flow.held += 1;
        self.buffered += 1;
        self.stats.max_depth = self.stats.max_depth.max(flow.held as u64);
    }

    /// Skips gaps that waited longer than the timeout; returns when the next one expires.
    pub fn poll(&mut self, now_us: u64, out: &mut Vec<T>) -> Option<u64> {
        self.poll_with(now_us, |_| None, out)
    }

    /// [`Reorder::poll`], also skipping a gap once `horizon(flow)` (the oldest, over the
    /// sender's paths in use, of the newest transmit timestamp each delivered) is past the
    /// first packet held after it.
    pub fn poll_with(
        &mut self,
        now_us: u64,
        horizon: impl Fn(FlowKey) -> Option<u32>,
        out: &mut Vec<T>,
    ) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        let timeout = self.limits.timeout_us;
        for (key, flow) in self.flows.iter_mut() {
            while flow.held > 0 {
                let passed = horizon(*key).is_some_and(|h| {
                    first_held_ts(flow).is_some_and(|t| (h.wrapping_sub(t) as i32) > 0)
                });
                if !passed && now_us.saturating_sub(flow.oldest_us) < timeout {
                    let due = flow.oldest_us + timeout;
                    earliest = Some(earliest.map_or(due, |e| e.min(due)));
                    break;
                }
                let oldest = oldest_arrival(flow);
                flow.oldest_us = oldest;
                if !passed && now_us.saturating_sub(oldest) < timeout {
                    let due = oldest + timeout;
                    earliest = Some(earliest.map_or(due, |e| e.min(due)));
                    break;
                }
                // Skip to the first held packet, then deliver the run that follows it.
                let window = flow.slots.len() as u32;
                while flow.slots[(flow.next % window) as usize].is_none() {
                    flow.next = flow.next.wrapping_add(1);
                }
                self.stats.timeouts += 1;
                self.buffered -= drain(flow, out);
            }
        }
        earliest
    }
}

impl<T> Reorder<T> {
    /// Makes room for a flow: drops an idle flow's state, or flushes the least recent one.
    fn evict(&mut self, out: &mut Vec<T>) {
        let victim = self
            .flows
            .iter()
            .min_by_key(|(_, f)| (f.held > 0, f.last_us))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            if let Some(mut f) = self.flows.remove(&k) {
                if f.held > 0 {
                    self.stats.overflows += 1;
                    self.buffered -= flush(&mut f, out);
                }
            }
        }
    }
}

fn oldest_arrival<T>(flow: &Flow<T>) -> u64 {
    flow.slots
        .iter()
        .flatten()
        .map(|(_, at, _)| *at)
        .min()
        .unwrap_or(0)
}

/// Transmit timestamp of the first packet held after the gap at `next`.
fn first_held_ts<T>(flow: &Flow<T>) -> Option<u32> {
    let window = flow.slots.len() as u32;
    (0..window)
        .find_map(|i| flow.slots[(flow.next.wrapping_add(i) % window) as usize].as_ref())
        .and_then(|(_, _, ts)| *ts)
}

/// Delivers the consecutive run starting at `next`; returns how many left the buffer.
fn drain<T>(flow: &mut Flow<T>, out: &mut Vec<T>) -> usize {
    let window = flow.slots.len() as u32;
    let mut n = 0;
    while flow.held > 0 {
        let Some((pkt, _, _)) = flow.slots[(flow.next % window) as usize].take() else {
            break;
        };
        out.push(pkt);
        flow.next = flow.next.wrapping_add(1);
        flow.held -= 1;
        n += 1;
    }
    n
}

/// Delivers everything held, in sequence order; returns how many left the buffer.
fn flush<T>(flow: &mut Flow<T>, out: &mut Vec<T>) -> usize {
    let window = flow.slots.len() as u32;
    let mut n = 0;
    for i in 0..window {
        if flow.held == 0 {
            break;
        }
        let seq = flow.next.wrapping_add(i);
        if let Some((pkt, _, _)) = flow.slots[(seq % window) as usize].take() {
            out.push(pkt);
            flow.held -= 1;
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            window: 8,
            max_flows: 2,
            max_buffered: 10,
            timeout_us: 100,
        }
    }

    #[test]
    fn in_order_passes_through() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        for s in 5..10u32 {
            r.push((1, 1), s, s, 0, &mut out);
        }
        assert_eq!(out, vec![5, 6, 7, 8, 9]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn swapped_packets_are_reordered() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        r.push((1, 1), 0, 0, 0, &mut out);
        r.push((1, 1), 2, 2, 0, &mut out);
        r.push((1, 1), 3, 3, 0, &mut out);
        assert_eq!(out, vec![0]);
        assert_eq!(r.stats.max_depth, 2);
        r.push((1, 1), 1, 1, 0, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
        assert_eq!(r.buffered(), 0);
        // Duplicate of a buffered packet is dropped; a late one delivered.
        r.push((1, 1), 6, 6, 0, &mut out);
        r.push((1, 1), 6, 6, 0, &mut out);
        assert_eq!(r.stats.duplicates, 1);
    }

    #[test]
    fn gap_skipped_after_timeout_and_late_packet_delivered() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        r.push((1, 1), 0, 0, 0, &mut out);
        r.push((1, 1), 2, 2, 10, &mut out);
        r.push((1, 1), 4, 4, 20, &mut out);
        assert_eq!(r.poll(50, &mut out), Some(110));
        assert_eq!(out, vec![0]);
        assert_eq!(r.poll(110, &mut out), Some(120));
        assert_eq!(out, vec![0, 2]);
        assert_eq!(r.poll(125, &mut out), None);
        assert_eq!(out, vec![0, 2, 4]);
        assert_eq!(r.stats.timeouts, 2);
        r.push((1, 1), 1, 1, 130, &mut out);
        assert_eq!(out.last(), Some(&1));
        assert_eq!(r.stats.late, 1);
    }

    #[test]
    fn bounded_window_buffer_and_flows() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        r.push((1, 1), 0, 0, 0, &mut out);
        r.push((1, 1), 3, 3, 0, &mut out);
        // Beyond the window: flush held in order, then carry on after it.
        r.push((1, 1), 100, 100, 0, &mut out);
        assert_eq!(out, vec![0, 3, 100]);
        assert_eq!(r.stats.overflows, 1);
        // Two more flows with held packets: the table holds 2, eviction flushes.
        out.clear();
        r.push((2, 2), 0, 0, 0, &mut out);
        r.push((2, 2), 2, 2, 1, &mut out);
        r.push((3, 3), 0, 10, 2, &mut out);
        r.push((4, 4), 0, 20, 3, &mut out);
        assert!(out.contains(&2) || r.buffered() == 1);
        assert!(r.flows.len() <= 2);
        // Buffer cap: never more than max_buffered held.
        let mut r = Reorder::new(limits());
        for s in 0..1000u32 {
            r.push((9, 9), s.wrapping_mul(7919) % 4000 + 1, s, 0, &mut out);
            assert!(r.buffered() <= 10);
        }
    }

    #[test]
    fn gap_skipped_once_every_path_is_past_it() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        r.push_sent((1, 1), 0, 0, 0, Some(100), &mut out);
        // Seq 1 (sent at 101) is missing; seq 2 was sent at 102.
        r.push_sent((1, 1), 2, 2, 5, Some(102), &mut out);
        assert_eq!(r.poll_with(6, |_| Some(102), &mut out), Some(105));
        assert_eq!(
            out,
            vec![0],
            "a path not yet past 102 may still bring seq 1"
        );
        r.poll_with(7, |_| Some(103), &mut out);
        assert_eq!(out, vec![0, 2], "every path is past it: seq 1 is lost");
        assert_eq!(r.stats.timeouts, 1);
        // Timestamps wrap.
        r.push_sent((1, 1), 4, 4, 8, Some(u32::MAX), &mut out);
        r.poll_with(9, |_| Some(3), &mut out);
        assert_eq!(out.last(), Some(&4));
    }

    #[test]
    fn sequence_wraps() {
        let mut r = Reorder::new(limits());
        let mut out = Vec::new();
        r.push((1, 1), u32::MAX - 1, 1, 0, &mut out);
        r.push((1, 1), 0, 3, 0, &mut out);
        r.push((1, 1), u32::MAX, 2, 0, &mut out);
        assert_eq!(out, vec![1, 2, 3]);
    }
}
