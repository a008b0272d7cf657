//! Part 2 of `bench attest`: the attested launch through the real outboard-vmm (release build)
//! and its API, timed from process start (the spawn) like `bench boot`:
//!
//! | figure | what |
//! |---|---|
//! | `vmm_entry_ms` | unattested `--kernel` start to the first `KVM_RUN` (test guest) |
//! | `vmm_attested_entry_ms` | the same with an attestation key and an approving policy: the helper starts, phase 1 measures and the policy is checked before the first `KVM_RUN` |
//! | `vmm_measure_added_ms` | the difference of the medians: what measuring adds to a start |
//! | `vmm_measure_added_min_ms` | the difference of the fastest runs (host load only adds time, so this is the intrinsic cost) |
//! | `vmm_boot_ms` | unattested start to the guest's `OUTBOARD_GUEST_READY` |
//! | `vmm_measure_pct_of_boot`, `vmm_measure_min_pct_of_boot` | the added time as a share of `vmm_boot_ms` (the issue's <5% target) |
//! | `vmm_service_entry_ms` | the same attested start through the host's attestation service (`--attest-service`, `outboard-vmm-attest --serve`): no helper process per VM, the VMM binary's digest cached |
//! | `vmm_service_added_ms`, `vmm_service_added_min_ms`, `vmm_service_pct_of_boot`, `vmm_service_min_pct_of_boot` | what measuring through the service adds, as above |
//! | `vmm_phase1_doc_ms` | `--no-start` with a key: start to a signed document received over the API (test guest) |
//! | `stock_phase1_doc_ms` | the same for the stock kernel and initramfs (512 MiB): phase 1 loads it without running it |
//! | `stock_service_phase1_doc_ms` | the same through the host's attestation service |
//!
//! Unattested, per-VM-helper and service runs alternate, so drifting host load hits all alike.
//! Medians.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const CMDLINE: &str = "outboard.run=poweroff";
const FIRST_RUN: &str = "first KVM_RUN";
const READY: &str = "OUTBOARD_GUEST_READY";

struct Setup {
    vmm: PathBuf,
    guest: PathBuf,
    dir: PathBuf,
}

impl Setup {
    fn key_flags(&self) -> Vec<String> {
        let host = self.dir.join("host");
        [
            ("--attest-key", "host.key"),
            ("--attest-cert", "host.pem"),
            ("--attest-cabundle", "cabundle.pem"),
        ]
        .iter()
        .flat_map(|(flag, file)| [flag.to_string(), host.join(file).display().to_string()])
        .collect()
    }

