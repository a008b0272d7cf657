//! Clock arithmetic: the kvmclock (pvclock) time formula and TSC frequencies from CPUID.

use crate::bytes::{u32_at, u64_at, u8_at};

/// Size of `struct pvclock_vcpu_time_info`.
pub const PVCLOCK_LEN: usize = 32;
/// pvclock flag: the TSC is stable across vCPUs.
pub const PVCLOCK_TSC_STABLE: u8 = 1;

/// A consistent copy of `struct pvclock_vcpu_time_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PvclockTime {
    pub version: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
}

impl PvclockTime {
    /// Decodes the 32-byte structure.
    pub fn parse(b: &[u8; PVCLOCK_LEN]) -> Self {
        PvclockTime {
            version: u32_at(b, 0).unwrap_or(0),
            tsc_timestamp: u64_at(b, 8).unwrap_or(0),
            system_time: u64_at(b, 16).unwrap_or(0),
            tsc_to_system_mul: u32_at(b, 24).unwrap_or(0),
            tsc_shift: u8_at(b, 28).unwrap_or(0) as i8,
            flags: u8_at(b, 29).unwrap_or(0),
        }
    }

    /// Nanoseconds of the clock at TSC value `tsc` (a TSC before the stamp counts as the stamp).
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let delta = tsc.saturating_sub(self.tsc_timestamp);
        self.system_time
            .wrapping_add(scale_delta(delta, self.tsc_to_system_mul, self.tsc_shift))
    }
}

/// `(delta << shift) * mul / 2^32` as the pvclock ABI defines it (negative shift: right shift).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let shifted = if shift < 0 {
        delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    } else {
        delta.checked_shl(shift as u32).unwrap_or(0)
    };
    ((u128::from(shifted) * u128::from(mul)) >> 32) as u64
}

/// TSC frequency from CPUID leaf 0x15 (EAX denominator, EBX numerator, ECX crystal Hz).
pub fn tsc_hz_from_leaf_15(eax: u32, ebx: u32, ecx: u32) -> Option<u64> {
    if eax == 0 || ebx == 0 || ecx == 0 {
        return None;
    }
    Some(u64::from(ecx) * u64::from(ebx) / u64::from(eax))
}

/// Nanoseconds for `ticks` of a clock running at `hz` (0 when `hz` is 0), without overflow.
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    (u128::from(ticks) * 1_000_000_000 / u128::from(hz)).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_like_the_pvclock_abi() {
        // mul = 2^31 halves; shift -1 halves again.
        assert_eq!(scale_delta(1000, 1 << 31, 0), 500);
        assert_eq!(scale_delta(1000, 1 << 31, -1), 250);
        assert_eq!(scale_delta(1000, 1 << 31, 1), 1000);
        assert_eq!(scale_delta(1000, 1 << 31, -100), 0);
        assert_eq!(
            scale_delta(u64::MAX, u32::MAX, 0),
            u64::MAX / 2 * 2 - (u64::MAX >> 32)
        );
    }

    #[test]
    fn reads_the_structure() {
        let mut b = [0u8; PVCLOCK_LEN];
        b[0..4].copy_from_slice(&4u32.to_le_bytes());
        b[8..16].copy_from_slice(&1_000u64.to_le_bytes());
        b[16..24].copy_from_slice(&5_000_000u64.to_le_bytes());
        b[24..28].copy_from_slice(&(1u32 << 31).to_le_bytes());
        b[28] = 0xff; // shift -1
        b[29] = PVCLOCK_TSC_STABLE;
        let t = PvclockTime::parse(&b);
        assert_eq!(t.tsc_shift, -1);
        assert_eq!(t.ns_at(5_000), 5_000_000 + 1_000);
        assert_eq!(t.ns_at(10), 5_000_000);
    }

    #[test]
    fn cpuid_frequency_needs_all_fields() {
        assert_eq!(tsc_hz_from_leaf_15(2, 250, 24_000_000), Some(3_000_000_000));
        assert_eq!(tsc_hz_from_leaf_15(0, 250, 24_000_000), None);
        assert_eq!(ticks_to_ns(3_000_000_000, 3_000_000_000), 1_000_000_000);
        assert_eq!(ticks_to_ns(5, 0), 0);
        assert_eq!(ticks_to_ns(u64::MAX, 1), u64::MAX);
    }
}
