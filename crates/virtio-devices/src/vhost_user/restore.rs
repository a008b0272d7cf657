//! Restoring a device from a snapshot file: the VMM that took the snapshot is gone, so the
//! backend is reached on a fresh connection and the saved rings are set up on it.
//!
//! Unlike a live update (`handover.rs`), nothing of the old connection survives: the backend
//! gets a new session (features, memory table of this process, a new inflight region) when the
//! device resumes. The rings restart at the used index in guest memory, the point up to which
//! the guest has seen completions: a disk was drained before the snapshot (nothing in
//! flight), and a NIC's receive buffers the old backend had taken but not filled are simply
//! offered again. Starting at the old backend's avail index instead would leave such buffers
//! (and any transmit it had taken without completing) lost to the guest, and a backend that
//! sets its used index from the base would write completions over the guest's view.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{VhostUserDevice, VhostUserState};
use crate::{ActiveQueue, Error};

impl VhostUserDevice {
    /// Loads a snapshot's `saved` state into this freshly connected device: the driver's
    /// features and rings as they were (`kicks`/`calls` are the transport's, indexed by queue),
    /// kept paused. This connection's handshake (backend and protocol features, block config)
    /// stays. Nothing is said to the backend until [`crate::VirtioDevice::resume`].
    ///
    /// The caller checks the features against what this backend offers; this checks the rings
    /// (a hostile file may name any queue or address).
    pub fn load_snapshot_state(
        &self,
        saved: VhostUserState,
        kicks: &[Arc<EventFd>],
        calls: &[Arc<EventFd>],
    ) -> Result<(), Error> {
        let mut queues: Vec<ActiveQueue> = Vec::with_capacity(saved.vrings.len());
        for v in &saved.vrings {
            let bad = Error::QueueAddress {
                index: v.index,
                addr: v.config.desc,
            };
            let duplicate = queues.iter().any(|q| q.index == v.index);
            let size = v.config.size;
            if duplicate || size == 0 || size > self.queue_size || !size.is_power_of_two() {
                return Err(bad);
            }
            let (Some(kick), Some(call)) = (kicks.get(v.index), calls.get(v.index)) else {
                return Err(bad);
            };
            for addr in [v.config.desc, v.config.avail, v.config.used] {
                self.hva(addr).map_err(|_| Error::QueueAddress {
                    index: v.index,
                    addr,
                })?;
            }
            queues.push(ActiveQueue {
                index: v.index,
                config: v.config,
                kick: kick.clone(),
                call: call.clone(),
            });
        }
        let mut conn = self.lock();
        let fresh = &conn.state;
        let mut state = VhostUserState {
            backend_features: fresh.backend_features,
            protocol_features: fresh.protocol_features,
            acked_features: saved.acked_features,
            active: saved.active,
            // Resumed (new session, rings at their bases) with the VM.
            paused: saved.active,
            vrings: if saved.active {
                saved.vrings
            } else {
                Vec::new()
            },
            inflight: None,
            config: fresh.config.clone(),
            mem_table: Vec::new(),
        };
        self.bases_from_used_ring(&mut state);
        conn.state = state;
        conn.queues = if conn.state.active {
            queues
        } else {
            Vec::new()
        };
        conn.session_ready = false;
        conn.inflight_file = None;
        Ok(())
    }
}
