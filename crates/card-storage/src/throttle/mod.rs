//! Per-volume I/O throttling: IOPS and bandwidth limits with burst.
//!
//! Each limit is a token bucket with continuous refill, kept as a theoretical arrival time
//! (GCRA): the bucket is "full" when that time is at or before now, and a request of cost `c`
//! moves it `c / rate` seconds forward. A request is admissible when the moved time is at most
//! `burst / rate` ahead of now; otherwise the exact wait until it becomes admissible is
//! returned, so the caller can arm a timer for that instant instead of polling on a coarse
//! tick. Arithmetic is exact: times are kept in nanoseconds scaled by the rate (u128), so there
//! is no rounding drift at any rate.
//!
//! A request passes only if every bucket that applies to it (total, read or write; IOPS and
//! bandwidth) admits it, and then it is charged to all of them. Excess I/O waits, it never
//! fails. A request costing more than a bucket's burst is admitted when that bucket is full
//! and then pays back the overdraft, so huge I/Os cannot starve.
//!
//! Cost of an I/O: `max(1, ceil(bytes / op_size))` operations (EBS counts up to 256 KiB as
//! one) and `bytes` bytes.
//!
//! ```text
//!   request ─► try_admit(now) ─┬─ Admit: charged to all buckets, submit it
//!                              └─ Wait(d): nothing charged; keep it at the head of the
//!                                 queue (FIFO) and retry at now + d
//! ```

/// EBS's I/O size unit for IOPS accounting.
pub const DEFAULT_OP_SIZE: u64 = 256 * 1024;
const NS_PER_SEC: u128 = 1_000_000_000;

/// Errors in a throttling configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Rate of limit {0} must be positive")]
    ZeroRate(&'static str),
    #[error("Burst of limit {0} must be at least 1")]
    ZeroBurst(&'static str),
    #[error("Operation size must be positive")]
    ZeroOpSize,
    #[error("Limit {0} cannot be set both as total and per direction")]
    Mixed(&'static str),
}

/// One limit: a sustained rate per second and a burst (bucket size) in the same unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

impl Limit {
    /// A limit whose burst is a tenth of a second's worth (at least 1): smooth pacing.
    pub fn rate(rate: u64) -> Self {
        Self {
            rate,
            burst: (rate / 10).max(1),
        }
    }
}

/// All limits of a volume. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub iops_total: Option<Limit>,
    pub iops_read: Option<Limit>,
    pub iops_write: Option<Limit>,
    pub bw_total: Option<Limit>,
    pub bw_read: Option<Limit>,
    pub bw_write: Option<Limit>,
    /// Bytes counted as one operation.
    pub op_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            iops_total: None,
            iops_read: None,
            iops_write: None,
            bw_total: None,
            bw_read: None,
            bw_write: None,
            op_size: DEFAULT_OP_SIZE,
        }
    }
}

