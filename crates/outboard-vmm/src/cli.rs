//! Command-line parsing (hand-written: a dozen flags don't need a framework).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use outboard_api_types::{BootSource, MachineConfig, SerialConfig};
use outboard_vmm::{parse_mem_size, AttestationConfig, KeyFiles, RebootPolicy, VmmConfig};

pub const USAGE: &str = "\
Usage: outboard-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory SIZE]
                    [--serial stdout|PATH] [--api-sock PATH] [--reboot exit|restart] [--id ID]
                    [--no-start] [ATTESTATION]
       outboard-vmm --api-sock PATH [ATTESTATION]  (configure and start through the API)
       outboard-vmm --restore state=P,memory=M[,resume=on|off] [--serial DEST] [--api-sock PATH]

  --kernel PATH      ELF (vmlinux, PVH) or bzImage kernel; the VM starts at once
  --initrd PATH      initramfs
  --cmdline STR      kernel command line (default: console=ttyS0 reboot=k panic=1)
  --cpus N           vCPUs (default 1)
  --memory SIZE      guest memory: 128M, 1G, 1024 (MiB) ... (default 128M)
  --serial DEST      COM1 to stdout (default) or appended to a file
  --api-sock PATH    serve the REST API on this Unix socket
  --reboot POLICY    on guest reset: exit (default) or restart the VM
  --id ID            instance id reported by the API (and the documents' module_id)
  --no-start         with --kernel and --api-sock: load and measure the VM (phase 1), then wait
                     for InstanceStart (or InstanceAbort) through the API
  --disk OPTS        vhost-user virtio-blk (repeatable): socket=PATH[,num_queues=N,queue_size=M]
  --net OPTS         vhost-user virtio-net (repeatable): socket=PATH[,mac=M,num_queues=N,queue_size=M]
  --vsock OPTS       virtio-vsock: cid=N,uds_path=PATH (guest port P connects to PATH_P)
  --live-update-fd N (internal) successor of a live update: receive the VM on descriptor N
  --restore OPTS     build the VM from a snapshot (PUT /snapshot/create): state file P, memory
                     file M; resume=off leaves it Paused for PATCH /vm (default on)
  --help, --version

Attestation (all three key flags together; see `outboard attest host-key create`):
  --attest-key F             host attestation private key (PEM, P-384)
  --attest-cert F            its certificate (PEM)
  --attest-cabundle F        the certificates from the root CA to the issuer (PEM)
  --attest-passphrase-file F passphrase of an encrypted --attest-key
  --attest-policy F          approved PCR values: InstanceStart is refused (409) unless they match
  --attest-service SOCKET    the host's attestation service (`outboard-vmm-attest --serve`) instead
                             of the key files: it holds the key and measures each binary once
With a key, GET /attestation serves signed documents; without one it answers 409.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<Args>),
    /// `--live-update-fd N`: become the successor of a live update.
    LiveUpdate(i32),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: VmmConfig,
    pub api_sock: Option<PathBuf>,
    pub id: String,
    /// `--no-start`: phase 1 only; the API starts the VM.
    pub no_start: bool,
    pub attestation: AttestationConfig,
    /// `--restore`: build the VM from a snapshot instead of a kernel.
    pub restore: Option<RestoreArgs>,
}

/// `--restore state=P,memory=M[,resume=on|off]`.
#[derive(Debug, PartialEq, Eq)]
pub struct RestoreArgs {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub resume: bool,
}

