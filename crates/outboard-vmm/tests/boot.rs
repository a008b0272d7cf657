//! The test guest under outboard-vmm: topology and memory it sees, and how its end maps to the
//! VMM's exit status.

mod common;

use common::{exit_code, testguest, TIMEOUT};
use outboard_guest_harness::{kvm_available, ReadyMarker};

/// RAM the e820 map reports: 639 KiB below the EBDA (0x9fc00) plus everything from 1 MiB up.
const MEM_KIB_128M: u64 = 639 + 127 * 1024;
const MEM_KIB_1G: u64 = 639 + 1023 * 1024;

fn boot_and_check(test: &str, cpus: u32, mib: u64, mem_kib: u64) {
    if !kvm_available(test) {
        return;
    }
    let vm = testguest(Some("poweroff"))
        .cpus(cpus)
        .memory_mib(mib)
        .spawn()
        .unwrap();
    let ready =
        ReadyMarker::parse(&vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap()).unwrap();
    assert_eq!(ready.cpus, cpus);
    assert_eq!(ready.mem_kib, mem_kib);
    assert_eq!(
        exit_code(&vm),
        0,
        "power-off exits 0; stderr:\n{}",
        vm.stderr()
    );
    assert!(vm.stderr().contains("guest powered off"));
}

#[test]
fn one_vcpu_128_mib() {
    boot_and_check("one_vcpu_128_mib", 1, 128, MEM_KIB_128M);
}

#[test]
fn two_vcpus_128_mib() {
    boot_and_check("two_vcpus_128_mib", 2, 128, MEM_KIB_128M);
}

#[test]
fn one_vcpu_1_gib() {
    boot_and_check("one_vcpu_1_gib", 1, 1024, MEM_KIB_1G);
}

#[test]
fn two_vcpus_1_gib() {
    boot_and_check("two_vcpus_1_gib", 2, 1024, MEM_KIB_1G);
}

#[test]
fn announces_a_pvm_host() {
    if !kvm_available("announces_a_pvm_host") {
        return;
    }
    let vm = testguest(Some("poweroff")).spawn().unwrap();
    assert_eq!(exit_code(&vm), 0);
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(
        vm.stderr().contains("host KVM is PVM"),
        pvm,
        "stderr:\n{}",
        vm.stderr()
    );
}

#[test]
fn guest_reset_exits_zero() {
    if !kvm_available("guest_reset_exits_zero") {
        return;
    }
    let vm = testguest(Some("reset")).spawn().unwrap();
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert!(vm.stderr().contains("guest reset"));
}

#[test]
fn reboot_restart_boots_again() {
    if !kvm_available("reboot_restart_boots_again") {
        return;
    }
    let vm = testguest(Some("reset"))
        .args(["--reboot", "restart"])
        .spawn()
        .unwrap();
    let first =
        ReadyMarker::parse(&vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap()).unwrap();
    let second =
        ReadyMarker::parse(&vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap()).unwrap();
    assert_eq!(first.mem_kib, second.mem_kib);
    assert!(vm.stderr().contains("restarting the VM"));
    vm.kill();
}

#[test]
fn internal_error_is_reported_with_rip() {
    if !kvm_available("internal_error_is_reported_with_rip") {
        return;
    }
    let vm = testguest(Some("crash")).spawn().unwrap();
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    let code = exit_code(&vm);
    let stderr = vm.stderr();
    assert_ne!(code, 0, "stderr:\n{stderr}");
    // PVM's emulator stops at the crash command's instruction (KVM internal error); hardware
    // KVM runs it and the guest then triple-faults. Either way the message names the exit.
    let internal = stderr.contains("Error: vCPU 0: KVM internal error (suberror");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert!(
        internal || (!pvm && stderr.contains("Error: vCPU 0: triple fault")),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("at RIP 0x"), "stderr:\n{stderr}");
    common::assert_no_panic(&vm);
}

#[test]
fn triple_fault_is_reported_with_rip() {
    if !kvm_available("triple_fault_is_reported_with_rip") {
        return;
    }
    let vm = testguest(Some("triple-fault")).spawn().unwrap();
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    assert_eq!(exit_code(&vm), 2, "stderr:\n{}", vm.stderr());
    let stderr = vm.stderr();
    assert!(
        stderr.contains("Error: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn sigterm_stops_cleanly() {
    if !kvm_available("sigterm_stops_cleanly") {
        return;
    }
    let vm = testguest(None).spawn().unwrap();
    vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &vm.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    assert!(vm.stderr().contains("stopped by signal"));
}

#[test]
fn serial_to_a_file() {
    if !kvm_available("serial_to_a_file") {
        return;
    }
    let log = common::temp_path("serial_to_a_file", ".log");
    let _ = std::fs::remove_file(&log);
    // The harness passes `--serial stdout`; a later `--serial` wins.
    let vm = testguest(Some("poweroff"))
        .arg("--serial")
        .arg(&log)
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("OUTBOARD_GUEST_READY"), "{console}");
    assert!(vm
        .lines()
        .iter()
        .all(|l| !l.contains("OUTBOARD_GUEST_READY")));
    std::fs::remove_file(log).unwrap();
}

#[test]
fn application_processors_start_with_init_sipi() {
    if !kvm_available("application_processors_start_with_init_sipi") {
        return;
    }
    let vm = testguest(Some("smp")).cpus(2).spawn().unwrap();
    vm.wait_for_line("OUTBOARD_AP_ONLINE apic_id=1", TIMEOUT)
        .unwrap();
    vm.wait_for_line("OUTBOARD_SMP_OK online=2", TIMEOUT)
        .unwrap();
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
}