    fn base(&self, kernel: &Path, memory: &str) -> Command {
        let mut c = Command::new(&self.vmm);
        c.env("OUTBOARD_VMM_TRACE_BOOT", "1")
            .arg("--kernel")
            .arg(kernel)
            .args(["--cpus", "1", "--memory", memory, "--serial", "stdout"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

pub fn run(
    release: &Path,
    runs: usize,
    stock_kernel: &str,
    stock_initrd: Option<&str>,
) -> Result<String> {
    let root = crate::util::workspace_root();
    let dir = std::env::temp_dir().join(format!("outboard-bench-attest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        vmm: release.join("outboard-vmm"),
        guest: root.join("target/guest/testguest"),
        dir,
    };
    let result = measure_all(&setup, release, runs.max(1), stock_kernel, stock_initrd);
    let _ = std::fs::remove_dir_all(&setup.dir);
    result
}

fn measure_all(
    setup: &Setup,
    release: &Path,
    runs: usize,
    stock_kernel: &str,
    stock_initrd: Option<&str>,
) -> Result<String> {
    let cli = release.join("outboard");
    let ca = setup.dir.join("ca");
    let host = setup.dir.join("host");
    let policy = setup.dir.join("policy.json");
    run_quiet(
        Command::new(&cli)
            .args(["attest", "ca", "create", "--out-dir"])
            .arg(&ca),
    )?;
    run_quiet(
        Command::new(&cli)
            .args(["attest", "host-key", "create", "--ca-dir"])
            .arg(&ca)
            .arg("--out-dir")
            .arg(&host),
    )?;
    run_quiet(
        Command::new(&cli)
            .args(["attest", "measure", "--vmm"])
            .arg(&setup.vmm)
            .arg("--host-agent")
            .arg(release.join("outboard-vmm-attest"))
            .arg("--kernel")
            .arg(&setup.guest)
            .args(["--cmdline", CMDLINE, "--cpus", "1", "--memory", "128M"])
            .arg("--signing-cert")
            .arg(host.join("host.pem"))
            .arg("--policy-out")
            .arg(&policy),
    )?;

    let unattested = || {
        let mut c = setup.base(&setup.guest, "128M");
        c.args(["--cmdline", CMDLINE]);
        c
    };
    let attested = || {
        let mut c = unattested();
        c.args(setup.key_flags())
            .arg("--attest-policy")
            .arg(&policy);
        c
    };
    let service = AttestService::start(setup, release)?;
    let through_service = || {
        let mut c = unattested();
        c.arg("--attest-service")
            .arg(&service.socket)
            .arg("--attest-policy")
            .arg(&policy);
        c
    };
    // Warm the page cache (and the service's digest cache) and catch a broken set-up before
    // timing.
    boot(&mut unattested()).context("unattested warm-up run")?;
    boot(&mut attested()).context("attested warm-up run")?;
    boot(&mut through_service()).context("attestation service warm-up run")?;

    let (mut entry, mut attested_entry, mut ready) = (Vec::new(), Vec::new(), Vec::new());
    let mut service_entry = Vec::new();
    let (mut phase1_doc, mut stock_doc, mut stock_service_doc) =
        (Vec::new(), Vec::new(), Vec::new());
    let service_flags = vec![
        "--attest-service".to_owned(),
        service.socket.display().to_string(),
    ];
    for i in 0..runs {
        let (e, r) = boot(&mut unattested()).with_context(|| format!("unattested run {i}"))?;
        let (a, _) = boot(&mut attested()).with_context(|| format!("attested run {i}"))?;
        let (s, _) =
            boot(&mut through_service()).with_context(|| format!("service-attested run {i}"))?;
        let doc = phase1_document(setup, &setup.guest, None, "128M", i, &setup.key_flags())
            .with_context(|| format!("phase-1 run {i}"))?;
        println!(
            "bench attest: run {i:>2}: first KVM_RUN {e:>7.2} ms unattested, {a:>7.2} ms attested (helper), {s:>7.2} ms attested (service); ready {r:>8.1} ms; phase 1 + document {doc:>7.2} ms"
        );
        service_entry.push(s);
        entry.push(e);
        attested_entry.push(a);
        ready.push(r);
        phase1_doc.push(doc);
    }
    if Path::new(stock_kernel).exists() {
        for i in 0..runs.min(5) {
            let kernel = Path::new(stock_kernel);
            let doc = phase1_document(setup, kernel, stock_initrd, "512M", i, &setup.key_flags())
                .with_context(|| format!("stock kernel phase-1 run {i}"))?;
            let via_service = phase1_document(
                setup,
                kernel,
                stock_initrd,
                "512M",
                i + runs,
                &service_flags,
            )
            .with_context(|| format!("stock kernel phase-1 run {i} (service)"))?;
            println!("bench attest: stock kernel run {i}: phase 1 + document {via_service:.1} ms through the service");
            stock_service_doc.push(via_service);
            println!("bench attest: stock kernel run {i}: phase 1 + document {doc:.1} ms");
            stock_doc.push(doc);
        }
    }
    // Host load only ever adds time, so the fastest runs show the intrinsic cost best.
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let added_min = min(&attested_entry) - min(&entry);
    let service_added_min = min(&service_entry) - min(&entry);
    let service_entry = median(service_entry);
    let (entry, attested_entry, ready) = (median(entry), median(attested_entry), median(ready));
    let added = attested_entry - entry;
    let mut line = format!(
        "vmm_runs={runs} vmm_entry_ms={entry:.2} vmm_attested_entry_ms={attested_entry:.2} vmm_measure_added_ms={added:.2} vmm_measure_added_min_ms={added_min:.2} vmm_boot_ms={ready:.1} vmm_measure_pct_of_boot={:.2} vmm_measure_min_pct_of_boot={:.2} vmm_phase1_doc_ms={:.2}",
        added / ready * 100.0,
        added_min / ready * 100.0,
        median(phase1_doc),
    );
    let service_added = service_entry - entry;
    line.push_str(&format!(
        " vmm_service_entry_ms={service_entry:.2} vmm_service_added_ms={service_added:.2} vmm_service_added_min_ms={service_added_min:.2} vmm_service_pct_of_boot={:.2} vmm_service_min_pct_of_boot={:.2}",
        service_added / ready * 100.0,
        service_added_min / ready * 100.0,
    ));
    if !stock_doc.is_empty() {
        line.push_str(&format!(
            " stock_phase1_doc_ms={:.1} stock_service_phase1_doc_ms={:.1}",
            median(stock_doc),
            median(stock_service_doc)
        ));
    }
    Ok(line)
}

/// The host's attestation service for the `--attest-service` runs; killed when dropped.
struct AttestService {
    child: Child,
    socket: PathBuf,
}

impl AttestService {
    fn start(setup: &Setup, release: &Path) -> Result<Self> {
        let socket = setup.dir.join("attest.sock");
        let child = Command::new(release.join("outboard-vmm-attest"))
            .arg("--serve")
            .arg(&socket)
            .args(setup.key_flags())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("Cannot start the attestation service")?;
        let mut service = AttestService { child, socket };
        let start = Instant::now();
        while UnixStream::connect(&service.socket).is_err() {
            if service.child.try_wait()?.is_some() || start.elapsed() > RUN_TIMEOUT {
                bail!("The attestation service did not come up");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(service)
    }
}

impl Drop for AttestService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().context("Cannot run the outboard CLI")?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Streams a pipe's lines to `tx` with their arrival times.
fn watch(pipe: impl Read + Send + 'static, tx: mpsc::Sender<(Instant, String)>) {
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(pipe);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
            if tx
                .send((Instant::now(), std::mem::take(&mut line)))
                .is_err()
            {
                break;
            }
        }
    });
}

fn reap(child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("outboard-vmm exited with {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("outboard-vmm did not exit within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A `--kernel` start: (start to first `KVM_RUN`, start to the ready marker), in ms.
fn boot(cmd: &mut Command) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut child = cmd.spawn().context("Cannot start outboard-vmm")?;
    let (tx, rx) = mpsc::channel();
    watch(child.stdout.take().context("no stdout")?, tx.clone());
    watch(child.stderr.take().context("no stderr")?, tx);
    let (mut first_run, mut ready) = (None, None);
    let mut seen = String::new();
    while first_run.is_none() || ready.is_none() {
        let Ok((at, line)) = rx.recv_timeout(RUN_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no {FIRST_RUN} and {READY} within {RUN_TIMEOUT:?}; output:\n{seen}");
        };
        if line.contains(FIRST_RUN) {
            first_run.get_or_insert(at - start);
        }
        if line.contains(READY) {
            ready.get_or_insert(at - start);
        }
        seen.push_str(&line);
    }
    reap(&mut child).with_context(|| format!("output:\n{seen}"))?;
    Ok((
        ms(first_run.unwrap_or_default()),
        ms(ready.unwrap_or_default()),
    ))
}

/// `--no-start` with a key: start to a signed document received; then `InstanceAbort`.
fn phase1_document(
    setup: &Setup,
    kernel: &Path,
    initrd: Option<&str>,
    memory: &str,
    run: usize,
    attest_flags: &[String],
) -> Result<f64> {
    let sock = setup.dir.join(format!("api-{run}.sock"));
    let mut cmd = setup.base(kernel, memory);
    cmd.args(["--cmdline", CMDLINE, "--no-start", "--api-sock"])
        .arg(&sock)
        .args(attest_flags)
        .stdout(Stdio::null());
    if let Some(initrd) = initrd {
        cmd.args(["--initrd", initrd]);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("Cannot start outboard-vmm")?;
    let result = (|| {
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < RUN_TIMEOUT => {
                    if child.try_wait()?.is_some() {
                        bail!("outboard-vmm exited before serving its API");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e).context("API socket never came up"),
            }
        };
        let (status, body) = http(stream, "GET", "/attestation?nonce=0123456789abcdef", "")?;
        let took = start.elapsed();
        if status != 200 {
            bail!(
                "GET /attestation answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let abort = UnixStream::connect(&sock)?;
        let (status, _) = http(
            abort,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceAbort"}"#,
        )?;
        if status != 204 {
            bail!("InstanceAbort answered {status}");
        }
        Ok(ms(took))
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    reap(&mut child).with_context(|| format!("stderr:\n{stderr}"))?;
    result.with_context(|| format!("stderr:\n{stderr}"))
}

/// One request with `Connection: close`; returns status and body.
fn http(mut stream: UnixStream, method: &str, path: &str, body: &str) -> Result<(u16, Vec<u8>)> {
    stream.set_read_timeout(Some(RUN_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, response[head_end + 4..].to_vec()))
}
