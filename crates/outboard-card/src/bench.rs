//! `outboard-card bench storage`: the card's vhost-user-blk backend side by side with
//! qemu-storage-daemon's export of the same data, through the same load generator, in one run.
//!
//! Rows: 4 KiB random read/write at QD1 and QD32, 128 KiB sequential read/write at QD32, for
//! plain (vs qsd raw on the same extent of the same file), encrypted (vs qsd LUKS
//! aes-xts-plain64) and throttled at 3000 IOPS (vs a qsd throttle group). Then throttle
//! accuracy (ten 1-second windows at QD32, and two volumes with different limits at once),
//! and XTS throughput per core. Backend CPU time comes from /proc/<pid>/task/*/schedstat. Each
//! row is the better of two runs per side, in the order card, qsd, qsd, card.
//! The last line is `RESULT storage …`.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use outboard_card_storage::loadgen::{Client, LoadSpec, Report};
use outboard_card_storage::table::VolumeStore;
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
}

pub fn storage(opts: &Options) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = opts
        .dir
        .join(format!("outboard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    let store = dir.join("store");
    let luks = dir.join("luks.img");
    let key = dir.join("key");
    eprintln!(
        "bench: preparing {} (zero-filled, so reads hit the disk)",
        dir.display()
    );
    zero_fill(&store, 2 * VOLUME)?;
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
    let file_node = |path: &Path| {
        format!(
            "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
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
    let key_s = s(&key);
    let limit_s = LIMIT.to_string();

    println!(
        "{:<10} {:<19} | {:>9} {:>8} {:>8} {:>8} {:>7} | {:>9} {:>8} {:>8} {:>8} {:>7} | {:>6}",
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
        "ratio"
    );
    let mut headline = Vec::new();
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
                )?,
            ),
        };
        for w in WORKLOADS
            .iter()
            .filter(|w| mode != "throttled" || w.name == "4k-randread-qd32")
        {
            let sp = spec(w, opts.seconds);
            // The host under the disk caches and the machine is shared: run in the order
            // card, qsd, qsd, card and keep each side's better run, so neither side is always
            // first or last.
            let c1 = measure(&card_b, &sp)?;
            let q1 = measure(&qsd_b, &sp)?;
            let q2 = measure(&qsd_b, &sp)?;
            let c2 = measure(&card_b, &sp)?;
            let best = |a: Row, b: Row| {
                if a.report.iops() >= b.report.iops() {
                    a
                } else {
                    b
                }
            };
            let (c, q) = (best(c1, c2), best(q1, q2));
            let ratio = c.report.iops() / q.report.iops().max(1e-9);
            println!(
                "{:<10} {:<19} | {} | {} | {:>6.2}",
                mode,
                w.name,
                fmt_row(&c),
                fmt_row(&q),
                ratio
            );
            if w.name == "4k-randread-qd32" || w.name == "4k-randwrite-qd32" {
                let tag = format!("{mode}_{}", w.name.replace('-', "_"));
                headline.push(format!(
                    "{tag}_iops={:.0} qsd_{tag}_iops={:.0} {tag}_ratio={ratio:.2}",
                    c.report.iops(),
                    q.report.iops()
                ));
            }
        }
    }

    // Throttle accuracy: ten whole 1-second windows at QD32, and the longest stall.
    let acc = |b: &Backend| {
        measure(
            b,
            &LoadSpec {
                duration: Duration::from_secs(10),
                ..spec(&WORKLOADS[1], 10.0)
            },
        )
    };
    let card_b = card(
        &["--iops", &limit_s, "--iops-burst", "32"],
        "bench",
        &card_sock,
    )?;
    let c = acc(&card_b)?;
    drop(card_b);
    let qsd_b = qsd(
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
    )?;
    let q = acc(&qsd_b)?;
    drop(qsd_b);
    let card_err = window_error(&c.report.per_second, 10, LIMIT);
    let qsd_err = window_error(&q.report.per_second, 10, LIMIT);
    println!(
        "throttle {LIMIT} IOPS QD32 10x1s: card windows {:?} max_err={card_err:.2}% max_stall={:.1}ms | qsd windows {:?} max_err={qsd_err:.2}% max_stall={:.1}ms",
        &c.report.per_second[..c.report.per_second.len().min(10)],
        c.report.max_gap_ns as f64 / 1e6,
        &q.report.per_second[..q.report.per_second.len().min(10)],
        q.report.max_gap_ns as f64 / 1e6
    );

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
        "RESULT storage {} throttle_max_err_pct={card_err:.2} throttle_max_stall_ms={:.1} qsd_throttle_max_err_pct={qsd_err:.2} two_volumes_max_err_pct={two_err:.2} xts_gbps={:.2}",
        headline.join(" "),
        c.report.max_gap_ns as f64 / 1e6,
        gbps[1]
    );
    Ok(())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
