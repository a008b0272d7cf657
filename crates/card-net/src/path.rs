//! Path selection: which underlay path (outer UDP source port, optionally a local source
//! address) each encapsulated packet takes, and what the card knows about each path.
//!
//! Pure logic over an injected clock (`now` in µs), so every policy is unit-tested
//! deterministically. Feedback comes from the Outboard option's timestamp echo (RTT and
//! the CE flag of the echoed packet) and from probes that went unanswered (loss).
//!
//! Path liveness:
//!
//! ```text
//!            echo received                     no echo for dead_after (probes sent meanwhile)
//!  ┌───────┐ ───────────────► (stays alive) ┌──────┐ ──────────────────────────────► ┌──────┐
//!  │ alive │                                 │alive │                                 │ dead │
//!  └───────┘ ◄────────────────────────────────────────────── an echo (probe answered) └──────┘
//! ```
//!
//! A path without an echo for `probe_interval` is probed (a Geneve OAM packet the peer answers
//! at once). `adaptive` sends nothing on a dead path except probes.

use std::str::FromStr;

/// How packets are spread over paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One path per flow (flow hash), as plain VXLAN/Geneve: the baseline.
    Hash,
    /// Per packet round robin over all paths, blind to their state (trains of several
    /// datagrams are charged for all of them, so every path carries the same share).
    Spray,
    /// Per packet, weighted by RTT, loss and ECN CE; dead paths get nothing.
    Adaptive,
}

impl FromStr for Policy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "hash" => Ok(Policy::Hash),
            "spray" => Ok(Policy::Spray),
            "adaptive" => Ok(Policy::Adaptive),
            _ => Err(Error::UnknownPolicy(s.to_owned())),
        }
    }
}

/// A path set that cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Unknown path policy {0:?} (hash, spray, adaptive)")]
    UnknownPolicy(String),
    #[error("Path count {0} out of range (1 to 255)")]
    Count(usize),
}

/// Timing of probes and failure detection.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Probe a path that has had no echo for this long.
    pub probe_interval_us: u64,
    /// Declare a path dead after this long without an echo.
    pub dead_after_us: u64,
    /// RTT differences below this are noise, not congestion.
    pub rtt_slack_us: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            probe_interval_us: 5_000,
            dead_after_us: 20_000,
            rtt_slack_us: 200.0,
        }
    }
}

/// What the card knows about one path.
#[derive(Debug, Clone, Copy)]
pub struct PathState {
    /// Smoothed RTT (µs), 0 until the first echo.
    pub srtt_us: f64,
    /// EWMA of the fraction of echoed packets that carried CE.
    pub ce: f64,
    /// EWMA of the loss rate seen by probes.
    pub loss: f64,
    pub alive: bool,
    /// Loss events seen (unanswered probes).
    pub losses: u64,
    last_echo_us: u64,
    last_probe_us: Option<u64>,
    probe_unanswered: bool,
    credit: f64,
}

const EWMA: f64 = 0.125;
/// Smoothing of RTT samples: echoes come by the thousand per second under load, and a
/// faster filter chases each path's own queue swings and flaps traffic between paths.
const RTT_EWMA: f64 = 1.0 / 32.0;
/// Floor of a live path's weight: a congested path keeps a trickle of traffic (and probes)
/// so its recovery is seen, but too little to show in a latency-sensitive flow's p99.
const MIN_WEIGHT: f64 = 0.002;

/// The paths to one peer set and the policy choosing between them.
#[derive(Debug, Clone)]
pub struct Paths {
    policy: Policy,
    timing: Timing,
    paths: Vec<PathState>,
    next: usize,
}

impl Paths {
    pub fn new(count: usize, policy: Policy, timing: Timing, now_us: u64) -> Result<Self, Error> {
        if count == 0 || count > 255 {
            return Err(Error::Count(count));
        }
        let state = PathState {
            srtt_us: 0.0,
            ce: 0.0,
            loss: 0.0,
            alive: true,
            losses: 0,
            last_echo_us: now_us,
            last_probe_us: None,
            probe_unanswered: false,
            credit: 0.0,
        };
        Ok(Self {
            policy,
            timing,
            paths: vec![state; count],
            next: 0,
        })
    }

