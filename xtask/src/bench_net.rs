//! `cargo xtask bench net [--seconds S] [--rr-seconds S] [--repeats N] [--rate R]
//! [--scenarios clean,congested,lossy,cut] [--policies hash,spray,adaptive,kernel]`: the card's
//! overlay against the kernel's own tunnel, in the same run and the same namespaces.
//!
//! Two hosts (netns) joined by two veth paths shaped to `--rate` each (tbf; default 1gbit), a
//! "VM" namespace behind each `outboard-card net` TAP. Per scenario and per policy (hash,
//! spray, adaptive; cards restarted for each cell) one TCP stream VM A → VM B (goodput) and
//! then 64-byte TCP request/response (p50/p99); then the same through the kernel tunnel
//! between the hosts (Geneve if the kernel has it, else VXLAN: this machine's kernel has no
//! Geneve module). Medians of `--repeats` runs. Last line: `RESULT net …`.
//!
//! Scenarios, all on path 1 (the one the kernel tunnel takes):
//! - `clean`;
//! - `congested`: path 1 flooded by UDP cross-traffic at 90% of `--rate` (iperf3);
//! - `lossy`: 5% of the tunnel's datagrams leaving on path 1 dropped at random (nft
//!   `numgen`; a UDP GSO train is one packet to netfilter, so a drop takes a whole train);
//! - `cut`: path 1's far end set down a third of the way into each measurement;
//!   `cut_*_recovery_ms` is how long after the cut the stream first carries 75% of one
//!   path's rate again over 10 ms (-1: never); `cut_*_rr_max_us` the longest request/response
//!   across the cut (TCP's own retransmission timeout included).
//!
//! Ratios: `*_vs_kernel` (goodput over the kernel tunnel's in the same scenario) and
//! `congested_*_free_share` (goodput over the capacity the flood leaves: 2 × rate − 90%).
//! The traffic is our own (`traffic`: a TCP stream with a 1 ms arrival timeline, 64-byte TCP
//! ping-pong), run from threads inside the namespaces. `OUTBOARD_BENCH_NET_STATS=FILE` makes
//! the cards append their counters (per path: bytes, RTT, losses, CE, weight) to FILE each
//! second.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util;

mod traffic;

const HA: &str = "obbench-ha";
const HB: &str = "obbench-hb";
const VA: &str = "obbench-va";
const VB: &str = "obbench-vb";

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("Cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &str) -> Result<String> {
    sh("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Deletes the bench namespaces (and so every device in them) when dropped.
struct Topology;

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [HA, HB, VA, VB] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn topology(rate: &str) -> Result<Topology> {
    drop(Topology); // leftovers of an interrupted run
    let t = Topology;
    for n in [HA, HB, VA, VB] {
        ip(&format!("netns add {n}"))?;
        ip(&format!("-n {n} link set lo up"))?;
    }
    for i in 1..=2 {
        ip(&format!(
            "-n {HA} link add a{i} type veth peer name b{i} netns {HB}"
        ))?;
        ip(&format!("-n {HA} addr add 10.{i}.0.1/24 dev a{i}"))?;
        ip(&format!("-n {HB} addr add 10.{i}.0.2/24 dev b{i}"))?;
        for (n, d) in [(HA, "a"), (HB, "b")] {
            ip(&format!("-n {n} link set {d}{i} up"))?;
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    n,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    &format!("{d}{i}"),
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "256kb",
                    "latency",
                    "5ms",
                ],
            )?;
        }
    }
    for (n, me, peer) in [(HA, 1, 2), (HB, 2, 1)] {
        ip(&format!("-n {n} addr add 10.9.0.{me}/32 dev lo"))?;
        ip(&format!(
            "-n {n} route add 10.9.0.{peer}/32 via 10.1.0.{peer}"
        ))?;
        for i in 1..=2 {
            ip(&format!(
                "-n {n} rule add from 10.{i}.0.{me} table {}",
                100 + i
            ))?;
            ip(&format!(
                "-n {n} route add 10.9.0.{peer}/32 via 10.{i}.0.{peer} table {}",
                100 + i
            ))?;
        }
    }
    Ok(t)
}