fn parse_restore(text: &str) -> Result<RestoreArgs> {
    let (mut state, mut memory, mut resume) = (None, None, true);
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("state", p)) if !p.is_empty() => state = Some(PathBuf::from(p)),
            Some(("memory", p)) if !p.is_empty() => memory = Some(PathBuf::from(p)),
            Some(("resume", "on" | "true")) => resume = true,
            Some(("resume", "off" | "false")) => resume = false,
            _ => bail!("Unknown or empty --restore option {item:?}"),
        }
    }
    match (state, memory) {
        (Some(state), Some(memory)) => Ok(RestoreArgs {
            state,
            memory,
            resume,
        }),
        _ => bail!("--restore needs state=PATH and memory=PATH"),
    }
}

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut machine = MachineConfig::default();
    let mut serial = SerialConfig::default();
    let mut api_sock = None;
    let mut reboot = RebootPolicy::default();
    let mut id = None;
    let mut no_start = false;
    let mut devices = outboard_vmm::pci::DeviceConfig::default();
    let mut restore = None;
    let (mut key, mut cert, mut cabundle, mut passphrase_file, mut policy, mut service) =
        (None, None, None, None, None, None);

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => args.next().ok_or_else(|| anyhow!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = Some(value()?),
            "--cpus" => {
                let v = value()?;
                machine.vcpu_count = v
                    .parse()
                    .map_err(|_| anyhow!("--cpus {v:?} is not a vCPU count"))?;
            }
            "--memory" => {
                let v = value()?;
                machine.mem_size_mib = parse_mem_size(&v).context("Invalid --memory")?;
            }
            "--serial" => {
                let v = value()?;
                serial.output = match v.as_str() {
                    "stdout" => None,
                    "" => bail!("--serial needs stdout or a file path"),
                    path => Some(PathBuf::from(path)),
                };
            }
            "--api-sock" => api_sock = Some(PathBuf::from(value()?)),
            "--reboot" => reboot = value()?.parse().context("Invalid --reboot")?,
            "--id" => id = Some(value()?),
            "--no-start" if inline.is_none() => no_start = true,
            "--disk" => devices
                .disks
                .push(value()?.parse().context("Invalid --disk")?),
            "--net" => devices
                .nets
                .push(value()?.parse().context("Invalid --net")?),
            "--vsock" => {
                if devices.vsock.is_some() {
                    bail!("--vsock given twice (one vsock device per VM)");
                }
                devices.vsock = Some(value()?.parse().context("Invalid --vsock")?);
            }
            "--live-update-fd" => {
                let v = value()?;
                let fd = v
                    .parse::<i32>()
                    .ok()
                    .filter(|fd| *fd > 2)
                    .ok_or_else(|| anyhow!("--live-update-fd {v:?} is not a descriptor"))?;
                return Ok(Command::LiveUpdate(fd));
            }
            "--restore" => restore = Some(parse_restore(&value()?)?),
            "--attest-key" => key = Some(PathBuf::from(value()?)),
            "--attest-cert" => cert = Some(PathBuf::from(value()?)),
            "--attest-cabundle" => cabundle = Some(PathBuf::from(value()?)),
            "--attest-passphrase-file" => passphrase_file = Some(PathBuf::from(value()?)),
            "--attest-policy" => policy = Some(PathBuf::from(value()?)),
            "--attest-service" => service = Some(PathBuf::from(value()?)),
            other => bail!("Unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if machine.vcpu_count == 0 {
        bail!("--cpus must be at least 1");
    }
    if restore.is_some() {
        let devices_given =
            !devices.disks.is_empty() || !devices.nets.is_empty() || devices.vsock.is_some();
        if kernel.is_some() || initrd.is_some() || cmdline.is_some() || no_start || devices_given {
            bail!("--restore takes the VM from the snapshot: no --kernel, --initrd, --cmdline, --no-start or devices");
        }
        let mut args = parse_restore_only(api_sock, serial, reboot, id)?;
        args.restore = restore;
        return Ok(Command::Run(Box::new(args)));
    }
    let boot = match kernel {
        Some(kernel_image_path) => Some(BootSource {
            kernel_image_path,
            initrd_path: initrd,
            boot_args: cmdline,
        }),
        None if initrd.is_some() || cmdline.is_some() => {
            bail!("--initrd and --cmdline need --kernel")
        }
        None if api_sock.is_none() => {
            bail!("Give --kernel, or --api-sock to configure through the API\n\n{USAGE}")
        }
        None => None,
    };
    if no_start && (boot.is_none() || api_sock.is_none()) {
        bail!("--no-start needs --kernel (what to load) and --api-sock (to start or abort it)");
    }
    let keys = match (key, cert, cabundle) {
        (Some(key), Some(cert), Some(cabundle)) => Some(KeyFiles {
            key,
            cert,
            cabundle,
            passphrase_file,
        }),
        (None, None, None) if passphrase_file.is_none() => None,
        _ => bail!("Give --attest-key, --attest-cert and --attest-cabundle together"),
    };
    if service.is_some() && keys.is_some() {
        bail!("Give either --attest-service or the --attest-key files, not both");
    }
    Ok(Command::Run(Box::new(Args {
        config: VmmConfig {
            machine,
            boot,
            serial,
            reboot,
            devices,
        },
        api_sock,
        id: id.unwrap_or_else(|| format!("outboard-vmm-{}", std::process::id())),
        no_start,
        attestation: AttestationConfig {
            keys,
            policy,
            service,
        },
        restore: None,
    })))
}