    /// A copy with fresh state, as if created at `now_us` (for a new peer).
    pub fn restarted(&self, now_us: u64) -> Self {
        // The count was valid for `self`, so `new` cannot fail; the clone is unreachable.
        Self::new(self.paths.len(), self.policy, self.timing, now_us)
            .unwrap_or_else(|_| self.clone())
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn state(&self, path: usize) -> Option<&PathState> {
        self.paths.get(path)
    }

    /// Picks the path of the next packet of the flow with hash `flow_hash`.
    pub fn choose(&mut self, flow_hash: u32) -> usize {
        self.choose_batch(flow_hash, 1)
    }

    /// Picks the path of the next `units` datagrams of the flow, sent together (a UDP GSO
    /// train): `adaptive` charges the path for all of them, so shares stay shares of
    /// datagrams whatever the train lengths.
    pub fn choose_batch(&mut self, flow_hash: u32, units: usize) -> usize {
        match self.policy {
            Policy::Hash => flow_hash as usize % self.paths.len(),
            Policy::Spray if units <= 1 => self.round_robin(),
            Policy::Spray => self.equal(units as f64),
            Policy::Adaptive => self.weighted(units.max(1) as f64),
        }
    }

    fn round_robin(&mut self) -> usize {
        let p = self.next % self.paths.len();
        self.next = p + 1;
        p
    }

    /// The share of traffic `path` should get relative to the others (0 for a dead path).
    pub fn weight(&self, path: usize) -> f64 {
        let Some(p) = self.paths.get(path) else {
            return 0.0;
        };
        if !p.alive {
            return 0.0;
        }
        let best = self
            .paths
            .iter()
            .filter(|q| q.alive && q.srtt_us > 0.0)
            .map(|q| q.srtt_us)
            .fold(f64::INFINITY, f64::min);
        // The best path's RTT over this one's, squared, each padded by a slack that absorbs
        // host noise (on a loaded 2-vCPU host echoes jitter by hundreds of µs with no queue).
        // Scale-free: a light flow (RTTs of ~100 µs) leaves a path with a standing queue of a
        // few ms nearly alone, while under bulk load both paths queue, the ratio nears 1 and
        // the shares even out instead of the traffic flapping from one path to the other.
        let slack = self.timing.rtt_slack_us;
        let rtt = if p.srtt_us > 0.0 && best.is_finite() {
            ((best + slack) / (p.srtt_us + slack)).min(1.0).powi(2)
        } else {
            1.0
        };
        // CE and loss count beyond the best path's too: marks and drops that every path shows
        // (the flow's own queue overflowing on each) are no reason to move, and reacting to
        // them would only flap the traffic between paths.
        let alive = || self.paths.iter().filter(|q| q.alive);
        let min_ce = alive().map(|q| q.ce).fold(f64::INFINITY, f64::min);
        let min_loss = alive().map(|q| q.loss).fold(f64::INFINITY, f64::min);
        let ce = (1.0 - (p.ce - min_ce).max(0.0)).max(0.0);
        let loss = (1.0 - 8.0 * (p.loss - min_loss).max(0.0)).max(0.0);
        (rtt * ce * ce * loss).max(MIN_WEIGHT)
    }

    /// Equal shares of datagrams, whatever the train lengths.
    fn equal(&mut self, units: f64) -> usize {
        let weights = vec![1.0; self.paths.len()];
        self.smooth(&weights, units)
    }

    fn weighted(&mut self, units: f64) -> usize {
        let weights: Vec<f64> = (0..self.paths.len()).map(|i| self.weight(i)).collect();
        self.smooth(&weights, units)
    }

    /// Smooth weighted round robin: deterministic, and each path's share tracks its weight.
    fn smooth(&mut self, weights: &[f64], units: f64) -> usize {
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            // Everything looks dead: keep trying all paths rather than black-holing.
            return self.round_robin();
        }
        let mut best: Option<usize> = None;
        for (i, &w) in weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            self.paths[i].credit += w * units;
            if best.is_none_or(|b| self.paths[i].credit > self.paths[b].credit) {
                best = Some(i);
            }
        }
        let Some(best) = best else {
            return self.round_robin();
        };
        self.paths[best].credit -= total * units;
        best
    }

    /// An echo came back for a packet sent on `path` after `rtt_us`; `ce` if it was CE-marked.
    pub fn on_echo(&mut self, path: usize, rtt_us: u64, ce: bool, now_us: u64) {
        let Some(p) = self.paths.get_mut(path) else {
            return;
        };
        let rtt = rtt_us as f64;
        p.srtt_us = if p.srtt_us == 0.0 {
            rtt
        } else {
            p.srtt_us + RTT_EWMA * (rtt - p.srtt_us)
        };
        p.ce += EWMA * (f64::from(u8::from(ce)) - p.ce);
        p.loss *= 1.0 - EWMA;
        p.last_echo_us = now_us;
        p.probe_unanswered = false;
        if !p.alive {
            p.alive = true;
            p.credit = 0.0;
        }
    }

    /// An echo reported `n` datagrams lost on `path` (path sequence gaps at the peer).
    pub fn on_reported_loss(&mut self, path: usize, n: u64) {
        if let Some(p) = self.paths.get_mut(path) {
            p.loss += EWMA * (1.0 - p.loss);
            p.losses += n;
        }
    }

    /// A packet on `path` is known lost.
    pub fn on_loss(&mut self, path: usize) {
        if let Some(p) = self.paths.get_mut(path) {
            p.loss += EWMA * (1.0 - p.loss);
            p.losses += 1;
        }
    }

    /// Advances time: marks dead paths and lists the paths to probe now (recorded as probed).
    pub fn poll(&mut self, now_us: u64, probes: &mut Vec<usize>) {
        probes.clear();
        let t = self.timing;
        for i in 0..self.paths.len() {
            let p = &mut self.paths[i];
            let silent = now_us.saturating_sub(p.last_echo_us);
            if p.alive && silent >= t.dead_after_us {
                p.alive = false;
            }
            let probed_recently = p
                .last_probe_us
                .is_some_and(|at| now_us.saturating_sub(at) < t.probe_interval_us);
            if silent >= t.probe_interval_us && !probed_recently {
                let lost = p.probe_unanswered;
                p.last_probe_us = Some(now_us);
                p.probe_unanswered = true;
                if lost {
                    self.on_loss(i);
                }
                probes.push(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(paths: &mut Paths, n: usize) -> Vec<usize> {
        let mut counts = vec![0; paths.len()];
        for i in 0..n {
            counts[paths.choose(i as u32)] += 1;
        }
        counts
    }

    #[test]
    fn parse_policy() {
        assert_eq!("spray".parse::<Policy>(), Ok(Policy::Spray));
        assert!("bogus".parse::<Policy>().is_err());
        assert!(Paths::new(0, Policy::Hash, Timing::default(), 0).is_err());
        assert!(Paths::new(256, Policy::Hash, Timing::default(), 0).is_err());
    }

    #[test]
    fn hash_pins_a_flow() {
        let mut p = Paths::new(4, Policy::Hash, Timing::default(), 0).unwrap();
        let first = p.choose(12345);
        assert!((0..100).all(|_| p.choose(12345) == first));
        assert_eq!(share(&mut p, 400), vec![100; 4]);
    }

    #[test]
    fn spray_round_robins() {
        let mut p = Paths::new(3, Policy::Spray, Timing::default(), 0).unwrap();
        let seq: Vec<usize> = (0..6).map(|_| p.choose(7)).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn spray_shares_datagrams_not_trains() {
        let mut p = Paths::new(2, Policy::Spray, Timing::default(), 0).unwrap();
        let mut sent = [0usize; 2];
        for _ in 0..100 {
            // A long and a short train per frame: alternation alone would load one path.
            sent[p.choose_batch(1, 44)] += 44;
            sent[p.choose_batch(1, 2)] += 2;
        }
        assert!(sent[0].abs_diff(sent[1]) <= 88, "{sent:?}");
    }

    #[test]
    fn adaptive_equal_paths_split_evenly() {
        let mut p = Paths::new(2, Policy::Adaptive, Timing::default(), 0).unwrap();
        p.on_echo(0, 20, false, 1);
        p.on_echo(1, 25, false, 1);
        let c = share(&mut p, 1000);
        // 5 µs of RTT noise moves the split by a few percent, no more.
        assert!(c[0].abs_diff(c[1]) < 100, "{c:?}");
    }

    #[test]
    fn adaptive_congested_path_gets_less() {
        let mut p = Paths::new(2, Policy::Adaptive, Timing::default(), 0).unwrap();
        for _ in 0..20 {
            p.on_echo(0, 20, false, 1);
            p.on_echo(1, 5000, false, 1); // a queue building on path 1
        }
        let c = share(&mut p, 1000);
        assert!(c[1] > 0 && c[1] < 200, "{c:?}");
        // CE marks alone also push traffic away.
        let mut p = Paths::new(2, Policy::Adaptive, Timing::default(), 0).unwrap();
        for _ in 0..20 {
            p.on_echo(0, 20, false, 1);
            p.on_echo(1, 20, true, 1);
        }
        let c = share(&mut p, 1000);
        assert!(c[1] < 150, "{c:?}");
        // And loss.
        let mut p = Paths::new(2, Policy::Adaptive, Timing::default(), 0).unwrap();
        for _ in 0..3 {
            p.on_loss(1);
        }
        let c = share(&mut p, 1000);
        assert!(c[1] < 300, "{c:?}");
    }

    #[test]
    fn dead_path_gets_nothing_until_probe_answered() {
        let t = Timing::default();
        let mut p = Paths::new(2, Policy::Adaptive, t, 0).unwrap();
        let mut probes = Vec::new();
        let mut now = 0;
        // Path 0 keeps echoing; path 1 goes silent.
        while now <= t.dead_after_us {
            now += 1000;
            p.on_echo(0, 30, false, now);
            p.poll(now, &mut probes);
            assert!(!probes.contains(&0));
        }
        assert!(!p.state(1).unwrap().alive);
        assert!(
            p.state(1).unwrap().loss > 0.0,
            "unanswered probes count as loss"
        );
        assert_eq!(share(&mut p, 500), vec![500, 0]);
        // Still probed, at the probe interval.
        now += t.probe_interval_us;
        p.on_echo(0, 30, false, now);
        p.poll(now, &mut probes);
        assert_eq!(probes, vec![1]);
        p.poll(now + 1, &mut probes);
        assert!(probes.is_empty());
        // The probe is answered: traffic comes back.
        p.on_echo(1, 30, false, now + 50);
        assert!(p.state(1).unwrap().alive);
        assert!(share(&mut p, 500)[1] > 0);
    }

    #[test]
    fn restarted_forgets_state() {
        let mut p = Paths::new(2, Policy::Adaptive, Timing::default(), 0).unwrap();
        p.on_loss(1);
        p.on_echo(0, 500, true, 5);
        let q = p.restarted(1_000_000);
        assert_eq!(q.len(), 2);
        assert!(q.state(1).unwrap().alive && q.state(1).unwrap().losses == 0);
        assert_eq!(q.state(0).unwrap().srtt_us, 0.0);
        let mut probes = Vec::new();
        let mut q = q;
        q.poll(1_000_001, &mut probes);
        assert!(
            probes.is_empty(),
            "a fresh peer is not probed before probe_interval"
        );
    }

    #[test]
    fn all_dead_falls_back_to_round_robin() {
        let t = Timing::default();
        let mut p = Paths::new(2, Policy::Adaptive, t, 0).unwrap();
        let mut probes = Vec::new();
        p.poll(t.dead_after_us, &mut probes);
        assert_eq!(probes, vec![0, 1]);
        assert_eq!(share(&mut p, 10), vec![5, 5]);
    }
}
