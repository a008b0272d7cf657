//! The serial console's host side: where COM1's output goes (stdout or a file), stdin forwarded
//! to the guest, and the host terminal in raw mode while it is forwarded.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outboard_devices::serial::SerialDevice;
use vmm_sys_util::terminal::Terminal;

/// Errors of setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open serial output file {path}")]
    OpenOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start forwarding stdin to the console")]
    Spawn(#[source] std::io::Error),
}

/// Writes guest output to stdout unbuffered, so prompts without a newline show at once.
struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// The byte sink for COM1: the file at `path` (created, appended to), or stdout.
pub fn serial_output(path: Option<&Path>) -> Result<Box<dyn Write + Send>, Error> {
    match path {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::OpenOutput {
                    path: path.to_owned(),
                    source,
                })?;
            Ok(Box::new(file))
        }
        None => Ok(Box::new(StdoutSink)),
    }
}

/// A private handle on fd 0 for the input thread. Not `Stdin`: its lock would be held while the
/// thread waits in `read`, and restoring the terminal at exit takes that lock.
fn stdin_file() -> std::io::Result<File> {
    Ok(File::from(std::io::stdin().as_fd().try_clone_to_owned()?))
}

/// Puts the host terminal in raw mode while alive (only if stdin is a terminal).
#[derive(Debug)]
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let active = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
        RawTerminal { active }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Forwards stdin to the guest's UART until stdin ends. The FIFO is small: when it is full the
/// thread waits for the guest to drain it.
pub fn forward_stdin(serial: Arc<SerialDevice>) -> Result<(), Error> {
    let mut stdin = stdin_file().map_err(Error::Spawn)?;
    std::thread::Builder::new()
        .name("console-in".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial.enqueue_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(Error::Spawn)
}
