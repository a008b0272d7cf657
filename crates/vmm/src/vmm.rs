//! The control thread: owns the VM's lifecycle state, answers API requests and reacts to guest
//! and host events (power-off, reset, vCPU faults, SIGINT/SIGTERM) until the VM ends.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_api_server::{ApiError, ApiHandler, ApiRequest, ApiResponse};
use outboard_api_types::{
    ActionType, BootSource, InstanceInfo, LiveUpdate, MachineConfig, RequestedVmState,
    SnapshotCreate, VmState, VmmVersion,
};
use outboard_hypervisor::Hypervisor;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiBridge, ApiMessage, Reply};
use crate::attestation::{self, Attestation};
use crate::config::{validate_machine, RebootPolicy, VmmConfig};
use crate::console::{self, RawTerminal};
use crate::live_update::{self, Channel, HandoverConfig, Incoming, Message};
use crate::snapshot;
use crate::vcpu::VcpuFault;
use crate::vm::{self, Vm, VmEvents};

/// The VMM's version string: the package version, or `OUTBOARD_VERSION` at build time (a
/// release's full version; the live-update tests build a second binary with another one).
pub const VMM_VERSION: &str = match option_env!("OUTBOARD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Time given to the API thread to send the response to `InstanceStop` before the process exits.
const STOP_RESPONSE_GRACE: Duration = Duration::from_millis(100);

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    PoweredOff,
    Reset,
    /// `InstanceStop` through the API.
    Stopped,
    /// `InstanceAbort` through the API; guest memory was zeroed.
    Aborted,
    /// SIGINT or SIGTERM.
    Signalled,
    /// A vCPU hit a triple fault, a KVM internal error or an exit we don't handle.
    Fault {
        vcpu: u8,
        fault: VcpuFault,
    },
    /// The VM was handed to a successor VMM (live update), which runs it now.
    LiveUpdated,
    /// The VMM itself failed.
    Failed(String),
}

