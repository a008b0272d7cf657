//! A real Linux kernel on outboard-vmm's platform: the tiny kernel of `cargo xtask guest
//! --tiny-kernel` (one PVM's emulator can run, kernel space only) boots with 2 vCPUs and no root
//! file system. Its log shows whether Linux accepts our ACPI tables, brings up the second CPU and
//! uses the serial console; it then panics for want of a root fs, `panic=-1` reboots it, and
//! outboard-vmm exits 0 on the reset.

mod common;

use std::time::Duration;

use common::vmm;
use outboard_guest_harness::{guest_dir, kvm_available, GuestCommand, GuestVm};

/// `noxsave` and `clearcpuid` keep the kernel off what PVM's emulator cannot run (xsave, cx16,
/// movbe, popcnt, rdrand, fsgsbase, rdseed, smap, rdpid). `noxsave` is needed although our CPUID
/// hides XSAVE on PVM: the kernel still enumerates it there. `panic=-1` turns the no-root-fs
/// panic into a reboot.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial noxsave \
                       clearcpuid=141,150,151,158,288,306,308,534 panic=-1";
/// Ring-0 code runs instruction by instruction in PVM's emulator, on a shared 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn wait(vm: &GuestVm, pattern: &str) -> String {
    vm.wait_for_line(pattern, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", vm.stderr()))
}

#[test]
#[ignore = "slow: boots the tiny kernel (~1 min under PVM); run with cargo xtask test --slow"]
fn tiny_kernel_finds_our_acpi_tables_and_two_cpus_then_reboots_on_panic() {
    let test = "tiny_kernel_finds_our_acpi_tables_and_two_cpus_then_reboots_on_panic";
    if !kvm_available(test) {
        return;
    }
    let image = guest_dir().join("tiny-vmlinux");
    assert!(
        image.is_file(),
        "Tiny kernel {} is missing: run `cargo xtask guest --tiny-kernel` first",
        image.display()
    );
    let vm = GuestCommand::new(vmm())
        .kernel(&image)
        .cmdline(CMDLINE)
        .cpus(2)
        .memory_mib(256)
        .spawn()
        .expect("spawn outboard-vmm");

    for table in ["ACPI: RSDP", "ACPI: FACP", "ACPI: APIC", "ACPI: DSDT"] {
        wait(&vm, table);
    }
    wait(&vm, "console [ttyS0] enabled");
    let smp = wait(&vm, "smp: Brought up");
    assert!(smp.contains("2 CPUs"), "only {smp:?}");
    wait(&vm, "VFS: Unable to mount root fs");
    // A complaint from Linux's ACPI core about our tables fails the test.
    let complaints: Vec<String> = vm
        .lines()
        .into_iter()
        .filter(|l| {
            [
                "ACPI BIOS Error",
                "ACPI Error",
                "ACPI Warning",
                "[Firmware Bug]: ACPI",
            ]
            .iter()
            .any(|c| l.contains(c))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "Linux complains about our ACPI tables:\n{}",
        complaints.join("\n")
    );
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}: no reboot after the panic\nstderr:\n{}", vm.stderr()));
    assert_eq!(
        status.code(),
        Some(0),
        "outboard-vmm did not exit 0 on the guest's reset\nstderr:\n{}",
        vm.stderr()
    );
    common::assert_no_panic(&vm);
}
