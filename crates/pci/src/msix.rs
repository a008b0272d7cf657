//! MSI-X: the capability, the vector table and the pending-bit array (PBA) in a BAR.
//!
//! Each vector owns one GSI. A vector is *deliverable* when MSI-X is enabled, the function is
//! not masked and the entry is not masked; then its GSI routes to the entry's message and every
//! eventfd bound to the vector is an irqfd, so KVM injects without the VMM. When a vector
//! stops being deliverable its irqfds are unregistered: signals then accumulate in the
//! eventfds, which is exactly the pending state. The PBA reports it (a masked vector with a
//! readable eventfd, or a VMM-raised interrupt held back), and unmasking re-registers the
//! irqfds: KVM_IRQFD injects at registration when the eventfd already has a count.
//!
//! ```text
//!   masked ──unmask (enabled, function unmasked)──► deliverable: route set, irqfds registered
//!      ▲                                                 │
//!      └──────────── mask / disable / function mask ◄────┘
//! ```

use std::os::fd::AsRawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{self, MsiMessage, MsiRouter};

pub const MSIX_CAP_ID: u8 = 0x11;
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// One table entry, as the guest programs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The guest-visible MSI-X state (what a successor restores).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub enabled: bool,
    pub function_masked: bool,
    /// Interrupts the VMM raised while the vector was masked.
    pub held: Vec<bool>,
}

