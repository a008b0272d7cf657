//! The `/net` routes of the card API, as a client of `outboard-card serve` sees them: the
//! mapping table, overlay NICs started and stopped through the API with their counters, and
//! hostile requests. Creating a NIC needs root (a TAP); that part prints `SKIP:` otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{call, start as start_card, Daemon, CARD};

fn start() -> Daemon {
    start_card("net-api", 16)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

#[test]
fn mappings_interfaces_and_counters() {
    let d = start();
    let m = r#"{"vni":4242,"mac":"02:0b:00:00:00:02","ip":"192.168.77.2","host":"10.9.0.2"}"#;
    assert_eq!(call(&d, "PUT", "/net/mappings", m).0, 204);
    let (s, v) = call(&d, "GET", "/net/mappings", "");
    assert_eq!(s, 200);
    assert_eq!(v["mappings"][0]["mac"], "02:0b:00:00:00:02");
    assert_eq!(v["mappings"][0]["host"], "10.9.0.2");

    // Hostile or wrong requests: clear errors, nothing changes.
    for (method, path, body, want) in [
        (
            "PUT",
            "/net/mappings",
            r#"{"vni":1,"mac":"zz","ip":"1.2.3.4","host":"1.2.3.4"}"#,
            400,
        ),
        (
            "PUT",
            "/net/mappings",
            r#"{"vni":16777216,"mac":"02:00:00:00:00:01","ip":"1.2.3.4","host":"1.2.3.4"}"#,
            400,
        ),
        (
            "PUT",
            "/net/mappings",
            r#"{"vni":1,"mac":"ff:ff:ff:ff:ff:ff","ip":"1.2.3.4","host":"1.2.3.4"}"#,
            400,
        ),
        (
            "PUT",
            "/net/mappings",
            r#"{"vni":1,"mac":"02:00:00:00:00:01","ip":"1.2.3.4","host":"1.2.3.4","x":1}"#,
            400,
        ),
        ("PUT", "/net/mappings", "not json", 400),
        ("DELETE", "/net/mappings/4242/02:0b:00:00:00:09", "", 404),
        ("DELETE", "/net/mappings/x/02:0b:00:00:00:02", "", 400),
        ("POST", "/net/mappings", "", 405),
        ("GET", "/net/nothing", "", 404),
        ("GET", "/net/interfaces/none/counters", "", 404),
        ("PUT", "/net/interfaces/bad%20id", "{}", 400),
        (
            "PUT",
            "/net/interfaces/n0",
            r#"{"tap":"t","vni":1,"mac":"02:00:00:00:00:01","ip":"1.2.3.4","host":"1.2.3.4","paths":["127.0.0.1:0"],"policy":"fastest"}"#,
            400,
        ),
        (
            "PUT",
            "/net/interfaces/n0",
            r#"{"tap":"t","vni":1,"mac":"02:00:00:00:00:01","ip":"1.2.3.4","host":"1.2.3.4","paths":[]}"#,
            400,
        ),
        ("DELETE", "/net/interfaces/none", "", 404),
    ] {
        let (s, v) = call(&d, method, path, body);
        assert_eq!(s, want, "{method} {path} {body}: {v}");
        if s >= 400 {
            assert!(v["fault_message"].is_string(), "{v}");
        }
    }
    assert_eq!(
        call(&d, "GET", "/net/mappings", "").1["mappings"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        call(&d, "DELETE", "/net/mappings/4242/02:0b:00:00:00:02", "").0,
        204
    );
    assert_eq!(
        call(&d, "GET", "/net/mappings", "").1["mappings"],
        Value::Array(vec![])
    );

    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: creating an overlay NIC through the API needs root and /dev/net/tun");
        return;
    }
    let tap = format!("obapi{}", std::process::id() % 100_000);
    let nic = format!(
        r#"{{"tap":"{tap}","vni":7,"mac":"02:00:00:00:00:01","ip":"192.168.5.1","host":"127.0.0.1","paths":["127.0.0.1:0","127.0.0.1:0"],"listen":"127.0.0.1:0","policy":"spray"}}"#
    );
    let (s, v) = call(&d, "PUT", "/net/interfaces/vm0", &nic);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["policy"], "spray");
    assert_eq!(call(&d, "PUT", "/net/interfaces/vm0", &nic).0, 409);
    let (s, v) = call(&d, "GET", "/net/interfaces", "");
    assert_eq!((s, v["interfaces"][0]["id"].clone()), (200, "vm0".into()));
    let (s, v) = call(&d, "GET", "/net/interfaces/vm0/counters", "");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["paths"].as_array().unwrap().len(), 2);
    assert!(v["dropped"]["rx_malformed"].is_u64(), "{v}");
    assert!(v["paths"][1]["rtt_p99_us"].is_u64(), "{v}");
    assert_eq!(call(&d, "DELETE", "/net/interfaces/vm0", "").0, 204);
    assert_eq!(call(&d, "GET", "/net/interfaces/vm0/counters", "").0, 404);
    // The TAP went with the NIC.
    let link = Command::new("ip")
        .args(["link", "show", &tap])
        .output()
        .unwrap();
    assert!(!link.status.success(), "TAP {tap} still exists");
}

/// `outboard-card net --api`: one NIC in the foreground, its counters as interface `0` and
/// the mapping table it uses, editable live.
#[test]
fn foreground_nic_serves_its_counters_and_mappings() {
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: outboard-card net needs root and /dev/net/tun for its TAP");
        return;
    }
    let dir = std::env::temp_dir().join(format!("outboard-card-net-fg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("net.sock");
    let tap = format!("obfg{}", std::process::id() % 100_000);
    let child = Command::new(CARD)
        .args([
            "net",
            "--tap",
            &tap,
            "--vni",
            "9",
            "--mac",
            "02:00:00:00:00:01",
        ])
        .args([
            "--ip",
            "192.168.9.1",
            "--host",
            "127.0.0.1",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--path", "127.0.0.1:0", "--path", "127.0.0.1:0"])
        .args([
            "--remote",
            "02:00:00:00:00:02=192.168.9.2@127.0.0.2",
            "--api",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, dir };
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "API socket never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let call = |method: &str, path: &str, body: &str| {
        let mut s = UnixStream::connect(&sock).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
        (status, body)
    };
    let (s, body) = call("GET", "/net/interfaces/0/counters", "");
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["paths"].as_array().unwrap().len(), 2);
    assert_eq!(v["gso"], true);
    let (s, body) = call("GET", "/net/mappings", "");
    assert_eq!(s, 200);
    assert!(body.contains("\"host\":\"127.0.0.2\""), "{body}");
    let m = r#"{"vni":9,"mac":"02:00:00:00:00:03","ip":"192.168.9.3","host":"127.0.0.3"}"#;
    assert_eq!(call("PUT", "/net/mappings", m).0, 204);
    assert!(call("GET", "/net/mappings", "").1.contains("127.0.0.3"));
    assert_eq!(
        call("GET", "/volumes", "").0,
        404,
        "only /net is served here"
    );
    drop(d);
}
