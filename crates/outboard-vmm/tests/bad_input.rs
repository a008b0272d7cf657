//! Bad command lines and files: a clear error and exit status 1, never a panic or a hang.

mod common;

use std::io::Write;

use common::{exit_code, temp_path, vmm};
use outboard_guest_harness::{kvm_available, GuestCommand, GuestVm};

fn run_expecting_error(cmd: GuestCommand, needle: &str) -> GuestVm {
    let vm = cmd.spawn().unwrap();
    assert_eq!(exit_code(&vm), 1, "stderr:\n{}", vm.stderr());
    let stderr = vm.stderr();
    assert!(stderr.contains("Error: "), "stderr:\n{stderr}");
    assert!(
        stderr.contains(needle),
        "stderr lacks {needle:?}:\n{stderr}"
    );
    common::assert_no_panic(&vm);
    vm
}

fn file_with(test: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = temp_path(test, ".bin");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

#[test]
fn missing_kernel() {
    if !kvm_available("missing_kernel") {
        return;
    }
    run_expecting_error(
        GuestCommand::new(vmm()).kernel("/nonexistent/outboard/vmlinux"),
        "Cannot open kernel /nonexistent/outboard/vmlinux",
    );
}

#[test]
fn truncated_kernel() {
    if !kvm_available("truncated_kernel") {
        return;
    }
    let guest = outboard_guest_harness::testguest_path();
    outboard_guest_harness::require_guest_image(&guest);
    let bytes = std::fs::read(&guest).unwrap();
    let path = file_with("truncated", &bytes[..bytes.len().min(200)]);
    run_expecting_error(GuestCommand::new(vmm()).kernel(&path), "Cannot load kernel");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn file_that_is_not_a_kernel() {
    if !kvm_available("file_that_is_not_a_kernel") {
        return;
    }
    let path = file_with("text", b"#!/bin/sh\necho this is not a kernel\n");
    run_expecting_error(
        GuestCommand::new(vmm()).kernel(&path),
        "is neither an ELF kernel nor a bzImage",
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn zero_vcpus() {
    // Rejected while parsing the command line: no KVM needed.
    run_expecting_error(common::testguest(None).cpus(0), "--cpus must be at least 1");
}

#[test]
fn more_vcpus_than_kvm_allows() {
    if !kvm_available("more_vcpus_than_kvm_allows") {
        return;
    }
    run_expecting_error(common::testguest(None).cpus(100_000), "exceeds the maximum");
}

#[test]
fn memory_the_host_cannot_give() {
    if !kvm_available("memory_the_host_cannot_give") {
        return;
    }
    run_expecting_error(
        common::testguest(None).memory_mib(64 << 20),
        "exceeds what the host can give",
    );
}

#[test]
fn malformed_memory_size() {
    run_expecting_error(
        common::testguest(None).args(["--memory", "lots"]),
        "Invalid --memory",
    );
}

#[test]
fn kernel_command_line_too_long() {
    if !kvm_available("kernel_command_line_too_long") {
        return;
    }
    let long = format!("outboard.pad={}", "x".repeat(4096));
    run_expecting_error(
        common::testguest(None).cmdline(&long),
        "Kernel command line is",
    );
}
