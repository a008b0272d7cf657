//! The Debian Linux guest (bzImage + initramfs from `cargo xtask guest`) under outboard-vmm.
//! A stock kernel needs hardware virtualization: on a PVM host only the loading is checked.

mod common;

use std::time::{Duration, Instant};

use common::{exit_code, vmm, TIMEOUT};
use outboard_guest_harness::{hardware_virtualization, kvm_available, GuestCommand, ReadyMarker};

#[test]
fn linux_guest_boots_with_two_vcpus() {
    if !kvm_available("linux_guest_boots_with_two_vcpus")
        || !hardware_virtualization("linux_guest_boots_with_two_vcpus")
    {
        return;
    }
    let vm = GuestCommand::linux(vmm())
        .cmdline("outboard.poweroff")
        .cpus(2)
        .spawn()
        .unwrap();
    let ready =
        ReadyMarker::parse(&vm.wait_for_line("OUTBOARD_GUEST_READY", TIMEOUT).unwrap()).unwrap();
    assert_eq!(ready.cpus, 2);
    assert_eq!(exit_code(&vm), 0, "stderr:\n{}", vm.stderr());
}

#[test]
fn linux_bzimage_and_initramfs_load_and_run() {
    if !kvm_available("linux_bzimage_and_initramfs_load_and_run") {
        return;
    }
    // Reaching the first KVM_RUN means the bzImage, the initramfs, the command line, the zero
    // page and the ACPI tables were all accepted; what the kernel does next depends on the host.
    let vm = GuestCommand::linux(vmm())
        .cmdline("outboard.poweroff")
        .env("OUTBOARD_VMM_TRACE_BOOT", "1")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !vm.stderr().contains("first KVM_RUN after") {
        assert!(
            Instant::now() < deadline,
            "no KVM_RUN; stderr:\n{}",
            vm.stderr()
        );
        assert!(
            vm.wait_exit(Duration::from_millis(20)).is_err(),
            "outboard-vmm exited before running the guest; stderr:\n{}",
            vm.stderr()
        );
    }
    vm.kill();
    common::assert_no_panic(&vm);
}
