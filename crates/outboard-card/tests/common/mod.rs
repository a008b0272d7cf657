//! Shared by the card API tests (`api.rs`, `net_api.rs`, `stores.rs`): `outboard-card serve` on
//! fresh, formatted backing files, and a one-request HTTP client for its socket.

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
    let dir = fresh_dir(tag);
    let store = dir.join("store");
    format(&store, store_mib);
    serve(dir, &[store])
}

/// A new empty directory for one test.
pub fn fresh_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outboard-card-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Creates a `mib` MiB file at `store` and writes an empty volume table to it.
pub fn format(store: &Path, mib: u64) {
    std::fs::File::create(store)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let out = Command::new(CARD)
        .args(["volume", "--backing", store.to_str().unwrap(), "format"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn serve_command(dir: &Path, stores: &[PathBuf]) -> Command {
    let mut cmd = Command::new(CARD);
    cmd.arg("serve");
    for s in stores {
        cmd.arg("--backing").arg(s);
    }
    cmd.arg("--api").arg(dir.join("api.sock"));
    cmd
}

/// Serves `stores` with the API socket in `dir` (removed with the daemon); returns once the
/// API answers.
pub fn serve(dir: PathBuf, stores: &[PathBuf]) -> Daemon {
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let child = serve_command(&dir, stores)
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

/// Runs `serve` expecting it to refuse to start; returns its stderr.
pub fn serve_fails(dir: &Path, stores: &[PathBuf]) -> String {
    let out = serve_command(dir, stores).output().unwrap();
    assert!(!out.status.success(), "serve started with {stores:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
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
