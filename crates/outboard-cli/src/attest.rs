//! `outboard attest …`: thin wrappers over `outboard-attest`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use outboard_attest::bench::{self, Phase1Inputs};
use outboard_attest::config::parse_size;
use outboard_attest::keys::{
    self, load_certificate, save_host_files, CertificateAuthority, SecretKey, Validity,
};
use outboard_attest::verify::{self, verify_document, VerifyOptions};
use outboard_attest::{
    document, policy, AttestationSigner, CanonicalVmConfig, EventLog, Measurements, PcrIndex,
    Policy,
};

#[derive(Subcommand)]
pub enum Command {
    /// Operator root CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Host attestation key and certificate.
    HostKey {
        #[command(subcommand)]
        command: HostKeyCommand,
    },
    /// Verify an attestation document.
    Verify(VerifyArgs),
    /// Print the PCRs a launch will have, computed from its files.
    Measure(MeasureArgs),
    /// Write a policy approving the PCRs of attestation documents.
    Policy(PolicyArgs),
    /// Time phase 1 (measure kernel, initrd, command line and configuration; sign a document).
    Bench(BenchArgs),
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a root CA in OUT_DIR (root-ca.key, root-ca.pem).
    Create {
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value = "Outboard operator root CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Encrypt the private key with the passphrase in this file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum HostKeyCommand {
    /// Create host.key, host.pem and cabundle.pem in OUT_DIR, signed by the CA in CA_DIR.
    Create {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value = "outboard-host")]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Passphrase file of the CA key, if it is encrypted.
        #[arg(long)]
        ca_passphrase_file: Option<PathBuf>,
        /// Encrypt the host key with the passphrase in this file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long)]
    doc: PathBuf,
    #[arg(long)]
    root_ca: PathBuf,
    /// The challenge sent with the request, hex; the document must carry it.
    #[arg(long)]
    nonce: Option<String>,
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Event log (JSON) served with the document; it must replay to the document's PCRs.
    #[arg(long)]
    event_log: Option<PathBuf>,
}

#[derive(Args)]
pub struct LaunchArgs {
    /// Kernel file as given to outboard-vmm.
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The final command line the guest sees.
    #[arg(long, default_value = "")]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory size, e.g. 512M.
    #[arg(long, default_value = "128M")]
    memory: String,
    /// Canonical configuration as JSON ({"vcpus", "memory_bytes", "devices"}); overrides --cpus/--memory.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
pub struct MeasureArgs {
    #[command(flatten)]
    launch: LaunchArgs,
    /// outboard-vmm binary (PCR0).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Host agent binary (PCR6).
    #[arg(long)]
    host_agent: Option<PathBuf>,
    /// Card binary (PCR7).
    #[arg(long)]
    card: Option<PathBuf>,
    /// Host certificate, PEM (PCR8).
    #[arg(long)]
    signing_cert: Option<PathBuf>,
    /// Also write a policy approving exactly the measured PCRs.
    #[arg(long)]
    policy_out: Option<PathBuf>,
    /// Also write the event log as JSON.
    #[arg(long)]
    event_log_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Documents whose PCR values to approve (repeat to approve several values per PCR).
    #[arg(long, required = true)]
    from_doc: Vec<PathBuf>,
    /// PCRs to include, e.g. 0,2,3,4,5 (default: every non-zero PCR except 8, the host's
    /// certificate, so the policy is not tied to one host).
    #[arg(long, value_delimiter = ',')]
    pcrs: Option<Vec<u8>>,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    launch: LaunchArgs,
    #[arg(long, default_value_t = 9)]
    runs: usize,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Ca {
            command:
                CaCommand::Create {
                    out_dir,
                    name,
                    days,
                    passphrase_file,
                },
        } => {
            let pass = read_passphrase(passphrase_file.as_deref())?;
            let ca = CertificateAuthority::create_root(&name, Validity::days_from_now(days))?;
            ca.save_root(&out_dir, pass.as_deref())
                .context("Cannot write the root CA")?;
            println!(
                "Created root CA {:?}: {} (private, 0600) and {}",
                name,
                out_dir.join(keys::ROOT_KEY_FILE).display(),
                out_dir.join(keys::ROOT_CERT_FILE).display()
            );
            Ok(())
        }
        Command::HostKey {
            command:
                HostKeyCommand::Create {
                    ca_dir,
                    out_dir,
                    name,
                    days,
                    ca_passphrase_file,
                    passphrase_file,
                },
        } => {
            let ca_pass = read_passphrase(ca_passphrase_file.as_deref())?;
            let pass = read_passphrase(passphrase_file.as_deref())?;
            let ca = CertificateAuthority::load_root(&ca_dir, ca_pass.as_deref())
                .context("Cannot load the root CA")?;
            let key = SecretKey::generate()?;
            let not_after = ca.certificate.not_after();
            let mut validity = Validity::days_from_now(days);
            // A host certificate never outlives its CA.
            let ca_end = openssl::asn1::Asn1Time::from_unix(0)?.diff(not_after)?;
            validity.not_after = validity
                .not_after
                .min(i64::from(ca_end.days) * 86_400 + i64::from(ca_end.secs));
            let cert = ca.issue_host_certificate(&name, &key, validity)?;
            save_host_files(&out_dir, &key, &cert, &ca.bundle(), pass.as_deref())
                .context("Cannot write the host key files")?;
            println!(
                "Created host key {:?}: {} (private, 0600), {}, {}",
                name,
                out_dir.join(keys::HOST_KEY_FILE).display(),
                out_dir.join(keys::HOST_CERT_FILE).display(),
                out_dir.join(keys::CABUNDLE_FILE).display()
            );
            Ok(())
        }
        Command::Verify(args) => verify_cmd(args),
        Command::Measure(args) => measure_cmd(args),
        Command::Policy(args) => policy_cmd(args),
        Command::Bench(args) => bench_cmd(args),
    }
}

