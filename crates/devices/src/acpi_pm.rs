//! ACPI PM1a fixed hardware: the event block (PM1_STS, PM1_EN; 2 bytes each) followed by the
//! control block (PM1_CNT), 6 bytes from the FADT's PM1a_EVT_BLK.
//!
//! Writing PM1_CNT with SLP_EN and SLP_TYP = the DSDT's `\_S5_` value signals the power-off
//! event. ACPI is always enabled (no SMI command port), so SCI_EN reads as 1.

use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Counter, Error, Lifecycle};

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const CNT_OFFSET: usize = 4;
const BLOCK_LEN: usize = 6;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Registers {
    status: u16,
    enable: u16,
    control: u16,
}

impl Registers {
    fn bytes(&self) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        b[0..2].copy_from_slice(&self.status.to_le_bytes());
        b[2..4].copy_from_slice(&self.enable.to_le_bytes());
        b[4..6].copy_from_slice(&((self.control | SCI_EN) & !SLP_EN).to_le_bytes());
        b
    }
}

/// PM1a event and control registers.
#[derive(Debug)]
pub struct AcpiPm {
    regs: Mutex<Registers>,
    s5_slp_typ: u8,
    poweroff_evt: EventFd,
    poweroffs: Counter,
    other_sleeps: Counter,
}

impl AcpiPm {
    /// `s5_slp_typ` must match the DSDT's `\_S5_`; `poweroff_evt` is signalled on S5 entry.
    pub fn new(s5_slp_typ: u8, poweroff_evt: EventFd) -> Self {
        AcpiPm {
            regs: Mutex::new(Registers::default()),
            s5_slp_typ,
            poweroff_evt,
            poweroffs: Counter::default(),
            other_sleeps: Counter::default(),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self
            .regs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut touched_control_high = false;
        for (i, value) in data.iter().enumerate() {
            let pos = offset + i;
            let shift = 8 * (pos % 2);
            let byte = u16::from(*value) << shift;
            let mask = 0xffu16 << shift;
            match pos {
                // Status bits are write-1-to-clear.
                0 | 1 => regs.status &= !byte,
                2 | 3 => regs.enable = (regs.enable & !mask) | byte,
                4 | 5 => {
                    regs.control = (regs.control & !mask) | byte;
                    touched_control_high |= pos == CNT_OFFSET + 1;
                }
                _ => {}
            }
        }
        if touched_control_high && regs.control & SLP_EN != 0 {
            let slp_typ = (regs.control >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            regs.control &= !SLP_EN;
            if slp_typ == u16::from(self.s5_slp_typ) {
                self.poweroffs.inc();
                let _ = self.poweroff_evt.write(1);
            } else {
                self.other_sleeps.inc();
            }
        }
    }
}

impl Lifecycle for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi_pm"
    }

    fn save(&self) -> Result<serde_json::Value, Error> {
        let r = *self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(serde_json::json!({"status": r.status, "enable": r.enable, "control": r.control}))
    }

    fn restore(&self, state: &serde_json::Value) -> Result<(), Error> {
        let field = |name: &str| {
            state
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u16::try_from(v).ok())
                .ok_or_else(|| Error::BadState {
                    device: "acpi_pm",
                    reason: format!("field {name} missing or not a u16"),
                })
        };
        let regs = Registers {
            status: field("status")?,
            enable: field("enable")?,
            control: field("control")?,
        };
        *self.regs.lock().unwrap_or_else(PoisonError::into_inner) = regs;
        Ok(())
    }

    fn reset(&self) {
        *self.regs.lock().unwrap_or_else(PoisonError::into_inner) = Registers::default();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("poweroffs", self.poweroffs.get()),
            ("other_sleeps", self.other_sleeps.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (AcpiPm::new(5, evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn s5_write_powers_off() {
        let (pm, evt) = pm();
        let value: u16 = SLP_EN | (5 << SLP_TYP_SHIFT) | SCI_EN;
        pm.write(4, &value.to_le_bytes());
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(pm.counters()[0], ("poweroffs", 1));
    }

    #[test]
    fn byte_wise_s5_write_powers_off_once() {
        let (pm, evt) = pm();
        let value: u16 = SLP_EN | (5 << SLP_TYP_SHIFT);
        pm.write(4, &[value as u8]);
        assert!(evt.read().is_err());
        pm.write(5, &[(value >> 8) as u8]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_states_do_not_power_off() {
        let (pm, evt) = pm();
        let value: u16 = SLP_EN | (3 << SLP_TYP_SHIFT);
        pm.write(4, &value.to_le_bytes());
        assert!(evt.read().is_err());
        assert_eq!(pm.counters()[1], ("other_sleeps", 1));
        // SLP_TYP=5 without SLP_EN only programs the type.
        pm.write(4, &(5u16 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(evt.read().is_err());
    }

    #[test]
    fn registers_read_back() {
        let (pm, _evt) = pm();
        pm.write(2, &0x0121u16.to_le_bytes());
        let mut all = [0u8; 6];
        pm.read(0, &mut all);
        assert_eq!(all, [0, 0, 0x21, 0x01, 1, 0], "SCI_EN always set");
        let mut past = [0u8; 2];
        pm.read(5, &mut past);
        assert_eq!(past, [0, 0xff]);
        pm.write(u64::MAX, &[1]);
        let saved = pm.save().unwrap();
        pm.reset();
        pm.restore(&saved).unwrap();
        pm.read(2, &mut past);
        assert_eq!(past, [0x21, 0x01]);
    }
}
