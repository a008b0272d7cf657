//! `cargo xtask bench boot [--runs N]`: boots the test guest N times under outboard-vmm and, in the
//! same run, under `qemu-system-x86_64 -accel kvm` (q35 and microvm, whichever is faster), and
//! reports medians and spreads of:
//!
//! - `entry`: process start to the guest kernel's first instruction. The test guest's entry code
//!   writes `OUTBOARD_ENTRY` to the debug console port 0x402 before anything else; both VMMs
//!   forward that port to their stderr, where this bench timestamps it. This is the VMM's set-up
//!   cost (plus, for QEMU, its firmware).
//! - `marker`: process start to the `OUTBOARD_GUEST_READY` line on the serial console. Guest
//!   execution is emulated on PVM hosts, so this mostly measures the host, not the VMM.
//! - `overhead`: the VMM's resident memory beyond guest memory (VmRSS minus RssShmem, guest memory
//!   being a shared memfd in both VMMs), sampled when the marker arrives.
//! - `setup_cpu`: CPU time of all the VMM's threads when the entry mark arrives (from
//!   `/proc/<pid>/task/*/schedstat`, in ns): what setting the VM up cost, before the guest runs.
//! - `cpu_total`: CPU time of the whole run to power-off (rusage), guest execution included.

use crate::util;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ENTRY_MARK: &[u8] = b"OUTBOARD_ENTRY";
const READY_MARK: &[u8] = b"OUTBOARD_GUEST_READY";
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const GUEST_MIB: u64 = 128;

#[derive(Debug, Clone, Copy)]
struct Sample {
    entry_ms: f64,
    marker_ms: f64,
    overhead_kib: u64,
    setup_cpu_ms: f64,
    cpu_total_ms: f64,
}

pub fn run(args: &[&str]) -> Result<()> {
    let runs = match args.iter().position(|a| *a == "--runs") {
        Some(i) => args
            .get(i + 1)
            .context("--runs needs a number")?
            .parse::<usize>()
            .context("--runs needs a number")?,
        None => 10,
    };
    crate::setup::run()?;
    crate::guest_test::build()?;
    util::cargo(&["build", "--release", "-p", "outboard-vmm"])?;
    let root = util::workspace_root();
    let vmm = util::cargo_target_dir().join("release/outboard-vmm");
    let guest = root.join("target/guest/testguest");

    let outboard = |_: usize| -> Command {
        let mut c = Command::new(&vmm);
        c.env("OUTBOARD_VMM_TRACE_BOOT", "1")
            .arg("--kernel")
            .arg(&guest)
            .args(["--cmdline", "outboard.run=poweroff", "--cpus", "1"])
            .args(["--memory", &format!("{GUEST_MIB}M"), "--serial", "stdout"]);
        c
    };
    // Warm the page cache and catch a broken build before timing anything.
    measure("outboard-vmm", &mut outboard(0)).context("outboard-vmm warm-up run failed")?;
    let ours = repeat("outboard-vmm", runs, outboard)?;

    let mut peer: Option<(&str, Vec<Sample>)> = None;
    for machine in ["microvm", "q35"] {
        let qemu = |_: usize| qemu_command(machine, &guest);
        match measure(&format!("qemu {machine}"), &mut qemu(0)) {
            Ok(_) => {
                let samples = repeat(&format!("qemu-kvm-{machine}"), runs, qemu)?;
                let better = match &peer {
                    None => true,
                    Some((_, best)) => {
                        median_of(&samples, |s| s.entry_ms)
                            < median_of(best, |s: &Sample| s.entry_ms)
                    }
                };
                if better {
                    peer = Some((machine, samples));
                }
            }
            Err(e) => println!(
                "bench boot: qemu -accel kvm -M {machine} does not boot the test guest here: {e:#}"
            ),
        }
    }

    print_table("outboard-vmm", &ours);
    let mut result = format!(
        "RESULT boot runs={runs} guest_mib={GUEST_MIB} outboard_entry_ms={:.2} outboard_marker_ms={:.1} outboard_overhead_mib={:.2} outboard_setup_cpu_ms={:.2} outboard_cpu_total_ms={:.1}",
        median_of(&ours, |s| s.entry_ms),
        median_of(&ours, |s| s.marker_ms),
        median_of(&ours, |s| s.overhead_kib as f64) / 1024.0,
        median_of(&ours, |s| s.setup_cpu_ms),
        median_of(&ours, |s| s.cpu_total_ms),
    );
    match &peer {
        Some((machine, theirs)) => {
            print_table(&format!("qemu -accel kvm -M {machine}"), theirs);
            let ratio =
                |f: fn(&Sample) -> f64| median_of(theirs, f) / median_of(&ours, f).max(1e-9);
            result.push_str(&format!(
                " qemu_machine={machine} qemu_entry_ms={:.2} qemu_marker_ms={:.1} qemu_overhead_mib={:.2} qemu_setup_cpu_ms={:.2} qemu_cpu_total_ms={:.1} entry_speedup={:.1} marker_speedup={:.2} overhead_ratio={:.1} setup_cpu_ratio={:.1}",
                median_of(theirs, |s| s.entry_ms),
                median_of(theirs, |s| s.marker_ms),
                median_of(theirs, |s| s.overhead_kib as f64) / 1024.0,
                median_of(theirs, |s| s.setup_cpu_ms),
                median_of(theirs, |s| s.cpu_total_ms),
                ratio(|s| s.entry_ms),
                ratio(|s| s.marker_ms),
                ratio(|s| s.overhead_kib as f64),
                ratio(|s| s.setup_cpu_ms),
            ));
        }
        None => result.push_str(" qemu=unavailable"),
    }
    println!("{result}");
    Ok(())
}