/// MSI-X of one function.
pub struct Msix {
    state: MsixState,
    gsis: Vec<u32>,
    bound: Vec<Vec<Arc<EventFd>>>,
    /// Which vectors currently have their route and irqfds installed.
    live: Vec<bool>,
    router: Arc<dyn MsiRouter>,
    errors: u64,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("state", &self.state)
            .field("gsis", &self.gsis)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// A table of `vectors` entries (1..=2048), one GSI each.
    pub fn new(vectors: u16, router: Arc<dyn MsiRouter>) -> Result<Self, interrupt::Error> {
        let n = usize::from(vectors.clamp(1, 2048));
        let gsis = (0..n)
            .map(|_| router.allocate_gsi())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Msix {
            state: MsixState {
                entries: vec![MsixEntry::default(); n],
                enabled: false,
                function_masked: false,
                held: vec![false; n],
            },
            gsis,
            bound: vec![Vec::new(); n],
            live: vec![false; n],
            router,
            errors: 0,
        })
    }

    pub fn vectors(&self) -> u16 {
        self.state.entries.len() as u16
    }

    /// Capability bytes and write mask: table at `table_offset` and PBA at `pba_offset`, both in
    /// BAR `bar`.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = vec![MSIX_CAP_ID, 0];
        body.extend_from_slice(&(self.vectors() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        (body, vec![0, 0, 0, 0xc0])
    }

    /// Size in bytes of the table and of the PBA.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors()) * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors()).div_ceil(64) * 8
    }

    pub fn state(&self) -> &MsixState {
        &self.state
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Failed route or irqfd updates (a KVM error; counted, never fatal to the VMM).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Applies the capability's message control word after a guest config write.
    pub fn set_control(&mut self, control: u16) {
        self.state.enabled = control & CTRL_ENABLE != 0;
        self.state.function_masked = control & CTRL_FUNCTION_MASK != 0;
        self.sync_all();
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.state.enabled
            && !self.state.function_masked
            && self.state.entries[vector].control & ENTRY_MASKED == 0
    }

    fn sync_all(&mut self) {
        for v in 0..self.state.entries.len() {
            self.sync(v, false);
        }
    }

    /// Brings vector `v`'s route and irqfds in line with its state; `reroute` after the
    /// message changed.
    fn sync(&mut self, v: usize, reroute: bool) {
        let want = self.deliverable(v);
        let gsi = self.gsis[v];
        let mut ok = true;
        if want && (!self.live[v] || reroute) {
            let msg = self.state.entries[v].message();
            ok &= self.router.set_route(gsi, Some(msg)).is_ok();
        }
        if want && !self.live[v] {
            for evt in &self.bound[v] {
                ok &= self.router.register_irqfd(evt, gsi).is_ok();
            }
            if std::mem::take(&mut self.state.held[v]) {
                ok &= self
                    .router
                    .signal_msi(self.state.entries[v].message())
                    .is_ok();
            }
        } else if !want && self.live[v] {
            for evt in &self.bound[v] {
                ok &= self.router.unregister_irqfd(evt, gsi).is_ok();
            }
        }
        self.live[v] = want;
        if !ok {
            self.errors += 1;
        }
    }

    /// Binds `evt` (a queue's call eventfd) to `vector`; false if the vector doesn't exist.
    pub fn bind(&mut self, vector: u16, evt: Arc<EventFd>) -> bool {
        let v = usize::from(vector);
        if v >= self.bound.len() {
            return false;
        }
        if self.live[v] && self.router.register_irqfd(&evt, self.gsis[v]).is_err() {
            self.errors += 1;
        }
        self.bound[v].push(evt);
        true
    }

    /// Unbinds `evt` from whatever vector holds it.
    pub fn unbind(&mut self, evt: &EventFd) {
        for v in 0..self.bound.len() {
            let before = self.bound[v].len();
            self.bound[v].retain(|e| e.as_raw_fd() != evt.as_raw_fd());
            if self.bound[v].len() != before
                && self.live[v]
                && self.router.unregister_irqfd(evt, self.gsis[v]).is_err()
            {
                self.errors += 1;
            }
        }
    }

    /// Raises `vector` from the VMM (config change): injected now, or held until unmasked.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.state.entries.len() {
            return;
        }
        if self.deliverable(v) {
            if self
                .router
                .signal_msi(self.state.entries[v].message())
                .is_err()
            {
                self.errors += 1;
            }
        } else {
            self.state.held[v] = true;
        }
    }

    fn pending(&self, v: usize) -> bool {
        if self.state.held[v] {
            return true;
        }
        !self.live[v] && self.bound[v].iter().any(|e| readable(e))
    }

    /// Guest read in the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let pos = offset + i as u64;
            *out = self
                .entry_words(pos / ENTRY_SIZE)
                .map(|w| w[((pos % ENTRY_SIZE) / 4) as usize].to_le_bytes()[(pos % 4) as usize])
                .unwrap_or(0);
        }
    }

    fn entry_words(&self, index: u64) -> Option<[u32; 4]> {
        let e = self.state.entries.get(usize::try_from(index).ok()?)?;
        Some([e.addr_lo, e.addr_hi, e.data, e.control])
    }

    /// Guest write in the table (any width; the message updates once per write).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, value) in data.iter().enumerate() {
            let pos = offset + i as u64;
            let Some(v) = usize::try_from(pos / ENTRY_SIZE)
                .ok()
                .filter(|v| *v < self.state.entries.len())
            else {
                continue;
            };
            let e = &mut self.state.entries[v];
            let word = match (pos % ENTRY_SIZE) / 4 {
                0 => &mut e.addr_lo,
                1 => &mut e.addr_hi,
                2 => &mut e.data,
                _ => &mut e.control,
            };
            let mut bytes = word.to_le_bytes();
            bytes[(pos % 4) as usize] = *value;
            *word = u32::from_le_bytes(bytes);
            // Only the mask bit of vector control is writable.
            e.control &= ENTRY_MASKED;
            if !touched.contains(&v) {
                touched.push(v);
            }
        }
        for v in touched {
            self.sync(v, true);
        }
    }

    /// Guest read in the PBA (writes to it are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let bit0 = (offset + i as u64) * 8;
            let mut byte = 0u8;
            for b in 0..8 {
                let v = bit0 + b;
                if usize::try_from(v).is_ok_and(|v| v < self.state.entries.len() && self.pending(v))
                {
                    byte |= 1 << b;
                }
            }
            *out = byte;
        }
    }

    /// Drops all routes and irqfds and returns to power-on state (device reset).
    pub fn reset(&mut self) {
        self.state.enabled = false;
        self.sync_all();
        for (v, e) in self.state.entries.iter_mut().enumerate() {
            *e = MsixEntry::default();
            self.state.held[v] = false;
            let _ = self.router.set_route(self.gsis[v], None);
        }
    }

    /// Loads saved state (the entry count must match) and reinstalls routes and irqfds.
    pub fn restore(&mut self, state: MsixState) -> bool {
        if state.entries.len() != self.state.entries.len()
            || state.held.len() != state.entries.len()
        {
            return false;
        }
        self.state = state;
        for v in 0..self.state.entries.len() {
            self.sync(v, true);
        }
        true
    }
}

