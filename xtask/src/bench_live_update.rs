//! `cargo xtask bench live-update [--updates N] [--snapshots N]`: live updates of the test
//! guest's heartbeat under the release outboard-vmm, for 128 MiB and 4 GiB guests with 1 and
//! 2 vCPUs, and, as the peer in the same run, the usual way to move a VM to a new VMM binary:
//! snapshot to files, then restore into a new process.
//!
//! Per configuration:
//!
//! - `pause`: vCPUs stopped in the old VMM to running in the successor, as the successor
//!   measures it (one CLOCK_MONOTONIC for both processes), median and p99 over N updates;
//! - `hb_excess`: the guest's own view: the longest heartbeat interval across each update
//!   minus the heartbeat period (kvmclock is advanced past the pause, so the stall shows);
//! - `total`: `PUT /live-update` request to response (successor start, preparation, pause,
//!   commit), client-measured;
//! - `snapshot`, `restore`: `PUT /snapshot/create` of the paused VM (client-measured) and the
//!   new process's restore (as it reports it);
//! - `peer_pause`: `PATCH /vm Paused` sent to the first heartbeat of the restored process (the
//!   guest's downtime when it moves by snapshot and restore).
//!
//! A fifth row (`128m_1c_blk`) moves a VM with a vhost-user disk served by qemu-storage-daemon
//! while the guest's `live-mix` writes and verifies blocks: the pause then includes stopping
//! the rings (GET_VRING_BASE after in-flight requests complete) and restarting them in the
//! successor. It has no snapshot figures: qemu-storage-daemon serves one client at a time, and
//! this bench restores while the snapshotted VMM still holds its connection.
//!
//! The host is PVM on 2 shared cores: guest execution is emulated, VMM-side costs are real.

use crate::util;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INTERVAL_MS: u64 = 5;
const TIMEOUT: Duration = Duration::from_secs(60);

/// One configuration's figures, in ms.
#[derive(Debug, Default)]
struct Figures {
    pause: Vec<f64>,
    hb_excess: Vec<f64>,
    total: Vec<f64>,
    snapshot: Vec<f64>,
    restore: Vec<f64>,
    peer_pause: Vec<f64>,
    /// The successor's preparation (KVM VM, vCPUs, devices) while the guest runs.
    prepare: Vec<f64>,
    /// Per update: (pause, old VMM state saved, old VMM committed, successor restore,
    /// successor resume), from the status lines, to explain the tail.
    breakdown: Vec<(f64, f64, f64, f64, f64)>,
}

/// Lines of a child's stdout or stderr, as they arrive, with their arrival time.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(Instant, String)>>>);

impl Lines {
    fn collect(self, source: impl Read + Send + 'static) -> Self {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines().map_while(Result::ok) {
                lines.0.lock().unwrap().push((Instant::now(), line));
            }
        });
        self
    }

    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Waits for a line containing `needle` at index `from` or later; returns its index.
    fn wait(&self, needle: &str, from: usize) -> Result<usize> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.snapshot()[from.min(self.len())..]
                .iter()
                .position(|(_, l)| l.contains(needle))
            {
                return Ok(from + i);
            }
            if Instant::now() > deadline {
                bail!("No {needle:?} line within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The guest's heartbeats `(seq, ns)` among `lines`.
fn heartbeats(lines: &[(Instant, String)]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|(_, l)| l.starts_with("OUTBOARD_HEARTBEAT"))
        .filter_map(|(_, l)| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|n| n.parse().ok())
            };
            Some((field("seq=")?, field("ns=")?))
        })
        .collect()
}

