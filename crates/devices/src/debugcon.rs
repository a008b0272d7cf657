//! The debug console port (0x402, as QEMU's isa-debugcon): a one-byte port a guest writes
//! characters to with a single `out`, long before it has set up a UART. The boot benchmark uses it
//! to timestamp the guest kernel's first instruction under outboard-vmm and QEMU alike.
//!
//! Bytes go to the sink only when the VMM asks for it (boot tracing); otherwise they are counted
//! and dropped, so a chatty guest cannot fill the VMM's stderr.

use std::io::Write;
use std::sync::Mutex;

use crate::{BusDevice, Counter, Lifecycle};

/// What a read of the port returns: QEMU's read-back value, so guests can detect the port.
pub const READBACK: u8 = 0xe9;

/// The debug console.
pub struct DebugConsole {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
    bytes: Counter,
}

impl std::fmt::Debug for DebugConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugConsole")
            .field("forwarding", &self.sink.is_some())
            .field("bytes", &self.bytes.get())
            .finish()
    }
}

impl DebugConsole {
    /// A console forwarding to `sink`, or dropping bytes when `sink` is `None`.
    pub fn new(sink: Option<Box<dyn Write + Send>>) -> Self {
        Self {
            sink: sink.map(Mutex::new),
            bytes: Counter::default(),
        }
    }
}

impl BusDevice for DebugConsole {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(READBACK);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        self.bytes.add(data.len() as u64);
        if let Some(sink) = &self.sink {
            let mut sink = sink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Unbuffered on purpose: the benchmark timestamps each byte's arrival.
            let _ = sink.write_all(data);
            let _ = sink.flush();
        }
    }
}

impl Lifecycle for DebugConsole {
    fn name(&self) -> &'static str {
        "debugcon"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes", self.bytes.get())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::Shared;

    #[test]
    fn forwards_when_asked_and_counts_always() {
        let out = Shared::default();
        let con = DebugConsole::new(Some(Box::new(out.clone())));
        con.write(0, b"OUTBOARD_ENTRY\n");
        assert_eq!(&*out.0.lock().unwrap(), b"OUTBOARD_ENTRY\n");
        let silent = DebugConsole::new(None);
        silent.write(0, b"xyz");
        assert_eq!(silent.counters(), vec![("bytes", 3)]);
        let mut b = [0u8; 1];
        silent.read(0, &mut b);
        assert_eq!(b[0], READBACK);
    }
}
