//! `outboard-card bench storage`: the card's vhost-user-blk backend side by side with
//! qemu-storage-daemon's export of the same data, through the same load generator, in one run.
//!
//! Rows: 4 KiB random read/write at QD1 and QD32, 128 KiB sequential read/write at QD32, for
//! plain (vs qsd raw on the same extent of the same file), encrypted (vs qsd LUKS
//! aes-xts-plain64) and throttled at 3000 IOPS (vs a qsd throttle group). Then throttle
//! accuracy (ten 1-second windows at QD32, once as is and once with both sides and the load
//! generator at SCHED_FIFO to take other processes on the shared host out of the stalls; and
//! two volumes with different limits at once), and XTS throughput per core. Backend CPU time
//! comes from /proc/<pid>/task/*/schedstat.
//!
//! The host is small and shared, so each row is `--repeats` rounds of one card run and one qsd
//! run back to back, alternating which goes first; the table shows each side's median run
//! (by IOPS), the ratio of the medians, and the range of the per-round ratios.
//! With `--ram`, both backends serve loop devices over files in /dev/shm instead of files on the
//! disk: a device faster than either backend, standing in for the NVMe drives the card is made
//! for, so the backends' own cost per I/O decides (on this host's virtual disk both are capped
//! by the disk). Results then carry `device=ram`.
//! The last line is `RESULT storage …`.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use outboard_card_storage::backing::Backing;
use outboard_card_storage::blk::device::VolumeDevice;
use outboard_card_storage::loadgen::{Client, LoadSpec, Report};
use outboard_card_storage::table::VolumeStore;
use outboard_card_storage::throttle::{Limit, Limits};
use outboard_card_storage::vhost::Server;
use outboard_card_storage::xts;

const VOLUME: u64 = 512 << 20;
const LIMIT: u64 = 3000;

struct Workload {
    name: &'static str,
    bs: u32,
    read_pct: u8,
    random: bool,
    depth: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4k-randread-qd1",
        bs: 4096,
        read_pct: 100,
        random: true,
        depth: 1,
    },
    Workload {
        name: "4k-randread-qd32",
        bs: 4096,
        read_pct: 100,
        random: true,
        depth: 32,
    },
    Workload {
        name: "4k-randwrite-qd1",
        bs: 4096,
        read_pct: 0,
        random: true,
        depth: 1,
    },
    Workload {
        name: "4k-randwrite-qd32",
        bs: 4096,
        read_pct: 0,
        random: true,
        depth: 32,
    },
    Workload {
        name: "128k-seqread-qd32",
        bs: 131072,
        read_pct: 100,
        random: false,
        depth: 32,
    },
    Workload {
        name: "128k-seqwrite-qd32",
        bs: 131072,
        read_pct: 0,
        random: false,
        depth: 32,
    },
];

