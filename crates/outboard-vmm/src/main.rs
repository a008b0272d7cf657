//! outboard-vmm: one process per VM. Parses the command line, opens KVM, optionally serves the
//! REST API, starts the VM (at once with `--kernel`, or on `InstanceStart`) and exits with the
//! VM's outcome: 0 for power-off, reset, InstanceStop or SIGINT/SIGTERM; 2 for a guest fault
//! (triple fault, KVM internal error, unhandled exit); 1 for any VMM error.

mod cli;

use anyhow::{Context, Result};
use outboard_api_server::ApiServer;
use outboard_hypervisor::{HostKind, Hypervisor};
use outboard_vmm::{config::validate_machine, trace, Vmm};

const PVM_NOTICE: &str = "outboard-vmm: host KVM is PVM (software virtualization): only PVM-aware \
kernels and the Outboard test guest run here; a stock Linux kernel will not";

fn main() {
    trace::mark_process_start();
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run() -> Result<i32> {
    let args = match cli::parse(std::env::args().skip(1))? {
        cli::Command::Help => {
            println!("{}", cli::USAGE);
            return Ok(0);
        }
        cli::Command::Version => {
            println!("outboard-vmm {}", outboard_vmm::VMM_VERSION);
            return Ok(0);
        }
        cli::Command::Run(args) => args,
    };
    let hv = Hypervisor::new().context("Cannot use KVM")?;
    if hv.kind() == HostKind::Pvm {
        eprintln!("{PVM_NOTICE}");
    }
    validate_machine(&args.config.machine, hv.max_vcpus())?;
    let start_now = args.config.boot.is_some();
    let mut vmm = Vmm::new(hv, args.config, args.id)?;
    if let Some(path) = &args.api_sock {
        let handler = vmm.api_handler()?;
        ApiServer::bind(path)?.spawn(handler)?;
    }
    if start_now {
        vmm.start().context("Cannot start the VM")?;
    }
    let outcome = vmm.run();
    if let Some(path) = &args.api_sock {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("{}", outcome.message());
    Ok(outcome.exit_code())
}
