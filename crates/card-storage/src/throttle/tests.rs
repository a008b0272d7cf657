use super::*;

const SEC: u64 = 1_000_000_000;

fn iops(rate: u64, burst: u64) -> Limits {
    Limits {
        iops_total: Some(Limit { rate, burst }),
        ..Limits::default()
    }
}

/// A closed-loop client with `qd` requests outstanding, each completing `service_ns` after
/// admission, driven by the throttle's exact waits on a virtual clock. Returns admission times.
fn run(
    t: &mut Throttle,
    qd: usize,
    service_ns: u64,
    until: u64,
    dir: Direction,
    bytes: u64,
) -> Vec<u64> {
    let mut now = 0u64;
    let mut admitted = Vec::new();
    // Completion times of outstanding requests.
    let mut outstanding: Vec<u64> = Vec::new();
    while now < until {
        outstanding.retain(|&c| c > now);
        if outstanding.len() < qd {
            match t.try_admit(now, dir, bytes) {
                Admission::Admit => {
                    admitted.push(now);
                    outstanding.push(now + service_ns);
                    continue;
                }
                Admission::Wait(w) => {
                    assert!(w > 0);
                    // A wait must be exact: one nanosecond earlier is still too early.
                    if w > 1 {
                        assert!(matches!(
                            t.clone().try_admit(now + w - 1, dir, bytes),
                            Admission::Wait(_)
                        ));
                    }
                    let next_completion = outstanding.iter().copied().min().unwrap_or(u64::MAX);
                    now = (now + w).min(next_completion.max(now + 1));
                }
            }
        } else {
            now = outstanding.iter().copied().min().unwrap();
        }
    }
    admitted
}

fn per_window(times: &[u64], window: u64, windows: u64) -> Vec<u64> {
    let mut counts = vec![0u64; windows as usize];
    for &t in times {
        if t / window < windows {
            counts[(t / window) as usize] += 1;
        }
    }
    counts
}