/// One HTTP/1.1 request on the API socket; the status code and body.
fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)
        .with_context(|| format!("Cannot connect to {}", sock.display()))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("Bad HTTP response {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

fn expect(sock: &Path, method: &str, path: &str, body: Option<&str>, want: u16) -> Result<()> {
    let (code, text) = request(sock, method, path, body)?;
    if code != want {
        bail!("{method} {path}: HTTP {code}: {text}");
    }
    Ok(())
}

/// The number after `marker` in `line` (e.g. "guest paused for " → ms).
fn number_after(line: &str, marker: &str) -> Option<f64> {
    line.split(marker)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Vm {
    child: Child,
    sock: PathBuf,
    out: Lines,
    err: Lines,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The process serving the API may be a successor of `child`.
        let _ = request(
            &self.sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStop"}"#),
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut cmd: Command, sock: PathBuf) -> Result<Vm> {
    let _ = std::fs::remove_file(&sock);
    let mut child = cmd
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot start outboard-vmm")?;
    let out = Lines::default().collect(child.stdout.take().context("stdout")?);
    let err = Lines::default().collect(child.stderr.take().context("stderr")?);
    Ok(Vm {
        child,
        sock,
        out,
        err,
    })
}

fn boot(
    vmm: &Path,
    guest: &Path,
    mib: u64,
    cpus: u32,
    disk: Option<&Path>,
    sock: PathBuf,
) -> Result<Vm> {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(guest).args([
        "--cpus",
        &cpus.to_string(),
        "--memory",
        &format!("{mib}M"),
    ]);
    match disk {
        None => cmd.args([
            "--cmdline",
            &format!("outboard.run=heartbeat outboard.interval_ms={INTERVAL_MS}"),
        ]),
        Some(socket) => cmd
            .args([
                "--cmdline",
                &format!(
                    "outboard.run=live-mix outboard.mix_net=0 outboard.interval_ms={INTERVAL_MS} \
                     outboard.blk_every=8 outboard.blk_sectors=256"
                ),
            ])
            .args([
                "--disk",
                &format!("socket={},num_queues=1", socket.display()),
            ]),
    };
    let vm = spawn(cmd, sock)?;
    vm.out.wait("OUTBOARD_HEARTBEAT seq=20 ", 0)?;
    Ok(vm)
}

/// qemu-storage-daemon serving a scratch image as vhost-user-blk on `socket`.
fn serve_disk(dir: &Path, socket: &Path) -> Result<Child> {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)?.set_len(32 << 20)?;
    let _ = std::fs::remove_file(socket);
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,\
             num-queues=1",
            socket.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start qemu-storage-daemon")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon made no socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// N live updates of one running VM.
fn updates(vm: &Vm, vmm: &Path, n: usize, f: &mut Figures) -> Result<()> {
    let body = format!("{{\"binary\":\"{}\"}}", vmm.display());
    for i in 0..n {
        let beats_before = heartbeats(&vm.out.snapshot()).len();
        let err_from = vm.err.len();
        let started = Instant::now();
        expect(&vm.sock, "PUT", "/live-update", Some(&body), 204)
            .with_context(|| format!("update {i}"))?;
        f.total.push(ms(started.elapsed()));
        let at = vm.err.wait("guest paused for ", err_from)?;
        let line = vm.err.snapshot()[at].1.clone();
        let pause = number_after(&line, "guest paused for ").context("pause figure")?;
        f.pause.push(pause);
        let at = vm.err.wait("VM prepared in ", err_from)?;
        let prepared = vm.err.snapshot()[at].1.clone();
        f.prepare
            .push(number_after(&prepared, "VM prepared in ").unwrap_or(f64::NAN));
        let at = vm.err.wait("state saved ", err_from)?;
        let old = vm.err.snapshot()[at].1.clone();
        f.breakdown.push((
            pause,
            number_after(&old, "state saved ").unwrap_or(f64::NAN),
            number_after(&old, "and committed ").unwrap_or(f64::NAN),
            number_after(&line, "restore here ").unwrap_or(f64::NAN),
            number_after(&line, "resume here ").unwrap_or(f64::NAN),
        ));
        // Three more beats: the one delayed by the pause and two after it.
        let deadline = Instant::now() + TIMEOUT;
        let beats = loop {
            let beats = heartbeats(&vm.out.snapshot());
            if beats.len() >= beats_before + 3 {
                break beats;
            }
            if Instant::now() > deadline {
                bail!("The guest stopped beating after update {i}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let window = &beats[beats_before.saturating_sub(1)..];
        if window.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
            bail!("The heartbeat counter restarted or skipped at update {i}");
        }
        let gap = window
            .windows(2)
            .map(|w| w[1].1.saturating_sub(w[0].1))
            .max()
            .unwrap_or(0);
        f.hb_excess
            .push((gap as f64 / 1e6 - INTERVAL_MS as f64).max(0.0));
    }
    Ok(())
}

/// Snapshot to files and restore into a new process, N times; returns the last VM.
fn snapshots(mut vm: Vm, vmm: &Path, dir: &Path, n: usize, f: &mut Figures) -> Result<Vm> {
    for i in 0..n {
        let (state, memory) = (dir.join("vm.state"), dir.join("vm.mem"));
        let paused = Instant::now();
        expect(&vm.sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204)?;
        let snap = Instant::now();
        let body = format!(
            "{{\"state_path\":\"{}\",\"memory_path\":\"{}\"}}",
            state.display(),
            memory.display()
        );
        expect(&vm.sock, "PUT", "/snapshot/create", Some(&body), 204)
            .with_context(|| format!("snapshot {i}"))?;
        f.snapshot.push(ms(snap.elapsed()));
        let sock = vm.sock.with_extension(format!("restored-{i}"));
        drop(vm);
        let mut cmd = Command::new(vmm);
        cmd.args([
            "--restore",
            &format!(
                "state={},memory={},resume=on",
                state.display(),
                memory.display()
            ),
        ]);
        vm = spawn(cmd, sock)?;
        vm.out.wait("OUTBOARD_HEARTBEAT", 0)?;
        f.peer_pause.push(ms(paused.elapsed()));
        let at = vm.err.wait("outboard-vmm: restored", 0)?;
        let line = vm.err.snapshot()[at].1.clone();
        f.restore
            .push(number_after(&line, " in ").context("restore figure")?);
    }
    Ok(vm)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn run(args: &[&str]) -> Result<()> {
    let count = |flag: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| *a == flag) {
            Some(i) => args
                .get(i + 1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{flag} needs a number")),
            None => Ok(default),
        }
    };
    let n_updates = count("--updates", 20)?.max(1);
    let n_snapshots = count("--snapshots", 5)?.max(1);
    if !Path::new("/dev/kvm").exists() {
        println!("SKIP: bench live-update: /dev/kvm is missing");
        return Ok(());
    }
    crate::guest_test::build()?;
    util::cargo(&["build", "--release", "-p", "outboard-vmm"])?;
    let vmm = util::cargo_target_dir().join("release/outboard-vmm");
    let guest = util::workspace_root().join("target/guest/testguest");
    let dir = std::env::temp_dir().join(format!("obvmm-bench-lu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let configs = [
        (128u64, 1u32, false),
        (128, 2, false),
        (4096, 1, false),
        (4096, 2, false),
        (128, 1, true),
    ];
    let mut rows = Vec::new();
    for (mib, cpus, with_disk) in configs {
        let what = if with_disk { " + vhost-user disk" } else { "" };
        println!("bench live-update: {mib} MiB, {cpus} vCPU(s){what}: {n_updates} live updates");
        let mut f = Figures::default();
        let disk_sock = dir.join("blk.sock");
        let mut qsd = match with_disk {
            true => match serve_disk(&dir, &disk_sock) {
                Ok(child) => Some(child),
                Err(e) => {
                    println!("bench live-update: no disk row: {e:#}");
                    continue;
                }
            },
            false => None,
        };
        let disk = qsd.as_ref().map(|_| disk_sock.as_path());
        // A path per VM: a stopping VMM removes its socket path as it exits.
        let sock = dir.join(format!("api-{mib}-{cpus}-{with_disk}.sock"));
        let vm = boot(&vmm, &guest, mib, cpus, disk, sock)?;
        updates(&vm, &vmm, n_updates, &mut f)?;
        if !with_disk {
            println!(
                "bench live-update: {mib} MiB, {cpus} vCPU(s): {n_snapshots} snapshot + restore"
            );
            let vm = snapshots(vm, &vmm, &dir, n_snapshots, &mut f)?;
            drop(vm);
        } else {
            let lines = vm.out.snapshot();
            let failed = lines.iter().any(|(_, l)| {
                l.contains("OUTBOARD_MIX_RESULT") || l.contains("OUTBOARD_GUEST_ERROR")
            });
            let verified = lines
                .iter()
                .rev()
                .find(|(_, l)| l.starts_with("OUTBOARD_BLK_PROGRESS"))
                .is_some_and(|(_, l)| l.contains(" errors=0 "));
            let errors = failed || !verified;
            drop(vm);
            if errors {
                bail!("The guest's disk check failed across the live updates");
            }
        }
        if let Some(mut qsd) = qsd.take() {
            let _ = qsd.kill();
            let _ = qsd.wait();
        }
        let _ = std::fs::remove_file(dir.join("vm.mem"));
        println!(
            "  pause ms: median {:.2} p99 {:.2} max {:.2} | heartbeat excess ms: median {:.2} p99 {:.2} | \
             total ms: median {:.1} p99 {:.1} (of which preparing the successor, guest running: \
             median {:.1} p99 {:.1})",
            percentile(&f.pause, 50.0),
            percentile(&f.pause, 99.0),
            percentile(&f.pause, 100.0),
            percentile(&f.hb_excess, 50.0),
            percentile(&f.hb_excess, 99.0),
            percentile(&f.total, 50.0),
            percentile(&f.total, 99.0),
            percentile(&f.prepare, 50.0),
            percentile(&f.prepare, 99.0),
        );
        if !with_disk {
            println!(
                "  snapshot ms: median {:.1} | restore ms: median {:.1} | peer pause (snapshot \
                 + restore in a new process) ms: median {:.1} p99 {:.1}",
                percentile(&f.snapshot, 50.0),
                percentile(&f.restore, 50.0),
                percentile(&f.peer_pause, 50.0),
                percentile(&f.peer_pause, 99.0),
            );
        }
        let mut worst = f.breakdown.clone();
        worst.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (pause, saved, committed, restore, resume) in worst.iter().take(3) {
            println!(
                "  slowest: pause {pause:.2} ms: old VMM paused and saved in {saved:.2} ms, \
                 successor restored in {restore:.2} ms, commit at {committed:.2} ms, successor \
                 resumed in {resume:.2} ms"
            );
        }
        rows.push((mib, cpus, with_disk, f));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut result = format!("RESULT live-update updates={n_updates} snapshots={n_snapshots}");
    for (mib, cpus, with_disk, f) in &rows {
        let tag = format!("{mib}m_{cpus}c{}", if *with_disk { "_blk" } else { "" });
        result.push_str(&format!(
            " pause_{tag}_ms={:.2} pause_{tag}_p99_ms={:.2} total_{tag}_ms={:.1} \
             total_{tag}_p99_ms={:.1}",
            percentile(&f.pause, 50.0),
            percentile(&f.pause, 99.0),
            percentile(&f.total, 50.0),
            percentile(&f.total, 99.0),
        ));
        // The disk row's heartbeats wait behind the guest's disk rounds, and it has no
        // snapshot: only the rows without devices have these.
        if !*with_disk {
            result.push_str(&format!(
                " hb_excess_{tag}_ms={:.2} snapshot_{tag}_ms={:.1} restore_{tag}_ms={:.1} \
                 peer_pause_{tag}_ms={:.1} peer_ratio_{tag}={:.1}",
                percentile(&f.hb_excess, 50.0),
                percentile(&f.snapshot, 50.0),
                percentile(&f.restore, 50.0),
                percentile(&f.peer_pause, 50.0),
                percentile(&f.peer_pause, 50.0) / percentile(&f.pause, 50.0).max(1e-9),
            ));
        }
    }
    let small = rows.iter().find(|r| r.0 == 128 && r.1 == 1 && !r.2);
    let big = rows.iter().find(|r| r.0 == 4096 && r.1 == 1);
    if let (Some(s), Some(b)) = (small, big) {
        result.push_str(&format!(
            " pause_4g_over_128m={:.2}",
            percentile(&b.3.pause, 50.0) / percentile(&s.3.pause, 50.0).max(1e-9)
        ));
    }
    println!("{result}");
    Ok(())
}
