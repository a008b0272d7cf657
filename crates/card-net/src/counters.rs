//! Counters of one virtual NIC and of each of its paths: atomics written by the dataplane
//! worker and read at any time (card API, tests, benchmarks) as plain snapshots.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::table::Drop;

/// Log-linear histogram of µs values: 8 sub-buckets per power of two, up to 2^40 µs.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const SUB: u32 = 8;
const POWERS: u32 = 40;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..SUB * POWERS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < u64::from(SUB) {
        return v as usize;
    }
    let power = 63 - v.leading_zeros(); // >= 3
    let sub = (v >> (power - 3)) & u64::from(SUB - 1);
    (((power - 2) * SUB) as usize + sub as usize).min((SUB * POWERS) as usize - 1)
}

/// Lower bound of the values in bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    let b = b as u64;
    let sub = u64::from(SUB);
    if b < sub {
        return b;
    }
    let power = b / sub + 2;
    (1 << power) | ((b % sub) << (power - 3))
}

impl Histogram {
    pub fn record(&self, v: u64) {
        self.buckets[bucket(v)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The value at quantile `q` (0..=1), to the bucket's lower bound; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_floor(b);
            }
        }
        0
    }
}

/// Counters of one path.
#[derive(Debug, Default)]
pub struct PathCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub probes: AtomicU64,
    /// Loss events the sender's policy counted on this path (unanswered probes, losses
    /// echoed by the peer).
    pub losses: AtomicU64,
    /// Datagrams the peer sent on this path that never arrived (path sequence gaps).
    pub rx_lost: AtomicU64,
    /// Packets received on this path with CE on their outer header.
    pub ecn_ce: AtomicU64,
    /// Echoes telling us the peer received one of our packets on this path with CE.
    pub ecn_ce_echoed: AtomicU64,
    /// `adaptive`'s current weight of the path ×1000 (its lowest over peers; 1000 otherwise).
    pub weight_milli: AtomicU64,
    pub rtt_us: Histogram,
}

/// Counters of one virtual NIC.
#[derive(Debug, Default)]
pub struct NicCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_spoofed: AtomicU64,
    pub tx_unsupported: AtomicU64,
    pub tx_unknown_dst: AtomicU64,
    pub tx_errors: AtomicU64,
    pub rx_malformed: AtomicU64,
    pub rx_wrong_vni: AtomicU64,
    pub rx_unknown_src: AtomicU64,
    pub rx_not_for_us: AtomicU64,
    /// Frames the TAP would not take (its queue full, or the device gone).
    pub rx_tap_drops: AtomicU64,
    pub reorder_timeouts: AtomicU64,
    pub reorder_overflows: AtomicU64,
    pub reorder_late: AtomicU64,
    pub reorder_max_depth: AtomicU64,
    pub reorder_depth: Histogram,
    /// Frames rebuilt from several datagrams.
    pub frames_reassembled: AtomicU64,
    /// Frames lost because one of their datagrams was (or came too late).
    pub frames_incomplete: AtomicU64,
    /// Continuation datagrams whose frame start was lost.
    pub frag_orphans: AtomicU64,
    /// 1 while UDP GSO sends work (0 after falling back to single datagrams).
    pub gso: AtomicU64,
    pub paths: Vec<PathCounters>,
}

impl NicCounters {
    pub fn new(paths: usize) -> Self {
        Self {
            paths: (0..paths).map(|_| PathCounters::default()).collect(),
            ..Self::default()
        }
    }

