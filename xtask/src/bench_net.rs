//! `cargo xtask bench net [--seconds S] [--repeats N] [--rate R] [--scenarios clean,congested]`:
//! the card's overlay against the kernel's own tunnel, in the same run and the same namespaces.
//!
//! Two hosts (netns) joined by two veth paths shaped to `--rate` each (tbf; default 1gbit), a
//! "VM" namespace behind each `outboard-card net` TAP. Per policy (hash, spray, adaptive) one
//! iperf3 TCP flow VM A → VM B; then one flow through the kernel tunnel between the hosts
//! (Geneve if the kernel has it, else VXLAN: this machine's kernel has no Geneve). Medians of
//! `--repeats` runs. Last line: `RESULT net …`.
//!
//! Scenarios: `clean`, and `congested` (path 1 flooded by an iperf3 UDP flow at 90% of
//! `--rate` for the whole measurement; the kernel tunnel rides path 1 too). Lossy and cut paths
//! and request/response latency are the next scenarios (issue 7).

use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util;

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
    ]);
    for i in 1..=2 {
        args.extend(["--path".into(), format!("10.{i}.0.{me}:{}", 40000 + i)]);
    }
    args.extend([
        "--remote".into(),
        format!("{}=192.168.77.{peer}@10.9.0.{peer}", mac(peer)),
    ]);
    Command::new("ip")
        .args(&args)
        .stdout(Stdio::null())
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

/// One iperf3 TCP flow from namespace `client` to `server_ip` (served in `server`); Mbit/s.
fn iperf(client: &str, server: &str, server_ip: &str, seconds: u32) -> Result<f64> {
    let srv = Command::new("ip")
        .args([
            "netns", "exec", server, "iperf3", "-s", "-1", "-B", server_ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start iperf3 -s")?;
    let _reaper = Reaper(vec![srv]);
    sleep(Duration::from_millis(300));
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            client,
            "iperf3",
            "-c",
            server_ip,
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    // "sum_received": { ... "bits_per_second": N ... }
    let at = out
        .find("\"sum_received\"")
        .context("iperf3 output without sum_received")?;
    let rest = &out[at..];
    let b = rest
        .find("\"bits_per_second\":")
        .context("iperf3 output without bits_per_second")?;
    let num: String = rest[b + 18..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+')
        .collect();
    Ok(num.parse::<f64>().context("Bad iperf3 bits_per_second")? / 1e6)
}

/// UDP cross-traffic on path 1 (10.1.0.1 → 10.1.0.2) for `seconds`, at `mbps`.
fn flood(seconds: u32, mbps: u32) -> Result<Reaper> {
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
        .args([
            "-b",
            &format!("{mbps}M"),
            "-l",
            "1400",
            "-t",
            &(seconds + 2).to_string(),
        ])
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

fn overlay_run(bin: &str, policy: &str, seconds: u32, flood_mbps: Option<u32>) -> Result<f64> {
    let _ = ip(&format!("-n {VA} link del obtap"));
    let _ = ip(&format!("-n {VB} link del obtap"));
    let cards = Reaper(vec![
        card(bin, HA, 1, 2, policy)?,
        card(bin, HB, 2, 1, policy)?,
    ]);
    attach_tap(HA, VA, 1)?;
    attach_tap(HB, VB, 2)?;
    let _flood = flood_mbps.map(|m| flood(seconds, m)).transpose()?;
    let mbps = iperf(VA, VB, "192.168.77.2", seconds)?;
    drop(cards);
    Ok(mbps)
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

pub fn run(args: &[&str]) -> Result<()> {
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default.to_string(), |s| s.to_string())
    };
    let seconds: u32 = opt("--seconds", "5").parse().context("Bad --seconds")?;
    let repeats: usize = opt("--repeats", "3").parse().context("Bad --repeats")?;
    let rate = opt("--rate", "1gbit");
    let euid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        bail!("bench net needs root (network namespaces)");
    }
    if sh("iperf3", &["--version"]).is_err() {
        bail!("bench net needs iperf3 (apt-get install -y iperf3)");
    }
    util::cargo(&["build", "--release", "-p", "outboard-card"])?;
    let bin = util::cargo_target_dir().join("release/outboard-card");
    let bin = bin.to_str().context("Non-UTF-8 target dir")?.to_owned();

    let scenarios = opt("--scenarios", "clean,congested");
    let flood_mbps = rate_mbps(&rate)? * 9 / 10;

    let _topology = topology(&rate)?;
    let mut line = format!("RESULT net rate={rate} seconds={seconds} repeats={repeats}");
    let mut kind = "";
    for scenario in scenarios.split(',') {
        let flood = match scenario {
            "clean" => None,
            "congested" => Some(flood_mbps),
            other => bail!("Unknown scenario {other:?} (clean, congested)"),
        };
        let mut results = Vec::new();
        for policy in ["hash", "spray", "adaptive"] {
            let runs = (0..repeats)
                .map(|_| overlay_run(&bin, policy, seconds, flood))
                .collect::<Result<Vec<_>>>()?;
            println!("{scenario} {policy}: {runs:.0?} Mbit/s");
            results.push((policy, median(runs)));
        }
        if kind.is_empty() {
            kind = kernel_tunnel()?;
        }
        let runs = (0..repeats)
            .map(|_| {
                let _flood = flood.map(|m| self::flood(seconds, m)).transpose()?;
                iperf(HA, HB, "192.168.78.2", seconds)
            })
            .collect::<Result<Vec<_>>>()?;
        println!("{scenario} kernel {kind}: {runs:.0?} Mbit/s");
        let kernel = median(runs);
        for (policy, mbps) in &results {
            line += &format!(" {scenario}_{policy}_mbps={mbps:.0}");
        }
        line += &format!(" {scenario}_kernel_mbps={kernel:.0}");
        for (policy, mbps) in &results {
            line += &format!(" {scenario}_{policy}_vs_kernel={:.2}", mbps / kernel);
        }
    }
    line += &format!(" kernel={kind}");
    println!("{line}");
    Ok(())
}