/// A backend process that is killed when dropped.
struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn spawn(cmd: &mut Command, socket: &Path) -> Result<Backend> {
    let _ = std::fs::remove_file(socket);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start backend")?;
    let mut b = Backend {
        child,
        socket: socket.to_owned(),
    };
    let t = Instant::now();
    while !socket.exists() {
        if let Some(status) = b.child.try_wait()? {
            bail!("Backend exited early: {status}");
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("Backend socket {} never appeared", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(b)
}

/// CPU time of every thread of `pid`, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

struct Row {
    report: Report,
    cpu_ns: u64,
}

fn measure(b: &Backend, spec: &LoadSpec) -> Result<Row> {
    let mut client = Client::connect(&b.socket, 1, spec.depth, spec.block_size)
        .with_context(|| format!("Cannot connect to {}", b.socket.display()))?;
    let before = cpu_ns(b.child.id());
    let report = client.run(spec)?;
    let cpu = cpu_ns(b.child.id()).saturating_sub(before);
    if report.errors > 0 {
        bail!("{} I/O errors from {}", report.errors, b.socket.display());
    }
    Ok(Row {
        report,
        cpu_ns: cpu,
    })
}

fn spec(w: &Workload, secs: f64) -> LoadSpec {
    LoadSpec {
        queues: 1,
        depth: w.depth,
        block_size: w.bs,
        read_pct: w.read_pct,
        random: w.random,
        duration: Duration::from_secs_f64(secs),
        span: VOLUME,
        verify: false,
        seed: 7,
    }
}

fn fmt_row(r: &Row) -> String {
    let ops = r.report.ops().max(1);
    format!(
        "{:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>7.2}",
        r.report.iops(),
        r.report.mb_per_s(),
        r.report.percentile_us(50.0),
        r.report.percentile_us(99.0),
        r.cpu_ns as f64 / ops as f64 / 1e3
    )
}

/// Largest relative error of the whole-second windows `0..n` against `limit`, in percent.
fn window_error(per_second: &[u64], n: usize, limit: u64) -> f64 {
    per_second
        .iter()
        .take(n)
        .map(|&c| (c as f64 - limit as f64).abs() / limit as f64 * 100.0)
        .fold(0.0, f64::max)
}

fn zero_fill(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0u8; 8 << 20];
    let mut at = 0;
    while at < size {
        let n = chunk.len().min((size - at) as usize);
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

pub struct Options {
    pub dir: PathBuf,
    pub seconds: f64,
    pub repeats: usize,
    /// Serve loop devices over /dev/shm files instead of files on `dir`'s disk.
    pub ram: bool,
}

fn report_row(report: Report) -> Row {
    Row { report, cpu_ns: 0 }
}

/// Runs `f` with this thread at SCHED_FIFO priority 10 (threads and processes it starts
/// inherit it), then back at SCHED_OTHER; None where the policy cannot be set.
fn realtime<T>(f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    let fifo = libc::sched_param { sched_priority: 10 };
    // SAFETY: pid 0 is the calling thread and `fifo` is a valid sched_param for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } != 0 {
        return Ok(None);
    }
    let r = f();
    let other = libc::sched_param { sched_priority: 0 };
    // SAFETY: as above.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &other) };
    r.map(Some)
}

/// The run with the median IOPS (the upper one of an even count).
fn median(mut rows: Vec<Row>) -> Row {
    rows.sort_by(|a, b| a.report.iops().total_cmp(&b.report.iops()));
    let mid = rows.len() / 2;
    rows.swap_remove(mid)
}

pub fn storage(opts: &Options) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = opts
        .dir
        .join(format!("outboard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    let key = dir.join("key");
    let mut loops = Loops::default();
    let (store, luks) = if opts.ram {
        let shm = PathBuf::from(format!("/dev/shm/outboard-bench-{}", std::process::id()));
        std::fs::create_dir_all(&shm)?;
        loops.shm = Some(shm.clone());
        (shm.join("store"), shm.join("luks.img"))
    } else {
        (dir.join("store"), dir.join("luks.img"))
    };
    eprintln!(
        "bench: preparing {} (zero-filled, so reads hit the {})",
        store.display(),
        if opts.ram {
            "RAM-backed device"
        } else {
            "disk"
        }
    );
    zero_fill(&store, 2 * VOLUME)?;
    let store = if opts.ram {
        loops.attach(&store)?
    } else {
        store
    };
    let mut vs = VolumeStore::format(&store)?;
    let vol = vs.create("bench", VOLUME)?;
    vs.create("bench2", VOLUME / 2)?;
    drop(vs);
    let offset = vol.extents[0].physical;
    let mut k = [0u8; 64];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut k)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)?
        .write_all(&k)?;
    // qemu-img times PBKDF2 with getrusage, which sometimes reads zero on this kind of VM
    // ("Unable to get accurate CPU usage"): retry.
    let mut created = false;
    for _ in 0..5 {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object", "secret,id=sec0,data=outboard-bench", "-o"])
            .arg("key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=500,preallocation=full")
            .arg(&luks)
            .arg(VOLUME.to_string())
            .output()
            .context("Cannot run qemu-img (apt-get install qemu-utils)")?;
        if out.status.success() {
            created = true;
            break;
        }
    }
    if !created {
        bail!("qemu-img create failed");
    }
    let luks = if opts.ram { loops.attach(&luks)? } else { luks };

    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let card = |extra: &[&str], volume: &str, sock: &Path| -> Result<Backend> {
        let mut c = Command::new(&exe);
        c.args([
            "attach",
            "--backing",
            &s(&store),
            "--volume",
            volume,
            "--socket",
            &s(sock),
            "--queues",
            "1",
        ]);
        c.args(extra);
        spawn(&mut c, sock)
    };
    // QEMU opens block devices with its host_device driver, files with file.
    let driver = if opts.ram { "host_device" } else { "file" };
    let file_node = |path: &Path| {
        format!(
            "driver={driver},node-name=file0,filename={},cache.direct=on,aio=io_uring",
            s(path)
        )
    };
    let export = |node: &str, sock: &Path| {
        format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,logical-block-size=4096,num-queues=1",
            s(sock)
        )
    };
    let raw_node = format!("driver=raw,node-name=raw0,file=file0,offset={offset},size={VOLUME}");
    let qsd = |args: Vec<String>, sock: &Path| -> Result<Backend> {
        let mut c = Command::new("qemu-storage-daemon");
        c.args(args);
        spawn(&mut c, sock)
    };
    let card_sock = dir.join("card.sock");
    let qsd_sock = dir.join("qsd.sock");
    // The volume behind a qsd throttle group at the limit the card's throttled rows use.
    let qsd_throttled = || {
        qsd(
            vec![
                "--object".into(),
                format!("throttle-group,id=tg0,limits.iops-total={LIMIT}"),
                "--blockdev".into(),
                file_node(&store),
                "--blockdev".into(),
                raw_node.clone(),
                "--blockdev".into(),
                "driver=throttle,node-name=thr0,throttle-group=tg0,file=raw0".into(),
                "--export".into(),
                export("thr0", &qsd_sock),
            ],
            &qsd_sock,
        )
    };
    let key_s = s(&key);
    let limit_s = LIMIT.to_string();

    println!(
        "{:<10} {:<19} | {:>9} {:>8} {:>8} {:>8} {:>7} | {:>9} {:>8} {:>8} {:>8} {:>7} | ratio  rounds",
        "mode",
        "workload",
        "card_iops",
        "MB/s",
        "p50_us",
        "p99_us",
        "cpu_us",
        "qsd_iops",
        "MB/s",
        "p50_us",
        "p99_us",
        "cpu_us",
    );
    let mut headline = Vec::new();
    let mut ratios = Vec::new();
    for mode in ["plain", "encrypted", "throttled"] {
        let (card_b, qsd_b) = match mode {
            "plain" => (
                card(&[], "bench", &card_sock)?,
                qsd(
                    vec![
                        "--blockdev".into(),
                        file_node(&store),
                        "--blockdev".into(),
                        raw_node.clone(),
                        "--export".into(),
                        export("raw0", &qsd_sock),
                    ],
                    &qsd_sock,
                )?,
            ),
            "encrypted" => (
                card(&["--key-file", &key_s], "bench", &card_sock)?,
                qsd(
                    vec![
                        "--object".into(),
                        "secret,id=sec0,data=outboard-bench".into(),
                        "--blockdev".into(),
                        file_node(&luks),
                        "--blockdev".into(),
                        "driver=luks,node-name=luks0,file=file0,key-secret=sec0".into(),
                        "--export".into(),
                        export("luks0", &qsd_sock),
                    ],
                    &qsd_sock,
                )?,
            ),
            _ => (
                card(
                    &["--iops", &limit_s, "--iops-burst", "32"],
                    "bench",
                    &card_sock,
                )?,
                qsd_throttled()?,
            ),
        };
        for w in WORKLOADS
            .iter()
            .filter(|w| mode != "throttled" || w.name == "4k-randread-qd32")
        {
            let sp = spec(w, opts.seconds);
            // Interleave: the disk under the host caches and other work comes and goes, so
            // neither side may always run first or last.
            let mut cards = Vec::new();
            let mut qsds = Vec::new();
            for round in 0..opts.repeats.max(1) {
                if round % 2 == 0 {
                    cards.push(measure(&card_b, &sp)?);
                    qsds.push(measure(&qsd_b, &sp)?);
                } else {
                    qsds.push(measure(&qsd_b, &sp)?);
                    cards.push(measure(&card_b, &sp)?);
                }
            }
            let rounds: Vec<f64> = cards
                .iter()
                .zip(&qsds)
                .map(|(c, q)| c.report.iops() / q.report.iops().max(1e-9))
                .collect();
            let (lo, hi) = rounds
                .iter()
                .fold((f64::MAX, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
            let (c, q) = (median(cards), median(qsds));
            let ratio = c.report.iops() / q.report.iops().max(1e-9);
            println!(
                "{:<10} {:<19} | {} | {} | {:>6.2} {:>4.2}-{:<4.2}",
                mode,
                w.name,
                fmt_row(&c),
                fmt_row(&q),
                ratio,
                lo,
                hi
            );
            let tag = format!("{mode}_{}", w.name.replace('-', "_"));
            ratios.push(format!("{tag}_ratio={ratio:.2}"));
            if w.name == "4k-randread-qd32" || w.name == "4k-randwrite-qd32" {
                headline.push(format!(
                    "{tag}_iops={:.0} qsd_{tag}_iops={:.0}",
                    c.report.iops(),
                    q.report.iops()
                ));
            }
        }
    }

    // Throttle accuracy: ten whole 1-second windows at QD32, and the longest stall. The card
    // side runs in this process, so that its counters (worst throttle wake-up lateness) are
    // readable next to what the load generator saw.
    let accuracy = || -> Result<(Row, f64, Row)> {
        let store_t = VolumeStore::open(&store)?;
        let volume = store_t
            .table()
            .volume("bench")
            .context("No bench volume")?
            .clone();
        drop(store_t);
        let limits = Limits {
            iops_total: Some(Limit {
                rate: LIMIT,
                burst: 32,
            }),
            ..Limits::default()
        };
        let dev = Arc::new(VolumeDevice::new(
            volume,
            Arc::new(Backing::open(&store)?),
            None,
            limits,
        )?);
        let sp = LoadSpec {
            duration: Duration::from_secs(10),
            ..spec(&WORKLOADS[1], 10.0)
        };
        let server = Server::start(dev.clone(), &card_sock, 1)?;
        let mut client = Client::connect(&card_sock, 1, 32, 4096)?;
        let report = client.run(&sp)?;
        drop(client);
        server.stop()?;
        let late = dev.counters.snapshot().wake_late_max_ns as f64 / 1e6;
        let qsd_b = qsd_throttled()?;
        let q = measure(&qsd_b, &sp)?;
        Ok((report_row(report), late, q))
    };
    let achieved = |r: &Report| r.per_second.iter().take(10).sum::<u64>() as f64 / 10.0;
    let show = |label: &str, c: &Row, late_ms: f64, q: &Row| {
        println!(
            "throttle {LIMIT} IOPS QD32 10x1s ({label}): card windows {:?} achieved={:.0} max_err={:.2}% max_stall={:.1}ms worst_wake_late={late_ms:.2}ms | qsd windows {:?} achieved={:.0} max_err={:.2}% max_stall={:.1}ms",
            &c.report.per_second[..c.report.per_second.len().min(10)],
            achieved(&c.report),
            window_error(&c.report.per_second, 10, LIMIT),
            c.report.max_gap_ns as f64 / 1e6,
            &q.report.per_second[..q.report.per_second.len().min(10)],
            achieved(&q.report),
            window_error(&q.report.per_second, 10, LIMIT),
            q.report.max_gap_ns as f64 / 1e6
        );
    };
    let (c, late_ms, q) = accuracy()?;
    show("shared host", &c, late_ms, &q);
    let card_err = window_error(&c.report.per_second, 10, LIMIT);
    let qsd_err = window_error(&q.report.per_second, 10, LIMIT);
    // The same with every thread of both sides and the load generator at SCHED_FIFO: on this
    // shared 2-core host, the stalls above are mostly other processes holding the CPU.
    let rt = realtime(accuracy)?;
    let rt_stalls = match &rt {
        Some((c, late, q)) => {
            show("SCHED_FIFO", c, *late, q);
            format!(
                "throttle_rt_max_err_pct={:.2} throttle_rt_max_stall_ms={:.1} qsd_throttle_rt_max_stall_ms={:.1}",
                window_error(&c.report.per_second, 10, LIMIT),
                c.report.max_gap_ns as f64 / 1e6,
                q.report.max_gap_ns as f64 / 1e6
            )
        }
        None => {
            println!(
                "throttle (SCHED_FIFO): SKIP: cannot set SCHED_FIFO (needs root or CAP_SYS_NICE)"
            );
            String::new()
        }
    };

    // Two volumes with different limits, loaded at the same time.
    let a = card(
        &["--iops", &limit_s, "--iops-burst", "32"],
        "bench",
        &card_sock,
    )?;
    let b_sock = dir.join("card2.sock");
    let b = card(&["--iops", "1000", "--iops-burst", "32"], "bench2", &b_sock)?;
    let sp_a = LoadSpec {
        duration: Duration::from_secs(5),
        ..spec(&WORKLOADS[1], 5.0)
    };
    let sp_b = LoadSpec {
        span: VOLUME / 2,
        ..sp_a.clone()
    };
    let (ra, rb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| measure(&a, &sp_a));
        let hb = sc.spawn(|| measure(&b, &sp_b));
        (
            ha.join().expect("load thread"),
            hb.join().expect("load thread"),
        )
    });
    let (ra, rb) = (ra?, rb?);
    let two_err = window_error(&ra.report.per_second, 5, LIMIT).max(window_error(
        &rb.report.per_second,
        5,
        1000,
    ));
    println!(
        "two volumes at once (3000 and 1000 IOPS) 5x1s: {:?} {:?} max_err={two_err:.2}%",
        &ra.report.per_second[..ra.report.per_second.len().min(5)],
        &rb.report.per_second[..rb.report.per_second.len().min(5)]
    );

    let mut gbps = Vec::new();
    for _ in 0..3 {
        gbps.push(xts::bench(256 << 20)?.encrypt_gbps);
    }
    gbps.sort_by(f64::total_cmp);
    println!(
        "xts aes-256 4KiB units, one core: {:.2} GB/s (median of 3)",
        gbps[1]
    );
    println!(
        "RESULT storage {} {} throttle_iops={:.0} throttle_max_err_pct={card_err:.2} throttle_max_stall_ms={:.1} throttle_wake_late_ms={late_ms:.2} qsd_throttle_iops={:.0} qsd_throttle_max_err_pct={qsd_err:.2} qsd_throttle_max_stall_ms={:.1} {rt_stalls} two_volumes_max_err_pct={two_err:.2} xts_gbps={:.2} repeats={} device={}",
        headline.join(" "),
        ratios.join(" "),
        achieved(&c.report),
        c.report.max_gap_ns as f64 / 1e6,
        achieved(&q.report),
        q.report.max_gap_ns as f64 / 1e6,
        gbps[1],
        opts.repeats,
        if opts.ram { "ram" } else { "disk" }
    );
    Ok(())
}

struct Cleanup(PathBuf);

/// Loop devices over files in /dev/shm (`--ram`); detached and deleted when dropped.
#[derive(Default)]
struct Loops {
    devices: Vec<PathBuf>,
    shm: Option<PathBuf>,
}

impl Loops {
    /// A loop device over `file` (buffered, so its speed is the page cache's).
    fn attach(&mut self, file: &Path) -> Result<PathBuf> {
        let out = Command::new("losetup")
            .args(["--show", "-f", "--direct-io=off"])
            .arg(file)
            .output()
            .context("Cannot run losetup")?;
        if !out.status.success() {
            bail!(
                "losetup failed (--ram needs root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        self.devices.push(dev.clone());
        Ok(dev)
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for dev in &self.devices {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
        if let Some(shm) = &self.shm {
            let _ = std::fs::remove_dir_all(shm);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
