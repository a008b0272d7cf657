//! Command-line parsing (hand-written: a dozen flags don't need a framework).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use outboard_api_types::{BootSource, MachineConfig, SerialConfig};
use outboard_vmm::{parse_mem_size, RebootPolicy, VmmConfig};

pub const USAGE: &str = "\
Usage: outboard-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory SIZE]
                    [--serial stdout|PATH] [--api-sock PATH] [--reboot exit|restart] [--id ID]
       outboard-vmm --api-sock PATH     (configure and start through the API)

  --kernel PATH      ELF (vmlinux, PVH) or bzImage kernel; the VM starts at once
  --initrd PATH      initramfs
  --cmdline STR      kernel command line (default: console=ttyS0 reboot=k panic=1)
  --cpus N           vCPUs (default 1)
  --memory SIZE      guest memory: 128M, 1G, 1024 (MiB) ... (default 128M)
  --serial DEST      COM1 to stdout (default) or appended to a file
  --api-sock PATH    serve the REST API on this Unix socket
  --reboot POLICY    on guest reset: exit (default) or restart the VM
  --id ID            instance id reported by the API
  --help, --version";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: VmmConfig,
    pub api_sock: Option<PathBuf>,
    pub id: String,
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
            other => bail!("Unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if machine.vcpu_count == 0 {
        bail!("--cpus must be at least 1");
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
    Ok(Command::Run(Args {
        config: VmmConfig {
            machine,
            boot,
            serial,
            reboot,
        },
        api_sock,
        id: id.unwrap_or_else(|| format!("outboard-vmm-{}", std::process::id())),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(a) => Ok(a),
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
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(["--help".to_string()]).unwrap(), Command::Help);
        assert_eq!(parse(["-V".to_string()]).unwrap(), Command::Version);
    }
}
