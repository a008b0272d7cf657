//! outboard-vmm: one process per VM. Parses the command line, opens KVM, optionally serves the
//! REST API, starts the VM (at once with `--kernel`, or on `InstanceStart`; with `--no-start`
//! it loads and measures the VM first and waits for `InstanceStart`) and exits with the VM's
//! outcome: 0 for power-off, reset, InstanceStop, InstanceAbort or SIGINT/SIGTERM; 2 for a guest fault
//! (triple fault, KVM internal error, unhandled exit); 1 for any VMM error.

mod cli;
mod logger;

use anyhow::{Context, Result};
use outboard_api_server::ApiServer;
use outboard_hypervisor::{HostKind, Hypervisor};
use outboard_vmm::live_update::{self, Channel};
use outboard_vmm::{config::validate_machine, trace, Attestation, Outcome, RebootPolicy, Vmm};

const PVM_NOTICE: &str = "outboard-vmm: host KVM is PVM (software virtualization): only PVM-aware \
kernels and the Outboard test guest run here; a stock Linux kernel will not";

fn main() {
    trace::mark_process_start();
    logger::init();
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            outboard_vmm::status_line!("Error: {e:#}");
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
        cli::Command::LiveUpdate(fd) => return successor(fd),
        cli::Command::Run(args) => args,
    };
    let start_now = args.config.boot.is_some();
    // Started first: the helper loads the key and policy and hashes this binary (PCR0) while
    // KVM and the VM are set up.
    let mut attestation = Attestation::new(args.attestation, &args.id)?;
    if !start_now {
        // Nothing to overlap with: report bad key or policy files now.
        attestation.wait_ready()?;
    }
    let hv = Hypervisor::new().context("Cannot use KVM")?;
    if hv.kind() == HostKind::Pvm {
        outboard_vmm::status_line!("{PVM_NOTICE}");
    }
    validate_machine(&args.config.machine, hv.max_vcpus())?;
    let mut vmm = Vmm::new(hv, args.config, args.id)?;
    vmm.set_attestation(attestation);
    if let Some(path) = &args.api_sock {
        let handler = vmm.api_handler()?;
        let server = ApiServer::bind(path)?;
        let listener = server.listener().try_clone()?;
        vmm.set_api_listener(listener.into(), path.clone());
        server.spawn(handler)?;
    }
    if let Some(restore) = &args.restore {
        vmm.restore(&restore.state, &restore.memory, restore.resume)
            .context("Cannot restore the VM")?;
    } else if start_now && args.no_start {
        vmm.load().context("Cannot load the VM")?;
        outboard_vmm::status_line!(
            "outboard-vmm: VM loaded and measured; waiting for InstanceStart"
        );
    } else if start_now {
        vmm.start().context("Cannot start the VM")?;
    }
    let outcome = vmm.run();
    // After a live update the socket path is the successor's.
    if let (Some(path), false) = (&args.api_sock, outcome == Outcome::LiveUpdated) {
        let _ = std::fs::remove_file(path);
    }
    outboard_vmm::status_line!("{}", outcome.message());
    Ok(outcome.exit_code())
}

/// The successor of a live update: opens KVM, receives the VM from the old VMM on `fd`, takes
/// over its API socket and runs the guest.
fn successor(fd: i32) -> Result<i32> {
    // SAFETY: `fd` is the socket the old VMM made us inherit (`--live-update-fd`); nothing else
    // in this fresh process owns it.
    let channel = unsafe { Channel::from_raw_fd(fd) }.context("Cannot use --live-update-fd")?;
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) => {
            live_update::report_failure(&channel, &e);
            return Err(e).context("Cannot use KVM");
        }
    };
    let incoming = live_update::receive(&channel, &hv).context("Cannot receive the VM")?;
    let handover = incoming.config.clone();
    let config = outboard_vmm::VmmConfig {
        serial: outboard_api_types::SerialConfig {
            output: handover.serial_output.clone(),
        },
        reboot: if handover.reboot_restart {
            RebootPolicy::Restart
        } else {
            RebootPolicy::Exit
        },
        ..Default::default()
    };
    let mut vmm = Vmm::new(hv, config, handover.id.clone())?;
    let mut api_sock = None;
    if let (Some(listener), Some(path)) = (incoming.api_listener.as_ref(), &handover.api_sock) {
        let handler = vmm.api_handler()?;
        let server = ApiServer::from_listener(listener.try_clone()?, path.clone());
        vmm.set_api_listener(listener.try_clone()?.into(), path.clone());
        server.spawn(handler)?;
        api_sock = Some(path.clone());
    }
    vmm.adopt(incoming, &channel)
        .context("Cannot take over the VM")?;
    let outcome = vmm.run();
    if let (Some(path), false) = (&api_sock, outcome == Outcome::LiveUpdated) {
        let _ = std::fs::remove_file(path);
    }
    outboard_vmm::status_line!("{}", outcome.message());
    Ok(outcome.exit_code())
}
