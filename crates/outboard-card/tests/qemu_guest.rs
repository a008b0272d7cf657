//! End to end: a Linux guest under QEMU (TCG) runs fio with verification on a volume served by
//! `outboard-card attach`, then the backing store is inspected from outside.
//!
//! Needs qemu-system-x86_64 and the guest image (`cargo xtask guest` → target/guest); prints
//! `SKIP:` and returns where either is missing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_card_storage::table::VolumeStore;
use outboard_card_storage::xts::{Xts, XtsKey, SECTOR};

const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");

mod common;

use common::{blk_disk_args, qemu_prerequisites};

/// A child process killed if a test fails while it runs (taken out to wait for it normally).
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fresh directory for one test, removed when it ends.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("outboard-card-{tag}-"))
        .tempdir()
        .unwrap()
}

fn card(args: &[&str]) -> String {
    let out = Command::new(CARD).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "outboard-card {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "socket {} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(mut child: Child, limit: Duration) -> (bool, String) {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                s.read_to_string(&mut out).unwrap();
            }
            if let Some(mut s) = child.stderr.take() {
                s.read_to_string(&mut out).unwrap();
            }
            return (status.success(), out);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// QEMU (TCG) booting the Linux guest with `outboard.run={run} {extra}` on the vhost-user-blk
/// socket `sock`; with `reconnect`, QEMU reconnects to a card that went away (once a second).
/// A guest reboot ends QEMU.
fn qemu(sock: &Path, run: &str, extra: &str, reconnect: bool) -> Command {
    let mut cmd = qemu_machine(sock, run, extra, reconnect);
    cmd.arg("-no-reboot");
    cmd
}

/// [`qemu`] where a guest reboot resets the machine (and the vhost-user device) instead.
fn qemu_machine(sock: &Path, run: &str, extra: &str, reconnect: bool) -> Command {
    let g = outboard_guest_harness::guest_dir();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-M", "q35", "-m", "512", "-nographic"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .args(blk_disk_args("c0", sock, reconnect))
        .arg("-kernel")
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join("initramfs.img"))
        .args([
            "-append",
            &format!("console=ttyS0 outboard.run={run} {extra}"),
        ])
        .stdin(Stdio::null());
    cmd
}

fn run_guest(sock: &Path, run: &str, extra: &str) -> String {
    let child = qemu(sock, run, extra, false)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_, out) = wait_exit(child, Duration::from_secs(300));
    out
}

/// Counts 4 KiB blocks that start with fio's verify header magic (0xacca, little-endian).
fn fio_blocks(data: &[u8]) -> usize {
    data.chunks_exact(SECTOR)
        .filter(|b| b[0] == 0xca && b[1] == 0xac)
        .count()
}

/// A store with volumes vm1 and vm2 (64 MiB each) and a key file.
fn setup(dir: &tempfile::TempDir) -> (PathBuf, PathBuf, Vec<u8>) {
    let store = dir.path().join("store");
    let key_path = dir.path().join("key");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(101).wrapping_add(7))
        .collect();
    std::fs::write(&key_path, &key).unwrap();
    let s = store.to_str().unwrap();
    card(&["volume", "--backing", s, "format"]);
    card(&["volume", "--backing", s, "create", "vm1", "64M"]);
    card(&["volume", "--backing", s, "create", "vm2", "64M"]);
    (store, key_path, key)
}

/// Serves `volume` (encrypted, two queues, `extra` card flags) to one guest running fio-verify with
/// `fio` parameters; returns the fio result line.
fn fio_run(
    store: &Path,
    volume: &str,
    key_path: &Path,
    sock: &Path,
    extra: &[&str],
    fio: &str,
) -> String {
    fio_run_with(store, volume, Some(key_path), sock, extra, fio).0
}

