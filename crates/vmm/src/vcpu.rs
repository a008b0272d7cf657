//! vCPU threads: the `KVM_RUN` loop, exit dispatch to the buses, and parking for pause.
//!
//! Each thread owns its [`Vcpu`]. The control thread steers all of them through one
//! [`VcpuControl`] (a command under a mutex plus a condition variable) and kicks them out of
//! `KVM_RUN` with a signal that sets `immediate_exit` (see `outboard_hypervisor::kick`), so a
//! pause can't be missed however the signal races the thread.
//!
//! ```text
//!            ┌────────── command = Run ◄──────────┐
//!            ▼                                    │
//!   ──► running (KVM_RUN) ──kick + Pause──► parked (counted, waiting on the condvar)
//!            │                                    │
//!            │ fatal exit                         │ command = Exit
//!            ▼                                    ▼
//!   reports VcpuFault, exits                   thread exits
//! ```
//!
//! A reset generation bump while parked makes each thread reload its boot state on resume
//! (VM restart on guest reset). A save generation bump while parked makes each thread read its
//! vCPU's state and hand it to the control thread (snapshot): the `Vcpu` never leaves its
//! thread, since the `KVM_RUN` path must not take a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outboard_devices::Bus;
use outboard_hypervisor::kvm_bindings::kvm_lapic_state;
use outboard_hypervisor::regs::LongModeEntry;
use outboard_hypervisor::state::VcpuState;
use outboard_hypervisor::{Exit, Vcpu};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::trace;

/// Errors of steering vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot spawn the thread of vCPU {id}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
    #[error("Cannot install the vCPU kick signal handler")]
    Kick(#[source] outboard_hypervisor::kick::Error),
    #[error("vCPUs must be paused to save their state")]
    NotPaused,
    #[error("vCPUs did not hand over their state within {0:?}")]
    SaveTimeout(Duration),
    #[error("Cannot save the state of vCPU {id}: {message}")]
    Save { id: u8, message: String },
}

/// Why a vCPU stopped the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuFault {
    TripleFault { rip: u64 },
    InternalError { suberror: u32, rip: u64 },
    FailEntry { reason: u64, rip: u64 },
    Unhandled { exit: &'static str, rip: u64 },
    RunFailed { message: String, rip: u64 },
    Setup { message: String },
}

impl std::fmt::Display for VcpuFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuFault::TripleFault { rip } => {
                write!(f, "triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}")
            }
            VcpuFault::InternalError { suberror, rip } => {
                write!(
                    f,
                    "KVM internal error (suberror {suberror}) at RIP {rip:#x}"
                )
            }
            VcpuFault::FailEntry { reason, rip } => {
                write!(
                    f,
                    "KVM_EXIT_FAIL_ENTRY (reason {reason:#x}) at RIP {rip:#x}"
                )
            }
            VcpuFault::Unhandled { exit, rip } => {
                write!(f, "unhandled exit {exit} at RIP {rip:#x}")
            }
            VcpuFault::RunFailed { message, rip } => {
                write!(f, "KVM_RUN failed ({message}) at RIP {rip:#x}")
            }
            VcpuFault::Setup { message } => write!(f, "cannot reset vCPU state: {message}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct ControlState {
    command: Command,
    parked: usize,
    /// Bumped to make vCPUs reload `entry` before running again.
    reset_generation: u64,
    entry: Option<LongModeEntry>,
    fault: Option<(u8, VcpuFault)>,
    /// Bumped to make parked vCPUs push their state to `saved`.
    save_generation: u64,
    msr_indices: Arc<Vec<u32>>,
    saved: Vec<(u8, Result<VcpuState, String>)>,
}

/// Per-vCPU exit counters.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub exits_io: AtomicU64,
    pub exits_mmio: AtomicU64,
    pub exits_interrupted: AtomicU64,
    pub exits_other: AtomicU64,
}

/// Shared between the control thread and the vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Written when a vCPU reports a fault.
    fault_evt: EventFd,
}