fn parse_restore_only(
    api_sock: Option<PathBuf>,
    serial: SerialConfig,
    reboot: RebootPolicy,
    id: Option<String>,
) -> Result<Args> {
    Ok(Args {
        config: VmmConfig {
            serial,
            reboot,
            ..VmmConfig::default()
        },
        api_sock,
        id: id.unwrap_or_else(|| format!("outboard-vmm-{}", std::process::id())),
        no_start: false,
        attestation: AttestationConfig::default(),
        restore: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(a) => Ok(*a),
            other => bail!("unexpected {other:?}"),
        }
    }

    #[test]
    fn full_command_line() {
        let args = run(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 outboard.run=poweroff",
            "--cpus",
            "2",
            "--memory=1G",
            "--serial",
            "/tmp/s.log",
            "--api-sock",
            "/tmp/a.sock",
            "--reboot",
            "restart",
            "--id",
            "vm1",
        ])
        .unwrap();
        let boot = args.config.boot.unwrap();
        assert_eq!(boot.kernel_image_path, PathBuf::from("/k"));
        assert_eq!(boot.initrd_path, Some(PathBuf::from("/i")));
        assert_eq!(
            boot.boot_args.as_deref(),
            Some("console=ttyS0 outboard.run=poweroff")
        );
        assert_eq!(args.config.machine.vcpu_count, 2);
        assert_eq!(args.config.machine.mem_size_mib, 1024);
        assert_eq!(args.config.serial.output, Some(PathBuf::from("/tmp/s.log")));
        assert_eq!(args.config.reboot, RebootPolicy::Restart);
        assert_eq!(args.api_sock, Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!(args.id, "vm1");
        assert!(!args.no_start);
        assert_eq!(args.attestation, AttestationConfig::default());
    }

    #[test]
    fn two_phase_and_attestation_flags() {
        let args = run(&[
            "--kernel",
            "/k",
            "--api-sock",
            "/a",
            "--no-start",
            "--attest-key=/h.key",
            "--attest-cert",
            "/h.pem",
            "--attest-cabundle",
            "/b.pem",
            "--attest-passphrase-file",
            "/p",
            "--attest-policy",
            "/policy.json",
        ])
        .unwrap();
        assert!(args.no_start);
        assert_eq!(
            args.attestation,
            AttestationConfig {
                keys: Some(KeyFiles {
                    key: "/h.key".into(),
                    cert: "/h.pem".into(),
                    cabundle: "/b.pem".into(),
                    passphrase_file: Some("/p".into()),
                }),
                policy: Some("/policy.json".into()),
                service: None,
            }
        );
        let policy_only = run(&["--api-sock", "/a", "--attest-policy", "/p.json"]).unwrap();
        assert_eq!(policy_only.attestation.keys, None);
        assert!(policy_only.attestation.policy.is_some());
        let service = run(&["--api-sock", "/a", "--attest-service", "/run/attest.sock"]).unwrap();
        assert_eq!(
            service.attestation.service,
            Some(PathBuf::from("/run/attest.sock"))
        );
    }

    #[test]
    fn defaults_and_api_only() {
        let args = run(&["--api-sock", "/tmp/a.sock"]).unwrap();
        assert!(args.config.boot.is_none());
        assert_eq!(args.config.machine, MachineConfig::default());
        assert_eq!(args.config.serial.output, None);
        let args = run(&["--kernel", "/k", "--serial", "stdout"]).unwrap();
        assert_eq!(args.config.serial.output, None);
        assert_eq!(args.config.reboot, RebootPolicy::Exit);
    }

    #[test]
    fn errors_are_clear() {
        let err = |a: &[&str]| format!("{:#}", run(a).unwrap_err());
        assert!(err(&[]).contains("Give --kernel"));
        assert!(err(&["--kernel", "/k", "--cpus", "0"]).contains("at least 1"));
        assert!(err(&["--kernel", "/k", "--cpus", "two"]).contains("not a vCPU count"));
        assert!(err(&["--kernel", "/k", "--memory", "lots"]).contains("Invalid --memory"));
        assert!(err(&["--kernel"]).contains("--kernel needs a value"));
        assert!(err(&["--kernel", "/k", "--frobnicate"]).contains("Unknown argument"));
        assert!(err(&["--api-sock", "/a", "--cmdline", "x"]).contains("need --kernel"));
        assert!(err(&["--kernel", "/k", "--reboot", "never"]).contains("Invalid --reboot"));
        assert!(err(&["--kernel", "/k", "--no-start"]).contains("--no-start needs"));
        assert!(err(&["--api-sock", "/a", "--no-start"]).contains("--no-start needs"));
        let partial = [
            "--kernel",
            "/k",
            "--attest-key",
            "/k.pem",
            "--attest-cert",
            "/c",
        ];
        assert!(err(&partial).contains("together"));
        assert!(err(&["--kernel", "/k", "--attest-passphrase-file", "/p"]).contains("together"));
        let both = [
            "--kernel",
            "/k",
            "--attest-service",
            "/s",
            "--attest-key",
            "/k",
            "--attest-cert",
            "/c",
            "--attest-cabundle",
            "/b",
        ];
        assert!(err(&both).contains("not both"));
    }

    #[test]
    fn restore_flag() {
        let args = run(&["--restore", "state=/s,memory=/m", "--serial", "/o"]).unwrap();
        assert_eq!(
            args.restore,
            Some(RestoreArgs {
                state: "/s".into(),
                memory: "/m".into(),
                resume: true
            })
        );
        assert_eq!(args.config.serial.output, Some(PathBuf::from("/o")));
        let paused = run(&["--restore=memory=/m,state=/s,resume=off"]).unwrap();
        assert!(!paused.restore.unwrap().resume);
        let err = |a: &[&str]| format!("{:#}", run(a).unwrap_err());
        assert!(err(&["--restore", "state=/s"]).contains("needs state=PATH and memory=PATH"));
        assert!(err(&["--restore", "state=/s,memory=/m,x=1"]).contains("Unknown"));
        assert!(err(&["--restore", "state=,memory=/m"]).contains("Unknown or empty"));
        assert!(err(&["--restore", "state=/s,memory=/m", "--kernel", "/k"]).contains("snapshot"));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(["--help".to_string()]).unwrap(), Command::Help);
        assert_eq!(parse(["-V".to_string()]).unwrap(), Command::Version);
    }
}
