//! Backend events under outboard-vmm with the test guest: a card volume grown through the
//! card's API while the guest uses it (CONFIG_CHANGE_MSG → GET_CONFIG → config interrupt: the
//! guest reads the new capacity and writes and verifies blocks beyond the old end), also after
//! a card restart and a live update (each new session opens its own backend request channel),
//! and backends that stop answering: one that accepts the connection and never answers (the
//! boot fails with a clear error within the reply timeout instead of hanging) and a card frozen
//! (SIGSTOP) under I/O (a pause costs the VMM seconds, its API answers, and the guest carries on
//! without errors once the card is back).
//!
//! The card binary is found next to outboard-vmm's or named by `OUTBOARD_CARD`; without it (or
//! /dev/kvm) the tests print `SKIP:` and return.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{card_binary, exit_code, testguest, with_api, TIMEOUT};
use outboard_guest_harness::{kvm_available, wait_for_path, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// outboard_virtio_devices::vhost_user::REPLY_TIMEOUT.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// `outboard-card serve` on a fresh store in a scratch directory (removed on drop).
struct Card {
    dir: PathBuf,
    bin: PathBuf,
    daemon: Option<Daemon>,
}

impl Card {
    /// [`Card::serve`] where /dev/kvm and the card binary exist; None after a `SKIP:` line.
    fn for_test(test: &str, store_mib: u64) -> Option<Self> {
        if !kvm_available(test) {
            return None;
        }
        let bin = card_binary(test)?;
        Some(Self::serve(test, &bin, store_mib))
    }

    fn serve(test: &str, card: &Path, store_mib: u64) -> Self {
        let dir = common::fresh_dir(test);
        let store = dir.join("store");
        std::fs::File::create(&store)
            .unwrap()
            .set_len(store_mib * MIB)
            .unwrap();
        let out = Command::new(card)
            .arg("volume")
            .arg("--backing")
            .arg(&store)
            .arg("format")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut c = Card {
            dir,
            bin: card.to_owned(),
            daemon: None,
        };
        c.start();
        c
    }

    /// Starts (or, killed first, restarts) the daemon on the store.
    fn start(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        let api = self.dir.join("api.sock");
        let _ = std::fs::remove_file(&api);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("card.log"))
            .unwrap();
        let daemon = Daemon::spawn(
            Command::new(&self.bin)
                .arg("serve")
                .arg("--backing")
                .arg(self.dir.join("store"))
                .arg("--api")
                .arg(&api)
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        assert!(
            wait_for_path(&api, Duration::from_secs(10)),
            "the card's API never came up"
        );
        self.daemon = Some(daemon);
    }

    fn create(&self, name: &str, mib: u64) {
        let body = format!(r#"{{"name":"{name}","size":{}}}"#, mib * MIB);
        let (st, v) = self.call("POST", "/volumes", &body);
        assert_eq!(st, 201, "{v}");
    }

    /// Attaches `name` on `<dir>/<name>.sock`; returns the socket path.
    fn attach(&self, name: &str) -> PathBuf {
        let sock = self.dir.join(format!("{name}.sock"));
        let (st, v) = self.call(
            "PUT",
            &format!("/volumes/{name}/attachment"),
            &format!(r#"{{"socket":"{}","queues":1}}"#, sock.display()),
        );
        assert_eq!(st, 201, "{v}");
        sock
    }

    /// Grows `name` to `mib` MiB; asserts the front end acknowledged the config change.
    fn grow(&self, name: &str, mib: u64) {
        let g = self.grow_unacknowledged(name, mib);
        assert_eq!(
            g["front_end_notified"],
            true,
            "outboard-vmm did not acknowledge the config change: {g}\ncard:\n{}",
            self.log()
        );
    }

    /// Grows `name` to `mib` MiB; returns the card's answer, acknowledged or not.
    fn grow_unacknowledged(&self, name: &str, mib: u64) -> Value {
        let (st, g) = self.call(
            "PATCH",
            &format!("/volumes/{name}"),
            &format!(r#"{{"size":{}}}"#, mib * MIB),
        );
        assert_eq!(st, 200, "{g}\ncard:\n{}", self.log());
        g
    }

    /// One API request; returns the status and the JSON body (Null if empty).
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let mut s = UnixStream::connect(self.dir.join("api.sock")).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: card\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let text = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
        let v = serde_json::from_str(text).unwrap_or(Value::Null);
        (status, v)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("card.log")).unwrap_or_default()
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_volume_grown_live_reaches_the_guest() {
    const TEST: &str = "a_volume_grown_live_reaches_the_guest";
    let Some(card) = Card::for_test(TEST, 128) else {
        return;
    };
    card.create("g", 32);
    // A neighbour right behind it: the grown area is a second extent elsewhere on the store.
    card.create("n", 8);
    let sock = card.attach("g");

    let vm = testguest(Some("blk-grow"))
        .cmdline("outboard.virtio_irq=1 outboard.blk_sectors=64 outboard.blk_grow_ms=120000")
        .args(["--disk", &format!("socket={},num_queues=1", sock.display())])
        .spawn()
        .unwrap();
    let before = vm.expect_fields("OUTBOARD_BLK_CAPACITY", TIMEOUT);
    let old = 32 * MIB / 512;
    assert_eq!(before["sectors"], old.to_string());
    card.grow("g", 64);
    let (irqs, written, first) = grown_and_used(&vm, old, 64 * MIB / 512);
    eprintln!(
        "{TEST}: {old} -> {} sectors, {irqs} config interrupt(s), {written} blocks written \
         and verified from sector {first}",
        64 * MIB / 512
    );
}

/// The guest's `blk-grow` saw `old` become `new` and used the new area; returns the config
/// interrupts, the blocks written and verified, and the first sector written.
fn grown_and_used(vm: &outboard_guest_harness::GuestVm, old: u64, new: u64) -> (u64, u64, u64) {
    let grown = vm.expect_fields("OUTBOARD_BLK_GROWN", TIMEOUT);
    assert_eq!(grown["old"], old.to_string());
    assert_eq!(grown["new"], new.to_string());
    let irqs: u64 = grown["config_irqs"].parse().unwrap();
    assert!(irqs >= 1, "{grown:?}");
    let first: u64 = grown["first_sector"].parse().unwrap();
    assert!(first >= old && first < new, "{grown:?}");

    let r = vm.expect_fields("OUTBOARD_BLK_RESULT", TIMEOUT);
    assert_eq!(
        r["ok"],
        "1",
        "{r:?}\n{}\n{}",
        vm.lines().join("\n"),
        vm.stderr()
    );
    assert_eq!(r["errors"], "0");
    assert_eq!(r["capacity"], new.to_string());
    let written: u64 = r["written"].parse().unwrap();
    assert!(written > 0);
    assert_eq!(r["verified"], written.to_string());
    assert_eq!(exit_code(vm), 0, "stderr:\n{}", vm.stderr());
    (irqs, written, first)
}

#[test]
fn a_grow_after_a_card_restart_and_a_live_update_reaches_the_guest() {
    const TEST: &str = "a_grow_after_a_card_restart_and_a_live_update_reaches_the_guest";
    let Some(mut card) = Card::for_test(TEST, 128) else {
        return;
    };
    card.create("g", 16);
    let sock = card.attach("g");
    let (vm, api) = with_api(
        testguest(Some("blk-grow"))
            .cmdline("outboard.virtio_irq=1 outboard.blk_sectors=64 outboard.blk_grow_ms=300000")
            .args(["--disk", &format!("socket={},num_queues=1", sock.display())]),
        TEST,
    );
    let old = 16 * MIB / 512;
    let before = vm.expect_fields("OUTBOARD_BLK_CAPACITY", TIMEOUT);
    assert_eq!(before["sectors"], old.to_string());
    let counter = |name: &str| {
        let (code, body) = api.request("GET", "/metrics", None).unwrap();
        assert_eq!(code, 200, "{body}");
        let m: Value = serde_json::from_str(&body).unwrap();
        m["devices"]["virtio-blk0"][name].as_u64().unwrap_or(0)
    };

    // A new card process: the VMM reconnects and gives it a new backend request channel.
    card.start();
    card.attach("g");
    let t = Instant::now();
    while counter("reconnects") == 0 {
        assert!(t.elapsed() < TIMEOUT, "outboard-vmm never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A successor VMM: it opens its own channel once it speaks to the card.
    let (code, body) = api
        .request(
            "PUT",
            "/live-update",
            Some(&serde_json::json!({ "binary": env!("CARGO_BIN_EXE_outboard-vmm") }).to_string()),
        )
        .unwrap();
    assert!(code == 200 || code == 204, "{code} {body}\n{}", vm.stderr());

    // Until the successor first speaks to the card, the card still holds the predecessor's
    // channel, which died with it: that grow goes unacknowledged, and the successor reads the
    // configuration when it opens its own channel. Either way the guest must see it.
    let g = card.grow_unacknowledged("g", 48);
    if g["front_end_notified"] != true {
        let e = g["notify_error"].as_str().unwrap_or_default();
        assert!(
            e.contains("Broken pipe") || e.contains("closed"),
            "not the predecessor's dead channel: {g}\ncard:\n{}",
            card.log()
        );
    }
    let (irqs, written, first) = grown_and_used(&vm, old, 48 * MIB / 512);
    eprintln!(
        "{TEST}: after a card restart and a live update, {old} -> {} sectors (acknowledged: \
         {}), {irqs} config interrupt(s), {written} blocks written and verified from sector \
         {first}",
        48 * MIB / 512,
        g["front_end_notified"]
    );
}

#[test]
fn a_backend_that_never_answers_fails_the_boot_in_time() {
    const TEST: &str = "a_backend_that_never_answers_fails_the_boot_in_time";
    if !kvm_available(TEST) {
        return;
    }
    let sock = common::temp_path(TEST, ".sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    // Accepts and holds every connection, never reading or answering.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept() {
            held.push(s);
        }
    });
    let start = Instant::now();
    let vm = testguest(None)
        .args(["--disk", &format!("socket={},num_queues=1", sock.display())])
        .spawn()
        .unwrap();
    let status = vm
        .wait_exit(REPLY_TIMEOUT + TIMEOUT)
        .unwrap_or_else(|e| panic!("outboard-vmm hangs on a silent backend: {e}"));
    let took = start.elapsed();
    let stderr = vm.stderr();
    assert!(!status.success(), "booted on a silent backend:\n{stderr}");
    assert!(
        stderr.contains("gave no answer to GET_FEATURES within"),
        "unclear error:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    eprintln!("{TEST}: refused after {took:?}");
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_frozen_card_costs_a_pause_seconds_not_a_hang() {
    const TEST: &str = "a_frozen_card_costs_a_pause_seconds_not_a_hang";
    let Some(card) = Card::for_test(TEST, 64) else {
        return;
    };
    card.create("g", 16);
    let sock = card.attach("g");
    let rounds = 6;
    let (vm, api) = with_api(
        testguest(Some("blk-loop"))
            .cmdline(&format!(
                "outboard.blk_every=32 outboard.blk_sectors=256 outboard.blk_rounds={rounds} \
                 outboard.blk_timeout_ms=500"
            ))
            .args(["--disk", &format!("socket={},num_queues=1", sock.display())]),
        TEST,
    );
    vm.wait_for_line("OUTBOARD_BLK_PROGRESS round=0 ", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", vm.lines(), vm.stderr()));
    let pid = card.daemon.as_ref().unwrap().pid().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let t = Instant::now();
    let (code, body) = api
        .request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
        .unwrap();
    let paused_in = t.elapsed();
    assert_eq!(code, 204, "{body}\n{}", vm.stderr());
    assert!(
        paused_in < REPLY_TIMEOUT + Duration::from_secs(3),
        "{paused_in:?}"
    );
    let (code, body) = api.request("GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let m: Value = serde_json::from_str(&body).unwrap();
    let blk = &m["devices"]["virtio-blk0"];
    signal("-CONT");
    let (code, body) = api
        .request("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))
        .unwrap();
    assert_eq!(code, 204, "{body}");
    let r = vm.expect_fields("OUTBOARD_BLK_RESULT", 4 * TIMEOUT);
    assert_eq!(
        r["ok"],
        "1",
        "{r:?}\n{}\n{}",
        vm.lines().join("\n"),
        vm.stderr()
    );
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verified"], (rounds * 32).to_string());
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    eprintln!(
        "{TEST}: paused in {paused_in:?} with the card frozen (device timeouts {}, \
         disconnects {})",
        blk["timeouts"], blk["disconnects"]
    );
}
