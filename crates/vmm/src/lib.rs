//! outboard-vmm's core: builds a VM from a [`VmmConfig`], runs its vCPU threads and steers its
//! lifecycle from one control thread, which also serves the API ([`Vmm::api_handler`]).
//!
//! VM lifecycle (the `state` of `GET /`):
//!
//! ```text
//!                InstanceStart (API) or --kernel (CLI)
//!   NotStarted ────────────────────────────────────► Running ◄───┐ guest reset with
//!       │                                          │   ▲    └────┘ --reboot restart: vCPUs
//!       │                         PATCH /vm Paused │   │ Resumed   reset, kernel reloaded
//!       │                                          ▼   │           into the same RAM
//!       │                                          Paused
//!       │ InstanceStop                               │
//!       ▼                                            ▼ (from Running or Paused)
//!    Stopped ◄── power-off, reset (--reboot exit), InstanceStop, SIGINT/SIGTERM, vCPU fault
//! ```
//!
//! Pause really stops the guest: every vCPU is kicked out of `KVM_RUN` and parked before the API
//! call returns (see [`vcpu`]). `Stopped` is terminal: the process exits with
//! [`Outcome::exit_code`].

pub mod api;
pub mod config;
pub mod console;
pub mod trace;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use config::{parse_mem_size, RebootPolicy, VmmConfig};
pub use vmm::{error_chain, Error, Outcome, Vmm, VMM_VERSION};
