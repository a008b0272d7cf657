//! outboard-vmm on a terminal (a pty from util-linux `script`): the console is raw while the VM
//! runs, and SIGTERM still ends the VMM promptly, with the input thread blocked reading the tty.

mod common;

use std::path::PathBuf;

use common::{exit_code, TIMEOUT};
use outboard_guest_harness::{kvm_available, GuestCommand, Runner};

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn sigterm_on_a_terminal_exits_and_restores_it() {
    if !kvm_available("sigterm_on_a_terminal_exits_and_restores_it") {
        return;
    }
    let script = PathBuf::from("/usr/bin/script");
    if !script.is_file() {
        eprintln!(
            "SKIP: sigterm_on_a_terminal_exits_and_restores_it: util-linux script is missing"
        );
        return;
    }
    let guest = outboard_guest_harness::testguest_path();
    outboard_guest_harness::require_guest_image(&guest);
    // `stty -a` after the VMM exits shows whether canonical mode and echo came back.
    let inner = format!(
        "{} --kernel {} --cmdline outboard.run=heartbeat; echo VMM_EXIT=$?; stty -a",
        env!("CARGO_BIN_EXE_outboard-vmm"),
        guest.display()
    );
    let vm = GuestCommand::new(Runner::Command(script))
        .args(["-qfec", &inner, "/dev/null"])
        .spawn()
        .unwrap();
    vm.wait_for_line("OUTBOARD_HEARTBEAT seq=2 ", TIMEOUT)
        .unwrap();
    let vmm = children(vm.pid())
        .into_iter()
        .flat_map(|shell| children(shell).into_iter().chain([shell]))
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.ends_with("outboard-vmm"))
        })
        .expect("outboard-vmm runs under script");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &vmm.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    vm.wait_for_line("VMM_EXIT=0", TIMEOUT).unwrap();
    let stty = vm.wait_for_line(" icanon", TIMEOUT).unwrap();
    assert!(!stty.contains("-icanon"), "terminal left raw: {stty}");
    assert_eq!(exit_code(&vm), 0);
}