impl VcpuControl {
    pub fn new(fault_evt: EventFd) -> Self {
        VcpuControl {
            state: Mutex::new(ControlState {
                command: Command::Run,
                parked: 0,
                reset_generation: 0,
                entry: None,
                fault: None,
                save_generation: 0,
                msr_indices: Arc::new(Vec::new()),
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
            fault_evt,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self, id: u8, fault: VcpuFault) {
        let mut state = self.lock();
        if state.fault.is_none() {
            state.fault = Some((id, fault));
        }
        drop(state);
        let _ = self.fault_evt.write(1);
    }

    /// The first fault a vCPU reported.
    pub fn fault(&self) -> Option<(u8, VcpuFault)> {
        self.lock().fault.clone()
    }

    /// Makes vCPU threads park as soon as they start (a restored VM that stays paused).
    pub fn hold(&self) {
        self.lock().command = Command::Pause;
    }
}

/// What one vCPU thread needs.
#[derive(Debug)]
pub struct VcpuContext {
    pub vcpu: Vcpu,
    /// The local APIC as set up at power-on, restored on a VM restart.
    pub boot_lapic: kvm_lapic_state,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub counters: Arc<VcpuCounters>,
}

/// The control thread's handle on all vCPU threads.
#[derive(Debug)]
pub struct VcpuThreads {
    control: Arc<VcpuControl>,
    handles: Vec<JoinHandle<()>>,
}

const KICK_INTERVAL: Duration = Duration::from_millis(20);
/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuThreads {
    /// Spawns one thread per vCPU; they start running at once.
    pub fn spawn(contexts: Vec<VcpuContext>, control: Arc<VcpuControl>) -> Result<Self, Error> {
        outboard_hypervisor::kick::install_kick_handler().map_err(Error::Kick)?;
        let mut threads = VcpuThreads {
            control,
            handles: Vec::new(),
        };
        for ctx in contexts {
            let id = ctx.vcpu.id();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(ctx))
                .map_err(|source| Error::Spawn { id, source })?;
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    fn kick_all(&self) {
        for handle in &self.handles {
            if !handle.is_finished() {
                let _ = handle.kill(outboard_hypervisor::kick::kick_signal());
            }
        }
    }

    fn alive(&self) -> usize {
        self.handles.iter().filter(|h| !h.is_finished()).count()
    }

    /// Stops every vCPU outside `KVM_RUN` and waits until all are parked.
    pub fn pause(&self) -> Result<(), Error> {
        self.control.lock().command = Command::Pause;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            self.kick_all();
            let state = self.control.lock();
            let (state, _) = self
                .control
                .changed
                .wait_timeout_while(state, KICK_INTERVAL, |s| s.parked < self.alive())
                .unwrap_or_else(PoisonError::into_inner);
            if state.parked >= self.alive() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.control.lock().command = Command::Run;
        self.control.changed.notify_all();
    }

    /// The state of every vCPU, in id order; they must be paused. `msr_indices` is normally
    /// `Hypervisor::msr_index_list`.
    pub fn save_states(&self, msr_indices: Vec<u32>) -> Result<Vec<VcpuState>, Error> {
        let mut state = self.control.lock();
        if state.command != Command::Pause {
            return Err(Error::NotPaused);
        }
        state.saved.clear();
        state.msr_indices = Arc::new(msr_indices);
        state.save_generation += 1;
        self.control.changed.notify_all();
        let count = self.handles.len();
        let (mut state, _) = self
            .control
            .changed
            .wait_timeout_while(state, PAUSE_TIMEOUT, |s| s.saved.len() < count)
            .unwrap_or_else(PoisonError::into_inner);
        if state.saved.len() < count {
            return Err(Error::SaveTimeout(PAUSE_TIMEOUT));
        }
        let mut saved = std::mem::take(&mut state.saved);
        drop(state);
        saved.sort_by_key(|(id, _)| *id);
        saved
            .into_iter()
            .map(|(id, r)| r.map_err(|message| Error::Save { id, message }))
            .collect()
    }

    /// Makes parked vCPUs restart from `entry` (BSP) or wait-for-SIPI (APs) when resumed.
    pub fn schedule_reset(&self, entry: LongModeEntry) {
        let mut state = self.control.lock();
        state.reset_generation += 1;
        state.entry = Some(entry);
    }

    /// Ends all vCPU threads and waits for them.
    pub fn stop(mut self) {
        self.control.lock().command = Command::Exit;
        self.control.changed.notify_all();
        self.kick_all();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Parks while paused (handing over its state when asked); returns false when the thread must
/// exit.
fn wait_for_run(ctx: &mut VcpuContext, generation: &mut u64, saved: &mut u64) -> bool {
    let control = ctx.control.clone();
    let mut state = control.lock();
    let mut counted = false;
    loop {
        match state.command {
            Command::Run => break,
            Command::Exit => {
                if counted {
                    state.parked -= 1;
                }
                return false;
            }
            Command::Pause => {
                if !counted {
                    state.parked += 1;
                    counted = true;
                    control.changed.notify_all();
                }
                if state.save_generation != *saved {
                    *saved = state.save_generation;
                    let result = ctx
                        .vcpu
                        .complete_pending_io()
                        .map_err(|e| crate::error_chain(&e))
                        .and_then(|()| {
                            ctx.vcpu
                                .save_state(&state.msr_indices)
                                .map_err(|e| crate::error_chain(&e))
                        });
                    state.saved.push((ctx.vcpu.id(), result));
                    control.changed.notify_all();
                }
                state = control
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
    if counted {
        state.parked -= 1;
    }
    if state.reset_generation != *generation {
        *generation = state.reset_generation;
        let entry = state.entry;
        drop(state);
        if let Err(fault) = reset_state(&ctx.vcpu, &ctx.boot_lapic, entry) {
            control.report(ctx.vcpu.id(), fault);
            return false;
        }
    }
    true
}

fn reset_state(
    vcpu: &Vcpu,
    boot_lapic: &kvm_lapic_state,
    entry: Option<LongModeEntry>,
) -> Result<(), VcpuFault> {
    let setup = |e: outboard_hypervisor::vcpu::Error| VcpuFault::Setup {
        message: e.to_string(),
    };
    vcpu.set_lapic(boot_lapic).map_err(setup)?;
    match (vcpu.id(), entry) {
        (0, Some(entry)) => vcpu.setup_long_mode(&entry).map_err(setup),
        _ => vcpu.setup_application_processor().map_err(setup),
    }
}

fn run_vcpu(mut ctx: VcpuContext) {
    ctx.vcpu.bind_kick();
    let mut generation = 0;
    let mut saved = 0;
    let mut first_run = true;
    loop {
        // Clear a stale kick before looking at the command: a kick that lands after this point
        // makes the next KVM_RUN return at once.
        ctx.vcpu.clear_kick();
        if !wait_for_run(&mut ctx, &mut generation, &mut saved) {
            break;
        }
        if first_run && ctx.vcpu.id() == 0 {
            trace::first_kvm_run();
            first_run = false;
        }
        if let Some(fault) = run_once(&mut ctx) {
            let id = ctx.vcpu.id();
            ctx.control.report(id, fault);
            break;
        }
    }
    ctx.vcpu.unbind_kick();
}

/// One `KVM_RUN` and its exit; returns a fault that ends the VM.
fn run_once(ctx: &mut VcpuContext) -> Option<VcpuFault> {
    let counters = ctx.counters.clone();
    let outcome = match ctx.vcpu.run() {
        Ok(Exit::IoIn { port, size, data }) => {
            counters.exits_io.fetch_add(1, Ordering::Relaxed);
            for access in data.chunks_mut(size) {
                ctx.pio.read(u64::from(port), access);
            }
            None
        }
        Ok(Exit::IoOut { port, size, data }) => {
            counters.exits_io.fetch_add(1, Ordering::Relaxed);
            for access in data.chunks(size) {
                ctx.pio.write(u64::from(port), access);
            }
            None
        }
        Ok(Exit::MmioRead { addr, data }) => {
            counters.exits_mmio.fetch_add(1, Ordering::Relaxed);
            ctx.mmio.read(addr, data);
            None
        }
        Ok(Exit::MmioWrite { addr, data }) => {
            counters.exits_mmio.fetch_add(1, Ordering::Relaxed);
            ctx.mmio.write(addr, data);
            None
        }
        Ok(Exit::Interrupted) => {
            counters.exits_interrupted.fetch_add(1, Ordering::Relaxed);
            None
        }
        // With the in-kernel LAPIC, KVM waits for interrupts itself; a HLT exit just re-enters.
        Ok(Exit::Hlt) => {
            counters.exits_other.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ok(Exit::Shutdown) => Some(VcpuFault::TripleFault { rip: 0 }),
        Ok(Exit::InternalError) => Some(VcpuFault::InternalError {
            suberror: 0,
            rip: 0,
        }),
        Ok(Exit::FailEntry { reason }) => Some(VcpuFault::FailEntry { reason, rip: 0 }),
        Ok(Exit::SystemEvent { kind }) => Some(VcpuFault::Unhandled {
            exit: system_event_name(kind),
            rip: 0,
        }),
        Ok(Exit::Unhandled(exit)) => Some(VcpuFault::Unhandled { exit, rip: 0 }),
        Err(e) => Some(VcpuFault::RunFailed {
            message: std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
            rip: 0,
        }),
    };
    // The exit's borrow of the vCPU has ended: now fill in the RIP and error details.
    outcome.map(|fault| with_details(&mut ctx.vcpu, fault))
}

fn with_details(vcpu: &mut Vcpu, fault: VcpuFault) -> VcpuFault {
    let rip = vcpu.rip();
    match fault {
        VcpuFault::TripleFault { .. } => VcpuFault::TripleFault { rip },
        VcpuFault::InternalError { .. } => {
            let details = vcpu.internal_error();
            log::debug!("vCPU {} internal error data {:x?}", vcpu.id(), details.data);
            VcpuFault::InternalError {
                suberror: details.suberror,
                rip,
            }
        }
        VcpuFault::FailEntry { reason, .. } => VcpuFault::FailEntry { reason, rip },
        VcpuFault::Unhandled { exit, .. } => VcpuFault::Unhandled { exit, rip },
        VcpuFault::RunFailed { message, .. } => VcpuFault::RunFailed { message, rip },
        other => other,
    }
}

fn system_event_name(kind: u32) -> &'static str {
    match kind {
        kvm_system_event::SHUTDOWN => "KVM_EXIT_SYSTEM_EVENT (shutdown)",
        kvm_system_event::RESET => "KVM_EXIT_SYSTEM_EVENT (reset)",
        kvm_system_event::CRASH => "KVM_EXIT_SYSTEM_EVENT (crash)",
        _ => "KVM_EXIT_SYSTEM_EVENT",
    }
}

mod kvm_system_event {
    pub const SHUTDOWN: u32 = outboard_hypervisor::kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
    pub const RESET: u32 = outboard_hypervisor::kvm_bindings::KVM_SYSTEM_EVENT_RESET;
    pub const CRASH: u32 = outboard_hypervisor::kvm_bindings::KVM_SYSTEM_EVENT_CRASH;
}