fn max_gap(times: &[u64]) -> u64 {
    times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

#[test]
fn iops_limit_is_accurate_per_second_without_stalls() {
    // The Firecracker example: 3000 IOPS. Ten one-second windows at QD32, each within ±5 %
    // (in fact within one operation), and no gap longer than one inter-arrival time.
    let mut t = Throttle::new(iops(3000, 1)).unwrap();
    let times = run(&mut t, 32, 50_000, 10 * SEC, Direction::Read, 4096);
    for (i, c) in per_window(&times, SEC, 10).iter().enumerate() {
        assert!((2999..=3001).contains(c), "window {i}: {c} ops");
    }
    assert!(max_gap(&times) <= SEC / 3000 + 1, "gap {}", max_gap(&times));
}

#[test]
fn odd_rates_do_not_drift() {
    for rate in [1u64, 7, 999, 12_345, 100_000] {
        let mut t = Throttle::new(iops(rate, 1)).unwrap();
        let times = run(&mut t, 64, 1_000, 10 * SEC, Direction::Write, 4096);
        let total = times.iter().filter(|&&x| x < 10 * SEC).count() as u64;
        assert!(total.abs_diff(rate * 10) <= 1, "rate {rate}: {total}");
    }
}

#[test]
fn burst_is_served_at_once_then_paced() {
    let mut t = Throttle::new(iops(1000, 100)).unwrap();
    for _ in 0..100 {
        assert_eq!(t.try_admit(0, Direction::Read, 4096), Admission::Admit);
    }
    assert_eq!(
        t.try_admit(0, Direction::Read, 4096),
        Admission::Wait(1_000_000)
    );
    assert_eq!(
        t.try_admit(1_000_000, Direction::Read, 4096),
        Admission::Admit
    );
    // After a long idle period, the bucket is full again but no fuller.
    let idle = 100 * SEC;
    for _ in 0..100 {
        assert_eq!(t.try_admit(idle, Direction::Read, 4096), Admission::Admit);
    }
    assert!(matches!(
        t.try_admit(idle, Direction::Read, 4096),
        Admission::Wait(_)
    ));
}

#[test]
fn large_ios_count_as_several_ops() {
    let t = Throttle::new(iops(100, 1)).unwrap();
    assert_eq!(t.ops_for(0), 1);
    assert_eq!(t.ops_for(4096), 1);
    assert_eq!(t.ops_for(256 * 1024), 1);
    assert_eq!(t.ops_for(256 * 1024 + 1), 2);
    assert_eq!(t.ops_for(1024 * 1024), 4);
    // 1 MiB I/Os at 1000 IOPS: 250 per second.
    let mut t = Throttle::new(iops(1000, 4)).unwrap();
    let times = run(&mut t, 8, 1000, 4 * SEC, Direction::Read, 1 << 20);
    for c in per_window(&times, SEC, 4) {
        assert!((249..=251).contains(&c), "{c}");
    }
}

#[test]
fn bandwidth_limit_is_accurate() {
    let mb = 1_000_000;
    let limits = Limits {
        bw_total: Some(Limit::rate(100 * mb)),
        ..Limits::default()
    };
    let mut t = Throttle::new(limits).unwrap();
    let bytes = 128 * 1024;
    let times = run(&mut t, 32, 20_000, 10 * SEC, Direction::Write, bytes);
    // Skip the first window, which includes the initial burst of 0.1 s.
    for (i, c) in per_window(&times, SEC, 10).iter().enumerate().skip(1) {
        let got = c * bytes;
        let err = got.abs_diff(100 * mb) as f64 / (100 * mb) as f64;
        assert!(err < 0.05, "window {i}: {got} B/s");
    }
    let first = per_window(&times, SEC, 1)[0] * bytes;
    assert!(first <= 110 * mb + bytes, "first window {first}");
}

#[test]
fn iops_and_bandwidth_both_apply() {
    // 1000 IOPS and 10 MB/s: 64 KiB I/Os are bandwidth bound (~152/s), 4 KiB ones IOPS bound.
    let limits = Limits {
        iops_total: Some(Limit {
            rate: 1000,
            burst: 1,
        }),
        bw_total: Some(Limit {
            rate: 10_000_000,
            burst: 65536,
        }),
        ..Limits::default()
    };
    let mut t = Throttle::new(limits).unwrap();
    let big = run(&mut t, 16, 1000, 5 * SEC, Direction::Read, 65536);
    let per_sec = big.len() as f64 / 5.0;
    assert!((per_sec - 10_000_000.0 / 65536.0).abs() < 3.0, "{per_sec}");
    let mut t = Throttle::new(limits).unwrap();
    let small = run(&mut t, 16, 1000, 5 * SEC, Direction::Read, 4096);
    assert!(small.len().abs_diff(5000) <= 2, "{}", small.len());
}

#[test]
fn read_and_write_limits_are_separate() {
    let limits = Limits {
        iops_read: Some(Limit {
            rate: 100,
            burst: 1,
        }),
        ..Limits::default()
    };
    let mut t = Throttle::new(limits).unwrap();
    assert_eq!(t.try_admit(0, Direction::Read, 4096), Admission::Admit);
    assert!(matches!(
        t.try_admit(0, Direction::Read, 4096),
        Admission::Wait(10_000_000)
    ));
    for _ in 0..1000 {
        assert_eq!(t.try_admit(0, Direction::Write, 4096), Admission::Admit);
    }
}

#[test]
fn oversized_request_is_admitted_when_full_and_paid_back() {
    // Burst 1 MB, one 4 MB request: admitted at once, then the bucket owes 3 MB (+ the next
    // request's 1 MB) at 1 MB/s.
    let limits = Limits {
        bw_total: Some(Limit {
            rate: 1_000_000,
            burst: 1_000_000,
        }),
        ..Limits::default()
    };
    let mut t = Throttle::new(limits).unwrap();
    assert_eq!(
        t.try_admit(0, Direction::Write, 4_000_000),
        Admission::Admit
    );
    assert_eq!(
        t.try_admit(0, Direction::Write, 1_000_000),
        Admission::Wait(4 * SEC)
    );
    assert_eq!(
        t.try_admit(4 * SEC, Direction::Write, 1_000_000),
        Admission::Admit
    );
}

#[test]
fn two_volumes_under_contention_each_hold_their_limit() {
    // Two throttles advanced on one clock, alternating like two queues on one worker.
    let mut a = Throttle::new(iops(3000, 1)).unwrap();
    let mut b = Throttle::new(iops(500, 1)).unwrap();
    let (mut na, mut nb) = (0u64, 0u64);
    let mut now = 0;
    while now < 10 * SEC {
        let wa = match a.try_admit(now, Direction::Read, 4096) {
            Admission::Admit => {
                na += 1;
                0
            }
            Admission::Wait(w) => w,
        };
        let wb = match b.try_admit(now, Direction::Read, 4096) {
            Admission::Admit => {
                nb += 1;
                0
            }
            Admission::Wait(w) => w,
        };
        if wa > 0 && wb > 0 {
            now += wa.min(wb);
        }
    }
    assert!(na.abs_diff(30_000) <= 1, "{na}");
    assert!(nb.abs_diff(5_000) <= 1, "{nb}");
}

#[test]
fn live_limit_change() {
    let mut t = Throttle::new(iops(10, 1)).unwrap();
    assert_eq!(t.try_admit(0, Direction::Read, 4096), Admission::Admit);
    assert!(matches!(
        t.try_admit(0, Direction::Read, 4096),
        Admission::Wait(100_000_000)
    ));
    t.set_limits(iops(1000, 1)).unwrap();
    assert_eq!(t.try_admit(0, Direction::Read, 4096), Admission::Admit);
    t.set_limits(Limits::default()).unwrap();
    assert!(t.limits().is_unlimited());
    for _ in 0..10_000 {
        assert_eq!(t.try_admit(0, Direction::Read, 4096), Admission::Admit);
    }
}

#[test]
fn bad_configurations_are_rejected() {
    assert_eq!(
        Throttle::new(iops(0, 1)).unwrap_err(),
        Error::ZeroRate("iops_total")
    );
    assert_eq!(
        Throttle::new(iops(1, 0)).unwrap_err(),
        Error::ZeroBurst("iops_total")
    );
    let l = Limits {
        op_size: 0,
        ..Limits::default()
    };
    assert_eq!(Throttle::new(l).unwrap_err(), Error::ZeroOpSize);
    // Extreme values do not overflow.
    let mut t = Throttle::new(Limits {
        bw_total: Some(Limit {
            rate: u64::MAX,
            burst: u64::MAX,
        }),
        ..Limits::default()
    })
    .unwrap();
    assert_eq!(
        t.try_admit(u64::MAX, Direction::Read, u64::MAX),
        Admission::Admit
    );
    let mut t = Throttle::new(iops(1, 1)).unwrap();
    assert_eq!(t.try_admit(0, Direction::Read, u64::MAX), Admission::Admit);
    assert!(matches!(
        t.try_admit(0, Direction::Read, 1),
        Admission::Wait(_)
    ));
}
