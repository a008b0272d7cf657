//! Two Linux VMs (QEMU TCG) on two "hosts" talk through the card's overlay: each VM's NIC is a
//! vhost-user-net virtual port of its own `outboard-card net` process, and the two cards
//! exchange Geneve over two paths each (distinct loopback source ports, so no root is needed).
//! The client VM pings the server VM and fetches a random blob over HTTP; the blob's MD5 must
//! match and no ping may be lost. A third VM on another virtual network, mapped on the same
//! card, cannot reach the server.
//!
//! Needs qemu-system-x86_64 and the guest image; prints `SKIP:` where either is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outboard_guest_harness::{marker, GuestCommand, GuestVm, Runner};

mod common;

use common::qemu_prerequisites;

const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");
/// TCG boots in ~3 s; the client's ping wait and the fetch add a few more.
const TIMEOUT: Duration = Duration::from_secs(180);

struct Card(Child);

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM's NIC on a card at `host` (a loopback address).
struct Nic<'a> {
    socket: PathBuf,
    vni: u32,
    mac: &'a str,
    ip: &'a str,
    host: &'a str,
    /// MAC=IP@HOST of the other VMs of its network.
    remotes: Vec<String>,
    log: PathBuf,
}

fn start_card(nic: &Nic<'_>, base_port: u16) -> Card {
    let mut cmd = Command::new(CARD);
    cmd.args(["net", "--vhost-user"])
        .arg(&nic.socket)
        .args([
            "--vni",
            &nic.vni.to_string(),
            "--mac",
            nic.mac,
            "--ip",
            nic.ip,
        ])
        .args([
            "--host",
            nic.host,
            "--listen",
            &format!("{}:6081", nic.host),
        ])
        .args(["--path", &format!("{}:{base_port}", nic.host)])
        .args(["--path", &format!("{}:{}", nic.host, base_port + 1)])
        .args(["--policy", "spray", "--stats-secs", "1"]);
    for r in &nic.remotes {
        cmd.args(["--remote", r]);
    }
    let log = std::fs::File::create(&nic.log).unwrap();
    let child = cmd
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start outboard-card net");
    let card = Card(child);
    assert!(
        outboard_guest_harness::wait_for_path(&nic.socket, Duration::from_secs(20)),
        "card never listened:\n{}",
        read(&nic.log)
    );
    card
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn vm(nic: &Nic<'_>, role: &str, peer: &str, wait_s: u32) -> GuestVm {
    GuestCommand::linux(Runner::QemuTcg)
        .shared_memory()
        .memory_mib(512)
        .run_command("net-peer")
        .cmdline(&format!(
            "outboard.net.role={role} outboard.net.ip={}/24 outboard.net.peer={peer} \
             outboard.net.wait={wait_s}",
            nic.ip
        ))
        .args([
            "-chardev".into(),
            format!("socket,id=nic0,path={}", nic.socket.display()),
        ])
        .args(["-netdev", "vhost-user,id=net0,chardev=nic0"])
        // vectors=0: QEMU 7.2 (Debian 12) segfaults in vhost_net_start → msix_set_vector_notifiers
        // with any vhost-user-net backend when the device has MSI-X; INTx avoids that path.
        .args([
            "-device".to_owned(),
            format!("virtio-net-pci,netdev=net0,mac={},vectors=0", nic.mac),
        ])
        .spawn()
        .expect("start QEMU")
}

/// The last `STATS` line a card printed, as key → value.
fn last_stats(log: &Path) -> std::collections::BTreeMap<String, String> {
    let text = read(log);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("STATS "))
        .unwrap_or_else(|| panic!("no STATS line in the card's log:\n{text}"));
    marker::fields(line, "STATS").unwrap()
}

#[test]
fn two_vms_talk_through_the_overlay_and_a_third_network_is_isolated() {
    const TEST: &str = "two_vms_talk_through_the_overlay_and_a_third_network_is_isolated";
    if !qemu_prerequisites(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mac_a, mac_b, mac_c) = (
        "52:54:00:0a:00:01",
        "52:54:00:0b:00:01",
        "52:54:00:0c:00:01",
    );
    let a = Nic {
        socket: dir.path().join("a.sock"),
        vni: 7,
        mac: mac_a,
        ip: "10.9.0.1",
        host: "127.0.0.1",
        remotes: vec![format!("{mac_b}=10.9.0.2@127.0.0.2")],
        log: dir.path().join("card-a.log"),
    };
    let b = Nic {
        socket: dir.path().join("b.sock"),
        vni: 7,
        mac: mac_b,
        ip: "10.9.0.2",
        host: "127.0.0.2",
        remotes: vec![format!("{mac_a}=10.9.0.1@127.0.0.1")],
        log: dir.path().join("card-b.log"),
    };
    // VM C claims an address in A's subnet but lives in VNI 8; its card even maps A's MAC (as
    // a VM of VNI 8), yet A's card only accepts VNI 7.
    let c = Nic {
        socket: dir.path().join("c.sock"),
        vni: 8,
        mac: mac_c,
        ip: "10.9.0.3",
        host: "127.0.0.3",
        remotes: vec![format!("{mac_a}=10.9.0.1@127.0.0.1")],
        log: dir.path().join("card-c.log"),
    };
    let _cards = [
        start_card(&a, 41000),
        start_card(&b, 42000),
        start_card(&c, 43000),
    ];
    let server = vm(&a, "server", "10.9.0.2", 90);
    let client = vm(&b, "client", "10.9.0.1", 90);
    // By the time it gives up, the server has long been answering its own network.
    let outsider = vm(&c, "client", "10.9.0.1", 15);

    let s = server.expect_fields("OUTBOARD_NET_SERVER", TIMEOUT);
    let r = client.expect_fields("OUTBOARD_NET_CLIENT", TIMEOUT);
    let context = || {
        format!(
            "client: {r:?}\ncard A:\n{}\ncard B:\n{}\nclient console:\n{}",
            read(&a.log),
            read(&b.log),
            client.lines().join("\n")
        )
    };
    assert_eq!(r["ok"], "1", "{}", context());
    assert_eq!(r["loss_pct"], "0", "{}", context());
    assert_eq!(
        r["md5"],
        s["md5"],
        "the blob changed on the way: {}",
        context()
    );
    assert_eq!(r["bytes"], s["bytes"]);
    eprintln!(
        "{TEST}: {} bytes in {} s, ping rtt avg {} ms",
        r["bytes"], r["seconds"], r["rtt_avg_ms"]
    );

    let o = outsider.expect_fields("OUTBOARD_NET_CLIENT", TIMEOUT);
    assert_eq!(
        o["ok"], "0",
        "a VM of another network reached the server: {o:?}"
    );

    // Both paths of card B carried the transfer (spray), and card A dropped VNI 8's frames.
    std::thread::sleep(Duration::from_millis(1500));
    let stats_b = last_stats(&b.log);
    let stats_a = last_stats(&a.log);
    eprintln!("card A: {stats_a:?}\ncard B: {stats_b:?}");
    let n = |m: &std::collections::BTreeMap<String, String>, k: &str| -> u64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    for side in [&stats_a, &stats_b] {
        for path in ["path0_tx_packets", "path1_tx_packets"] {
            assert!(n(side, path) > 0, "{path} idle under spray: {side:?}");
        }
    }
    // C's frames reach card A on VNI 8 and are dropped there, counted.
    assert!(n(&stats_a, "rx_wrong_vni") > 0, "{stats_a:?}");
}
