//! `outboard-card net`: runs one overlay NIC (a VM's vhost-user-net virtual port, or a TAP,
//! joined to the Geneve multipath underlay, crate outboard-card-net) in the foreground, printing
//! a `STATS key=value …` line of its counters every `--stats-secs`.
//!
//! ```text
//! outboard-card net (--vhost-user SOCKET | --tap T) --vni N --mac M --ip A --host H --path ADDR:PORT [--path …]
//!                   --remote MAC=IP@HOST [--remote …] [--policy hash|spray|adaptive]
//!                   [--listen ADDR:PORT] [--reorder-timeout-us U] [--stats-secs S]
//!                   [--underlay-mtu M] [--train N] [--no-offload] [--api SOCKET]
//! ```
//!
//! With `--api`, the card API's `/net` routes are served on SOCKET: the mapping table (which
//! the NIC uses live) and this NIC's counters as interface `0`.
//!
//! ```text
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use outboard_card_net::dataplane::{Config, Dataplane, NicSpec, PathSpec};
use outboard_card_net::flow::parse_mac;
use outboard_card_net::path::{Policy, Timing};
use outboard_card_net::reorder;
use outboard_card_net::table::{Port, SharedTable, Table};

use crate::api::{self, net::Net};

#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// TAP device to create (or attach to), for a host or a test.
    #[arg(
        long,
        required_unless_present = "vhost_user",
        conflicts_with = "vhost_user"
    )]
    tap: Option<String>,
    /// A VM's NIC: the vhost-user-net socket its VMM (or QEMU) connects to.
    #[arg(long)]
    vhost_user: Option<std::path::PathBuf>,
    /// Virtual network of the NIC.
    #[arg(long)]
    vni: u32,
    /// The VM's MAC address: frames from any other are dropped.
    #[arg(long)]
    mac: String,
    /// The VM's IPv4 address: packets from any other are dropped.
    #[arg(long)]
    ip: Ipv4Addr,
    /// This card's underlay address (the HOST of its VMs in the peers' --remote).
    #[arg(long)]
    host: Ipv4Addr,
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
    #[arg(long, default_value_t = 10_000)]
    reorder_timeout_us: u64,
    /// Print the counters this often (0: never).
    #[arg(long, default_value_t = 0.0)]
    stats_secs: f64,
    /// Underlay IP MTU: outer datagrams are cut to fit.
    #[arg(long, default_value_t = 1500)]
    underlay_mtu: usize,
    /// Most datagrams per path choice (0: a whole UDP GSO send).
    #[arg(long, default_value_t = 0)]
    train: usize,
    /// No virtio-net header, TSO, UDP GSO or GRO: one frame per datagram.
    #[arg(long)]
    no_offload: bool,
    /// Serve the card API's /net routes on this Unix socket.
    #[arg(long)]
    api: Option<std::path::PathBuf>,
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
    let table = SharedTable::new(table);
    let cfg = Config {
        nic: match (a.tap, a.vhost_user) {
            (Some(tap), None) => NicSpec::Tap(tap),
            (None, Some(socket)) => NicSpec::VhostUser(socket),
            _ => anyhow::bail!("Give one of --tap and --vhost-user"),
        },
        port: Port {
            vni: a.vni,
            mac,
            ip: a.ip,
        },
        host: a.host,
        table: table.clone(),
        paths: a.paths.iter().map(|&local| PathSpec { local }).collect(),
        listen: a.listen,
        policy: a.policy.parse::<Policy>()?,
        timing: Timing::default(),
        reorder: reorder::Limits {
            timeout_us: a.reorder_timeout_us,
            ..Default::default()
        },
        offload: !a.no_offload,
        underlay_mtu: a.underlay_mtu,
        train: a.train,
    };
    let policy = cfg.policy;
    let mut dp = Dataplane::new(cfg).context("Cannot start the overlay NIC")?;
    if let Some(socket) = a.api {
        let net = Arc::new(Net::with_table(table));
        let summary = serde_json::json!({
            "id": "0", "nic": dp.nic_name(), "vni": a.vni, "mac": a.mac,
            "ip": a.ip.to_string(), "host": a.host.to_string(),
            "policy": format!("{policy:?}").to_lowercase(),
            "paths": a.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "offload": !a.no_offload,
        });
        net.adopt("0", summary, dp.counters());
        std::thread::spawn(move || {
            if let Err(e) = api::net::serve(net, &socket) {
                log::error!("Net API stopped: {e:#}");
            }
        });
    }
    log::info!("overlay NIC {} up ({} paths)", dp.nic_name(), a.paths.len());
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
