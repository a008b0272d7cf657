//! Shared by the card's integration tests: `outboard-card serve` on fresh, formatted backing
//! files and a one-request HTTP client for its socket (the API tests); the check that a Linux
//! guest can run here, a vhost-user-blk disk for QEMU, and commands typed into the guest's
//! console shell (the QEMU tests).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_guest_harness::{GuestCommand, GuestVm, Runner};
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

/// Creates volume `name` of `mib` MiB through the API; returns the answer (with its extents).
pub fn create_volume(d: &Daemon, name: &str, mib: u64) -> Value {
    let body = format!(r#"{{"name":"{name}","size":{}}}"#, mib << 20);
    let (st, v) = call(d, "POST", "/volumes", &body);
    assert_eq!(st, 201, "{v}");
    v
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

/// Whether the Linux guest can run here: the image from `cargo xtask guest` and QEMU. Prints
/// `SKIP: <test>: <why>` where not.
pub fn qemu_prerequisites(test: &str) -> bool {
    let g = outboard_guest_harness::guest_dir();
    if !g.join("vmlinuz").exists() || !g.join("initramfs.img").exists() {
        eprintln!(
            "SKIP: {test}: no guest image in {} (run `cargo xtask guest`)",
            g.display()
        );
        return false;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: {test}: qemu-system-x86_64 not installed");
        return false;
    }
    true
}

/// QEMU arguments for a two-queue vhost-user-blk disk on `sock` (chardev `id`); with
/// `reconnect`, QEMU reconnects to a card that went away (once a second).
pub fn blk_disk_args(id: &str, sock: &Path, reconnect: bool) -> [String; 4] {
    let reconnect = if reconnect { ",reconnect=1" } else { "" };
    [
        "-chardev".into(),
        format!("socket,id={id},path={}{reconnect}", sock.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues=2"),
    ]
}

/// The Linux guest under QEMU (TCG) with a vhost-user-blk disk on each of `socks` (vda, vdb...
/// in that order), booted to its console shell.
pub fn linux_on_disks(socks: &[&Path]) -> GuestVm {
    let mut cmd = GuestCommand::linux(Runner::QemuTcg).shared_memory();
    for (i, sock) in socks.iter().enumerate() {
        cmd = cmd.args(blk_disk_args(&format!("c{i}"), sock, false));
    }
    let vm = cmd.spawn().unwrap();
    vm.wait_for_ready(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()));
    // Let the console shell start.
    std::thread::sleep(Duration::from_secs(2));
    vm
}

/// Runs `cmd` in the guest shell, then prints `OUTBOARD_<tag> <value of $out>`; returns the
/// value. The marker is typed split (`OUT""BOARD`) so the console's echo of the command line
/// never matches it.
pub fn shell(vm: &GuestVm, tag: &str, cmd: &str, timeout: Duration) -> String {
    vm.send(&format!("{cmd}; echo OUT\"\"BOARD_{tag} \"$out\"\n"))
        .unwrap();
    let marker = format!("OUTBOARD_{tag} ");
    let line = vm.wait_for_line(&marker, timeout).unwrap_or_else(|e| {
        panic!(
            "{e}\nserial:\n{}\nstderr:\n{}",
            vm.lines().join("\n"),
            vm.stderr()
        )
    });
    line.split_once(&marker).unwrap().1.trim().to_owned()
}
