//! Shared by the card API tests (`api.rs`, `net_api.rs`): `outboard-card serve` on a fresh,
//! formatted backing file, and a one-request HTTP client for its socket.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");

/// A running `outboard-card serve`; killed and its directory removed when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serves a freshly formatted `store_mib` MiB backing file; returns once the API answers.
pub fn start(tag: &str, store_mib: u64) -> Daemon {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outboard-card-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(store_mib << 20)
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

/// Sends `request` as is; returns the status and the body.
pub fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
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

/// `method path` with a JSON `body`; returns the status and the parsed JSON (Null if empty).
pub fn call(d: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
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
