//! The 8250/16550 UART on COM1 (vm-superio's register model), raising its ISA IRQ through an
//! eventfd that KVM injects (irqfd), writing to any byte sink and fed from the host by
//! [`SerialDevice::enqueue_input`].

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Counter, Error, Lifecycle};

/// Raises the UART's interrupt by signalling an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// UART event counters.
#[derive(Debug, Default)]
pub struct SerialCounters {
    pub bytes_out: Counter,
    pub bytes_lost: Counter,
    pub bytes_in: Counter,
    pub reads: Counter,
    pub writes: Counter,
    pub interrupt_errors: Counter,
}

impl SerialEvents for SerialCounters {
    fn buffer_read(&self) {
        self.bytes_in.inc();
    }

    fn out_byte(&self) {
        self.bytes_out.inc();
    }

    fn tx_lost_byte(&self) {
        self.bytes_lost.inc();
    }

    fn in_buffer_empty(&self) {}
}

type Uart = Serial<IrqTrigger, Arc<SerialCounters>, Box<dyn Write + Send>>;

/// COM1.
pub struct SerialDevice {
    uart: Mutex<Uart>,
    counters: Arc<SerialCounters>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        SerialDevice {
            uart: Mutex::new(Serial::with_events(IrqTrigger(irq), counters.clone(), out)),
            counters,
        }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart();
        let room = uart.fifo_capacity();
        let take = room.min(bytes.len());
        if take == 0 {
            return 0;
        }
        match uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(_) => {
                self.counters.interrupt_errors.inc();
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart().fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.counters.reads.inc();
        match (u8::try_from(offset), data.len()) {
            (Ok(offset @ 0..=7), 1) => data[0] = self.uart().read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.counters.writes.inc();
        if let (Ok(offset @ 0..=7), [value]) = (u8::try_from(offset), data) {
            if self.uart().write(offset, *value).is_err() {
                self.counters.interrupt_errors.inc();
            }
        }
    }
}

fn state_to_json(s: &SerialState) -> serde_json::Value {
    serde_json::json!({
        "baud_divisor_low": s.baud_divisor_low,
        "baud_divisor_high": s.baud_divisor_high,
        "interrupt_enable": s.interrupt_enable,
        "interrupt_identification": s.interrupt_identification,
        "line_control": s.line_control,
        "line_status": s.line_status,
        "modem_control": s.modem_control,
        "modem_status": s.modem_status,
        "scratch": s.scratch,
        "in_buffer": s.in_buffer,
    })
}

fn state_from_json(v: &serde_json::Value) -> Result<SerialState, String> {
    let byte = |name: &str| -> Result<u8, String> {
        v.get(name)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| format!("field {name} missing or not a byte"))
    };
    let in_buffer = v
        .get("in_buffer")
        .and_then(serde_json::Value::as_array)
        .ok_or("field in_buffer missing")?
        .iter()
        .map(|b| b.as_u64().and_then(|n| u8::try_from(n).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or("in_buffer holds a non-byte")?;
    Ok(SerialState {
        baud_divisor_low: byte("baud_divisor_low")?,
        baud_divisor_high: byte("baud_divisor_high")?,
        interrupt_enable: byte("interrupt_enable")?,
        interrupt_identification: byte("interrupt_identification")?,
        line_control: byte("line_control")?,
        line_status: byte("line_status")?,
        modem_control: byte("modem_control")?,
        modem_status: byte("modem_status")?,
        scratch: byte("scratch")?,
        in_buffer,
    })
}

impl Lifecycle for SerialDevice {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn save(&self) -> Result<serde_json::Value, Error> {
        Ok(state_to_json(&self.uart().state()))
    }

    fn restore(&self, state: &serde_json::Value) -> Result<(), Error> {
        let state = state_from_json(state).map_err(|reason| Error::BadState {
            device: "serial",
            reason,
        })?;
        let mut uart = self.uart();
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        // Rebuild the UART around the same trigger and writer; `from_state` wants them by value.
        let old = std::mem::replace(
            &mut *uart,
            Serial::with_events(
                IrqTrigger(
                    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::BadState {
                        device: "serial",
                        reason: e.to_string(),
                    })?,
                ),
                self.counters.clone(),
                placeholder,
            ),
        );
        let trigger =
            IrqTrigger(
                old.interrupt_evt()
                    .0
                    .try_clone()
                    .map_err(|e| Error::BadState {
                        device: "serial",
                        reason: e.to_string(),
                    })?,
            );
        let out = old.into_writer();
        *uart = Serial::from_state(&state, trigger, self.counters.clone(), out).map_err(|e| {
            Error::BadState {
                device: "serial",
                reason: format!("{e:?}"),
            }
        })?;
        Ok(())
    }

    fn reset(&self) {
        let _ = self.restore(&state_to_json(&SerialState::default()));
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("bytes_out", c.bytes_out.get()),
            ("bytes_lost", c.bytes_lost.get()),
            ("bytes_in", c.bytes_in.get()),
            ("reads", c.reads.get()),
            ("writes", c.writes.get()),
            ("interrupt_errors", c.interrupt_errors.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::Shared;

    fn device() -> (SerialDevice, Shared, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (dev, out, irq)
    }

    #[test]
    fn transmits_to_the_sink_and_counts() {
        let (dev, out, _irq) = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.counters()[0], ("bytes_out", 3));
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let (dev, _out, irq) = device();
        // IER: received-data-available interrupt.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'a');
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (dev, _out, _irq) = device();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(9, &[1]);
        dev.write(0, &[1, 2]);
    }

    #[test]
    fn save_and_restore_round_trip() {
        let (dev, out, _irq) = device();
        dev.write(7, &[0x5a]);
        let saved = dev.save().unwrap();
        dev.reset();
        let mut scratch = [0u8];
        dev.read(7, &mut scratch);
        assert_eq!(scratch[0], 0);
        dev.restore(&saved).unwrap();
        dev.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        dev.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"k");
        assert!(dev.restore(&serde_json::json!({"scratch": 300})).is_err());
    }
}
