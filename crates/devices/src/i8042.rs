//! The i8042 keyboard controller, as far as a guest uses it without a keyboard: the controller
//! commands a kernel's probe sends (read/write the command byte, self-test, interface test,
//! enable/disable ports) answer as a real controller with nothing plugged in would, and command
//! 0xFE (pulse the reset line) signals the reset event.
//!
//! Answering the probe matters: a controller that never sets "output buffer full" makes Linux
//! wait for the command byte until it times out (seconds of boot) and then fail the probe.
//!
//! Placed at port 0x60 with length 5, so offset 0 is the data port and offset 4 the
//! command/status port.
//!
//! ```text
//!   command 0x20 ──► output buffer = command byte ──read data──► empty
//!   command 0x60 ──► next data write sets the command byte
//!   command 0xAA ──► output buffer = 0x55 (self-test passed)
//!   command 0xAB/0xA9 ──► output buffer = 0x00 (interface test passed)
//!   command 0xFE ──► reset event
//! ```

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Counter, Lifecycle};

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OBF: u8 = 0x01;
/// "System flag": set once the self-test has passed, as after a BIOS POST.
const STATUS_SYS: u8 = 0x04;
/// Last write was a command (not data).
const STATUS_CMD: u8 = 0x08;

const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
/// Power-on command byte: keyboard translation on, both ports disabled, no interrupts.
const CTR_POWER_ON: u8 = 0x40 | STATUS_SYS | CTR_KBD_DISABLED | CTR_AUX_DISABLED;

#[derive(Debug, Clone, Copy)]
struct Regs {
    ctr: u8,
    output: Option<u8>,
    /// The last command was 0x60: the next data byte is the new command byte.
    expecting_ctr: bool,
    last_was_command: bool,
}

impl Regs {
    const POWER_ON: Regs = Regs {
        ctr: CTR_POWER_ON,
        output: None,
        expecting_ctr: false,
        last_was_command: false,
    };
}

/// The keyboard-less i8042.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    regs: Mutex<Regs>,
    resets: Counter,
    commands: Counter,
}

impl I8042 {
    /// `reset_evt` is signalled when the guest asks for a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            regs: Mutex::new(Regs::POWER_ON),
            resets: Counter::default(),
            commands: Counter::default(),
        }
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, Regs> {
        self.regs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn command(&self, cmd: u8) {
        self.commands.inc();
        let mut r = self.regs();
        r.last_was_command = true;
        r.expecting_ctr = false;
        match cmd {
            CMD_READ_CTR => r.output = Some(r.ctr),
            CMD_WRITE_CTR => r.expecting_ctr = true,
            CMD_SELF_TEST => r.output = Some(0x55),
            CMD_TEST_KBD | CMD_TEST_AUX => r.output = Some(0x00),
            CMD_DISABLE_KBD => r.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => r.ctr &= !CTR_KBD_DISABLED,
            CMD_DISABLE_AUX => r.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => r.ctr &= !CTR_AUX_DISABLED,
            CMD_RESET_CPU => {
                drop(r);
                self.resets.inc();
                // A full eventfd counter (impossible in practice) would only merge resets.
                let _ = self.reset_evt.write(1);
            }
            // Other commands (output port, keyboard device commands) have nothing to act on.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        let mut r = self.regs();
        data[0] = match offset {
            DATA_OFFSET => r.output.take().unwrap_or(0),
            COMMAND_OFFSET => {
                let obf = if r.output.is_some() { STATUS_OBF } else { 0 };
                let cmd = if r.last_was_command { STATUS_CMD } else { 0 };
                obf | STATUS_SYS | cmd
            }
            _ => 0xff,
        };
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            COMMAND_OFFSET => self.command(data[0]),
            DATA_OFFSET => {
                let mut r = self.regs();
                r.last_was_command = false;
                if std::mem::take(&mut r.expecting_ctr) {
                    r.ctr = data[0];
                }
                // Bytes for a keyboard that is not there are dropped, as with an empty port.
            }
            _ => {}
        }
    }
}

impl Lifecycle for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn reset(&self) {
        *self.regs() = Regs::POWER_ON;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("resets", self.resets.get()),
            ("commands", self.commands.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &I8042, offset: u64) -> u8 {
        let mut b = [0xa5u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(evt.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_KBD]);
        assert!(evt.read().is_err(), "no reset for other commands");
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        assert!(evt.read().is_err(), "0xfe on the data port is not a reset");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(dev.counters(), vec![("resets", 1), ("commands", 2)]);
        assert_eq!(
            read(&dev, COMMAND_OFFSET) & STATUS_OBF,
            0,
            "nothing to read"
        );
    }

    #[test]
    fn linux_probe_sequence_gets_answers() {
        let dev = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        // Read the command byte: output buffer full, then the byte, then empty again.
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&dev, COMMAND_OFFSET) & STATUS_OBF, 0);
        assert_eq!(read(&dev, DATA_OFFSET), CTR_POWER_ON);
        assert_eq!(read(&dev, COMMAND_OFFSET) & STATUS_OBF, 0);
        // Write it back changed, then read it again.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&dev, DATA_OFFSET), 0x47);
        // A data byte without a preceding 0x60 does not change it.
        dev.write(DATA_OFFSET, &[0x00]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&dev, DATA_OFFSET), 0x47);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&dev, DATA_OFFSET), 0x55);
        dev.write(COMMAND_OFFSET, &[CMD_TEST_KBD]);
        assert_eq!(read(&dev, DATA_OFFSET), 0x00);
        dev.write(COMMAND_OFFSET, &[CMD_ENABLE_KBD]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&dev, DATA_OFFSET) & CTR_KBD_DISABLED, 0);
        dev.reset();
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&dev, DATA_OFFSET), CTR_POWER_ON);
    }

    #[test]
    fn wide_or_stray_accesses_are_harmless() {
        let dev = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut wide = [0u8; 4];
        dev.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        dev.write(2, &[CMD_RESET_CPU]);
        assert_eq!(dev.counters(), vec![("resets", 0), ("commands", 0)]);
        assert_eq!(read(&dev, 2), 0xff);
    }
}
