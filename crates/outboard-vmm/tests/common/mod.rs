//! Shared helpers of the outboard-vmm integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use outboard_guest_harness::{ApiClient, GuestCommand, GuestVm, Runner};

/// Generous: guest ring-0 code runs in PVM's emulator here.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn vmm() -> Runner {
    Runner::OutboardVmm(PathBuf::from(env!("CARGO_BIN_EXE_outboard-vmm")))
}

/// The outboard-card binary (next to outboard-vmm's, both built by `cargo test --workspace`,
/// or named by `OUTBOARD_CARD`); None, after a `SKIP:` line, where it is missing.
pub fn card_binary(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("OUTBOARD_CARD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_BIN_EXE_outboard-vmm")).with_file_name("outboard-card")
        });
    if path.exists() {
        return Some(path);
    }
    eprintln!(
        "SKIP: {test}: no outboard-card binary at {} (cargo build -p outboard-card, or set \
         OUTBOARD_CARD)",
        path.display()
    );
    None
}

/// An empty per-test scratch directory (`temp_path(test, ".d")`, emptied if a run left it).
pub fn fresh_dir(test: &str) -> PathBuf {
    let dir = temp_path(test, ".d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A per-test path in the temp directory.
pub fn temp_path(test: &str, suffix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("obvmm-{}-{test}{suffix}", std::process::id()))
}

/// The test guest under outboard-vmm running `command` (or idling when `None`).
pub fn testguest(command: Option<&str>) -> GuestCommand {
    let cmd = GuestCommand::testguest(vmm());
    match command {
        Some(c) => cmd.run_command(c),
        None => cmd,
    }
}

/// Starts `cmd` with an API socket; returns the VM and a ready client.
pub fn with_api(cmd: GuestCommand, test: &str) -> (GuestVm, ApiClient) {
    let sock = temp_path(test, ".sock");
    let vm = cmd.api_socket(&sock).spawn().expect("spawn outboard-vmm");
    let api = ApiClient::new(&sock);
    api.wait_ready(TIMEOUT).expect("API socket comes up");
    (vm, api)
}

/// Exit code of a VM that must exit within [`TIMEOUT`].
pub fn exit_code(vm: &GuestVm) -> i32 {
    let status = vm.wait_exit(TIMEOUT).expect("outboard-vmm exits");
    status
        .code()
        .expect("outboard-vmm exited by itself, not by a signal")
}

/// Asserts an HTTP error status and a JSON `fault_message` containing `needle`.
pub fn assert_fault(response: (u16, String), status: u16, needle: &str) {
    let (code, body) = response;
    assert_eq!(code, status, "body: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("error body is JSON");
    let message = json["fault_message"]
        .as_str()
        .expect("fault_message is a string");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

/// The VMM did not crash: no Rust panic on stderr.
pub fn assert_no_panic(vm: &GuestVm) {
    let stderr = vm.stderr();
    assert!(
        !stderr.contains("panicked"),
        "outboard-vmm panicked:\n{stderr}"
    );
}
