//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine: command
//! 0xFE (pulse the reset line) on the command port signals the reset event. There is no keyboard:
//! the status register reports empty buffers and the data port reads 0.
//!
//! Placed at port 0x60 with length 5, so offset 0 is the data port and offset 4 the command port.

use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Counter, Lifecycle};

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only i8042.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    resets: Counter,
    commands: Counter,
}

impl I8042 {
    /// `reset_evt` is signalled when the guest asks for a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            resets: Counter::default(),
            commands: Counter::default(),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            // Status: output buffer empty, input buffer empty. Data: nothing to give.
            DATA_OFFSET | COMMAND_OFFSET => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != COMMAND_OFFSET || data.len() != 1 {
            return;
        }
        self.commands.inc();
        if data[0] == CMD_RESET_CPU {
            self.resets.inc();
            // A full eventfd counter (impossible in practice) would only merge resets.
            let _ = self.reset_evt.write(1);
        }
    }
}

impl Lifecycle for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
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

    #[test]
    fn reset_command_signals_the_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(evt.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(evt.read().is_err(), "no reset for other commands");
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        assert!(evt.read().is_err(), "0xfe on the data port is not a reset");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(dev.counters(), vec![("resets", 1), ("commands", 2)]);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
