//! `outboard-card net`: runs one overlay NIC (a TAP joined to the Geneve multipath underlay,
//! crate outboard-card-net) in the foreground, printing a `STATS key=value …` line of its
//! counters every `--stats-secs`.
//!
//! ```text
//! outboard-card net --tap T --vni N --mac M --ip A --path ADDR:PORT [--path …]
//!                   --remote MAC=IP@HOST [--remote …] [--policy hash|spray|adaptive]
//!                   [--listen ADDR:PORT] [--reorder-timeout-us U] [--stats-secs S]
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use outboard_card_net::dataplane::{Config, Dataplane, PathSpec};
use outboard_card_net::flow::parse_mac;
use outboard_card_net::path::{Policy, Timing};
use outboard_card_net::reorder;
use outboard_card_net::table::{Port, Table};

#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// TAP device to create (or attach to).
    #[arg(long)]
    tap: String,
    /// Virtual network of the NIC.
    #[arg(long)]
    vni: u32,
    /// The VM's MAC address: frames from any other are dropped.
    #[arg(long)]
    mac: String,
    /// The VM's IPv4 address: packets from any other are dropped.
    #[arg(long)]
    ip: Ipv4Addr,
    /// A path: its local source ADDR:PORT (0.0.0.0:PORT to vary the port only). Repeat.
    #[arg(long = "path", required = true)]
    paths: Vec<SocketAddrV4>,
    /// A remote VM of the same network: MAC=IP@HOST (HOST: its card's underlay address). Repeat.
    #[arg(long = "remote")]
    remotes: Vec<String>,
    #[arg(long, default_value = "adaptive")]
    policy: String,
    #[arg(long, default_value = "0.0.0.0:6081")]
    listen: SocketAddrV4,
    #[arg(long, default_value_t = 2000)]
    reorder_timeout_us: u64,
    /// Print the counters this often (0: never).
    #[arg(long, default_value_t = 0.0)]
    stats_secs: f64,
}

fn remote(spec: &str) -> Result<([u8; 6], Ipv4Addr, Ipv4Addr)> {
    let bad = || anyhow!("Bad --remote {spec:?} (want MAC=IP@HOST)");
    let (mac, rest) = spec.split_once('=').ok_or_else(bad)?;
    let (ip, host) = rest.split_once('@').ok_or_else(bad)?;
    Ok((
        parse_mac(mac).ok_or_else(bad)?,
        ip.parse().map_err(|_| bad())?,
        host.parse().map_err(|_| bad())?,
    ))
}

pub fn run(a: NetArgs) -> Result<()> {
    let mac = parse_mac(&a.mac).ok_or_else(|| anyhow!("Bad --mac {:?}", a.mac))?;
    let mut table = Table::new();
    for r in &a.remotes {
        let (m, ip, host) = remote(r)?;
        table.add_remote(a.vni, m, ip, host)?;
    }
    let cfg = Config {
        tap: a.tap,
        port: Port {
            vni: a.vni,
            mac,
            ip: a.ip,
        },
        table,
        paths: a.paths.iter().map(|&local| PathSpec { local }).collect(),
        listen: a.listen,
        policy: a.policy.parse::<Policy>()?,
        timing: Timing::default(),
        reorder: reorder::Limits {
            timeout_us: a.reorder_timeout_us,
            ..Default::default()
        },
    };
    let mut dp = Dataplane::new(cfg).context("Cannot start the overlay NIC")?;
    log::info!("overlay NIC {} up ({} paths)", dp.tap_name(), a.paths.len());
    if a.stats_secs > 0.0 {
        let counters = dp.counters();
        let every = Duration::from_secs_f64(a.stats_secs);
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            println!("STATS {}", counters.snapshot().kv_line());
        });
    }
    // Runs until the process is killed: the card daemon will own stopping it.
    dp.run(&AtomicBool::new(false))?;
    Ok(())
}
