//! The test guest under outboard-vmm on an encrypted volume served by `outboard-card attach`:
//! the card is killed (SIGKILL) and restarted mid-I/O several times and the guest sees delay,
//! not errors (the card resubmits what the inflight region says was in flight); data written
//! in one boot verifies in the next.
//!
//! The card binary is found next to outboard-vmm's (both are built by `cargo test --workspace`)
//! or named by `OUTBOARD_CARD`; without it the tests print `SKIP:` and return.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{card_binary, exit_code, testguest, TIMEOUT};
use outboard_guest_harness::{kvm_available, marker, wait_for_path, Daemon, GuestVm};

/// A store with one encrypted 32 MiB volume, in a scratch directory removed on drop.
struct Store {
    dir: PathBuf,
    card: PathBuf,
}

impl Store {
    fn new(test: &str, card: PathBuf) -> Self {
        let dir = common::fresh_dir(test);
        let s = Self { dir, card };
        File::create(s.path("store"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(73) ^ 0x5c).collect();
        std::fs::write(s.path("key"), key).unwrap();
        s.run(&["format"]);
        s.run(&["create", "vm", "32M"]);
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.card)
            .arg("volume")
            .arg("--backing")
            .arg(self.path("store"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "outboard-card volume {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `outboard-card attach` on `vm.sock`; its log goes to `card-<n>.log`.
    fn attach(&self, queues: u16, n: usize, extra: &[&str]) -> Daemon {
        let sock = self.path("vm.sock");
        let _ = std::fs::remove_file(&sock);
        let log = File::create(self.path(&format!("card-{n}.log"))).unwrap();
        let daemon = Daemon::spawn(
            Command::new(&self.card)
                .arg("attach")
                .arg("--backing")
                .arg(self.path("store"))
                .args(["--volume", "vm", "--socket"])
                .arg(&sock)
                .arg("--key-file")
                .arg(self.path("key"))
                .args(["--queues", &queues.to_string()])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        assert!(
            wait_for_path(&sock, Duration::from_secs(10)),
            "the card made no socket"
        );
        daemon
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.path(&format!("card-{n}.log"))).unwrap_or_default()
    }

    fn disk_arg(&self, queues: u16) -> String {
        format!(
            "socket={},num_queues={queues}",
            self.path("vm.sock").display()
        )
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (up to `limit`) for `marker_name` and returns its fields.
fn result_within(vm: &GuestVm, marker_name: &str, limit: Duration) -> BTreeMap<String, String> {
    vm.expect_fields(marker_name, limit)
}

fn result(vm: &GuestVm, marker_name: &str) -> BTreeMap<String, String> {
    result_within(vm, marker_name, TIMEOUT)
}

/// Requests the card's log says it resubmitted after a restart.
fn resubmitted(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn card_killed_mid_io_costs_the_guest_no_data() {
    const TEST: &str = "card_killed_mid_io_costs_the_guest_no_data";
    if !kvm_available(TEST) {
        return;
    }
    let Some(card) = card_binary(TEST) else {
        return;
    };
    let store = Store::new(TEST, card);
    let queues = 2;
    // A throttled volume keeps requests queued in the card, so every kill finds some in flight.
    let throttle = ["--iops", "20"];
    let mut attached = store.attach(queues, 0, &throttle);
    let rounds = 8;
    let vm = testguest(Some("blk-loop"))
        .cmdline(&format!(
            "outboard.blk_queues={queues} outboard.blk_every=64 outboard.blk_sectors=512 \
             outboard.blk_rounds={rounds} outboard.blk_timeout_ms=500"
        ))
        .args(["--disk", &store.disk_arg(queues)])
        .spawn()
        .unwrap();
    vm.wait_for_line("OUTBOARD_BLK_PROGRESS round=0 ", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", vm.lines(), vm.stderr()));
    // Kills are timed rather than tied to progress lines (which reach the test with a lag that
    // varies): spaced so that they land at different points of the rounds, most of which the
    // throttle spends in I/O.
    let kills = 5;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(4100 + 300 * k as u64));
        attached.kill();
        std::thread::sleep(Duration::from_millis(1000));
        attached = store.attach(queues, k + 1, &throttle);
    }
    // The throttle makes a round take about 7 s here.
    let r = result_within(&vm, "OUTBOARD_BLK_RESULT", 4 * TIMEOUT);
    let lines = vm.lines();
    if std::env::var_os("OUTBOARD_TEST_VERBOSE").is_some() {
        eprintln!("{}", lines.join("\n"));
        for n in 0..=kills {
            eprintln!("card {n}:\n{}", store.log(n));
        }
    }
    assert_eq!(r["ok"], "1", "{r:?}\n{}\n{}", lines.join("\n"), vm.stderr());
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verified"], (rounds * 64).to_string());
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    let resubmits: u64 = (1..=kills).map(|n| resubmitted(&store.log(n))).sum();
    // Progress lines carry the time since the loop started; a round's length is the difference.
    let ends: Vec<u64> = lines
        .iter()
        .filter_map(|l| marker::fields(l, "OUTBOARD_BLK_PROGRESS").ok())
        .filter_map(|f| f.get("ns")?.parse::<u64>().ok())
        .collect();
    let mut rounds_ms: Vec<u64> = ends
        .iter()
        .scan(0, |prev, &t| {
            let d = t.saturating_sub(*prev);
            *prev = t;
            Some(d / 1_000_000)
        })
        .collect();
    rounds_ms.sort_unstable();
    assert!(
        resubmits > 0,
        "no kill found a request in flight: {}",
        (0..=kills)
            .map(|n| store.log(n))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{TEST}: {kills} card kills, {resubmits} requests resubmitted, rounds median {} ms, \
         slowest {} ms, {} guest waits",
        rounds_ms.get(rounds_ms.len() / 2).copied().unwrap_or(0),
        rounds_ms.last().copied().unwrap_or(0),
        lines
            .iter()
            .filter(|l| l.contains("no completion for"))
            .count()
    );
    drop(attached);
}

#[test]
fn data_written_in_one_boot_verifies_in_the_next() {
    const TEST: &str = "data_written_in_one_boot_verifies_in_the_next";
    if !kvm_available(TEST) {
        return;
    }
    let Some(card) = card_binary(TEST) else {
        return;
    };
    let store = Store::new(TEST, card);
    let boot = |n: usize, command: &str, seed: u64| {
        // A fresh card per boot: nothing survives in its memory either.
        let _card = store.attach(1, n, &[]);
        let vm = testguest(Some(command))
            .cmdline(&format!(
                "outboard.blk_sectors=256 outboard.blk_seed={seed}"
            ))
            .args(["--disk", &store.disk_arg(1)])
            .spawn()
            .unwrap();
        let r = result(&vm, "OUTBOARD_BLK_RESULT");
        let code = exit_code(&vm);
        (r, code)
    };
    let (w, code) = boot(0, "blk-write", 42);
    assert_eq!((w["ok"].as_str(), code), ("1", 0), "{w:?}");
    let (r, code) = boot(1, "blk-read-verify", 42);
    assert_eq!((r["ok"].as_str(), code), ("1", 0), "{r:?}");
    assert_eq!(r["verified"], "256");
    let (bad, _) = boot(2, "blk-read-verify", 43);
    assert_eq!(bad["ok"], "0", "another seed must not verify: {bad:?}");
}