impl Outcome {
    /// Process exit status: 0 for an orderly end, 2 for a guest fault, 1 for a VMM failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PoweredOff
            | Outcome::Reset
            | Outcome::Stopped
            | Outcome::Aborted
            | Outcome::Signalled
            | Outcome::LiveUpdated => 0,
            Outcome::Fault { .. } => 2,
            Outcome::Failed(_) => 1,
        }
    }

    /// The line printed on stderr at exit.
    pub fn message(&self) -> String {
        match self {
            Outcome::PoweredOff => "outboard-vmm: guest powered off".into(),
            Outcome::Reset => "outboard-vmm: guest reset".into(),
            Outcome::Stopped => "outboard-vmm: stopped by InstanceStop".into(),
            Outcome::Aborted => {
                "outboard-vmm: aborted by InstanceAbort; guest memory zeroed".into()
            }
            Outcome::Signalled => "outboard-vmm: stopped by signal".into(),
            Outcome::LiveUpdated => "outboard-vmm: VM handed to the successor VMM".into(),
            Outcome::Fault { vcpu, fault } => format!("Error: vCPU {vcpu}: {fault}"),
            Outcome::Failed(message) => format!("Error: {message}"),
        }
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Errors of creating the VMM and of launching its VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Attestation(#[from] attestation::Error),
    /// The launch policy rejects the measurements; the helper's message names the PCRs.
    #[error("Refusing to start the VM: {0}")]
    Refused(String),
    #[error("Cannot create control eventfds")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error("Cannot install SIGINT/SIGTERM handlers")]
    Signals(#[source] outboard_hypervisor::kick::Error),
    #[error("Cannot set up the control loop")]
    Epoll(#[source] std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    LiveUpdate(#[from] live_update::Error),
}

/// Where a restored VM's KVM VM and memory come from.
enum Source<'a> {
    /// Built here on this guest RAM.
    Ram(vm::RamSource<'a>),
    /// Made before a live update's pause.
    Prepared(Box<vm::PreparedVm>),
}

const TOKEN_SIGNAL: u64 = 0;
const TOKEN_POWEROFF: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_FAULT: u64 = 3;
const TOKEN_API: u64 = 4;

/// The per-VM monitor.
pub struct Vmm {
    hv: Hypervisor,
    config: VmmConfig,
    id: String,
    state: VmState,
    vm: Option<Vm>,
    events: VmEvents,
    termination: EventFd,
    api: Option<(Receiver<ApiMessage>, EventFd)>,
    terminal: Option<RawTerminal>,
    exit: Option<Outcome>,
    attestation: Attestation,
    /// The API server's listener and path (a live update gives the successor a new listener,
    /// renamed over the path at the commit).
    api_listener: Option<(std::os::fd::OwnedFd, std::path::PathBuf)>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    pub fn new(hv: Hypervisor, config: VmmConfig, id: String) -> Result<Self, Error> {
        Ok(Vmm {
            hv,
            config,
            id,
            state: VmState::NotStarted,
            vm: None,
            events: VmEvents::new()?,
            termination: outboard_hypervisor::kick::termination_eventfd()
                .map_err(Error::Signals)?,
            api: None,
            terminal: None,
            exit: None,
            attestation: Attestation::default(),
            api_listener: None,
        })
    }

    /// The API server's listening socket (a duplicate) and its path, for a live update.
    pub fn set_api_listener(&mut self, listener: std::os::fd::OwnedFd, path: std::path::PathBuf) {
        self.api_listener = Some((listener, path));
    }

    /// Successor side of a live update: builds the VM handed over (same guest RAM pages),
    /// tells the old VMM it is ready, and resumes the guest once the old VMM commits.
    pub fn adopt(&mut self, incoming: Incoming, channel: &Channel) -> Result<(), Error> {
        let running = incoming.config.running;
        if incoming.config.attested {
            self.attestation = Attestation::superseded();
        }
        let restore_started = live_update::monotonic_ns();
        let restored = self.restore_with(
            &incoming.state,
            Source::Prepared(Box::new(incoming.prepared)),
            false,
        );
        if let Err(e) = restored {
            live_update::report_failure(channel, &e);
            return Err(e);
        }
        let restore_ms = (live_update::monotonic_ns() - restore_started) as f64 / 1e6;
        channel.send(&Message::Ready, &[])?;
        live_update::test_kill_point("ready");
        let (Message::Commit { paused_at_ns }, _) = channel.recv()? else {
            return Err(live_update::Error::Unexpected("Commit").into());
        };
        channel.send(&Message::Resuming, &[])?;
        let resume_started = live_update::monotonic_ns();
        if let Some(vm) = &self.vm {
            let read_at = incoming.config.clock_read_at_ns;
            if read_at != 0 {
                let behind = live_update::monotonic_ns().saturating_sub(read_at);
                let clock = incoming.state.clock_ns.saturating_add(behind);
                if let Err(e) = vm.kvm_vm().set_clock_ns(clock) {
                    log::warn!("Cannot advance kvmclock past the pause: {e}");
                }
            }
            if running {
                vm.resume();
                self.state = VmState::Running;
            }
            vm.pci().replay_interrupts();
        }
        crate::status_line!(
            "outboard-vmm: live update: guest paused for {:.3} ms (vCPUs stopped in the old VMM \
             to running here; restore here {restore_ms:.3} ms, resume here {:.3} ms)",
            (live_update::monotonic_ns() - paused_at_ns) as f64 / 1e6,
            (live_update::monotonic_ns() - resume_started) as f64 / 1e6
        );
        Ok(())
    }

    /// Sets the attestation key and launch policy (before the VM is loaded).
    pub fn set_attestation(&mut self, attestation: Attestation) {
        self.attestation = attestation;
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// The handler to give to the API server; requests are carried out by [`Vmm::run`].
    pub fn api_handler(&mut self) -> Result<Arc<dyn ApiHandler>, Error> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
        let (bridge, rx) = ApiBridge::new(wake.try_clone().map_err(Error::EventFd)?);
        self.api = Some((rx, wake));
        Ok(Arc::new(bridge))
    }

    /// Phase 1: builds the VM, loads the boot items and measures them; no vCPU runs.
    pub fn load(&mut self) -> Result<(), Error> {
        self.build(true)
    }

    fn build(&mut self, explicit_phase1: bool) -> Result<(), Error> {
        if self.state != VmState::NotStarted {
            return Err(vm::Error::AlreadyStarted.into());
        }
        let vm = Vm::build(&self.hv, &self.config, &self.events)?;
        if explicit_phase1 || self.attestation.measures_every_launch() {
            self.attestation.measure(&vm, &self.config)?;
        }
        self.vm = Some(vm);
        self.state = VmState::Loaded;
        Ok(())
    }

    /// Phase 2: starts the vCPUs of the loaded VM (loading it first from `NotStarted`), unless
    /// the launch policy rejects its measurements, in which case it stays loaded.
    pub fn start(&mut self) -> Result<(), Error> {
        match self.state {
            VmState::NotStarted => self.build(false)?,
            VmState::Loaded => {}
            _ => return Err(vm::Error::AlreadyStarted.into()),
        }
        if let Some(refusal) = self.attestation.check_policy()? {
            return Err(Error::Refused(refusal));
        }
        crate::trace::mark("launch approved");
        let Some(vm) = self.vm.as_mut() else {
            return Err(vm::Error::AlreadyStarted.into());
        };
        if self.config.serial.output.is_none() {
            self.terminal = Some(RawTerminal::enable());
            console::forward_stdin(vm.serial()).map_err(vm::Error::from)?;
        }
        vm.start()?;
        self.state = VmState::Running;
        Ok(())
    }

    /// Builds the VM a snapshot describes (state file plus memory file) and starts its vCPUs,
    /// running (`resume`) or parked (`Paused`, for `PATCH /vm Resumed`). The snapshot's machine
    /// and boot source replace the configuration's; serial and reboot policy stay this
    /// process's.
    pub fn restore(&mut self, state: &Path, memory: &Path, resume: bool) -> Result<(), Error> {
        let started = Instant::now();
        let saved = snapshot::read_file(state)?;
        self.restore_from(&saved, vm::RamSource::File(memory), resume)?;
        crate::status_line!(
            "outboard-vmm: restored {} (written by outboard-vmm {}) in {:.3} ms",
            state.display(),
            saved.vmm_version,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Builds and starts (running or paused) the VM `saved` describes, with guest RAM from `memory`.
    pub fn restore_from(
        &mut self,
        saved: &snapshot::VmState,
        memory: vm::RamSource<'_>,
        resume: bool,
    ) -> Result<(), Error> {
        self.restore_with(saved, Source::Ram(memory), resume)
    }

    /// [`Vmm::restore_from`], or a live update's VM prepared before the pause.
    fn restore_with(
        &mut self,
        saved: &snapshot::VmState,
        source: Source<'_>,
        resume: bool,
    ) -> Result<(), Error> {
        if self.state != VmState::NotStarted {
            return Err(vm::Error::AlreadyStarted.into());
        }
        self.config.machine = MachineConfig {
            vcpu_count: saved.machine.vcpu_count,
            mem_size_mib: saved.machine.mem_size_mib,
        };
        self.config.boot = saved.boot.clone();
        let mut vm = match source {
            Source::Ram(memory) => {
                Vm::restore(&self.hv, &self.config, &self.events, saved, memory)?
            }
            Source::Prepared(prepared) => {
                Vm::restore_prepared(&self.config, &self.events, *prepared, saved)?
            }
        };
        self.config.devices = vm.pci().device_config();
        if self.config.serial.output.is_none() {
            self.terminal = Some(RawTerminal::enable());
            console::forward_stdin(vm.serial()).map_err(vm::Error::from)?;
        }
        if resume {
            // Parked first: restored virtio devices start their rings in `resume`, before the
            // vCPUs run.
            vm.start_paused()?;
            vm.resume();
            vm.pci().replay_interrupts();
            self.state = VmState::Running;
        } else {
            vm.start_paused()?;
            self.state = VmState::Paused;
        }
        self.vm = Some(vm);
        Ok(())
    }

    /// Runs the control loop until the VM ends; returns how it ended.
    pub fn run(mut self) -> Outcome {
        let outcome = match self.control_loop() {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(error_chain(&e)),
        };
        self.state = VmState::Stopped;
        let mut outcome = outcome;
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            if outcome == Outcome::Aborted {
                if let Err(e) = attestation::zero_guest_memory(vm.ram()) {
                    outcome = Outcome::Failed(error_chain(&e));
                }
            }
        }
        self.terminal.take();
        if matches!(
            outcome,
            Outcome::Stopped | Outcome::Aborted | Outcome::LiveUpdated
        ) {
            std::thread::sleep(STOP_RESPONSE_GRACE);
        }
        outcome
    }

    fn control_loop(&mut self) -> Result<Outcome, Error> {
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let watch = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Epoll)
        };
        watch(self.termination.as_raw_fd(), TOKEN_SIGNAL)?;
        watch(self.events.poweroff.as_raw_fd(), TOKEN_POWEROFF)?;
        watch(self.events.reset.as_raw_fd(), TOKEN_RESET)?;
        watch(self.events.fault.as_raw_fd(), TOKEN_FAULT)?;
        if let Some((_, wake)) = &self.api {
            watch(wake.as_raw_fd(), TOKEN_API)?;
        }
        let mut ready = vec![EpollEvent::default(); 8];
        loop {
            if let Some(outcome) = self.exit.take() {
                return Ok(outcome);
            }
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            for event in &ready[..n] {
                self.dispatch(event.data());
            }
        }
    }

    fn dispatch(&mut self, token: u64) {
        match token {
            TOKEN_SIGNAL => {
                let _ = self.termination.read();
                self.exit.get_or_insert(Outcome::Signalled);
            }
            TOKEN_POWEROFF => {
                let _ = self.events.poweroff.read();
                self.exit.get_or_insert(Outcome::PoweredOff);
            }
            TOKEN_RESET => {
                let _ = self.events.reset.read();
                self.on_reset();
            }
            TOKEN_FAULT => {
                let _ = self.events.fault.read();
                if let Some((vcpu, fault)) = self.vm.as_ref().and_then(Vm::fault) {
                    self.exit.get_or_insert(Outcome::Fault { vcpu, fault });
                }
            }
            TOKEN_API => self.serve_api(),
            _ => {}
        }
    }

    fn on_reset(&mut self) {
        match (&self.vm, self.config.reboot) {
            (Some(vm), RebootPolicy::Restart) if self.exit.is_none() => {
                crate::status_line!("outboard-vmm: guest reset; restarting the VM");
                if let Err(e) = vm.restart() {
                    self.exit = Some(Outcome::Failed(error_chain(&e)));
                } else {
                    self.state = VmState::Running;
                }
            }
            _ => {
                self.exit.get_or_insert(Outcome::Reset);
            }
        }
    }

    fn serve_api(&mut self) {
        let Some((rx, wake)) = &self.api else {
            return;
        };
        let _ = wake.read();
        let messages: Vec<ApiMessage> = rx.try_iter().collect();
        for message in messages {
            let reply = self.handle_api(message.request);
            let _ = message.reply.send(reply);
        }
    }

    fn require_not_started(&self, what: &str) -> Result<(), ApiError> {
        match self.state {
            VmState::NotStarted => Ok(()),
            // What was measured must be what runs.
            VmState::Loaded => Err(ApiError::conflict(format!(
                "Cannot change the {what} after the VM has been loaded and measured"
            ))),
            _ => Err(ApiError::conflict(format!(
                "Cannot change the {what} after the VM has started"
            ))),
        }
    }

    fn handle_api(&mut self, request: ApiRequest) -> Reply {
        match request {
            ApiRequest::GetInstanceInfo => json(&InstanceInfo {
                id: self.id.clone(),
                state: self.state,
                vmm_version: VMM_VERSION.into(),
                app_name: "outboard-vmm".into(),
                host_kvm: self.hv.kind().as_str().into(),
            }),
            ApiRequest::GetVersion => json(&VmmVersion {
                vmm_version: VMM_VERSION.into(),
            }),
            ApiRequest::GetVmConfig => json(&self.config.to_api()),
            ApiRequest::GetMetrics => Ok(ApiResponse::Json(
                self.vm
                    .as_ref()
                    .map(Vm::metrics)
                    .unwrap_or_else(|| serde_json::json!({})),
            )),
            ApiRequest::PutMachineConfig(machine) => {
                self.require_not_started("machine configuration")?;
                validate_machine(&machine, self.hv.max_vcpus())
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                self.config.machine = machine;
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PutBootSource(boot) => {
                self.require_not_started("boot source")?;
                check_boot_files(&boot)?;
                self.config.boot = Some(boot);
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PutSerial(serial) => {
                self.require_not_started("serial configuration")?;
                self.config.serial = serial;
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PutDisk(disk) => {
                self.require_not_started("disks")?;
                self.config
                    .devices
                    .add_disk(&disk)
                    .map_err(ApiError::bad_request)?;
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PutNet(net) => {
                self.require_not_started("network interfaces")?;
                self.config
                    .devices
                    .add_net(&net)
                    .map_err(ApiError::bad_request)?;
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PutVsock(vsock) => {
                self.require_not_started("vsock")?;
                self.config
                    .devices
                    .set_vsock(&vsock)
                    .map_err(ApiError::bad_request)?;
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::Action(ActionType::InstanceLoad) => self.api_launch(false),
            ApiRequest::Action(ActionType::InstanceStart) => self.api_launch(true),
            ApiRequest::Action(ActionType::InstanceStop) => {
                self.exit.get_or_insert(Outcome::Stopped);
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::Action(ActionType::InstanceAbort) => {
                self.exit.get_or_insert(Outcome::Aborted);
                Ok(ApiResponse::NoContent)
            }
            ApiRequest::PatchVm(requested) => self.api_patch_vm(requested),
            ApiRequest::CreateSnapshot(request) => self.api_snapshot(&request),
            ApiRequest::LiveUpdate(request) => self.api_live_update(&request),
            ApiRequest::GetAttestation { query } => self.attestation.document(&query),
            ApiRequest::GetAttestationEventLog => self.attestation.event_log(),
        }
    }

    /// `InstanceLoad` (`start` false) and `InstanceStart`.
    fn api_launch(&mut self, start: bool) -> Reply {
        match (self.state, start) {
            (VmState::NotStarted, _) | (VmState::Loaded, true) => {}
            (VmState::Loaded, false) => {
                return Err(ApiError::conflict("The VM has already been loaded"))
            }
            _ => return Err(ApiError::conflict("The VM has already been started")),
        }
        if self.config.boot.is_none() {
            return Err(ApiError::conflict(
                "Cannot start the VM without a boot source: PUT /boot-source first",
            ));
        }
        let result = if start { self.start() } else { self.load() };
        match result {
            Ok(()) => Ok(ApiResponse::NoContent),
            Err(e @ Error::Refused(_)) => Err(ApiError::conflict(error_chain(&e))),
            Err(Error::Vm(e)) if e.is_user_error() => Err(ApiError::bad_request(error_chain(&e))),
            Err(e) => Err(ApiError::internal(error_chain(&e))),
        }
    }

    /// `PUT /snapshot/create`: state file, then memory file, of the paused VM.
    fn api_snapshot(&mut self, request: &SnapshotCreate) -> Reply {
        let vm = match (&self.vm, self.state) {
            (Some(vm), VmState::Paused) if self.exit.is_none() => vm,
            _ => {
                return Err(ApiError::conflict(
                    "The VM must be paused to take a snapshot: PATCH /vm Paused first",
                ))
            }
        };
        let started = Instant::now();
        let state = vm
            .save_state(&self.hv)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        let saved_at = started.elapsed();
        snapshot::write_file(&request.state_path, &state)
            .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
        let ram = vm.ram();
        let copied = snapshot::memory::save(ram.memfd(), ram.size(), &request.memory_path)
            .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
        crate::status_line!(
            "outboard-vmm: snapshot written in {:.3} ms (state read in {:.3} ms; {} KiB of \
             {} MiB guest memory copied)",
            started.elapsed().as_secs_f64() * 1e3,
            saved_at.as_secs_f64() * 1e3,
            copied.bytes_copied >> 10,
            ram.size() >> 20
        );
        Ok(ApiResponse::NoContent)
    }

    /// `PUT /live-update`: on success this VMM exits and the successor serves the API.
    fn api_live_update(&mut self, request: &LiveUpdate) -> Reply {
        let vm = match (&self.vm, self.state) {
            (Some(vm), VmState::Running | VmState::Paused) if self.exit.is_none() => vm,
            _ => return Err(ApiError::conflict("The VM is not running")),
        };
        let running = self.state == VmState::Running;
        let config = HandoverConfig {
            id: self.id.clone(),
            serial_output: self.config.serial.output.clone(),
            reboot_restart: self.config.reboot == RebootPolicy::Restart,
            api_sock: self.api_listener.as_ref().map(|(_, p)| p.clone()),
            running,
            clock_read_at_ns: 0,
            attested: self.attestation.measured(),
        };
        match live_update::hand_over(vm, &self.hv, &request.binary, config, running) {
            Ok(times) => {
                crate::status_line!(
                    "outboard-vmm: live update: state saved {:.3} ms and committed {:.3} ms \
                     after the pause began",
                    times.state_saved_ms,
                    times.committed_ms
                );
                self.exit = Some(Outcome::LiveUpdated);
                self.state = VmState::Paused;
                Ok(ApiResponse::NoContent)
            }
            Err(e) => Err(ApiError::internal(format!(
                "Live update failed; the VM runs on here: {}",
                error_chain(&e)
            ))),
        }
    }

    fn api_patch_vm(&mut self, requested: RequestedVmState) -> Reply {
        let vm = match (&self.vm, self.state) {
            (Some(vm), VmState::Running | VmState::Paused) if self.exit.is_none() => vm,
            _ => return Err(ApiError::conflict("The VM is not running")),
        };
        match (requested, self.state) {
            (RequestedVmState::Paused, VmState::Running) => {
                vm.pause()
                    .map_err(|e| ApiError::internal(error_chain(&e)))?;
                self.state = VmState::Paused;
            }
            (RequestedVmState::Resumed, VmState::Paused) => {
                vm.resume();
                self.state = VmState::Running;
            }
            (RequestedVmState::Paused, _) => {
                return Err(ApiError::conflict("The VM is already paused"))
            }
            (RequestedVmState::Resumed, _) => {
                return Err(ApiError::conflict("The VM is not paused"))
            }
        }
        Ok(ApiResponse::NoContent)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Reply {
    serde_json::to_value(value)
        .map(ApiResponse::Json)
        .map_err(|e| ApiError::internal(format!("Cannot encode the response: {e}")))
}

/// The files a boot source names must be readable regular files now; their contents are checked
/// when the VM is built.
fn check_boot_files(boot: &BootSource) -> Result<(), ApiError> {
    let check = |what: &str, path: &std::path::Path| -> Result<(), ApiError> {
        match std::fs::File::open(path).and_then(|f| f.metadata()) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(ApiError::bad_request(format!(
                "The {what} {} is not a regular file",
                path.display()
            ))),
            Err(e) => Err(ApiError::bad_request(format!(
                "Cannot open the {what} {}: {e}",
                path.display()
            ))),
        }
    };
    check("kernel", &boot.kernel_image_path)?;
    if let Some(initrd) = &boot.initrd_path {
        check("initrd", initrd)?;
    }
    Ok(())
}
