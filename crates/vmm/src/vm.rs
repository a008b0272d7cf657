//! One built VM: KVM VM, guest RAM, buses and devices, vCPUs; start, pause, resume, restart, stop;
//! and the same VM saved to a [`VmState`] and built again from one (snapshot restore).

use std::path::Path;
use std::sync::Arc;

use outboard_boot::layout::{self, COM1_IRQ, COM1_PORT, I8042_DATA_PORT, PM1A_EVT_PORT};
use outboard_boot::{acpi, bootparams, loader, paging, GuestRam};
use outboard_devices::acpi_pm::AcpiPm;
use outboard_devices::debugcon::DebugConsole;
use outboard_devices::i8042::I8042;
use outboard_devices::serial::SerialDevice;
use outboard_devices::{Bus, Device};
use outboard_hypervisor::regs::LongModeEntry;
use outboard_hypervisor::{cpuid, Hypervisor, PlatformState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmmConfig;
use crate::console;
use crate::snapshot::{self, MachineState, MemoryState, RamRangeState, VmState};
use crate::vcpu::{self, VcpuContext, VcpuControl, VcpuCounters, VcpuThreads};

/// Errors of building and steering a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Memory(#[from] outboard_boot::memory::Error),
    #[error(transparent)]
    Load(#[from] loader::Error),
    #[error("Cannot write the ACPI tables")]
    Acpi(#[source] acpi::Error),
    #[error("Cannot write the zero page")]
    BootParams(#[source] bootparams::Error),
    #[error("Cannot write the boot page tables")]
    Paging(#[source] paging::Error),
    #[error("Cannot create the VM")]
    CreateVm(#[source] outboard_hypervisor::Error),
    #[error("Cannot set up the VM")]
    Platform(#[source] outboard_hypervisor::vm::Error),
    #[error("Cannot query the host CPUID")]
    Cpuid(#[source] outboard_hypervisor::Error),
    #[error("Cannot build the CPUID of vCPU {id}")]
    BuildCpuid {
        id: u8,
        #[source]
        source: cpuid::Error,
    },
    #[error("Cannot set up vCPU {id}")]
    Vcpu {
        id: u8,
        #[source]
        source: outboard_hypervisor::vcpu::Error,
    },
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot place a device")]
    Bus(#[source] outboard_devices::bus::Error),
    #[error(transparent)]
    Console(#[from] console::Error),
    #[error(transparent)]
    Threads(#[from] vcpu::Error),
    #[error(transparent)]
    Pci(#[from] crate::pci::Error),
    #[error("The VM has already been started")]
    AlreadyStarted,
    #[error("Cannot restore guest memory")]
    RestoreMemory(#[source] snapshot::memory::Error),
    #[error("Cannot restore the state of vCPU {id}")]
    RestoreVcpu {
        id: u8,
        #[source]
        source: outboard_hypervisor::state::Error,
    },
    #[error("Cannot restore the {name} device")]
    RestoreDevice {
        name: &'static str,
        #[source]
        source: outboard_devices::Error,
    },
    #[error("Cannot save the {name} device")]
    SaveDevice {
        name: &'static str,
        #[source]
        source: outboard_devices::Error,
    },
    #[error("Cannot list the MSRs to save")]
    MsrList(#[source] outboard_hypervisor::Error),
    #[error("A restored VM takes its virtio devices from the snapshot; configure none")]
    DevicesWithRestore,
    #[error("The VM has not been started")]
    NotStarted,
    #[error("The saved state has no vCPU {0}")]
    MissingVcpuState(u8),
    #[error("The VM prepared before the pause does not match the handed-over state")]
    PreparedMismatch,
}

impl Error {
    /// True for errors caused by the configuration or the files it names (an API client gets a
    /// 400 for these), false for failures of the host or the VMM (500).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Memory(_)
                | Error::Load(_)
                | Error::Console(_)
                | Error::Pci(_)
                | Error::RestoreMemory(_)
                | Error::RestoreVcpu { .. }
                | Error::RestoreDevice { .. }
                | Error::DevicesWithRestore
        )
    }
}

/// Eventfds devices and vCPUs signal to the control loop.
#[derive(Debug)]
pub struct VmEvents {
    pub reset: EventFd,
    pub poweroff: EventFd,
    pub fault: EventFd,
}

impl VmEvents {
    pub fn new() -> Result<Self, Error> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd);
        Ok(VmEvents {
            reset: evt()?,
            poweroff: evt()?,
            fault: evt()?,
        })
    }
}

/// Where a restored VM's guest memory comes from.
#[derive(Debug)]
pub enum RamSource<'a> {
    /// A snapshot's memory file, copied into a new memfd.
    File(&'a Path),
    /// The predecessor VMM's memfd (live update): the same pages, no copy.
    Memfd(std::fs::File),
}

/// A VM's KVM VM, guest RAM and vCPUs before its state is loaded (see [`Vm::prepare`]).
pub struct PreparedVm {
    kvm_vm: Arc<outboard_hypervisor::Vm>,
    ram: GuestRam,
    power_on: PlatformState,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// A live update's devices, adopted before the pause.
    pci: Option<crate::pci::PciDevices>,
    /// A live update's vsock connections, handed over at the pause.
    vsock_streams: Vec<std::os::fd::OwnedFd>,
    vcpus: Vec<(
        outboard_hypervisor::vcpu::Vcpu,
        outboard_hypervisor::kvm_bindings::kvm_lapic_state,
    )>,
}

impl PreparedVm {
    /// The vsock connections' sockets that came with the state at the pause.
    pub fn set_vsock_streams(&mut self, streams: Vec<std::os::fd::OwnedFd>) {
        self.vsock_streams = streams;
    }
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("ram", &self.ram)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Where the loader put the boot items in guest memory: what phase 1 measures.
#[derive(Clone, Copy, Debug)]
pub struct BootPlacement {
    pub kernel: loader::LoadedKernel,
    pub initrd: Option<loader::InitrdPlacement>,
    /// Command line length without its NUL; it lies at [`layout::CMDLINE_START`].
    pub cmdline_len: usize,
}

/// A built VM.
pub struct Vm {
    config: VmmConfig,
    /// `None` for a VM restored from a snapshot: nothing was loaded.
    placement: Option<BootPlacement>,
    kvm_vm: Arc<outboard_hypervisor::Vm>,
    /// PICs, IOAPIC and PIT as created, restored on a VM restart.
    power_on: PlatformState,
    ram: GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: Vec<Arc<dyn Device>>,
    pci: crate::pci::PciDevices,
    serial: Arc<SerialDevice>,
    control: Arc<VcpuControl>,
    counters: Vec<Arc<VcpuCounters>>,
    unstarted: Vec<VcpuContext>,
    threads: Option<VcpuThreads>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("ram", &self.ram)
            .finish_non_exhaustive()
    }
}

/// Loads kernel, initramfs, command line, ACPI tables, zero page and entry state into `mem`.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmmConfig,
) -> Result<(LongModeEntry, BootPlacement), Error> {
    let boot = config.kernel()?;
    let kernel = loader::load_kernel(mem, &boot.kernel_image_path)?;
    if let Some(pvh) = kernel.pvh_entry {
        log::debug!("Kernel has a PVH entry at {pvh:#x}; entering at the 64-bit entry instead");
    }
    let initrd = match &boot.initrd_path {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel, config.mem_bytes())?),
        None => None,
    };
    let cmdline_len = loader::write_cmdline(mem, config.cmdline(), kernel.cmdline_max())?;
    let pci_tables = crate::pci::acpi_extras(config.mem_bytes());
    let tables = acpi::write_tables_with(mem, config.machine.vcpu_count as usize, &pci_tables)
        .map_err(Error::Acpi)?;
    let page = bootparams::ZeroPage {
        mem_size: config.mem_bytes(),
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd,
        rsdp_addr: tables.rsdp,
    };
    bootparams::write(mem, &page).map_err(Error::BootParams)?;
    let entry = paging::write_entry_state(mem, kernel.entry).map_err(Error::Paging)?;
    let placement = BootPlacement {
        kernel,
        initrd,
        cmdline_len,
    };
    Ok((entry, placement))
}

impl Vm {
    /// Builds the VM (nothing runs yet). Checks the configuration first.
    pub fn build(hv: &Hypervisor, config: &VmmConfig, events: &VmEvents) -> Result<Vm, Error> {
        Self::create(hv, config, events, None)
    }

    /// Builds the VM a snapshot describes: `config` (from [`VmState`] plus this process's serial
    /// and reboot settings) and guest memory from `memory`; vCPUs, interrupt controllers, PIT,
    /// kvmclock and devices as saved. Nothing runs yet.
    ///
    /// Virtio devices come from the state: each is connected afresh to its backend (see
    /// [`crate::pci::PciDevices::restore`]).
    pub fn restore(
        hv: &Hypervisor,
        config: &VmmConfig,
        events: &VmEvents,
        state: &VmState,
        memory: RamSource<'_>,
    ) -> Result<Vm, Error> {
        if !config.devices.is_empty() {
            return Err(Error::DevicesWithRestore);
        }
        Self::create(hv, config, events, Some((state, memory)))
    }

    fn create(
        hv: &Hypervisor,
        config: &VmmConfig,
        events: &VmEvents,
        snapshot: Option<(&VmState, RamSource<'_>)>,
    ) -> Result<Vm, Error> {
        crate::config::validate_machine(&config.machine, hv.max_vcpus())?;
        let (snapshot, memory) = match snapshot {
            Some((state, memory)) => (Some(state), Some(memory)),
            None => (None, None),
        };
        if snapshot.is_none() {
            config.kernel()?;
        }
        let ram = match memory {
            Some(RamSource::Memfd(memfd)) => GuestRam::from_memfd(memfd, config.mem_bytes())?,
            Some(RamSource::File(path)) => {
                let ram = GuestRam::new(config.mem_bytes())?;
                snapshot::memory::load(path, ram.memfd(), ram.size())
                    .map_err(Error::RestoreMemory)?;
                ram
            }
            None => GuestRam::new(config.mem_bytes())?,
        };
        let prepared = Self::prepare(hv, config, ram, None)?;
        Self::finish(config, events, prepared, snapshot)
    }

    /// What of a VM doesn't depend on its state: the KVM VM with guest RAM registered and the
    /// irqchip and PIT, and the vCPUs with their CPUID and power-on local APIC. A live-update
    /// successor makes these before the old VMM pauses the guest, so their cost (KVM_CREATE_VM,
    /// memory slots, KVM_CREATE_VCPU) is not part of the pause; with `devices` (the early
    /// state and descriptors of [`crate::pci::PciDevices::handover`]) it also adopts the
    /// virtio devices and registers their ioeventfds.
    pub fn prepare(
        hv: &Hypervisor,
        config: &VmmConfig,
        ram: GuestRam,
        devices: Option<(&[crate::pci::PciDeviceState], Vec<std::os::fd::OwnedFd>)>,
    ) -> Result<PreparedVm, Error> {
        crate::config::validate_machine(&config.machine, hv.max_vcpus())?;
        let kvm_vm = Arc::new(hv.create_vm().map_err(Error::CreateVm)?);
        ram.register(&kvm_vm)?;
        kvm_vm
            .setup_platform(layout::KVM_TSS_START, layout::KVM_IDENTITY_MAP_START)
            .map_err(Error::Platform)?;
        let power_on = kvm_vm.platform_state().map_err(Error::Platform)?;
        let supported = hv.supported_cpuid().map_err(Error::Cpuid)?;
        let count = config.machine.vcpu_count as u8;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let vcpu = kvm_vm.create_vcpu(id).map_err(Error::Platform)?;
            let vcpu_err = |source| Error::Vcpu { id, source };
            let cpuid = cpuid::vcpu_cpuid(&supported, id, count, hv.kind())
                .map_err(|source| Error::BuildCpuid { id, source })?;
            vcpu.set_cpuid(&cpuid).map_err(vcpu_err)?;
            vcpu.setup_lapic().map_err(vcpu_err)?;
            let boot_lapic = vcpu.lapic().map_err(vcpu_err)?;
            vcpus.push((vcpu, boot_lapic));
        }
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let pci = match devices {
            Some((early, fds)) => Some(crate::pci::PciDevices::prepare_adopt(
                kvm_vm.clone(),
                &mmio,
                &pio,
                ram.memory(),
                config.mem_bytes(),
                early,
                fds,
            )?),
            None => None,
        };
        Ok(PreparedVm {
            kvm_vm,
            ram,
            power_on,
            pio,
            mmio,
            pci,
            vsock_streams: Vec::new(),
            vcpus,
        })
    }

    /// Finishes a [`PreparedVm`] as the VM `state` describes (a live update's successor).
    pub fn restore_prepared(
        config: &VmmConfig,
        events: &VmEvents,
        prepared: PreparedVm,
        state: &VmState,
    ) -> Result<Vm, Error> {
        if prepared.vcpus.len() != state.vcpus.len() || prepared.ram.size() != state.memory.size {
            return Err(Error::PreparedMismatch);
        }
        let mut config = config.clone();
        config.machine = outboard_api_types::MachineConfig {
            vcpu_count: state.machine.vcpu_count,
            mem_size_mib: state.machine.mem_size_mib,
        };
        config.boot = state.boot.clone();
        Self::finish(&config, events, prepared, Some(state))
    }

    fn finish(
        config: &VmmConfig,
        events: &VmEvents,
        prepared: PreparedVm,
        snapshot: Option<&VmState>,
    ) -> Result<Vm, Error> {
        let PreparedVm {
            kvm_vm,
            ram,
            power_on,
            pio,
            mmio,
            pci,
            vsock_streams,
            vcpus,
        } = prepared;
        let (entry, placement) = match snapshot {
            None => {
                let (entry, placement) = load_guest(ram.memory(), config)?;
                (Some(entry), Some(placement))
            }
            Some(_) => (None, None),
        };

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
        kvm_vm
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(Error::Platform)?;
        let out = console::serial_output(config.serial_path().map(|p| p.as_path()))?;
        let serial = Arc::new(SerialDevice::new(serial_irq, out));
        let dup = |e: &EventFd| e.try_clone().map_err(Error::EventFd);
        let i8042 = Arc::new(I8042::new(dup(&events.reset)?));
        let pm = Arc::new(AcpiPm::new(layout::S5_SLP_TYP, dup(&events.poweroff)?));
        pio.insert(u64::from(COM1_PORT), 8, serial.clone())
            .map_err(Error::Bus)?;
        pio.insert(u64::from(I8042_DATA_PORT), 5, i8042.clone())
            .map_err(Error::Bus)?;
        pio.insert(u64::from(PM1A_EVT_PORT), 6, pm.clone())
            .map_err(Error::Bus)?;
        let debugcon = Arc::new(DebugConsole::new(
            crate::trace::enabled().then(|| Box::new(std::io::stderr()) as Box<_>),
        ));
        pio.insert(u64::from(layout::DEBUGCON_PORT), 1, debugcon.clone())
            .map_err(Error::Bus)?;
        let devices: Vec<Arc<dyn Device>> = vec![serial.clone(), i8042, pm, debugcon];
        let pci = match (pci, snapshot) {
            (Some(pci), Some(state)) => {
                pci.finish_adopt(&state.pci_devices, vsock_streams)?;
                pci
            }
            (Some(_), None) => return Err(Error::PreparedMismatch),
            (None, Some(state)) => crate::pci::PciDevices::restore(
                kvm_vm.clone(),
                &mmio,
                &pio,
                ram.memory(),
                config.mem_bytes(),
                &state.pci_devices,
            )?,
            (None, None) => crate::pci::PciDevices::build(
                kvm_vm.clone(),
                &mmio,
                &pio,
                ram.memory(),
                config.mem_bytes(),
                &config.devices,
            )?,
        };
        let mut config = config.clone();
        config.devices = pci.device_config();

        let control = Arc::new(VcpuControl::new(dup(&events.fault)?));
        let mut unstarted = Vec::with_capacity(vcpus.len());
        let mut counters = Vec::with_capacity(vcpus.len());
        for (id, (vcpu, boot_lapic)) in vcpus.into_iter().enumerate() {
            let id = id as u8;
            let vcpu_err = |source| Error::Vcpu { id, source };
            match (snapshot, &entry) {
                (Some(state), _) => {
                    // `VmState::validate` checked there is one state per vCPU.
                    let saved = state
                        .vcpus
                        .get(usize::from(id))
                        .ok_or(Error::MissingVcpuState(id))?;
                    vcpu.restore_state(saved)
                        .map_err(|source| Error::RestoreVcpu { id, source })?;
                }
                (None, Some(entry)) if id == 0 => vcpu.setup_long_mode(entry).map_err(vcpu_err)?,
                _ => vcpu.setup_application_processor().map_err(vcpu_err)?,
            }
            let vcpu_counters = Arc::new(VcpuCounters::default());
            counters.push(vcpu_counters.clone());
            unstarted.push(VcpuContext {
                vcpu,
                boot_lapic,
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                counters: vcpu_counters,
            });
        }
        if let Some(state) = snapshot {
            kvm_vm
                .set_platform_state(&state.platform)
                .map_err(Error::Platform)?;
            kvm_vm
                .set_clock_ns(state.clock_ns)
                .map_err(Error::Platform)?;
            for device in &devices {
                if let Some(saved) = state.devices.get(device.name()) {
                    device
                        .restore(saved)
                        .map_err(|source| Error::RestoreDevice {
                            name: device.name(),
                            source,
                        })?;
                }
            }
        }
        Ok(Vm {
            config,
            placement,
            kvm_vm,
            power_on,
            ram,
            pio,
            mmio,
            devices,
            pci,
            serial,
            control,
            counters,
            unstarted,
            threads: None,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.threads.is_some() {
            return Err(Error::AlreadyStarted);
        }
        let contexts = std::mem::take(&mut self.unstarted);
        self.threads = Some(VcpuThreads::spawn(contexts, self.control.clone())?);
        Ok(())
    }

    /// Starts the vCPU threads parked, as after [`Vm::pause`] (a restored VM that stays paused).
    pub fn start_paused(&mut self) -> Result<(), Error> {
        self.control.hold();
        self.start()?;
        for device in &self.devices {
            if let Err(e) = device.pause() {
                log::warn!("Pausing {}: {e}", device.name());
            }
        }
        self.pci.pause();
        Ok(())
    }

    /// The whole VM as a [`VmState`], virtio devices included (their rings stopped by the
    /// pause); the VM must be paused. A snapshot file holds this; a successor VMM gets it with
    /// the devices' descriptors ([`crate::pci::PciDevices::handover`]).
    pub fn save_state(&self, hv: &Hypervisor) -> Result<VmState, Error> {
        let pci_devices = self.pci.states()?;
        let mut state = self.save_state_inner(hv)?;
        state.pci_devices = pci_devices;
        Ok(state)
    }

    /// [`Vm::save_state`] for a live update.
    pub fn handover_state(&self, hv: &Hypervisor) -> Result<VmState, Error> {
        self.save_state(hv)
    }

    fn save_state_inner(&self, hv: &Hypervisor) -> Result<VmState, Error> {
        let threads = self.threads.as_ref().ok_or(Error::NotStarted)?;
        let msr_indices = hv.msr_index_list().map_err(Error::MsrList)?;
        let vcpus = threads.save_states(msr_indices)?;
        let platform = self.kvm_vm.platform_state().map_err(Error::Platform)?;
        let clock_ns = self.kvm_vm.clock().map_err(Error::Platform)?.clock;
        let mut saved = std::collections::BTreeMap::new();
        for device in &self.devices {
            let state = device.save().map_err(|source| Error::SaveDevice {
                name: device.name(),
                source,
            })?;
            if !state.is_null() {
                saved.insert(device.name().to_owned(), state);
            }
        }
        Ok(VmState {
            vmm_version: crate::VMM_VERSION.into(),
            machine: MachineState {
                vcpu_count: self.config.machine.vcpu_count,
                mem_size_mib: self.config.machine.mem_size_mib,
            },
            boot: self.config.boot.clone(),
            memory: MemoryState {
                size: self.ram.size(),
                ranges: self
                    .ram
                    .ranges()
                    .iter()
                    .map(|r| RamRangeState {
                        guest_addr: r.guest_addr,
                        size: r.size,
                        file_offset: r.file_offset,
                    })
                    .collect(),
            },
            vcpus,
            platform,
            clock_ns,
            devices: saved,
            pci_devices: Vec::new(),
        })
    }

    /// Parks every vCPU (they are out of `KVM_RUN` when this returns) and pauses devices.
    pub fn pause(&self) -> Result<(), Error> {
        if let Some(threads) = &self.threads {
            threads.pause()?;
        }
        for device in &self.devices {
            if let Err(e) = device.pause() {
                log::warn!("Pausing {}: {e}", device.name());
            }
        }
        self.pci.pause();
        Ok(())
    }

    pub fn resume(&self) {
        self.pci.resume();
        for device in &self.devices {
            if let Err(e) = device.resume() {
                log::warn!("Resuming {}: {e}", device.name());
            }
        }
        if let Some(threads) = &self.threads {
            threads.resume();
        }
    }

    /// Guest reset with restart: vCPUs parked; devices, PICs, IOAPIC and PIT back to power-on
    /// state; kernel reloaded into the same memory; vCPUs back at the entry with their power-on
    /// local APIC (and the KVM paravirtual MSRs off, so nothing writes into the new guest).
    pub fn restart(&self) -> Result<(), Error> {
        self.pause()?;
        for device in &self.devices {
            device.reset();
        }
        self.pci.reset();
        self.kvm_vm
            .set_platform_state(&self.power_on)
            .map_err(Error::Platform)?;
        let (entry, _) = load_guest(self.ram.memory(), &self.config)?;
        if let Some(threads) = &self.threads {
            threads.schedule_reset(entry);
        }
        self.resume();
        Ok(())
    }

    /// Ends the vCPU threads.
    pub fn stop(&mut self) {
        if let Some(threads) = self.threads.take() {
            threads.stop();
        }
    }

    /// The first fault a vCPU reported.
    pub fn fault(&self) -> Option<(u8, vcpu::VcpuFault)> {
        self.control.fault()
    }

    pub fn serial(&self) -> Arc<SerialDevice> {
        self.serial.clone()
    }

    /// Where kernel, initrd and command line were loaded (`None` for a restored VM).
    pub fn placement(&self) -> Option<&BootPlacement> {
        self.placement.as_ref()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    pub fn pci(&self) -> &crate::pci::PciDevices {
        &self.pci
    }

    pub fn kvm_vm(&self) -> &Arc<outboard_hypervisor::Vm> {
        &self.kvm_vm
    }

    /// Counters of vCPUs, devices and buses.
    pub fn metrics(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let vcpus: Vec<serde_json::Value> = self
            .counters
            .iter()
            .enumerate()
            .map(|(id, c)| {
                serde_json::json!({
                    "id": id,
                    "exits_io": c.exits_io.load(Relaxed),
                    "exits_mmio": c.exits_mmio.load(Relaxed),
                    "exits_interrupted": c.exits_interrupted.load(Relaxed),
                    "exits_other": c.exits_other.load(Relaxed),
                })
            })
            .collect();
        let to_map = |counters: Vec<(&'static str, u64)>| {
            counters
                .into_iter()
                .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
                .collect::<serde_json::Map<_, _>>()
        };
        let mut devices: serde_json::Map<String, serde_json::Value> = self
            .devices
            .iter()
            .map(|d| (d.name().to_owned(), to_map(d.counters()).into()))
            .collect();
        for (label, counters) in self.pci.metrics() {
            devices.insert(label, to_map(counters).into());
        }
        serde_json::json!({
            "vcpus": vcpus,
            "devices": devices,
            "pio_bus": to_map(self.pio.counters()),
            "mmio_bus": to_map(self.mmio.counters()),
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
