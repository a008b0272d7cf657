//! The VMM's log sink: `log` records from every crate (device warnings such as a virtio device
//! entering NEEDS_RESET or a vhost-user backend reconnecting) go to stderr as
//! `outboard-vmm: <level> <target>: <message>`.
//!
//! A guest can provoke warnings at will (bad queue addresses, a flapping backend), so output is
//! rate-limited: at most [`BURST`] records per second; the rest are counted and the count is
//! reported with the next record that gets through. `OUTBOARD_VMM_LOG=error|warn|info|debug`
//! sets the level (default `warn`).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Records written per one-second window.
const BURST: u32 = 20;

struct Window {
    start: Instant,
    written: u32,
    dropped: u64,
}

struct StderrLogger {
    level: log::LevelFilter,
    window: Mutex<Window>,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.written = 0;
        }
        if w.written >= BURST {
            w.dropped += 1;
            return;
        }
        w.written += 1;
        let dropped = std::mem::take(&mut w.dropped);
        let mut err = std::io::stderr().lock();
        if dropped > 0 {
            let _ = writeln!(
                err,
                "outboard-vmm: {dropped} log records dropped (rate limit)"
            );
        }
        let _ = writeln!(
            err,
            "outboard-vmm: {} {}: {}",
            record.level().as_str().to_ascii_lowercase(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger; the level comes from `OUTBOARD_VMM_LOG`.
pub fn init() {
    let level = match std::env::var("OUTBOARD_VMM_LOG").as_deref() {
        Ok("off") => log::LevelFilter::Off,
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Warn,
    };
    let logger = StderrLogger {
        level,
        window: Mutex::new(Window {
            start: Instant::now(),
            written: 0,
            dropped: 0,
        }),
    };
    // One logger for the life of the process, so leaking it is the static it must be.
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}