fn qemu_command(machine: &str, guest: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let machine_opts = match machine {
        "microvm" => "microvm,acpi=on,pit=on,pic=on,rtc=on,memory-backend=mem",
        _ => "q35,memory-backend=mem",
    };
    c.args(["-accel", "kvm", "-cpu", "qemu64", "-smp", "1", "-m"])
        .arg(format!("{GUEST_MIB}M"))
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"
        ))
        .args([
            "-M",
            machine_opts,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot"])
        .args(["-chardev", "file,id=dbg,path=/dev/stderr"])
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", "outboard.run=poweroff"]);
    c
}

fn repeat(name: &str, runs: usize, mut make: impl FnMut(usize) -> Command) -> Result<Vec<Sample>> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let s = measure(name, &mut make(i)).with_context(|| format!("{name} run {i} failed"))?;
        println!(
            "bench boot: {name:<16} run {i:>2}: entry {:>8.2} ms  marker {:>9.1} ms  overhead {:>7} KiB  setup cpu {:>6.2} ms, total cpu {:>8.1} ms",
            s.entry_ms, s.marker_ms, s.overhead_kib, s.setup_cpu_ms, s.cpu_total_ms
        );
        out.push(s);
    }
    Ok(out)
}

/// Streams a pipe to the channel as (arrival time, bytes so far).
fn watch(mut pipe: impl Read + Send + 'static, tag: u8, tx: mpsc::Sender<(u8, Instant, Vec<u8>)>) {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if tx.send((tag, Instant::now(), all.clone())).is_err() {
                break;
            }
        }
    });
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn measure(name: &str, cmd: &mut Command) -> Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("Cannot start {name}"))?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    watch(child.stdout.take().context("no stdout")?, 1, tx.clone());
    watch(child.stderr.take().context("no stderr")?, 2, tx);
    let (mut entry, mut marker, mut overhead_kib, mut setup_cpu_ns) = (None, None, None, None);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let deadline = start + RUN_TIMEOUT;
    while marker.is_none() || entry.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((tag, at, bytes)) => {
                if tag == 1 {
                    out = bytes;
                } else {
                    err = bytes;
                }
                if entry.is_none() && contains(&err, ENTRY_MARK) {
                    entry = Some(at - start);
                    setup_cpu_ns = Some(cpu_ns_of_all_threads(pid)?);
                }
                if marker.is_none() && contains(&out, READY_MARK) {
                    marker = Some(at - start);
                    overhead_kib = Some(rss_beyond_shmem_kib(pid)?);
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{name}: no {} within {RUN_TIMEOUT:?}\nstdout: {}\nstderr: {}",
                    if entry.is_none() {
                        "OUTBOARD_ENTRY on port 0x402"
                    } else {
                        "ready marker"
                    },
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
        }
    }
    let (status, usage) = wait_with_rusage(pid)?;
    if !status_ok(status) {
        bail!(
            "{name} exited with status {status:#x}; stderr: {}",
            String::from_utf8_lossy(&err)
        );
    }
    let ms = |tv: libc::timeval| tv.tv_sec as f64 * 1e3 + tv.tv_usec as f64 / 1e3;
    Ok(Sample {
        entry_ms: entry.unwrap_or_default().as_secs_f64() * 1e3,
        marker_ms: marker.unwrap_or_default().as_secs_f64() * 1e3,
        overhead_kib: overhead_kib.unwrap_or_default(),
        setup_cpu_ms: setup_cpu_ns.unwrap_or_default() as f64 / 1e6,
        cpu_total_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
    })
}

fn status_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Waits for `pid` (killing it after [`RUN_TIMEOUT`]) and returns its status and resource usage.
fn wait_with_rusage(pid: i32) -> Result<(i32, libc::rusage)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // The child stays a zombie until wait4 reaps it, so its pid cannot be reused while the
    // watchdog may still fire; after reaping, `reaped` stops the watchdog.
    let reaped = Arc::new(AtomicBool::new(false));
    let watchdog_reaped = Arc::clone(&reaped);
    std::thread::spawn(move || {
        let until = Instant::now() + RUN_TIMEOUT;
        while Instant::now() < until {
            if watchdog_reaped.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !watchdog_reaped.load(Ordering::Acquire) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut status = 0;
    // SAFETY: rusage is plain old data, valid when zeroed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: status and usage are valid, writable, and live across the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    reaped.store(true, Ordering::Release);
    if r != pid {
        bail!("wait4({pid}) failed: {}", std::io::Error::last_os_error());
    }
    Ok((status, usage))
}

/// CPU time consumed so far by every thread of `pid`, in ns (schedstat is exact, unlike the
/// tick-sampled utime/stime split).
fn cpu_ns_of_all_threads(pid: i32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).context("Cannot list VMM threads")? {
        let path = task?.path().join("schedstat");
        // A thread may exit between the listing and the read; it no longer counts.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// VmRSS minus RssShmem: what the VMM holds beyond the shared guest memory.
fn rss_beyond_shmem_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status")))
        .context("Cannot read the VMM's /proc status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("VmRSS:").saturating_sub(field("RssShmem:")))
}

fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_table(name: &str, samples: &[Sample]) {
    let row = |label: &str, f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "bench boot: {name:<28} {label:<14} median {:>9.2}  min {:>9.2}  max {:>9.2}",
            median_of(samples, f),
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN)
        );
    };
    row("entry ms", &|s| s.entry_ms);
    row("marker ms", &|s| s.marker_ms);
    row("overhead KiB", &|s| s.overhead_kib as f64);
    row("setup cpu ms", &|s| s.setup_cpu_ms);
    row("cpu total ms", &|s| s.cpu_total_ms);
}
