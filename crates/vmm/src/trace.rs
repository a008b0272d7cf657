//! Boot-time tracing for the boot benchmarks: with `OUTBOARD_VMM_TRACE_BOOT=1`, vCPU 0 prints
//! `outboard-vmm: first KVM_RUN after <µs> us` (measured from [`mark_process_start`]) to stderr,
//! and an attested launch its phase-1 steps the same way.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Records the process start; call first thing in `main`.
pub fn mark_process_start() {
    START.get_or_init(Instant::now);
}

/// Whether boot tracing is on (`OUTBOARD_VMM_TRACE_BOOT=1`): the debug console port then
/// forwards to stderr, where the boot benchmark timestamps the guest's entry mark.
pub fn enabled() -> bool {
    std::env::var_os("OUTBOARD_VMM_TRACE_BOOT").is_some_and(|v| v == "1")
}

/// Called by vCPU 0 just before its first `KVM_RUN`.
pub fn first_kvm_run() {
    mark("first KVM_RUN");
}

/// Prints `outboard-vmm: <what> after <µs> us` when tracing (phase-1 steps, first `KVM_RUN`).
pub fn mark(what: &str) {
    if enabled() {
        let start = START.get_or_init(Instant::now);
        crate::status_line!(
            "outboard-vmm: {what} after {} us",
            start.elapsed().as_micros()
        );
    }
}

/// Writes one line to stderr with a single `write`, so that lines from two VMM processes sharing
/// stderr (the old and the new VMM during a live update) never interleave mid-line, as the
/// piecewise writes of `eprintln!` can.
pub fn write_line(line: &str) {
    use std::io::Write;
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

/// `eprintln!` with [`write_line`]'s one-write guarantee.
#[macro_export]
macro_rules! status_line {
    ($($arg:tt)*) => {
        $crate::trace::write_line(&format!($($arg)*))
    };
}