/// Kills a child process of ours when dropped.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn card(bin: &str, host: &str, me: u8, peer: u8, policy: &str) -> Result<Child> {
    let mac = |n: u8| format!("02:0b:00:00:00:{n:02x}");
    let mut args: Vec<String> = [
        "netns", "exec", host, bin, "net", "--tap", "obtap", "--vni", "4242",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--mac".into(),
        mac(me),
        "--ip".into(),
        format!("192.168.77.{me}"),
        "--policy".into(),
        policy.into(),
        "--host".into(),
        format!("10.9.0.{me}"),
    ]);
    for i in 1..=2 {
        args.extend(["--path".into(), format!("10.{i}.0.{me}:{}", 40000 + i)]);
    }
    args.extend([
        "--remote".into(),
        format!("{}=192.168.77.{peer}@10.9.0.{peer}", mac(peer)),
    ]);
    // OUTBOARD_BENCH_NET_STATS=FILE: the cards append their counters there every second.
    let stdout = match std::env::var_os("OUTBOARD_BENCH_NET_STATS") {
        Some(path) => {
            args.extend(["--stats-secs".into(), "1".into()]);
            Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        }
        None => Stdio::null(),
    };
    Command::new("ip")
        .args(&args)
        .stdout(stdout)
        .spawn()
        .context("Cannot start outboard-card net")
}