impl Limits {
    /// True if no limit is set.
    pub fn is_unlimited(&self) -> bool {
        [
            self.iops_total,
            self.iops_read,
            self.iops_write,
            self.bw_total,
            self.bw_read,
            self.bw_write,
        ]
        .iter()
        .all(Option::is_none)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.op_size == 0 {
            return Err(Error::ZeroOpSize);
        }
        let named = [
            ("iops_total", self.iops_total),
            ("iops_read", self.iops_read),
            ("iops_write", self.iops_write),
            ("bw_total", self.bw_total),
            ("bw_read", self.bw_read),
            ("bw_write", self.bw_write),
        ];
        for (name, l) in named {
            match l {
                Some(l) if l.rate == 0 => return Err(Error::ZeroRate(name)),
                Some(l) if l.burst == 0 => return Err(Error::ZeroBurst(name)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Direction of an I/O, for per-direction limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// Outcome of [`Throttle::try_admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; the request has been charged.
    Admit,
    /// Not before this many nanoseconds from now; nothing was charged.
    Wait(u64),
}

/// One GCRA bucket.
#[derive(Debug, Clone)]
struct Bucket {
    rate: u128,
    /// burst × 1e9: the tolerance in scaled units.
    tolerance: u128,
    /// Theoretical arrival time in ns × rate.
    tat: u128,
}

impl Bucket {
    fn new(l: Limit) -> Self {
        Self {
            rate: l.rate as u128,
            tolerance: l.burst as u128 * NS_PER_SEC,
            tat: 0,
        }
    }

    /// Nanoseconds until a request of `cost` units fits, 0 if now.
    fn wait(&self, now_ns: u64, cost: u64) -> u64 {
        let now = (now_ns as u128).saturating_mul(self.rate);
        if self.tat <= now {
            return 0; // Full: admit even a request bigger than the burst (overdraft).
        }
        let new_tat = self.tat.saturating_add(cost as u128 * NS_PER_SEC);
        let limit = now.saturating_add(self.tolerance);
        if new_tat <= limit {
            return 0;
        }
        // Smallest t with new_tat <= t*rate + tolerance, and also the full-bucket case for
        // oversized requests: t*rate >= tat.
        let need = new_tat.saturating_sub(self.tolerance).min(self.tat);
        let wait = need.saturating_sub(now).div_ceil(self.rate);
        u64::try_from(wait).unwrap_or(u64::MAX)
    }

    fn charge(&mut self, now_ns: u64, cost: u64) {
        let now = (now_ns as u128).saturating_mul(self.rate);
        self.tat = self.tat.max(now).saturating_add(cost as u128 * NS_PER_SEC);
    }
}

/// The throttle of one volume.
#[derive(Debug, Clone)]
pub struct Throttle {
    limits: Limits,
    iops_total: Option<Bucket>,
    iops_read: Option<Bucket>,
    iops_write: Option<Bucket>,
    bw_total: Option<Bucket>,
    bw_read: Option<Bucket>,
    bw_write: Option<Bucket>,
}

impl Throttle {
    /// A throttle with all buckets full.
    pub fn new(limits: Limits) -> Result<Self, Error> {
        limits.validate()?;
        Ok(Self {
            limits,
            iops_total: limits.iops_total.map(Bucket::new),
            iops_read: limits.iops_read.map(Bucket::new),
            iops_write: limits.iops_write.map(Bucket::new),
            bw_total: limits.bw_total.map(Bucket::new),
            bw_read: limits.bw_read.map(Bucket::new),
            bw_write: limits.bw_write.map(Bucket::new),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits live. Buckets that keep their rate keep their state; new or
    /// changed ones start full.
    pub fn set_limits(&mut self, limits: Limits) -> Result<(), Error> {
        limits.validate()?;
        fn keep(old: &Option<Bucket>, l: Option<Limit>) -> Option<Bucket> {
            match (old, l) {
                (Some(b), Some(l)) if b.rate == l.rate as u128 => Some(Bucket {
                    tolerance: l.burst as u128 * NS_PER_SEC,
                    ..b.clone()
                }),
                (_, l) => l.map(Bucket::new),
            }
        }
        self.iops_total = keep(&self.iops_total, limits.iops_total);
        self.iops_read = keep(&self.iops_read, limits.iops_read);
        self.iops_write = keep(&self.iops_write, limits.iops_write);
        self.bw_total = keep(&self.bw_total, limits.bw_total);
        self.bw_read = keep(&self.bw_read, limits.bw_read);
        self.bw_write = keep(&self.bw_write, limits.bw_write);
        self.limits = limits;
        Ok(())
    }

    /// Operations charged for an I/O of `bytes`.
    pub fn ops_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.limits.op_size).max(1)
    }

    fn buckets(&mut self, dir: Direction) -> [(Option<&mut Bucket>, bool); 4] {
        let (iops_dir, bw_dir) = match dir {
            Direction::Read => (self.iops_read.as_mut(), self.bw_read.as_mut()),
            Direction::Write => (self.iops_write.as_mut(), self.bw_write.as_mut()),
        };
        [
            (self.iops_total.as_mut(), true),
            (iops_dir, true),
            (self.bw_total.as_mut(), false),
            (bw_dir, false),
        ]
    }

    /// Admits and charges an I/O of `bytes` in direction `dir` at time `now_ns` (any
    /// monotonic clock in nanoseconds), or says how long to wait. Never charges on `Wait`.
    pub fn try_admit(&mut self, now_ns: u64, dir: Direction, bytes: u64) -> Admission {
        let ops = self.ops_for(bytes);
        let mut wait = 0;
        for (b, is_ops) in self.buckets(dir) {
            if let Some(b) = b {
                wait = wait.max(b.wait(now_ns, if is_ops { ops } else { bytes }));
            }
        }
        if wait > 0 {
            return Admission::Wait(wait);
        }
        for (b, is_ops) in self.buckets(dir).into_iter() {
            if let Some(b) = b {
                b.charge(now_ns, if is_ops { ops } else { bytes });
            }
        }
        Admission::Admit
    }
}

#[cfg(test)]
mod tests;
