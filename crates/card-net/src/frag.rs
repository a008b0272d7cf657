//! Large frames inside the tunnel: a frame (up to 64 KiB, a TSO segment from the VM) is cut
//! into datagrams that fit the underlay MTU and sent as UDP GSO trains; the receiver glues
//! the pieces back together after its reorder buffer has put them in sequence.
//!
//! Why whole frames and not MSS-sized TCP segments: the VM's stack already built one TCP
//! segment of 64 KiB with one checksum to finish; keeping it whole costs one TAP read, one
//! `sendmsg` per train, one GRO receive per train and one TAP write, with no TCP parsing or
//! checksum in the card, and the receiving stack gets the large segment it would get from
//! GRO. The price: one lost datagram loses the whole frame (TCP then retransmits that
//! segment), where segmenting would lose one MSS. Each datagram still has its own sequence
//! number, so reordering and loss accounting stay per datagram.
//!
//! Per flow on the receiver:
//!
//! ```text
//!  idle ──first fragment (MORE)──► partial ──CONT, seq == next, MORE──► partial
//!   ▲  ◄──whole frame: deliver        │ CONT, seq == next, last: deliver ──► idle
//!   └─────────────────────────────────┘ gap, or a new first fragment: drop partial (counted)
//! ```

use std::collections::HashMap;

use crate::geneve::{Offload, FRAG_CONT, FRAG_MORE};
use crate::reorder::FlowKey;
use crate::vnet;

/// Largest frame rebuilt (a TSO segment is at most 64 KiB plus its headers).
pub const MAX_FRAME: usize = 65_535 + 256;

/// How a frame is cut: for datagram `i`, the byte range of the frame it carries.
/// `first_hdr`/`hdr` are the encapsulation header lengths of the first and the other
/// datagrams and `segment` the largest datagram, so every datagram but the last is exactly
/// `segment` bytes (what a UDP GSO train requires).
pub fn cut(frame_len: usize, first_hdr: usize, hdr: usize, segment: usize) -> Vec<(usize, usize)> {
    let first = segment.saturating_sub(first_hdr).max(1);
    let rest = segment.saturating_sub(hdr).max(1);
    let mut out = vec![(0, frame_len.min(first))];
    let mut at = out[0].1;
    while at < frame_len {
        let end = (at + rest).min(frame_len);
        out.push((at, end));
        at = end;
    }
    out
}

/// Fragment flags of datagram `i` of `n`.
pub fn flags(i: usize, n: usize) -> u8 {
    let mut f = 0;
    if i > 0 {
        f |= FRAG_CONT;
    }
    if i + 1 < n {
        f |= FRAG_MORE;
    }
    f
}

/// A piece of a frame out of the reorder buffer. `buf` holds [`vnet::LEN`] bytes of room
/// and then the piece, so a whole frame is written to the TAP without another copy.
#[derive(Debug)]
pub struct Piece {
    pub seq: u32,
    pub frag: u8,
    pub offload: Option<Offload>,
    pub buf: Vec<u8>,
}

impl Piece {
    /// A piece holding `data`, with header room in front.
    pub fn new(seq: u32, frag: u8, offload: Option<Offload>, data: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(vnet::LEN + data.len());
        buf.resize(vnet::LEN, 0);
        buf.extend_from_slice(data);
        Self {
            seq,
            frag,
            offload,
            buf,
        }
    }
}

/// A rebuilt frame: `buf[vnet::LEN..]` is the frame.
#[derive(Debug)]
pub struct Frame {
    pub offload: Option<Offload>,
    pub buf: Vec<u8>,
}

/// What reassembly saw, for the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames rebuilt from more than one datagram.
    pub reassembled: u64,
    /// Partial frames abandoned (a piece lost, or the flow table full).
    pub incomplete: u64,
    /// Continuation pieces with no partial frame to join (their start was lost).
    pub orphans: u64,
    /// Frames that grew past [`MAX_FRAME`].
    pub oversized: u64,
}

#[derive(Debug)]
struct Partial {
    next: u32,
    piece: Piece,
    last_us: u64,
}

/// Per-flow reassembly of in-sequence pieces.
#[derive(Debug)]
pub struct Reassembly {
    partial: HashMap<FlowKey, Partial>,
    max_flows: usize,
    pub stats: Stats,
}

impl Reassembly {
    pub fn new(max_flows: usize) -> Self {
        Self {
            partial: HashMap::new(),
            max_flows: max_flows.max(1),
            stats: Stats::default(),
        }
    }

    /// Frames being rebuilt now.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Takes the next piece of flow `key` (in sequence order, gaps allowed); returns the
    /// frame it completes.
    pub fn push(&mut self, key: FlowKey, piece: Piece, now_us: u64) -> Option<Frame> {
        if piece.frag & FRAG_CONT == 0 {
            if self.partial.remove(&key).is_some() {
                self.stats.incomplete += 1;
            }
            if piece.frag & FRAG_MORE == 0 {
                return Some(Frame {
                    offload: piece.offload,
                    buf: piece.buf,
                });
            }
            if self.partial.len() >= self.max_flows {
                self.evict();
            }
            let next = piece.seq.wrapping_add(1);
            self.partial.insert(
                key,
                Partial {
                    next,
                    piece,
                    last_us: now_us,
                },
            );
            return None;
        }
        let Some(p) = self.partial.get_mut(&key) else {
            self.stats.orphans += 1;
            return None;
        };
        if piece.seq != p.next {
            self.partial.remove(&key);
            self.stats.incomplete += 1;
            self.stats.orphans += 1;
            return None;
        }
        let data = &piece.buf[vnet::LEN..];
        if p.piece.buf.len() - vnet::LEN + data.len() > MAX_FRAME {
            self.partial.remove(&key);
            self.stats.oversized += 1;
            return None;
        }
        p.piece.buf.extend_from_slice(data);
        p.next = p.next.wrapping_add(1);
        p.last_us = now_us;
        if piece.frag & FRAG_MORE != 0 {
            return None;
        }
        let p = self.partial.remove(&key)?;
        self.stats.reassembled += 1;
        Some(Frame {
            offload: p.piece.offload,
            buf: p.piece.buf,
        })
    }