    pub fn count_drop(&self, d: Drop) {
        let c = match d {
            Drop::Spoofed => &self.tx_spoofed,
            Drop::Unsupported => &self.tx_unsupported,
            Drop::UnknownDestination => &self.tx_unknown_dst,
            Drop::WrongVni => &self.rx_wrong_vni,
            Drop::UnknownSource => &self.rx_unknown_src,
            Drop::NotForUs => &self.rx_not_for_us,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> NicSnapshot {
        let l = |a: &AtomicU64| a.load(Relaxed);
        NicSnapshot {
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            dropped: [
                ("tx_spoofed", l(&self.tx_spoofed)),
                ("tx_unsupported", l(&self.tx_unsupported)),
                ("tx_unknown_dst", l(&self.tx_unknown_dst)),
                ("tx_errors", l(&self.tx_errors)),
                ("rx_malformed", l(&self.rx_malformed)),
                ("rx_wrong_vni", l(&self.rx_wrong_vni)),
                ("rx_unknown_src", l(&self.rx_unknown_src)),
                ("rx_not_for_us", l(&self.rx_not_for_us)),
                ("rx_tap_drops", l(&self.rx_tap_drops)),
            ],
            reorder_timeouts: l(&self.reorder_timeouts),
            reorder_overflows: l(&self.reorder_overflows),
            reorder_late: l(&self.reorder_late),
            reorder_max_depth: l(&self.reorder_max_depth),
            reorder_depth_p99: self.reorder_depth.quantile(0.99),
            frames_reassembled: l(&self.frames_reassembled),
            frames_incomplete: l(&self.frames_incomplete),
            frag_orphans: l(&self.frag_orphans),
            gso: l(&self.gso) != 0,
            paths: self
                .paths
                .iter()
                .map(|p| PathSnapshot {
                    tx_packets: l(&p.tx_packets),
                    tx_bytes: l(&p.tx_bytes),
                    rx_packets: l(&p.rx_packets),
                    rx_bytes: l(&p.rx_bytes),
                    probes: l(&p.probes),
                    losses: l(&p.losses),
                    rx_lost: l(&p.rx_lost),
                    ecn_ce: l(&p.ecn_ce),
                    ecn_ce_echoed: l(&p.ecn_ce_echoed),
                    rtt_samples: p.rtt_us.count(),
                    rtt_p50_us: p.rtt_us.quantile(0.5),
                    rtt_p99_us: p.rtt_us.quantile(0.99),
                    weight: l(&p.weight_milli) as f64 / 1000.0,
                })
                .collect(),
        }
    }
}

/// A point-in-time copy of [`PathCounters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathSnapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub probes: u64,
    pub losses: u64,
    pub rx_lost: u64,
    pub ecn_ce: u64,
    pub ecn_ce_echoed: u64,
    pub rtt_samples: u64,
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    pub weight: f64,
}

/// A point-in-time copy of [`NicCounters`].
#[derive(Debug, Clone, PartialEq)]
pub struct NicSnapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Drop counters by name.
    pub dropped: [(&'static str, u64); 9],
    pub reorder_timeouts: u64,
    pub reorder_overflows: u64,
    pub reorder_late: u64,
    pub reorder_max_depth: u64,
    pub reorder_depth_p99: u64,
    pub frames_reassembled: u64,
    pub frames_incomplete: u64,
    pub frag_orphans: u64,
    pub gso: bool,
    pub paths: Vec<PathSnapshot>,
}

impl NicSnapshot {
    /// `key=value` pairs on one line, for logs and benchmark output.
    pub fn kv_line(&self) -> String {
        let mut s = format!(
            "tx_packets={} tx_bytes={} rx_packets={} rx_bytes={}",
            self.tx_packets, self.tx_bytes, self.rx_packets, self.rx_bytes
        );
        for (name, v) in &self.dropped {
            s += &format!(" {name}={v}");
        }
        s += &format!(
            " reorder_timeouts={} reorder_overflows={} reorder_late={} reorder_max_depth={} reorder_depth_p99={}",
            self.reorder_timeouts, self.reorder_overflows, self.reorder_late, self.reorder_max_depth, self.reorder_depth_p99
        );
        s += &format!(
            " frames_reassembled={} frames_incomplete={} frag_orphans={} gso={}",
            self.frames_reassembled,
            self.frames_incomplete,
            self.frag_orphans,
            u8::from(self.gso)
        );
        for (i, p) in self.paths.iter().enumerate() {
            s += &format!(
                " path{i}_tx_packets={} path{i}_tx_bytes={} path{i}_rx_packets={} path{i}_rx_bytes={} path{i}_probes={} path{i}_losses={} path{i}_rx_lost={} path{i}_ecn_ce={} path{i}_ecn_ce_echoed={} path{i}_rtt_p50_us={} path{i}_rtt_p99_us={} path{i}_weight={:.3}",
                p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes, p.probes, p.losses, p.rx_lost, p.ecn_ce, p.ecn_ce_echoed, p.rtt_p50_us, p.rtt_p99_us, p.weight
            );
        }
        s
    }

    pub fn drops(&self, name: &str) -> u64 {
        self.dropped
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_a_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((448..=500).contains(&p50), "{p50}");
        assert!((896..=990).contains(&p99), "{p99}");
        h.record(u64::MAX);
        assert_eq!(h.count(), 1001);
    }

    #[test]
    fn bucket_floor_inverts_bucket() {
        for v in [0u64, 7, 8, 9, 15, 16, 100, 1 << 20, 123_456_789] {
            let b = bucket(v);
            assert!(bucket_floor(b) <= v && bucket(bucket_floor(b)) == b, "{v}");
        }
    }

    #[test]
    fn drops_counted_by_kind() {
        let c = NicCounters::new(2);
        c.count_drop(Drop::Spoofed);
        c.count_drop(Drop::WrongVni);
        c.count_drop(Drop::WrongVni);
        let s = c.snapshot();
        assert_eq!(s.drops("tx_spoofed"), 1);
        assert_eq!(s.drops("rx_wrong_vni"), 2);
        assert_eq!(s.paths.len(), 2);
        let line = s.kv_line();
        assert!(
            line.contains(" rx_wrong_vni=2 ") && line.contains(" path1_rtt_p99_us=0"),
            "{line}"
        );
    }
}