/// [`fio_run`] with an optional key (None: a plain volume); returns the fio result line and the
/// card's log.
fn fio_run_with(
    store: &Path,
    volume: &str,
    key_path: Option<&Path>,
    sock: &Path,
    extra: &[&str],
    fio: &str,
) -> (String, String) {
    let mut cmd = Command::new(CARD);
    cmd.args([
        "attach",
        "--backing",
        store.to_str().unwrap(),
        "--volume",
        volume,
        "--socket",
    ])
    .arg(sock);
    if let Some(k) = key_path {
        cmd.arg("--key-file").arg(k);
    }
    let mut attach = Reap(Some(
        cmd.args(["--queues", "2", "--once"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_for(sock);
    let console = run_guest(sock, "fio-verify", fio);
    let (ok, card_log) = wait_exit(
        attach.0.take().expect("card process"),
        Duration::from_secs(30),
    );
    assert!(ok, "card failed: {card_log}");
    let result = console
        .lines()
        .find(|l| l.starts_with("OUTBOARD_FIO_RESULT"))
        .unwrap_or_else(|| {
            panic!("no fio result; console:\n{console}\ncard:\n{card_log}");
        });
    assert!(result.contains("status=ok"), "{result}\n{console}");
    assert!(result.contains("errors=0"), "{result}");
    (result.to_owned(), card_log)
}

/// A plain volume: the Linux guest's fio-verify passes with its reads and writes going straight
/// between the store and guest memory (zero copy), and the store holds fio's blocks as written.
#[test]
fn fio_verify_on_a_plain_volume_goes_zero_copy() {
    if !qemu_prerequisites("fio_verify_on_a_plain_volume_goes_zero_copy") {
        return;
    }
    let dir = temp_dir("plain");
    let (store, _, _) = setup(&dir);
    let fio = "outboard.fio.size=16M outboard.fio.iodepth=16";
    let (_, log) = fio_run_with(&store, "vm1", None, &dir.path().join("vm1.sock"), &[], fio);
    let zero_copy: u64 = log
        .split("zero_copy=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no zero_copy counter in the card log:\n{log}"));
    // fio's 4096 writes and reads, plus the kernel's partition scan and the like.
    assert!(
        zero_copy >= 8192,
        "only {zero_copy} zero-copy requests:\n{log}"
    );
    if let Some(line) = log.lines().find(|l| l.contains("zero_copy=")) {
        eprintln!("{line}");
    }
    let vs = VolumeStore::open(&store).unwrap();
    let e = vs.table().volume("vm1").unwrap().extents[0];
    let raw = std::fs::read(&store).unwrap();
    let found = fio_blocks(&raw[e.physical as usize..(e.physical + (16 << 20)) as usize]);
    assert!(found > 4000, "only {found} fio blocks in the store");
}

#[test]
fn fio_verify_on_an_encrypted_volume() {
    if !qemu_prerequisites("fio_verify_on_an_encrypted_volume") {
        return;
    }
    let dir = temp_dir("fio");
    let (store, key_path, key) = setup(&dir);
    let fio = "outboard.fio.size=16M outboard.fio.iodepth=16";
    fio_run(
        &store,
        "vm1",
        &key_path,
        &dir.path().join("vm1.sock"),
        &[],
        fio,
    );

    // From outside: the volume's extent holds ciphertext only; decrypting it with the key
    // (XTS, tweak = 4 KiB sector) yields fio's verify blocks; vm2 was never touched.
    let vs = VolumeStore::open(&store).unwrap();
    let raw = std::fs::read(&store).unwrap();
    let vm1 = vs.table().volume("vm1").unwrap();
    let e = vm1.extents[0];
    assert_eq!(vm1.extents.len(), 1);
    let region = &raw[e.physical as usize..(e.physical + e.length) as usize];
    assert_eq!(
        fio_blocks(region),
        0,
        "plaintext fio blocks found in the backing store"
    );
    let mut plain = region[..16 << 20].to_vec();
    Xts::new(&XtsKey::from_bytes(&key).unwrap())
        .unwrap()
        .decrypt(0, &mut plain)
        .unwrap();
    let found = fio_blocks(&plain);
    assert!(found > 4000, "only {found} fio blocks after decryption");
    let vm2 = vs.table().volume("vm2").unwrap().extents[0];
    assert!(
        raw[vm2.physical as usize..(vm2.physical + vm2.length) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn throttled_volume_still_verifies_and_is_paced() {
    if !qemu_prerequisites("throttled_volume_still_verifies_and_is_paced") {
        return;
    }
    let dir = temp_dir("throttle");
    let (store, key_path, _) = setup(&dir);
    // 4 MiB of 4 KiB writes then reads: 2048 I/Os at 200 IOPS take at least 10 s (the burst is
    // 20); excess I/O waits, it never fails.
    let t = Instant::now();
    fio_run(
        &store,
        "vm1",
        &key_path,
        &dir.path().join("vm1.sock"),
        &["--iops", "200"],
        "outboard.fio.size=4M outboard.fio.iodepth=16",
    );
    assert!(t.elapsed() >= Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Two VMs at once, each on its own volume with its own key: both verify, each volume's extent
/// decrypts to fio data only with its own key, and neither holds plaintext.
#[test]
fn two_vms_are_isolated() {
    if !qemu_prerequisites("two_vms_are_isolated") {
        return;
    }
    let dir = temp_dir("two");
    let (store, key1_path, key1) = setup(&dir);
    let key2: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(191))
        .collect();
    let key2_path = dir.path().join("key2");
    std::fs::write(&key2_path, &key2).unwrap();
    let fio = "outboard.fio.size=8M outboard.fio.iodepth=8";
    let (sock1, sock2) = (dir.path().join("vm1.sock"), dir.path().join("vm2.sock"));
    std::thread::scope(|s| {
        let a = s.spawn(|| fio_run(&store, "vm1", &key1_path, &sock1, &[], fio));
        let b = s.spawn(|| fio_run(&store, "vm2", &key2_path, &sock2, &[], fio));
        a.join().unwrap();
        b.join().unwrap();
    });
    let vs = VolumeStore::open(&store).unwrap();
    let raw = std::fs::read(&store).unwrap();
    let region = |name: &str| {
        let e = vs.table().volume(name).unwrap().extents[0];
        raw[e.physical as usize..(e.physical + (8 << 20)) as usize].to_vec()
    };
    let decrypt = |data: &[u8], key: &[u8]| {
        let mut d = data.to_vec();
        Xts::new(&XtsKey::from_bytes(key).unwrap())
            .unwrap()
            .decrypt(0, &mut d)
            .unwrap();
        fio_blocks(&d)
    };
    for (name, own, other) in [("vm1", &key1, &key2), ("vm2", &key2, &key1)] {
        let r = region(name);
        assert_eq!(fio_blocks(&r), 0, "{name}: plaintext in the store");
        assert!(decrypt(&r, own) > 1500, "{name}: own key does not decrypt");
        assert_eq!(
            decrypt(&r, other),
            0,
            "{name}: the other VM's key decrypts it"
        );
    }
}

/// One HTTP request to the card's control API; returns (status, body).
fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    common::raw(sock, req.as_bytes())
}

/// The daemon path: `outboard-card serve`, a volume created and attached (with a key and a
/// QoS limit) through the REST API, a Linux guest verifying with fio, stats, detach.
#[test]
fn guest_on_a_volume_attached_through_the_api() {
    if !qemu_prerequisites("guest_on_a_volume_attached_through_the_api") {
        return;
    }
    let dir = temp_dir("api");
    let store = dir.path().join("store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    card(&["volume", "--backing", store.to_str().unwrap(), "format"]);
    let api_sock = dir.path().join("api.sock");
    let daemon = Command::new(CARD)
        .args(["serve", "--backing", store.to_str().unwrap(), "--api"])
        .arg(&api_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Reap(Some(daemon));
    wait_for(&api_sock);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        api(
            &api_sock,
            "POST",
            "/volumes",
            r#"{"name":"vm1","size":67108864}"#
        )
        .0,
        201
    );
    let vm_sock = dir.path().join("vm1.sock");
    let key = "5a".repeat(32) + &"c3".repeat(32);
    let body = format!(
        r#"{{"socket":"{}","key_hex":"{key}","queues":2,"qos":{{"iops":5000}}}}"#,
        vm_sock.display()
    );
    let (st, text) = api(&api_sock, "PUT", "/volumes/vm1/attachment", &body);
    assert_eq!(st, 201, "{text}");
    let console = run_guest(
        &vm_sock,
        "fio-verify",
        "outboard.fio.size=8M outboard.fio.iodepth=16",
    );
    let result = console
        .lines()
        .find(|l| l.starts_with("OUTBOARD_FIO_RESULT"))
        .unwrap_or_else(|| panic!("no fio result:\n{console}"));
    assert!(
        result.contains("status=ok") && result.contains("errors=0"),
        "{result}"
    );
    let (st, stats) = api(&api_sock, "GET", "/volumes/vm1/stats", "");
    assert_eq!(st, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["write_ops"].as_u64().unwrap() >= 2048, "{stats}");
    assert!(stats["read_ops"].as_u64().unwrap() >= 2048, "{stats}");
    assert_eq!(
        api(&api_sock, "DELETE", "/volumes/vm1/attachment", "").0,
        204
    );
    assert!(!vm_sock.exists());
}

/// `outboard-card attach` of `volume` (encrypted, two queues, throttled so that fio's I/O
/// spends most of its time queued in the card) with its log in `log`.
fn attach_logged(store: &Path, key_path: &Path, sock: &Path, log: &Path) -> Reap {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(CARD)
        .args(["attach", "--backing", store.to_str().unwrap(), "--volume"])
        .arg("vm1")
        .arg("--socket")
        .arg(sock)
        .arg("--key-file")
        .arg(key_path)
        .args(["--queues", "2", "--iops", "300"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for(sock);
    Reap(Some(child))
}

/// The card is killed (SIGKILL) and restarted three times while the guest runs fio with
/// verification; QEMU reconnects (`reconnect=1`), the card resubmits what its inflight region
/// says was in flight, and fio finishes with zero errors.
#[test]
fn card_killed_mid_fio_loses_nothing() {
    if !qemu_prerequisites("card_killed_mid_fio_loses_nothing") {
        return;
    }
    let dir = temp_dir("restart");
    let (store, key_path, _) = setup(&dir);
    let sock = dir.path().join("vm1.sock");
    let log = |n: usize| dir.path().join(format!("card-{n}.log"));
    let mut card = attach_logged(&store, &key_path, &sock, &log(0));
    let console = dir.path().join("console");
    let guest = qemu(
        &sock,
        "fio-verify",
        "outboard.fio.size=12M outboard.fio.iodepth=16",
        true,
    )
    .stdout(std::fs::File::create(&console).unwrap())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut guest = Reap(Some(guest));
    let t = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("OUTBOARD_GUEST_READY")
    {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the guest never booted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // fio's 6144 I/Os take about 20 s at 300 IOPS: kill the card three times in that window.
    let kills = 3;
    for n in 1..=kills {
        std::thread::sleep(Duration::from_millis(3000 + 700 * n as u64));
        drop(card);
        std::thread::sleep(Duration::from_millis(1500));
        card = attach_logged(&store, &key_path, &sock, &log(n));
    }
    let (_, _) = wait_exit(guest.0.take().unwrap(), Duration::from_secs(600));
    drop(card);
    let out = std::fs::read_to_string(&console).unwrap();
    let result = out
        .lines()
        .find(|l| l.starts_with("OUTBOARD_FIO_RESULT"))
        .unwrap_or_else(|| panic!("no fio result; console:\n{out}"));
    assert!(
        result.contains("status=ok") && result.contains("errors=0"),
        "{result}\n{out}"
    );
    let logs: Vec<String> = (0..=kills)
        .map(|n| std::fs::read_to_string(log(n)).unwrap_or_default())
        .collect();
    let resubmitted: u64 = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        resubmitted > 0,
        "no kill found a request in flight:\n{}",
        logs.join("\n")
    );
    eprintln!(
        "card_killed_mid_fio_loses_nothing: {kills} kills, {resubmitted} requests resubmitted, \
         {result}, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// One QEMU run of the `reboot-persist` guest script against a fresh `attach --once` of the
/// encrypted volume vm1 (QEMU resets on a guest reboot, or exits with `no_reboot`); returns
/// the console and the card's log.
fn persist_boot(store: &Path, key_path: &Path, sock: &Path, no_reboot: bool) -> (String, String) {
    let mut attach = Reap(Some(
        Command::new(CARD)
            .args(["attach", "--backing", store.to_str().unwrap()])
            .args(["--volume", "vm1", "--socket"])
            .arg(sock)
            .arg("--key-file")
            .arg(key_path)
            .args(["--queues", "2", "--once"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_for(sock);
    let mut cmd = qemu_machine(sock, "reboot-persist", "outboard.persist.size=16M", false);
    if no_reboot {
        cmd.arg("-no-reboot");
    }
    let guest = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_, console) = wait_exit(guest, Duration::from_secs(600));
    let (ok, card_log) = wait_exit(
        attach.0.take().expect("card process"),
        Duration::from_secs(30),
    );
    assert!(ok, "card failed: {card_log}");
    (console, card_log)
}

fn console_line(console: &str, card_log: &str, tag: &str) -> String {
    console
        .lines()
        .find(|l| l.starts_with(tag))
        .unwrap_or_else(|| panic!("no {tag}; console:\n{console}\ncard:\n{card_log}"))
        .to_owned()
}

/// A Linux guest writes a fio pattern to its encrypted volume and reboots (QEMU resets the
/// machine and the vhost-user device; the card stays up); after the reboot it reads it all back
/// intact. Then a new QEMU and a new card process verify it again, and after one block of the
/// store is damaged the same check fails (so the check can fail).
#[test]
fn data_survives_a_guest_reboot() {
    if !qemu_prerequisites("data_survives_a_guest_reboot") {
        return;
    }
    let dir = temp_dir("reboot");
    let (store, key_path, _) = setup(&dir);
    let sock = dir.path().join("vm1.sock");
    let (console, card_log) = persist_boot(&store, &key_path, &sock, false);
    let written = console_line(&console, &card_log, "OUTBOARD_PERSIST_WRITTEN");
    assert!(written.contains("status=ok"), "{written}\n{console}");
    assert!(written.contains("write_kib=16384"), "{written}");
    // Two boots: the guest really rebooted in between.
    let boots = console
        .lines()
        .filter(|l| l.starts_with("OUTBOARD_GUEST_READY"))
        .count();
    assert_eq!(boots, 2, "{console}");
    let result = console_line(&console, &card_log, "OUTBOARD_PERSIST_RESULT");
    assert!(result.contains("status=ok"), "{result}\n{console}");
    assert!(result.contains("errors=0"), "{result}");
    assert!(result.contains("read_kib=16384"), "{result}");
    eprintln!("{written}\n{result}");

    // A cold start of both QEMU and the card sees the same data.
    let (console, card_log) = persist_boot(&store, &key_path, &sock, true);
    let again = console_line(&console, &card_log, "OUTBOARD_PERSIST_RESULT");
    assert!(again.contains("status=ok"), "{again}\n{console}");
    assert!(!console.contains("OUTBOARD_PERSIST_WRITTEN"), "{console}");

    // Damage one 4 KiB block of the pattern in the store: the verification must notice.
    let vm1 = VolumeStore::open(&store)
        .unwrap()
        .table()
        .volume("vm1")
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        &[0x5a; 4096],
        vm1.extents[0].physical + (1 << 20),
    )
    .unwrap();
    f.sync_all().unwrap();
    let (console, card_log) = persist_boot(&store, &key_path, &sock, true);
    let damaged = console_line(&console, &card_log, "OUTBOARD_PERSIST_RESULT");
    assert!(damaged.contains("status=fail"), "{damaged}\n{console}");
    eprintln!("after damage: {damaged}");
}
