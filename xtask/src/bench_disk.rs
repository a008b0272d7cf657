//! `cargo xtask bench disk [--ops N]`: the test guest's `blk-bench` (N 4 KiB writes, then N
//! reads, at queue depth 1 and 32 on one queue) against a qemu-storage-daemon vhost-user-blk
//! disk, run by outboard-vmm and, in the same run, by `qemu-system-x86_64 -accel kvm -M
//! microvm,pcie=on` with the same guest and backend. For context QEMU also runs the guest on its
//! own emulated virtio-blk (`-drive`), where QEMU does the I/O itself.
//!
//! Per VMM and depth, between the guest's device line (just before the first request) and its
//! last `OUTBOARD_BLK_BENCH` line, from `/proc/<pid>/task/*`:
//!
//! - `cpu_us_per_io`: CPU time of all the VMM's threads (schedstat) per I/O. On this host vCPU
//!   threads run guest code in PVM's emulator, so that is mostly guest time;
//! - `vmm_cpu_us_per_io`: the same for the threads that are not vCPUs (device, I/O, event
//!   loop threads): the VMM's own work on the data path, which should be near zero;
//! - `wakeups_per_io` and `vmm_wakeups_per_io`: voluntary plus involuntary context switches,
//!   all threads and non-vCPU threads;
//! - `iops`: what the guest measured (guest execution is emulated here, so it is not the
//!   VMM's figure).

use crate::util;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_MIB: u64 = 256;
const DISK_BYTES: u64 = 64 << 20;
const DEPTHS: [u32; 2] = [1, 32];
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const DEVICE_LINE: &str = "outboard-testguest: blk ";
const BENCH_LINE: &str = "OUTBOARD_BLK_BENCH ";
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Outboard,
    QemuVhostUser,
    QemuEmulated,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Outboard => "outboard-vmm",
            Vmm::QemuVhostUser => "qemu-vhost-user",
            Vmm::QemuEmulated => "qemu-emulated",
        }
    }

    fn is_vcpu_thread(self, comm: &str) -> bool {
        match self {
            Vmm::Outboard => comm.starts_with("vcpu"),
            _ => comm.starts_with("CPU ") && comm.ends_with("/KVM"),
        }
    }
}

/// Counters of one thread.
#[derive(Clone, Copy, Debug, Default)]
struct TaskStat {
    vcpu: bool,
    cpu_ns: u64,
    switches: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ios: u64,
    cpu_ns: u64,
    vmm_cpu_ns: u64,
    wakeups: u64,
    vmm_wakeups: u64,
    iops_write: u64,
    iops_read: u64,
}

impl Sample {
    fn per_io(&self, v: u64) -> f64 {
        v as f64 / self.ios.max(1) as f64
    }
}