    /// Drops partial frames idle for `timeout_us` (their last piece was lost).
    pub fn expire(&mut self, now_us: u64, timeout_us: u64) {
        let before = self.partial.len();
        self.partial
            .retain(|_, p| now_us.saturating_sub(p.last_us) < timeout_us);
        self.stats.incomplete += (before - self.partial.len()) as u64;
    }

    fn evict(&mut self) {
        let oldest = self
            .partial
            .iter()
            .min_by_key(|(_, p)| p.last_us)
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.partial.remove(&k);
            self.stats.incomplete += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Cuts `f` and returns the pieces as a receiver would get them.
    fn pieces(f: &[u8], seq0: u32, off: Option<Offload>) -> Vec<Piece> {
        let cuts = cut(f.len(), 52, 36, 1472);
        let n = cuts.len();
        cuts.iter()
            .enumerate()
            .map(|(i, &(a, b))| {
                let o = if i == 0 { off } else { None };
                Piece::new(seq0.wrapping_add(i as u32), flags(i, n), o, &f[a..b])
            })
            .collect()
    }

    #[test]
    fn cut_fills_every_datagram_but_the_last() {
        let c = cut(65_000, 52, 36, 1472);
        assert_eq!(c[0], (0, 1420));
        assert!(c.windows(2).all(|w| w[0].1 == w[1].0));
        assert_eq!(c.last().unwrap().1, 65_000);
        for &(a, b) in &c[1..c.len() - 1] {
            assert_eq!(b - a + 36, 1472);
        }
        assert_eq!(cut(100, 52, 36, 1472), vec![(0, 100)]);
        assert_eq!(cut(0, 52, 36, 1472), vec![(0, 0)]);
        assert_eq!(flags(0, 1), 0);
        assert_eq!(flags(0, 3), FRAG_MORE);
        assert_eq!(flags(1, 3), FRAG_MORE | FRAG_CONT);
        assert_eq!(flags(2, 3), FRAG_CONT);
    }

    #[test]
    fn frames_rebuilt_whole_with_offload() {
        let off = Offload {
            gso_type: 1,
            gso_size: 1400,
            ..Default::default()
        };
        let mut r = Reassembly::new(4);
        let f = frame(60_000);
        let mut out = Vec::new();
        for p in pieces(&f, u32::MAX - 3, Some(off)) {
            out.extend(r.push((1, 1), p, 0));
        }
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].buf[vnet::LEN..], &f[..]);
        assert_eq!(out[0].offload, Some(off));
        assert_eq!(r.stats.reassembled, 1);
        // A small frame passes straight through.
        let small = r.push((1, 1), Piece::new(7, 0, None, b"abc"), 0).unwrap();
        assert_eq!(&small.buf[vnet::LEN..], b"abc");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn a_lost_piece_loses_only_its_frame() {
        let mut r = Reassembly::new(4);
        let f = frame(5000);
        let mut ps = pieces(&f, 10, None);
        ps.remove(1);
        let mut out = Vec::new();
        for p in ps {
            out.extend(r.push((1, 1), p, 0));
        }
        assert!(out.is_empty());
        assert_eq!(r.stats.incomplete, 1);
        // The next frame is whole.
        for p in pieces(&f, 20, None) {
            out.extend(r.push((1, 1), p, 0));
        }
        assert_eq!(out.len(), 1);
        // A lost last piece: the partial expires.
        let mut ps = pieces(&f, 30, None);
        ps.pop();
        for p in ps {
            assert!(r.push((1, 1), p, 0).is_none());
        }
        r.expire(100, 1000);
        assert_eq!(r.pending(), 1);
        r.expire(2000, 1000);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn hostile_pieces_are_bounded() {
        let mut r = Reassembly::new(2);
        // Orphans, flows beyond the table, and a frame that never ends.
        assert!(r
            .push((1, 1), Piece::new(5, FRAG_CONT, None, b"x"), 0)
            .is_none());
        assert_eq!(r.stats.orphans, 1);
        for k in 0..5 {
            r.push((k, k), Piece::new(0, FRAG_MORE, None, b"x"), u64::from(k));
            assert!(r.pending() <= 2);
        }
        let chunk = vec![0u8; 1400];
        r.push((9, 9), Piece::new(0, FRAG_MORE, None, &chunk), 0);
        for s in 1..100u32 {
            r.push(
                (9, 9),
                Piece::new(s, FRAG_MORE | FRAG_CONT, None, &chunk),
                0,
            );
        }
        assert!(r.stats.oversized >= 1);
    }
}
