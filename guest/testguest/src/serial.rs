//! COM1 (8250 UART at 0x3f8), polled: the guest's only output. Lines end in CR LF, as Linux's
//! serial console writes them. Each byte costs two port accesses (LSR poll, THR write), each a
//! VM exit, so output is kept short.

use crate::arch::{inb, outb};
use crate::sync::SpinLock;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const LCR: u16 = COM1 + 3;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LCR_8N1: u8 = 0x03;
/// Polls of LSR before writing anyway; after one such timeout the UART counts as stuck and is no
/// longer polled (each poll is a VM exit: a stuck UART must not make output crawl or hang).
const LSR_POLLS: u32 = 10_000;
/// Attempts to take the console lock before printing unserialized (fatal paths).
const LOCK_SPINS: u64 = 10_000_000;

static CONSOLE: SpinLock = SpinLock::new();
static STUCK: AtomicBool = AtomicBool::new(false);

/// Puts the UART in a known state: 8N1, no interrupts. The baud rate is irrelevant to a VMM.
pub fn init() {
    outb(IER, 0);
    outb(LCR, LCR_8N1);
}

fn put_byte(b: u8) {
    if !STUCK.load(Ordering::Relaxed) && !(0..LSR_POLLS).any(|_| inb(LSR) & LSR_THR_EMPTY != 0) {
        STUCK.store(true, Ordering::Relaxed);
    }
    outb(THR, b);
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put_byte);
        Ok(())
    }
}

/// Prints one line (CR LF added) while holding the console lock, so lines of different CPUs
/// never interleave.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _guard = CONSOLE.lock_bounded(LOCK_SPINS);
    let _ = Uart.write_fmt(args);
    let _ = Uart.write_str("\r\n");
}

/// `println!` for the guest: one line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}