fn read_passphrase(path: Option<&Path>) -> Result<Option<Vec<u8>>> {
    let Some(path) = path else { return Ok(None) };
    let mut p = fs::read(path)
        .with_context(|| format!("Cannot read passphrase file {}", path.display()))?;
    while p.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        p.pop();
    }
    if p.is_empty() {
        bail!("Passphrase file {} is empty", path.display());
    }
    Ok(Some(p))
}

fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).with_context(|| format!("Cannot read {}", path.display()))?;
    if meta.len() > max as u64 {
        bail!("{} is larger than {max} bytes", path.display());
    }
    fs::read(path).with_context(|| format!("Cannot read {}", path.display()))
}

fn pcr_name(i: u8) -> &'static str {
    PcrIndex::from_index(i.into()).map_or("", PcrIndex::name)
}

fn verify_cmd(args: VerifyArgs) -> Result<()> {
    let bytes = read_bounded(&args.doc, document::MAX_DOCUMENT_SIZE)?;
    let root = load_certificate(&args.root_ca)?;
    let nonce = args
        .nonce
        .as_deref()
        .map(hex::decode)
        .transpose()
        .context("--nonce is not hex")?;
    let policy = args.policy.as_deref().map(Policy::load).transpose()?;
    let event_log: Option<EventLog> = match &args.event_log {
        Some(path) => {
            let text = read_bounded(path, 4 << 20)?;
            Some(
                serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not an event log", path.display()))?,
            )
        }
        None => None,
    };
    let opts = VerifyOptions {
        expected_nonce: nonce.as_deref(),
        policy: policy.as_ref(),
        event_log: event_log.as_ref(),
        time: None,
    };
    let result = verify_document(&bytes, &root, &opts);
    if let Err(verify::Error::Policy(policy::Error::Mismatch { report, .. })) = &result {
        print!("{report}");
    }
    let v = result.context("Attestation document REJECTED")?;
    match &v.policy_report {
        Some(report) => print!("{report}"),
        None => {
            for (i, value) in &v.document.pcrs {
                println!("PCR{i:<2} {:<19} {}", pcr_name(*i), hex::encode(value));
            }
        }
    }
    println!(
        "OK: signature and certificate chain verified{}{}{}; module {} at {} ms",
        if nonce.is_some() {
            ", nonce matches"
        } else {
            ""
        },
        if event_log.is_some() {
            ", event log replays"
        } else {
            ""
        },
        if policy.is_some() {
            ", all policy PCRs match"
        } else {
            ""
        },
        v.document.module_id,
        v.document.timestamp
    );
    Ok(())
}

fn launch_config(l: &LaunchArgs) -> Result<CanonicalVmConfig> {
    match &l.config {
        Some(path) => {
            let text = read_bounded(path, 1 << 20)?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a VM configuration", path.display()))
        }
        None => Ok(CanonicalVmConfig {
            vcpus: l.cpus,
            memory_bytes: parse_size(&l.memory)?,
            devices: Vec::new(),
        }),
    }
}