/// Whether an eventfd has a count (signalled and not yet consumed), without consuming it.
fn readable(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingInterrupts;

    fn msix(n: u16) -> (Msix, Arc<RecordingInterrupts>) {
        let rec = Arc::new(RecordingInterrupts::default());
        (Msix::new(n, rec.clone()).unwrap(), rec)
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&data.to_le_bytes());
        bytes.extend_from_slice(&u32::from(masked).to_le_bytes());
        m.write_table(v * 16, &bytes);
    }

    #[test]
    fn table_reads_back_and_vectors_start_masked() {
        let (mut m, _) = msix(3);
        let mut ctrl = [0u8; 4];
        m.read_table(2 * 16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1);
        program(&mut m, 1, 0xfee0_1000, 0x41, false);
        let mut entry = [0u8; 16];
        m.read_table(16, &mut entry);
        assert_eq!(&entry[..8], &0xfee0_1000u64.to_le_bytes());
        // Reserved control bits are read-only.
        m.write_table(16 + 12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 0);
        // Beyond the table: ignored, reads zero.
        m.write_table(100 * 16, &[1; 4]);
        m.read_table(100 * 16, &mut ctrl);
        assert_eq!(ctrl, [0; 4]);
    }

    #[test]
    fn irqfds_follow_masking_and_pba_reports_pending() {
        let (mut m, rec) = msix(2);
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert!(m.bind(1, evt.clone()));
        assert!(!m.bind(2, evt.clone()), "vector beyond the table");
        program(&mut m, 1, 0xfee0_0000, 0x30, false);
        assert!(rec.snapshot().irqfds.is_empty(), "MSI-X still disabled");
        m.set_control(CTRL_ENABLE);
        let gsi = m.gsis[1];
        assert_eq!(rec.snapshot().irqfds, vec![(evt.as_raw_fd(), gsi)]);
        assert_eq!(rec.snapshot().routes[&gsi].data, 0x30);
        // Function mask: irqfd off, a signal shows as pending.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert!(rec.snapshot().irqfds.is_empty());
        evt.write(1).unwrap();
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_control(CTRL_ENABLE);
        assert_eq!(rec.snapshot().irqfds.len(), 1);
        // Re-programming the message updates the route.
        program(&mut m, 1, 0xfee0_0000, 0x31, false);
        assert_eq!(rec.snapshot().routes[&gsi].data, 0x31);
        m.unbind(&evt);
        assert!(rec.snapshot().irqfds.is_empty());
    }

    #[test]
    fn vmm_interrupt_is_held_while_masked() {
        let (mut m, rec) = msix(1);
        m.set_control(CTRL_ENABLE);
        m.trigger(0);
        assert!(rec.snapshot().injected.is_empty());
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        program(&mut m, 0, 0xfee0_0000, 0x22, false);
        assert_eq!(rec.snapshot().injected.len(), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.trigger(0);
        m.trigger(7);
        assert_eq!(rec.snapshot().injected.len(), 2);
    }

    #[test]
    fn save_restore_reinstalls_routes() {
        let (mut m, _) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x50, false);
        m.set_control(CTRL_ENABLE);
        let saved = serde_json::to_value(m.state()).unwrap();
        let (mut fresh, rec) = msix(2);
        assert!(fresh.restore(serde_json::from_value(saved).unwrap()));
        assert_eq!(rec.snapshot().routes.values().next().unwrap().data, 0x50);
        let (mut small, _) = msix(1);
        assert!(!small.restore(m.state().clone()));
        m.reset();
        assert!(!m.enabled());
    }
}
