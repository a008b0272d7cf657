//! outboard-guest-harness: what tests across the repo use to boot a guest and check what it
//! prints. It owns the guest image paths, the host capability checks that decide whether a test
//! can run, the VM builder and runner ([`GuestCommand`], [`GuestVm`]), helper processes such as
//! vhost-user backends ([`Daemon`]), the serial marker parsers ([`marker`]) and a small client
//! for REST APIs on Unix sockets ([`ApiClient`]). Nothing here waits without a timeout, and
//! every process it starts is killed when its handle drops.
//!
//! ```no_run
//! use outboard_guest_harness::{GuestCommand, Runner};
//! use std::time::Duration;
//!
//! let vm = GuestCommand::linux(Runner::QemuTcg).cpus(2).run_command("hello").spawn().unwrap();
//! let ready = vm.wait_for_ready(Duration::from_secs(60)).unwrap();
//! assert_eq!(ready.cpus, 2);
//! assert_eq!(vm.wait_for_run_done(Duration::from_secs(60)).unwrap().status, 0);
//! assert!(vm.wait_exit(Duration::from_secs(30)).unwrap().success());
//! ```
//!
//! Guest images are built by `cargo xtask guest` into `target/guest/` of the workspace
//! (whatever `CARGO_TARGET_DIR` is): `testguest`, `vmlinuz`, `initramfs.img`.
//!
//! The Linux guest's kernel command line: `console=ttyS0` (serial 8250 is built in), plus
//! `outboard.poweroff` (power off after the ready marker) or `outboard.run=<script>` (run
//! `/outboard/scripts/<script>.sh`, then power off); script parameters are further
//! `name=value` words, e.g. `outboard.fio.size=32M`.

pub mod api;
pub mod marker;
mod output;
mod vm;

pub use api::ApiClient;
pub use marker::{ReadyMarker, RunDone};
pub use vm::{wait_for_path, Daemon, Error, GuestCommand, GuestVm, Runner};

use std::path::{Path, PathBuf};

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the harness lives in crates/guest-harness")
        .to_path_buf()
}

/// `target/guest` of the workspace, where `cargo xtask guest` writes the images.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target/guest")
}

pub fn testguest_path() -> PathBuf {
    guest_dir().join("testguest")
}

pub fn linux_kernel_path() -> PathBuf {
    guest_dir().join("vmlinuz")
}

pub fn linux_initrd_path() -> PathBuf {
    guest_dir().join("initramfs.img")
}

/// Panics (failing the test, not skipping it) when a guest image was not built.
pub fn require_guest_image(path: &Path) {
    assert!(
        path.is_file(),
        "Guest image {} is missing: run `cargo xtask guest` first",
        path.display()
    );
}

/// Whether /dev/kvm can be opened read-write; prints `SKIP: <test>: ...` where it can't.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIP: {test}: /dev/kvm is missing or not accessible");
    }
    ok
}

/// Whether the CPU has vmx or svm, i.e. KVM can run a stock guest kernel; prints
/// `SKIP: <test>: ...` where it can't (as on PVM hosts, whose /dev/kvm runs only PVM-aware
/// kernels and our test guest).
pub fn hardware_virtualization(test: &str) -> bool {
    let ok = cpu_flags().iter().any(|f| f == "vmx" || f == "svm");
    if !ok {
        eprintln!("SKIP: {test}: no vmx/svm on this host (PVM cannot run a stock kernel)");
    }
    ok
}

fn cpu_flags() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_the_workspace_target() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(linux_kernel_path().ends_with("target/guest/vmlinuz"));
        assert!(linux_initrd_path().ends_with("target/guest/initramfs.img"));
        assert!(testguest_path().ends_with("target/guest/testguest"));
    }

    #[test]
    #[should_panic(expected = "run `cargo xtask guest` first")]
    fn a_missing_image_fails_with_the_command_to_build_it() {
        require_guest_image(Path::new("/nonexistent/vmlinuz"));
    }
}
