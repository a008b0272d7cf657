//! The commands `outboard.run=<name>` selects. Adding one is adding a function and a row in
//! [`COMMANDS`]; it gets the platform facts and the clock through [`Env`] and reads its own
//! parameters (`outboard.<param>=`) from the command line. When it returns, the guest powers off.
//! Device drivers for later commands (virtio over PCI) belong in their own modules beside this
//! one, used from the command that needs them.
//!
//! Output contract: results are single lines starting with `OUTBOARD_`; a command that can't do
//! its job prints `OUTBOARD_GUEST_ERROR <command>: <why>` and returns.

mod badinput;
mod basic;
mod blk;
mod heartbeat;
mod mix;
mod net;
mod pci;
pub mod smp;
mod vsock;

use crate::clock::Clock;
use crate::platform::Platform;
use crate::{power, println};
use outboard_testguest_parse::cmdline::Cmdline;

/// What a command may use.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    pub platform: &'static Platform,
    pub clock: &'static Clock,
}

impl Env {
    pub fn cmdline(&self) -> Cmdline<'static> {
        self.platform.cmdline()
    }

    /// The numeric parameter `key`, `default` when absent; a malformed value is reported.
    pub fn param_u64(&self, command: &str, key: &str, default: u64) -> Option<u64> {
        match self.cmdline().get_u64(key) {
            Ok(v) => Some(v.unwrap_or(default)),
            Err(e) => {
                println!("OUTBOARD_GUEST_ERROR {command}: {e}");
                None
            }
        }
    }
}

/// A named command.
#[derive(Debug)]
pub struct Command {
    pub name: &'static str,
    pub run: fn(&Env),
}

pub static COMMANDS: &[Command] = &[
    Command {
        name: "poweroff",
        run: |_| {},
    },
    Command {
        name: "reset",
        run: basic::reset,
    },
    Command {
        name: "crash",
        run: basic::crash,
    },
    Command {
        name: "triple-fault",
        run: basic::triple_fault,
    },
    Command {
        name: "heartbeat",
        run: heartbeat::run,
    },
    Command {
        name: "smp",
        run: smp::run,
    },
    Command {
        name: "pci",
        run: pci::run,
    },
    Command {
        name: "blk-verify",
        run: blk::verify,
    },
    Command {
        name: "blk-write",
        run: blk::write,
    },
    Command {
        name: "blk-read-verify",
        run: blk::read_verify,
    },
    Command {
        name: "blk-loop",
        run: blk::run_loop,
    },
    Command {
        name: "blk-bench",
        run: blk::bench,
    },
    Command {
        name: "blk-grow",
        run: blk::grow,
    },
    Command {
        name: "net-exchange",
        run: net::run,
    },
    Command {
        name: "live-mix",
        run: mix::run,
    },
    Command {
        name: "vsock-echo",
        run: vsock::run,
    },
    Command {
        name: "bad-queue-addr",
        run: badinput::queue_addr,
    },
    Command {
        name: "bad-queue-size",
        run: badinput::queue_size,
    },
    Command {
        name: "bad-msix",
        run: badinput::msix,
    },
    Command {
        name: "bad-bar",
        run: badinput::bar,
    },
    Command {
        name: "bad-desc",
        run: badinput::desc,
    },
];

/// Runs the command named on the command line (none: idle until the VMM stops the VM), then
/// powers off.
pub fn run(env: &Env) -> ! {
    let cmdline = env.cmdline();
    let name = cmdline
        .get("outboard.run")
        .or_else(|| cmdline.has("outboard.poweroff").then_some("poweroff"));
    match name {
        None => basic::idle(),
        Some(name) => match COMMANDS.iter().find(|c| c.name == name) {
            Some(command) => (command.run)(env),
            None => println!("OUTBOARD_GUEST_ERROR unknown command {name}"),
        },
    }
    power::poweroff()
}
