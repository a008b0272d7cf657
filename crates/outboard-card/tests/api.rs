//! The control API of `outboard-card serve`, as a client sees it: volumes, attach with a key
//! and QoS, I/O through the attached socket (load generator), live QoS change, stats, detach,
//! and hostile requests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_card_storage::loadgen::{Client, LoadSpec};
use serde_json::Value;

const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> Daemon {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outboard-card-api-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = Command::new(CARD)
        .args(["volume", "--backing", store.to_str().unwrap(), "format"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let child = Command::new(CARD)
        .args(["serve", "--backing", store.to_str().unwrap(), "--api"])
        .arg(dir.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, dir };
    let t = Instant::now();
    while UnixStream::connect(d.dir.join("api.sock")).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "API socket never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn call(d: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: card\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = raw(&d.dir.join("api.sock"), req.as_bytes());
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, v)
}

#[test]
fn volumes_attach_qos_stats_detach() {
    let d = start();
    let (st, v) = call(&d, "POST", "/volumes", r#"{"name":"vm1","size":8388608}"#);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["extents"][0]["length"], 8 << 20);
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"vm1","size":4096}"#).0,
        409
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"../x","size":4096}"#).0,
        400
    );
    assert_eq!(
        call(
            &d,
            "POST",
            "/volumes",
            r#"{"name":"big","size":1099511627776}"#
        )
        .0,
        409
    );
    assert_eq!(
        call(&d, "PATCH", "/volumes/vm1", r#"{"size":16777216}"#).0,
        200
    );
    let (st, list) = call(&d, "GET", "/volumes", "");
    assert_eq!(st, 200);
    assert_eq!(list["volumes"][0]["size"], 16 << 20);

    let sock = d.dir.join("vm1.sock");
    let key = "a1".repeat(32) + &"b2".repeat(32);
    let attach = format!(
        r#"{{"socket":"{}","key_hex":"{key}","queues":1,"qos":{{"iops":100000}}}}"#,
        sock.display()
    );
    assert_eq!(call(&d, "PUT", "/volumes/vm1/attachment", &attach).0, 201);
    assert_eq!(call(&d, "PUT", "/volumes/vm1/attachment", &attach).0, 409);
    assert_eq!(
        call(&d, "DELETE", "/volumes/vm1", "").0,
        409,
        "attached volumes cannot be deleted"
    );
    assert_eq!(
        call(&d, "PATCH", "/volumes/vm1", r#"{"size":33554432}"#).0,
        409
    );

    let mut c = Client::connect(&sock, 1, 8, 4096).unwrap();
    let spec = LoadSpec {
        depth: 8,
        read_pct: 50,
        verify: true,
        duration: Duration::from_millis(300),
        ..LoadSpec::default()
    };
    let r = c.run(&spec).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    // Live QoS change: 200 IOPS now holds the next run well below the first one's rate.
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/vm1/qos",
            r#"{"iops":200,"iops_burst":1}"#
        )
        .0,
        204
    );
    let slow = c
        .run(&LoadSpec {
            duration: Duration::from_millis(500),
            ..spec.clone()
        })
        .unwrap();
    assert!(
        slow.ops() <= 100 + 8 + 1,
        "{} ops at 200 IOPS in 0.5 s",
        slow.ops()
    );
    let (st, stats) = call(&d, "GET", "/volumes/vm1/stats", "");
    assert_eq!(st, 200);
    assert_eq!(
        stats["read_ops"].as_u64().unwrap() + stats["write_ops"].as_u64().unwrap(),
        r.ops() + slow.ops()
    );
    assert!(stats["throttled_ns"].as_u64().unwrap() > 0);
    // Encrypted: nothing goes straight to guest memory. Throttle wake-ups are measured.
    assert_eq!(stats["zero_copy"].as_u64(), Some(0));
    assert!(stats["wake_late_max_ns"].as_u64().is_some());
    assert!(stats["queue_depth"].as_u64().is_some());
    // A write-only limit leaves reads alone.
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/vm1/qos",
            r#"{"iops_write":50,"iops_burst":1}"#
        )
        .0,
        204
    );
    let reads = c
        .run(&LoadSpec {
            read_pct: 100,
            duration: Duration::from_millis(300),
            ..spec.clone()
        })
        .unwrap();
    let writes = c
        .run(&LoadSpec {
            read_pct: 0,
            duration: Duration::from_millis(300),
            ..spec.clone()
        })
        .unwrap();
    assert!(
        writes.ops() <= 15 + 8 + 1,
        "{} writes at 50 IOPS in 0.3 s",
        writes.ops()
    );
    assert!(
        reads.ops() > 2 * writes.ops(),
        "reads {} writes {}",
        reads.ops(),
        writes.ops()
    );
    assert_eq!(call(&d, "PUT", "/volumes/vm1/qos", r#"{"iops":0}"#).0, 400);
    assert_eq!(
        call(&d, "PUT", "/volumes/vm1/qos", r#"{"op_size":0}"#).0,
        400
    );
    drop(c);

    assert_eq!(call(&d, "DELETE", "/volumes/vm1/attachment", "").0, 204);
    assert!(!sock.exists());
    assert_eq!(call(&d, "DELETE", "/volumes/vm1/attachment", "").0, 404);
    assert_eq!(call(&d, "GET", "/volumes/vm1/stats", "").0, 404);
    assert_eq!(call(&d, "DELETE", "/volumes/vm1", "").0, 204);
    assert_eq!(call(&d, "GET", "/volumes/vm1", "").0, 404);
}

#[test]
fn hostile_requests_get_clear_errors() {
    let d = start();
    let api = d.dir.join("api.sock");
    assert_eq!(call(&d, "GET", "/nope", "").0, 404);
    assert_eq!(call(&d, "PUT", "/volumes", "").0, 405);
    let (st, v) = call(&d, "POST", "/volumes", "{not json");
    assert_eq!(st, 400);
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .starts_with("Bad request body"));
    assert_eq!(
        call(
            &d,
            "POST",
            "/volumes",
            r#"{"name":"a","size":1,"extra":true}"#
        )
        .0,
        400
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"a","size":-1}"#).0,
        400
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"a","size":4097}"#).0,
        400
    );
    call(&d, "POST", "/volumes", r#"{"name":"a","size":4096}"#);
    let bad_key = r#"{"socket":"/tmp/x.sock","key_hex":"zz"}"#;
    assert_eq!(call(&d, "PUT", "/volumes/a/attachment", bad_key).0, 400);
    let weak = format!(
        r#"{{"socket":"/tmp/x.sock","key_hex":"{}"}}"#,
        "00".repeat(64)
    );
    assert_eq!(call(&d, "PUT", "/volumes/a/attachment", &weak).0, 400);
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/a/attachment",
            r#"{"socket":"/tmp/x.sock","queues":0}"#
        )
        .0,
        400
    );
    assert_eq!(raw(&api, b"GARBAGE\r\n\r\n").0, 400);
    assert_eq!(
        raw(
            &api,
            b"POST /volumes HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        )
        .0,
        413
    );
    assert_eq!(
        raw(&api, b"POST /volumes HTTP/1.1\r\nContent-Length: x\r\n\r\n").0,
        400
    );
    // The daemon is still serving.
    assert_eq!(call(&d, "GET", "/volumes", "").0, 200);
}