pub fn run(args: &[&str]) -> Result<()> {
    let ops = match args.iter().position(|a| *a == "--ops") {
        Some(i) => args
            .get(i + 1)
            .context("--ops needs a number")?
            .parse::<u64>()
            .context("--ops needs a number")?,
        None => 1000,
    };
    crate::setup::run()?;
    crate::guest_test::build()?;
    util::cargo(&["build", "--release", "-p", "outboard-vmm"])?;
    let vmm_bin = util::cargo_target_dir().join("release/outboard-vmm");
    let guest = util::workspace_root().join("target/guest/testguest");
    let dir = std::env::temp_dir().join(format!("outboard-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let mut results: BTreeMap<(&'static str, u32), Sample> = BTreeMap::new();
        for vmm in [Vmm::Outboard, Vmm::QemuVhostUser, Vmm::QemuEmulated] {
            for depth in DEPTHS {
                let s = run_one(vmm, depth, ops, &vmm_bin, &guest, &dir)
                    .with_context(|| format!("{} at depth {depth}", vmm.name()))?;
                println!(
                    "bench disk: {:<16} qd{depth:<2}: {} I/Os  cpu/io {:>8.2} us (non-vCPU {:>7.3} us)  wakeups/io {:>6.3} (non-vCPU {:>6.3})  guest iops write {} read {}",
                    vmm.name(),
                    s.ios,
                    s.per_io(s.cpu_ns) / 1e3,
                    s.per_io(s.vmm_cpu_ns) / 1e3,
                    s.per_io(s.wakeups),
                    s.per_io(s.vmm_wakeups),
                    s.iops_write,
                    s.iops_read,
                );
                results.insert((vmm.name(), depth), s);
            }
        }
        Ok::<_, anyhow::Error>(results)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let results = result?;
    let mut line = format!("RESULT disk ops={ops} unit=4096 queues=1");
    for ((name, depth), s) in &results {
        let key = name.replace('-', "_");
        line.push_str(&format!(
            " {key}_qd{depth}_cpu_us_per_io={:.2} {key}_qd{depth}_vmm_cpu_us_per_io={:.3} {key}_qd{depth}_wakeups_per_io={:.3} {key}_qd{depth}_vmm_wakeups_per_io={:.3} {key}_qd{depth}_iops={}",
            s.per_io(s.cpu_ns) / 1e3,
            s.per_io(s.vmm_cpu_ns) / 1e3,
            s.per_io(s.wakeups),
            s.per_io(s.vmm_wakeups),
            (s.iops_write + s.iops_read) / 2,
        ));
    }
    for depth in DEPTHS {
        let ours = results[&(Vmm::Outboard.name(), depth)];
        let qemu = results[&(Vmm::QemuVhostUser.name(), depth)];
        let ratio = |a: u64, b: u64| a as f64 / (b as f64).max(1.0);
        line.push_str(&format!(
            " qd{depth}_vmm_cpu_ratio_vs_qemu_vhost_user={:.3} qd{depth}_cpu_ratio_vs_qemu_vhost_user={:.3}",
            ratio(ours.vmm_cpu_ns, qemu.vmm_cpu_ns),
            ratio(ours.cpu_ns, qemu.cpu_ns),
        ));
    }
    println!("{line}");
    Ok(())
}

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_disk(image: &Path, socket: &Path) -> Result<Reaped> {
    let _ = std::fs::remove_file(socket);
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("Cannot start qemu-storage-daemon")?;
    let daemon = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon made no socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn vmm_command(
    vmm: Vmm,
    vmm_bin: &Path,
    guest: &Path,
    cmdline: &str,
    image: &Path,
    socket: &Path,
) -> Command {
    if vmm == Vmm::Outboard {
        let mut c = Command::new(vmm_bin);
        c.arg("--kernel")
            .arg(guest)
            .args(["--cmdline", cmdline, "--cpus", "1"])
            .args(["--memory", &format!("{GUEST_MIB}M"), "--serial", "stdout"])
            .arg("--disk")
            .arg(format!("socket={},num_queues=1", socket.display()));
        return c;
    }
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-cpu", "qemu64", "-smp", "1", "-m"])
        .arg(format!("{GUEST_MIB}M"))
        .args(["-M", "microvm,pcie=on,memory-backend=mem"])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"
        ))
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // Thread names ("CPU 0/KVM", "iothread" …) tell vCPU threads from QEMU's own.
        .args(["-name", "bench,debug-threads=on"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(guest)
        .arg("-append")
        // microvm has ECAM at 0xe0000000 but no MCFG.
        .arg(format!("{cmdline} outboard.pci_ecam=0xe0000000"));
    if vmm == Vmm::QemuVhostUser {
        c.arg("-chardev")
            .arg(format!("socket,id=c0,path={}", socket.display()))
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on",
            ]);
    } else {
        c.arg("-drive")
            .arg(format!("file={},if=none,id=d0,format=raw", image.display()))
            .args([
                "-device",
                "virtio-blk-pci,drive=d0,num-queues=1,disable-legacy=on",
            ]);
    }
    c
}

fn run_one(
    vmm: Vmm,
    depth: u32,
    ops: u64,
    vmm_bin: &Path,
    guest: &Path,
    dir: &Path,
) -> Result<Sample> {
    let image = dir.join("disk.raw");
    let socket = dir.join("vub.sock");
    std::fs::File::create(&image)?.set_len(DISK_BYTES)?;
    let _daemon = match vmm {
        Vmm::QemuEmulated => None,
        _ => Some(serve_disk(&image, &socket)?),
    };
    let cmdline = format!(
        "console=ttyS0 outboard.run=blk-bench outboard.blk_ops={ops} outboard.blk_depth={depth} \
         outboard.blk_queues=1 outboard.blk_unit=4096 outboard.blk_bench=both"
    );
    let mut cmd = vmm_command(vmm, vmm_bin, guest, &cmdline, &image, &socket);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaped(
        cmd.spawn()
            .with_context(|| format!("Cannot start {}", vmm.name()))?,
    );
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().context("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = child.0.stderr.take().context("no stderr")?;
    let stderr_text = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut start: Option<BTreeMap<u32, TaskStat>> = None;
    // Last counters seen per thread, refreshed every SAMPLE_EVERY: the guest powers off right
    // after its last line, and an exited vCPU thread can no longer be read.
    let mut last: BTreeMap<u32, TaskStat> = BTreeMap::new();
    let mut sample = Sample::default();
    let mut passes = 0;
    let mut lines = Vec::new();
    while passes < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left.min(SAMPLE_EVERY)) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => None,
            Err(_) => {
                drop(child);
                bail!(
                    "no result within {RUN_TIMEOUT:?} (or the VMM exited)\nserial:\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    stderr_text.join().unwrap_or_default()
                );
            }
        };
        if start.is_some() {
            if let Ok(now) = task_stats(pid, vmm) {
                last.extend(now);
            }
        }
        let Some(line) = line else {
            continue;
        };
        if start.is_none() && line.contains(DEVICE_LINE) {
            start = Some(task_stats(pid, vmm)?);
        } else if let Some(at) = line.find(BENCH_LINE) {
            let fields = fields(&line[at + BENCH_LINE.len()..]);
            if fields.get("ok").map(String::as_str) != Some("1") {
                bail!("the guest's pass failed: {line}");
            }
            let n = |k: &str| -> Result<u64> {
                fields
                    .get(k)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no {k} in {line}"))
            };
            sample.ios += n("ops")?;
            match fields.get("op").map(String::as_str) {
                Some("write") => sample.iops_write = n("iops")?,
                _ => sample.iops_read = n("iops")?,
            }
            passes += 1;
        }
        lines.push(line);
    }
    let end = last;
    let start = start.context("the guest printed no device line")?;
    for (tid, e) in &end {
        let s = start.get(tid).copied().unwrap_or_default();
        let cpu = e.cpu_ns.saturating_sub(s.cpu_ns);
        let sw = e.switches.saturating_sub(s.switches);
        sample.cpu_ns += cpu;
        sample.wakeups += sw;
        if !e.vcpu {
            sample.vmm_cpu_ns += cpu;
            sample.vmm_wakeups += sw;
        }
    }
    let _ = child.0.wait();
    Ok(sample)
}

/// `key=value` pairs of a marker line.
fn fields(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Per-thread CPU time and context switches of `pid`.
fn task_stats(pid: u32, vmm: Vmm) -> Result<BTreeMap<u32, TaskStat>> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let mut out = BTreeMap::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("Cannot read {}", dir.display()))?
    {
        let path = entry?.path();
        let Some(tid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread may end between listing and reading: skip it.
        let (Ok(comm), Ok(schedstat), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue;
        };
        let cpu_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let switches = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(
            tid,
            TaskStat {
                vcpu: vmm.is_vcpu_thread(comm.trim()),
                cpu_ns,
                switches,
            },
        );
    }
    Ok(out)
}
