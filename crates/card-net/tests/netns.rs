//! Two hosts in network namespaces joined by two veth paths, a card dataplane per host, and
//! a "VM" namespace behind each card's TAP: ping and a verified TCP transfer through the
//! overlay, spray over both paths, and hostile traffic dropped and counted.
//!
//! ```text
//!  va ─ TAP ─ [card A in ha] ═ a1/b1 (10.1.0.0/24) ═ [card B in hb] ─ TAP ─ vb
//!                            ═ a2/b2 (10.2.0.0/24) ═
//!  hosts: 10.9.0.1 (ha lo), 10.9.0.2 (hb lo); path i = source address 10.i.0.x + policy route
//! ```
//!
//! Needs root and `ip`; prints `SKIP:` otherwise.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outboard_card_net::counters::NicCounters;
use outboard_card_net::dataplane::{Config, Dataplane, NicSpec, PathSpec};
use outboard_card_net::geneve::{self, OutboardOption};
use outboard_card_net::path::{Policy, Timing};
use outboard_card_net::reorder;
use outboard_card_net::sys::enter_netns;
use outboard_card_net::table::{Port, SharedTable, Table};

const VNI: u32 = 4242;
const MAC_A: [u8; 6] = [2, 0x0b, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0x0b, 0, 0, 0, 2];
const VM_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const VM_B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        return Some("root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun".into());
    }
    None
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &str) {
    run("ip", &args.split_whitespace().collect::<Vec<_>>());
}

/// Deletes its namespaces when dropped, test failure included.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Stops and joins the dataplane workers when dropped (before the namespaces go).
struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

struct Topology {
    ha: String,
    hb: String,
    va: String,
    vb: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn topology() -> (Namespaces, Topology) {
    let id = format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let t = Topology {
        ha: format!("obha{id}"),
        hb: format!("obhb{id}"),
        va: format!("obva{id}"),
        vb: format!("obvb{id}"),
    };
    let ns = Namespaces(vec![t.ha.clone(), t.hb.clone(), t.va.clone(), t.vb.clone()]);
    for n in &ns.0 {
        ip(&format!("netns add {n}"));
        ip(&format!("-n {n} link set lo up"));
    }
    let (ha, hb) = (&t.ha, &t.hb);
    for i in 1..=2 {
        ip(&format!(
            "-n {ha} link add a{i} type veth peer name b{i} netns {hb}"
        ));
        ip(&format!("-n {ha} addr add 10.{i}.0.1/24 dev a{i}"));
        ip(&format!("-n {hb} addr add 10.{i}.0.2/24 dev b{i}"));
        ip(&format!("-n {ha} link set a{i} up"));
        ip(&format!("-n {hb} link set b{i} up"));
    }
    for (n, me, peer) in [(ha, 1, 2), (hb, 2, 1)] {
        ip(&format!("-n {n} addr add 10.9.0.{me}/32 dev lo"));
        ip(&format!(
            "-n {n} route add 10.9.0.{peer}/32 via 10.1.0.{peer}"
        ));
        for i in 1..=2 {
            // Path i leaves from its own source address; policy routing pins it to link i.
            ip(&format!(
                "-n {n} rule add from 10.{i}.0.{me} table {}",
                100 + i
            ));
            ip(&format!(
                "-n {n} route add 10.9.0.{peer}/32 via 10.{i}.0.{peer} table {}",
                100 + i
            ));
        }
    }
    (ns, t)
}

/// Starts a card in `host` whose TAP ends up in `vm` with the given VM addresses.
#[allow(clippy::too_many_arguments)]
fn start_card(
    workers: &mut Workers,
    host: &str,
    vm: &str,
    me: u8,
    port: Port,
    remote: (Port, Ipv4Addr),
    policy: Policy,
) -> Arc<NicCounters> {
    let mut table = Table::new();
    table
        .add_remote(remote.0.vni, remote.0.mac, remote.0.ip, remote.1)
        .unwrap();
    let tap = format!("obtap{me}");
    let cfg = Config {
        nic: NicSpec::Tap(tap.clone()),
        port,
        host: Ipv4Addr::new(10, 9, 0, me),
        table: SharedTable::new(table),
        paths: (1..=2)
            .map(|i| PathSpec {
                local: SocketAddrV4::new(Ipv4Addr::new(10, i, 0, me), 40000 + u16::from(i)),
            })
            .collect(),
        listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, geneve::PORT),
        policy,
        timing: Timing::default(),
        reorder: reorder::Limits::default(),
        offload: true,
        underlay_mtu: 1500,
        train: 0,
    };
    let (tx, rx) = mpsc::channel();
    let stop = Arc::clone(&workers.stop);
    let host_ns = host.to_owned();
    workers.handles.push(std::thread::spawn(move || {
        enter_netns(&host_ns).expect("enter host namespace");
        let mut dp = Dataplane::new(cfg).expect("start dataplane");
        tx.send(dp.counters()).unwrap();
        dp.run(&stop).expect("dataplane run");
    }));
    let counters = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dataplane started");
    ip(&format!(
        "-n {host} link set {tap} address {}",
        mac(port.mac)
    ));
    ip(&format!("-n {host} link set {tap} mtu 1400"));
    ip(&format!("-n {host} link set {tap} netns {vm}"));
    ip(&format!("-n {vm} addr add {}/24 dev {tap}", port.ip));
    ip(&format!("-n {vm} link set {tap} up"));
    counters
}

fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("enter namespace");
        f()
    })
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

struct Overlay {
    t: Topology,
    ca: Arc<NicCounters>,
    cb: Arc<NicCounters>,
    // Field order is drop order: workers stop before the namespaces go.
    _workers: Workers,
    _ns: Namespaces,
}

const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

fn overlay(policy: Policy) -> Option<Overlay> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: netns overlay test needs {why}");
        return None;
    }
    let (ns, t) = topology();
    let mut workers = Workers {
        stop: Arc::new(AtomicBool::new(false)),
        handles: Vec::new(),
    };
    let port_a = Port {
        vni: VNI,
        mac: MAC_A,
        ip: VM_A,
    };
    let port_b = Port {
        vni: VNI,
        mac: MAC_B,
        ip: VM_B,
    };
    let ca = start_card(
        &mut workers,
        &t.ha,
        &t.va,
        1,
        port_a,
        (port_b, HOST_B),
        policy,
    );
    let cb = start_card(
        &mut workers,
        &t.hb,
        &t.vb,
        2,
        port_b,
        (port_a, HOST_A),
        policy,
    );
    Some(Overlay {
        t,
        ca,
        cb,
        _workers: workers,
        _ns: ns,
    })
}

/// Sends `bytes` from VM A to VM B over TCP, running `during` once a quarter is written (the
/// sender waits for it);
/// returns (bytes received, bytes corrupted, seconds).
fn transfer(t: &Topology, bytes: usize, during: impl FnOnce()) -> (usize, usize, f64) {
    let listener = in_netns(&t.vb, || TcpListener::bind((VM_B, 5201)).unwrap())
        .join()
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0usize;
        let mut bad = 0usize;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            bad += buf[..n]
                .iter()
                .enumerate()
                .filter(|(i, b)| **b != pattern(got + i))
                .count();
            got += n;
        }
        (got, bad)
    });
    let started = Instant::now();
    let (quarter_tx, quarter_rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let sender = in_netns(&t.va, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddrV4::new(VM_B, 5201).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        let data: Vec<u8> = (0..bytes).map(pattern).collect();
        for (i, chunk) in data.chunks(bytes / 4).enumerate() {
            if i == 1 {
                // The rest goes only once `during` is done: ip commands can stall on the rtnl
                // lock while parallel tests delete their namespaces.
                quarter_tx.send(()).unwrap();
                let _ = resume_rx.recv_timeout(Duration::from_secs(30));
            }
            s.write_all(chunk).unwrap();
        }
    });
    if quarter_rx.recv_timeout(Duration::from_secs(30)).is_ok() {
        during();
        let _ = resume_tx.send(());
    }
    sender.join().unwrap();
    let (got, bad) = receiver.join().unwrap();
    (got, bad, started.elapsed().as_secs_f64())
}

fn mbits(bytes: usize, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e6
}