fn measure_cmd(args: MeasureArgs) -> Result<()> {
    let mut m = Measurements::new();
    if let Some(vmm) = &args.vmm {
        m.measure_vmm_binary(vmm)?;
    }
    let kernel = fs::read(&args.launch.kernel)
        .with_context(|| format!("Cannot read kernel {}", args.launch.kernel.display()))?;
    m.measure_kernel_file(&kernel)?;
    if let Some(initrd) = &args.launch.initrd {
        m.measure_file(PcrIndex::Initrd, initrd)?;
    }
    m.measure_cmdline(args.launch.cmdline.as_bytes());
    m.measure_config(&launch_config(&args.launch)?)?;
    if let Some(agent) = &args.host_agent {
        m.measure_host_agent(agent)?;
    }
    if let Some(card) = &args.card {
        m.measure_card(card)?;
    }
    if let Some(cert) = &args.signing_cert {
        m.measure_signing_certificate(&load_certificate(cert)?.to_der()?);
    }
    let measured: std::collections::BTreeSet<u8> =
        m.event_log().events.iter().map(|e| e.pcr as u8).collect();
    let mut policy = Policy::default();
    for &i in &measured {
        let value = *m.pcrs().get(i.into()).expect("measured PCRs are in range");
        println!("PCR{i:<2} {:<19} {}", pcr_name(i), hex::encode(value));
        policy.approve(i, value);
    }
    if let Some(out) = &args.policy_out {
        fs::write(out, policy.to_json())
            .with_context(|| format!("Cannot write {}", out.display()))?;
    }
    if let Some(out) = &args.event_log_out {
        let json = serde_json::to_string_pretty(m.event_log())?;
        fs::write(out, json).with_context(|| format!("Cannot write {}", out.display()))?;
    }
    Ok(())
}

fn policy_cmd(args: PolicyArgs) -> Result<()> {
    let mut policy = Policy::default();
    for path in &args.from_doc {
        let bytes = read_bounded(path, document::MAX_DOCUMENT_SIZE)?;
        // Unverified on purpose: the user approves the values they see; `verify` checks origin.
        let doc = document::parse(&bytes)
            .with_context(|| format!("{} is not an attestation document", path.display()))?
            .document;
        let indices: Vec<u8> = match &args.pcrs {
            Some(list) => list.clone(),
            None => doc
                .pcrs
                .iter()
                .filter(|(i, v)| {
                    **i != PcrIndex::SigningCertificate as u8 && v.iter().any(|b| *b != 0)
                })
                .map(|(i, _)| *i)
                .collect(),
        };
        for i in &indices {
            if !doc.pcrs.contains_key(i) {
                bail!("{} has no PCR{i}", path.display());
            }
        }
        policy.approve_from_document(&doc, &indices);
    }
    if policy.approved().is_empty() {
        bail!("The documents carry no non-zero PCR to approve");
    }
    match &args.out {
        Some(out) => fs::write(out, policy.to_json())
            .with_context(|| format!("Cannot write {}", out.display()))?,
        None => print!("{}", policy.to_json()),
    }
    Ok(())
}

fn bench_cmd(args: BenchArgs) -> Result<()> {
    let kernel = fs::read(&args.launch.kernel)
        .with_context(|| format!("Cannot read kernel {}", args.launch.kernel.display()))?;
    let layout = outboard_attest::kernel::KernelLayout::parse(&kernel)?;
    // The bytes the loader places: concatenated here as the VMM would read them back.
    let placed: Vec<u8> = layout.measured_bytes(&kernel).flatten().copied().collect();
    let initrd = args
        .launch
        .initrd
        .as_ref()
        .map(|p| fs::read(p).with_context(|| format!("Cannot read initrd {}", p.display())))
        .transpose()?;
    let config = launch_config(&args.launch)?;
    let root = CertificateAuthority::create_root("bench root", Validity::days_from_now(1))?;
    let key = SecretKey::generate()?;
    let cert = root.issue_host_certificate("bench-host", &key, Validity::days_from_now(1))?;
    let signer = AttestationSigner::new(key, &cert, &root.bundle())?;
    let t = bench::phase1(
        &Phase1Inputs {
            kernel: &placed,
            initrd: initrd.as_deref(),
            cmdline: args.launch.cmdline.as_bytes(),
            config: &config,
        },
        &signer,
        args.runs,
    )?;
    let kernel_mib = placed.len() as f64 / f64::from(1 << 20);
    let initrd_mib = initrd
        .as_ref()
        .map_or(0.0, |i| i.len() as f64 / f64::from(1 << 20));
    println!(
        "phase 1 over {} runs: measured {:.2} MiB (kernel {kernel_mib:.2}, initrd {initrd_mib:.2}) in {:.3} ms, document ({} bytes) signed in {:.3} ms",
        t.runs,
        t.measured_bytes as f64 / f64::from(1 << 20),
        t.measure.as_secs_f64() * 1e3,
        t.document_bytes,
        t.sign.as_secs_f64() * 1e3
    );
    println!(
        "RESULT attest measure_ms={:.3} sign_ms={:.3} measure_ms_per_mib={:.3} sha384_mib_s={:.0} measured_mib={:.2} doc_bytes={}",
        t.measure.as_secs_f64() * 1e3,
        t.sign.as_secs_f64() * 1e3,
        t.measure_ms_per_mib(),
        t.measure_mib_per_s(),
        t.measured_bytes as f64 / f64::from(1 << 20),
        t.document_bytes
    );
    Ok(())
}
