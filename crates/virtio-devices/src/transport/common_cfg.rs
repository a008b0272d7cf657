//! The common configuration structure (virtio 1.2 §4.1.4.3): feature selection, device
//! status, and the per-queue registers behind `queue_select`, with the checks that put a
//! device in NEEDS_RESET when the driver programs something impossible.

use vm_memory::GuestMemoryBackend;

use super::{Inner, VirtioPciTransport, NO_VECTOR, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

impl<M: GuestMemoryBackend + Send + Sync> VirtioPciTransport<M> {
    pub(super) fn read_common(&self, inner: &mut Inner, offset: u64, data: &mut [u8]) {
        let st = &inner.state;
        let q = st.queues.get(usize::from(st.queue_select));
        let value: u64 = match offset {
            0x00 => u64::from(st.device_feature_select),
            0x04 => match st.device_feature_select {
                0 => self.offered_features() & 0xffff_ffff,
                1 => self.offered_features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(st.driver_feature_select),
            0x0c => match st.driver_feature_select {
                0 => st.driver_features & 0xffff_ffff,
                1 => st.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(st.msix_config),
            0x12 => st.queues.len() as u64,
            0x14 => u64::from(st.status),
            0x15 => u64::from(st.config_generation),
            0x16 => u64::from(st.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => q.map_or(0, |_| u64::from(st.queue_select)),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => {
                self.counters.bad_accesses.inc();
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(i).copied().unwrap_or(0);
        }
    }

    pub(super) fn write_common(&self, inner: &mut Inner, offset: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(buf);
        let live = inner.state.status & STATUS_DRIVER_OK != 0;
        let sel = usize::from(inner.state.queue_select);
        let has_queue = sel < inner.state.queues.len();
        // Queue registers are frozen once the device is live or the queue enabled.
        let queue_writable = has_queue && !live && !inner.state.queues[sel].enabled;
        let set_half = |field: &mut u64, high: bool| {
            *field = if high {
                (*field & 0xffff_ffff) | (value << 32)
            } else if n == 8 {
                value
            } else {
                (*field & !0xffff_ffff) | (value & 0xffff_ffff)
            };
        };
        match offset {
            0x00 => inner.state.device_feature_select = value as u32,
            0x08 => inner.state.driver_feature_select = value as u32,
            0x0c if inner.state.status & STATUS_FEATURES_OK == 0 => {
                let f = &mut inner.state.driver_features;
                match inner.state.driver_feature_select {
                    0 => *f = (*f & !0xffff_ffff) | (value & 0xffff_ffff),
                    1 => *f = (*f & 0xffff_ffff) | (value << 32),
                    _ => {}
                }
            }
            0x10 => {
                let v = value as u16;
                if v != NO_VECTOR && v >= inner.msix.vectors() {
                    inner.state.msix_config = NO_VECTOR;
                    self.needs_reset(inner, "config MSI-X vector beyond the table");
                } else {
                    inner.state.msix_config = v;
                }
            }
            0x14 => self.write_status(inner, value as u8),
            0x16 => inner.state.queue_select = value as u16,
            0x18 if queue_writable => {
                let size = value as u16;
                if size == 0 || !size.is_power_of_two() || size > self.device.queue_max_size() {
                    self.needs_reset(inner, &format!("queue {sel} size {size} invalid"));
                } else {
                    inner.state.queues[sel].size = size;
                }
            }
            0x1a if has_queue => self.set_queue_vector(inner, sel, value as u16),
            0x1c if queue_writable && value == 1 => {
                let q = inner.state.queues[sel];
                match self.queue_valid(&q) {
                    Ok(()) => inner.state.queues[sel].enabled = true,
                    Err(why) => self.needs_reset(inner, &format!("queue {sel}: {why}")),
                }
            }
            0x20 | 0x24 if queue_writable => {
                set_half(&mut inner.state.queues[sel].desc, offset == 0x24)
            }
            0x28 | 0x2c if queue_writable => {
                set_half(&mut inner.state.queues[sel].avail, offset == 0x2c)
            }
            0x30 | 0x34 if queue_writable => {
                set_half(&mut inner.state.queues[sel].used, offset == 0x34)
            }
            _ => self.counters.bad_accesses.inc(),
        }
    }

    pub(super) fn set_queue_vector(&self, inner: &mut Inner, sel: usize, vector: u16) {
        let call = inner.calls[sel].clone();
        inner.msix.unbind(&call);
        if vector == NO_VECTOR {
            inner.state.queues[sel].msix_vector = NO_VECTOR;
        } else if inner.msix.bind(vector, call) {
            inner.state.queues[sel].msix_vector = vector;
        } else {
            inner.state.queues[sel].msix_vector = NO_VECTOR;
            self.needs_reset(
                inner,
                &format!("queue {sel} MSI-X vector {vector} beyond the table"),
            );
        }
    }
}