#[test]
fn spray_uses_both_paths_and_drops_hostile_traffic() {
    let Some(o) = overlay(Policy::Spray) else {
        return;
    };
    let t = &o.t;
    if Command::new("ping").arg("-V").output().is_ok() {
        let ping = run(
            "ip",
            &[
                "netns",
                "exec",
                &t.va,
                "ping",
                "-c",
                "5",
                "-i",
                "0.2",
                "-W",
                "2",
                &VM_B.to_string(),
            ],
        );
        assert!(ping.contains(" 0% packet loss"), "{ping}");
    } else {
        eprintln!("SKIP: ping step (no `ping` installed); the TCP transfer below still runs");
    }
    const BYTES: usize = 32 << 20;
    let (got, bad, secs) = transfer(t, BYTES, || {});
    assert_eq!((got, bad), (BYTES, 0), "transfer incomplete or corrupted");
    eprintln!(
        "spray: {} MiB in {secs:.2} s = {:.0} Mbit/s",
        BYTES >> 20,
        mbits(BYTES, secs)
    );

    // Hostile traffic at card B: garbage, and a well-formed packet for another virtual network.
    in_netns(&t.ha, move || {
        let s = UdpSocket::bind("10.1.0.1:0").unwrap();
        let to = SocketAddrV4::new(HOST_B, geneve::PORT);
        s.send_to(b"\x00\x00\x65", to).unwrap();
        s.send_to(&[0xffu8; 64], to).unwrap();
        let mut pkt = Vec::new();
        geneve::encapsulate(
            VNI + 1,
            false,
            &OutboardOption::default(),
            &[0u8; 60],
            &mut pkt,
        );
        s.send_to(&pkt, to).unwrap();
    })
    .join()
    .unwrap();
    // A spoofed source address from VM A.
    ip(&format!("-n {} addr add 192.168.77.9/24 dev obtap1", t.va));
    in_netns(&t.va, || {
        let s = UdpSocket::bind("192.168.77.9:0").unwrap();
        for _ in 0..3 {
            s.send_to(b"spoofed", SocketAddrV4::new(VM_B, 9)).unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let sa = o.ca.snapshot();
    let sb = o.cb.snapshot();
    eprintln!("card A: {sa:?}");
    eprintln!("card B: {sb:?}");
    for (i, p) in sa.paths.iter().enumerate() {
        assert!(p.tx_packets > 1000, "path {i} carried too little: {p:?}");
    }
    for (i, p) in sb.paths.iter().enumerate() {
        assert!(p.rx_packets > 1000, "path {i} received too little: {p:?}");
        assert!(p.rtt_samples > 0, "path {i} has no RTT: {p:?}");
    }
    assert!(sb.drops("rx_malformed") >= 2, "{sb:?}");
    assert!(sb.drops("rx_wrong_vni") >= 1, "{sb:?}");
    assert!(sa.drops("tx_spoofed") >= 1, "{sa:?}");
}

#[test]
fn hash_pins_one_flow_to_one_path() {
    let Some(o) = overlay(Policy::Hash) else {
        return;
    };
    const BYTES: usize = 8 << 20;
    let (got, bad, secs) = transfer(&o.t, BYTES, || {});
    assert_eq!((got, bad), (BYTES, 0));
    eprintln!(
        "hash: {} MiB in {secs:.2} s = {:.0} Mbit/s",
        BYTES >> 20,
        mbits(BYTES, secs)
    );
    let sa = o.ca.snapshot();
    let mut tx: Vec<u64> = sa.paths.iter().map(|p| p.tx_bytes).collect();
    tx.sort();
    // The data flow all takes one path; the other carries probes, probe replies and ARP.
    assert!(tx[1] > BYTES as u64 && tx[0] < 64 << 10, "{:?}", sa.paths);
}

#[test]
fn adaptive_survives_a_cut_path() {
    let Some(o) = overlay(Policy::Adaptive) else {
        return;
    };
    const BYTES: usize = 32 << 20;
    let hb = o.t.hb.clone();
    let ca = Arc::clone(&o.ca);
    let mut at_cut = Vec::new();
    let (got, bad, secs) = transfer(&o.t, BYTES, || {
        // b2 down: a2 loses carrier, so everything A sends on path 2 is lost from here on.
        ip(&format!("-n {hb} link set b2 down"));
        at_cut = ca.snapshot().paths;
    });
    assert_eq!(
        (got, bad),
        (BYTES, 0),
        "the TCP connection must survive the cut"
    );
    eprintln!(
        "adaptive, path 2 cut: {} MiB in {secs:.2} s = {:.0} Mbit/s",
        BYTES >> 20,
        mbits(BYTES, secs)
    );
    let after = o.ca.snapshot().paths;
    eprintln!("path counters at cut: {at_cut:?}\nafter: {after:?}");
    assert!(
        at_cut[1].tx_packets > 100,
        "path 2 was in use before the cut: {at_cut:?}"
    );
    // Bytes, not packets: probes and probe replies are tiny.
    let data_after_cut = after[1].tx_bytes - at_cut[1].tx_bytes;
    let moved = after[0].tx_bytes - at_cut[0].tx_bytes;
    assert!(
        after[1].losses > 0,
        "unanswered probes on the cut path: {after:?}"
    );
    // Detection takes dead_after (20 ms): a little data is lost then, then none goes there.
    assert!(
        data_after_cut * 10 < moved,
        "path 2 kept traffic after the cut: {data_after_cut} vs {moved} bytes"
    );
}

/// Loads an nft ruleset into namespace `ns`; false (with a SKIP line) when nft is missing.
fn nft(ns: &str, rules: &str) -> bool {
    use std::process::Stdio;
    let Ok(mut child) = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIP: nft unusable here ({}); apt-get install -y nftables",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

/// A rule on host A's egress to path 1 (a1) for overlay datagrams.
fn path1_rule(action: &str) -> String {
    format!(
        "table ip obimpair {{\n chain post {{\n  type filter hook postrouting priority 0;\n  \
         oifname \"a1\" udp dport 6081 {action}\n }}\n}}\n"
    )
}

#[test]
fn adaptive_moves_off_a_ce_marking_path() {
    let Some(o) = overlay(Policy::Adaptive) else {
        return;
    };
    // Half of path 1's datagrams arrive CE-marked, as from a congested ECN queue.
    if !nft(
        &o.t.ha,
        &path1_rule("numgen random mod 100 < 50 ip ecn set ce"),
    ) {
        return;
    }
    const BYTES: usize = 32 << 20;
    let (got, bad, secs) = transfer(&o.t, BYTES, || {});
    assert_eq!((got, bad), (BYTES, 0));
    let sa = o.ca.snapshot();
    let sb = o.cb.snapshot();
    eprintln!(
        "adaptive, path 1 CE-marking: {:.0} Mbit/s; path tx bytes {} / {}; CE seen at B {}, echoed to A {}; weights {:.3} / {:.3}",
        mbits(BYTES, secs),
        sa.paths[0].tx_bytes,
        sa.paths[1].tx_bytes,
        sb.paths[0].ecn_ce,
        sa.paths[0].ecn_ce_echoed,
        sa.paths[0].weight,
        sa.paths[1].weight
    );
    assert!(
        sb.paths[0].ecn_ce > 0,
        "B saw no CE on path 1: {:?}",
        sb.paths
    );
    assert_eq!(
        sb.paths[1].ecn_ce, 0,
        "CE on the clean path: {:?}",
        sb.paths
    );
    assert!(
        sa.paths[0].ecn_ce_echoed > 0,
        "A got no CE echo: {:?}",
        sa.paths
    );
    // Spray would split bytes evenly; adaptive keeps well under half on the marking path.
    assert!(
        sa.paths[0].tx_bytes * 2 < sa.paths[1].tx_bytes,
        "marking path kept its share: {:?}",
        sa.paths
    );
}

#[test]
fn adaptive_survives_and_avoids_a_lossy_path() {
    let Some(o) = overlay(Policy::Adaptive) else {
        return;
    };
    if !nft(&o.t.ha, &path1_rule("numgen random mod 100 < 5 drop")) {
        return;
    }
    const BYTES: usize = 32 << 20;
    let (got, bad, secs) = transfer(&o.t, BYTES, || {});
    assert_eq!((got, bad), (BYTES, 0), "TCP delivers everything intact");
    let sa = o.ca.snapshot();
    let sb = o.cb.snapshot();
    eprintln!(
        "adaptive, path 1 dropping 5%: {:.0} Mbit/s; path tx bytes {} / {}; lost seen at B {}, loss events at A {}; frames lost {}",
        mbits(BYTES, secs),
        sa.paths[0].tx_bytes,
        sa.paths[1].tx_bytes,
        sb.paths[0].rx_lost,
        sa.paths[0].losses,
        sb.frames_incomplete
    );
    assert!(
        sb.paths[0].rx_lost > 0,
        "B saw no path-1 gap: {:?}",
        sb.paths
    );
    assert_eq!(
        sb.paths[1].rx_lost, 0,
        "loss on the clean path: {:?}",
        sb.paths
    );
    assert!(sa.paths[0].losses > 0, "A heard of no loss: {:?}", sa.paths);
    assert!(
        sa.paths[0].tx_bytes < sa.paths[1].tx_bytes,
        "lossy path kept its share: {:?}",
        sa.paths
    );
}
