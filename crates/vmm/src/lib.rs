//! outboard-vmm's core: builds a VM from a [`VmmConfig`], runs its vCPU threads and steers its
//! lifecycle from one control thread, which also serves the API ([`Vmm::api_handler`]).
//!
//! VM lifecycle (the `state` of `GET /`):
//!
//! ```text
//!              InstanceLoad (API) or --kernel --no-start (CLI): build, load, measure (phase 1)
//!   NotStarted ─────────────────────────────────────────────────► Loaded
//!       │ │                                                          │ InstanceStart (phase 2): refused,
//!       │ │ InstanceStart (API) or --kernel (CLI):                   │ staying Loaded, when a launch
//!       │ │ load (+ measure if attested) and start                   │ policy rejects the measurements
//!       │ └──────────────────────────────────────────────► Running ◄─┘
//!       │                                                 │   ▲  ▲ └──┐ guest reset with --reboot restart:
//!       │                                PATCH /vm Paused │   │  └────┘ vCPUs reset, kernel reloaded
//!       │                                                 ▼   │ Resumed into the same RAM
//!       │                                                 Paused
//!       │ InstanceStop, InstanceAbort                       │
//!       ▼                                                   ▼ (from Loaded, Running or Paused)
//!    Stopped ◄── power-off, reset (--reboot exit), InstanceStop, InstanceAbort (guest memory
//!                zeroed first), SIGINT/SIGTERM, vCPU fault
//! ```
//!
//! Snapshots and live update (see [`snapshot`], [`live_update`]):
//!
//! ```text
//!   NotStarted ──--restore state=P,memory=M──► Running (resume=on) or Paused (resume=off)
//!   Paused ──PUT /snapshot/create──► Paused (state file + memory file written)
//!   Running/Paused ──PUT /live-update──► Stopped here, exit 0; the successor process
//!                                        (--live-update-fd) runs the guest on the same memfd
//!                  └─ successor fails before Commit ─► back to Running/Paused here (rollback)
//! ```
//!
//! `Loaded` is the attested launch's approval point (see [`attestation`]): guest memory holds
//! exactly what was measured and no vCPU has run, so `GET /attestation` proves what will run.
//!
//! Pause really stops the guest: every vCPU is kicked out of `KVM_RUN` and parked before the API
//! call returns (see [`vcpu`]). `Stopped` is terminal: the process exits with
//! [`Outcome::exit_code`].

pub mod api;
pub mod attestation;
pub mod config;
pub mod console;
pub mod live_update;
pub mod pci;
pub mod snapshot;
pub mod trace;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use attestation::{Attestation, AttestationConfig, KeyFiles};
pub use config::{parse_mem_size, RebootPolicy, VmmConfig};
pub use vmm::{error_chain, Error, Outcome, Vmm, VMM_VERSION};