fn attach_tap(host: &str, vm: &str, me: u8) -> Result<()> {
    for _ in 0..100 {
        if ip(&format!("-n {host} link show obtap")).is_ok() {
            ip(&format!(
                "-n {host} link set obtap address 02:0b:00:00:00:{me:02x} mtu 1400"
            ))?;
            ip(&format!("-n {host} link set obtap netns {vm}"))?;
            ip(&format!("-n {vm} addr add 192.168.77.{me}/24 dev obtap"))?;
            ip(&format!("-n {vm} link set obtap up"))?;
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    bail!("outboard-card net did not create its TAP in {host}")
}

/// UDP cross-traffic on path 1 (10.1.0.1 → 10.1.0.2) at `mbps` until dropped.
fn flood(mbps: u32) -> Result<Reaper> {
    let srv = Command::new("ip")
        .args([
            "netns", "exec", HB, "iperf3", "-s", "-1", "-p", "5202", "-B", "10.1.0.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start the flood server")?;
    let mut reaper = Reaper(vec![srv]);
    sleep(Duration::from_millis(300));
    let cli = Command::new("ip")
        .args([
            "netns", "exec", HA, "iperf3", "-u", "-c", "10.1.0.2", "-B", "10.1.0.1", "-p", "5202",
        ])
        .args(["-b", &format!("{mbps}M"), "-l", "1400", "-t", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start the flood")?;
    reaper.0.push(cli);
    sleep(Duration::from_millis(500));
    Ok(reaper)
}

fn rate_mbps(rate: &str) -> Result<u32> {
    let (num, mul) = match rate.strip_suffix("gbit") {
        Some(n) => (n, 1000.0),
        None => (
            rate.strip_suffix("mbit")
                .context("--rate wants Nmbit or Ngbit")?,
            1.0,
        ),
    };
    Ok((num.parse::<f64>().context("Bad --rate")? * mul) as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The kernel's tunnel between the hosts' loopback addresses (path 1, as plain ECMP-less
/// Geneve/VXLAN would go); returns its kind.
fn kernel_tunnel() -> Result<&'static str> {
    for (n, me, peer) in [(HA, 1, 2), (HB, 2, 1)] {
        let geneve = ip(&format!(
            "-n {n} link add kt0 type geneve id 4242 remote 10.9.0.{peer}"
        ));
        if geneve.is_err() {
            ip(&format!(
                "-n {n} link add kt0 type vxlan id 4242 local 10.9.0.{me} remote 10.9.0.{peer} dstport 4789"
            ))?;
        }
        ip(&format!("-n {n} link set kt0 mtu 1400 up"))?;
        ip(&format!("-n {n} addr add 192.168.78.{me}/24 dev kt0"))?;
    }
    let kind = ip(&format!("-d -n {HA} link show kt0"))?;
    Ok(if kind.contains("geneve") {
        "geneve"
    } else {
        "vxlan"
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Clean,
    Congested,
    Lossy,
    Cut,
}

impl Scenario {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "clean" => Self::Clean,
            "congested" => Self::Congested,
            "lossy" => Self::Lossy,
            "cut" => Self::Cut,
            other => bail!("Unknown scenario {other:?} (clean, congested, lossy, cut)"),
        })
    }
}

/// Drops 5% of tunnel datagrams leaving host A on path 1, until dropped.
struct Lossy;

impl Lossy {
    fn add() -> Result<Self> {
        let rules = "table ip obloss {\n chain post {\n  type filter hook postrouting priority 0;\n  \
                     oifname \"a1\" udp dport { 6081, 4789 } numgen random mod 100 < 5 drop\n }\n}\n";
        let mut nft = Command::new("ip")
            .args(["netns", "exec", HA, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("Cannot run nft (apt-get install -y nftables)")?;
        nft.stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        if !nft.wait()?.success() {
            bail!("nft rejected the loss rule");
        }
        Ok(Self)
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        let _ = sh(
            "ip",
            &[
                "netns", "exec", HA, "nft", "delete", "table", "ip", "obloss",
            ],
        );
    }
}

/// Cuts path 1 at host B's end.
fn cut_path1() -> Result<()> {
    ip(&format!("-n {HB} link set b1 down")).map(drop)
}

/// Brings path 1 back: setting a link down drops the routes through it.
fn restore_path1() -> Result<()> {
    ip(&format!("-n {HB} link set b1 up"))?;
    let _ = ip(&format!("-n {HB} route replace 10.9.0.1/32 via 10.1.0.1"));
    let _ = ip(&format!(
        "-n {HB} route replace 10.9.0.1/32 via 10.1.0.1 table 101"
    ));
    sleep(Duration::from_millis(300));
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    mbps: f64,
    recovery_ms: Option<f64>,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

struct Opts {
    bin: String,
    seconds: f64,
    rr_seconds: f64,
    rate_mbps: f64,
    flood_mbps: u32,
}

/// One measurement of `tunnel` (a policy, or "kernel") in `scenario`.
fn cell(o: &Opts, scenario: Scenario, tunnel: &str) -> Result<Cell> {
    let _cards = if tunnel == "kernel" {
        None
    } else {
        let _ = ip(&format!("-n {VA} link del obtap"));
        let _ = ip(&format!("-n {VB} link del obtap"));
        let cards = Reaper(vec![
            card(&o.bin, HA, 1, 2, tunnel)?,
            card(&o.bin, HB, 2, 1, tunnel)?,
        ]);
        attach_tap(HA, VA, 1)?;
        attach_tap(HB, VB, 2)?;
        Some(cards)
    };
    let (client, server, server_ip) = if tunnel == "kernel" {
        (HA, HB, Ipv4Addr::new(192, 168, 78, 2))
    } else {
        (VA, VB, Ipv4Addr::new(192, 168, 77, 2))
    };
    let _flood = (scenario == Scenario::Congested)
        .then(|| flood(o.flood_mbps))
        .transpose()?;
    let _loss = (scenario == Scenario::Lossy).then(Lossy::add).transpose()?;
    // Let ARP and the path state settle (probes, first RTTs).
    sleep(Duration::from_millis(300));
    let cut = |secs: f64| (scenario == Scenario::Cut).then_some((secs / 3.0, &cut_path1 as _));
    let s = traffic::stream(
        client,
        server,
        server_ip,
        o.seconds,
        cut(o.seconds),
        o.rate_mbps,
    );
    if scenario == Scenario::Cut {
        restore_path1()?;
    }
    let s = s?;
    let r = traffic::rr(client, server, server_ip, o.rr_seconds, cut(o.rr_seconds));
    if scenario == Scenario::Cut {
        restore_path1()?;
    }
    let r = r?;
    Ok(Cell {
        mbps: s.mbps,
        recovery_ms: s.recovery_ms,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        max_us: r.max_us,
    })
}

pub fn run(args: &[&str]) -> Result<()> {
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default.to_string(), |s| s.to_string())
    };
    let seconds: f64 = opt("--seconds", "4").parse().context("Bad --seconds")?;
    let rr_seconds: f64 = opt("--rr-seconds", "2")
        .parse()
        .context("Bad --rr-seconds")?;
    let repeats: usize = opt("--repeats", "1").parse().context("Bad --repeats")?;
    let rate = opt("--rate", "1gbit");
    let scenarios = opt("--scenarios", "clean,congested,lossy,cut")
        .split(',')
        .map(Scenario::parse)
        .collect::<Result<Vec<_>>>()?;
    let policies = opt("--policies", "hash,spray,adaptive,kernel");
    let euid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        bail!("bench net needs root (network namespaces)");
    }
    if sh("iperf3", &["--version"]).is_err() {
        bail!("bench net needs iperf3 for cross-traffic (apt-get install -y iperf3)");
    }
    if scenarios.contains(&Scenario::Lossy) && sh("nft", &["--version"]).is_err() {
        bail!("the lossy scenario needs nft (apt-get install -y nftables)");
    }
    util::cargo(&["build", "--release", "-p", "outboard-card"])?;
    let bin = util::cargo_target_dir().join("release/outboard-card");
    let o = Opts {
        bin: bin.to_str().context("Non-UTF-8 target dir")?.to_owned(),
        seconds,
        rr_seconds,
        rate_mbps: f64::from(rate_mbps(&rate)?),
        flood_mbps: rate_mbps(&rate)? * 9 / 10,
    };

    let _topology = topology(&rate)?;
    let kind = kernel_tunnel()?;
    let mut line = format!(
        "RESULT net rate={rate} seconds={seconds} rr_seconds={rr_seconds} repeats={repeats} kernel={kind}"
    );
    for &scenario in &scenarios {
        let name = format!("{scenario:?}").to_lowercase();
        let mut cells = Vec::new();
        for tunnel in policies.split(',') {
            let runs = (0..repeats)
                .map(|_| cell(&o, scenario, tunnel))
                .collect::<Result<Vec<_>>>()?;
            let m = |f: fn(&Cell) -> f64| median(runs.iter().map(f).collect());
            let c = Cell {
                mbps: m(|c| c.mbps),
                recovery_ms: Some(m(|c| c.recovery_ms.unwrap_or(-1.0))),
                p50_us: m(|c| c.p50_us),
                p99_us: m(|c| c.p99_us),
                max_us: m(|c| c.max_us),
            };
            println!(
                "{name} {tunnel}: goodput {:.0?} Mbit/s, rr p50 {:.0?} µs, p99 {:.0?} µs{}",
                runs.iter().map(|c| c.mbps).collect::<Vec<_>>(),
                runs.iter().map(|c| c.p50_us).collect::<Vec<_>>(),
                runs.iter().map(|c| c.p99_us).collect::<Vec<_>>(),
                if scenario == Scenario::Cut {
                    format!(
                        ", recovery {:?} ms",
                        runs.iter().map(|c| c.recovery_ms).collect::<Vec<_>>()
                    )
                } else {
                    String::new()
                }
            );
            line += &format!(
                " {name}_{tunnel}_mbps={:.0} {name}_{tunnel}_rr_p50_us={:.0} {name}_{tunnel}_rr_p99_us={:.0}",
                c.mbps, c.p50_us, c.p99_us
            );
            if scenario == Scenario::Cut {
                line += &format!(
                    " {name}_{tunnel}_recovery_ms={:.0} {name}_{tunnel}_rr_max_us={:.0}",
                    c.recovery_ms.unwrap_or(-1.0),
                    c.max_us
                );
            }
            cells.push((tunnel, c));
        }
        let kernel = cells.iter().find(|(t, _)| *t == "kernel").map(|(_, c)| *c);
        for (tunnel, c) in &cells {
            if let (Some(k), true) = (kernel, *tunnel != "kernel") {
                line += &format!(" {name}_{tunnel}_vs_kernel={:.2}", c.mbps / k.mbps.max(1.0));
            }
        }
        if scenario == Scenario::Congested {
            // Free capacity: the clean path and what the flood leaves of path 1.
            let free = 2.0 * o.rate_mbps - f64::from(o.flood_mbps);
            for (tunnel, c) in &cells {
                line += &format!(" congested_{tunnel}_free_share={:.2}", c.mbps / free);
            }
        }
    }
    println!("{line}");
    Ok(())
}
