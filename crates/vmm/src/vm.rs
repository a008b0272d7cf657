//! One built VM: KVM VM, guest RAM, buses and devices, vCPUs; start, pause, resume, restart, stop.

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
    placement: BootPlacement,
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
        crate::config::validate_machine(&config.machine, hv.max_vcpus())?;
        config.kernel()?;
        let ram = GuestRam::new(config.mem_bytes())?;
        let kvm_vm = Arc::new(hv.create_vm().map_err(Error::CreateVm)?);
        ram.register(&kvm_vm)?;
        kvm_vm
            .setup_platform(layout::KVM_TSS_START, layout::KVM_IDENTITY_MAP_START)
            .map_err(Error::Platform)?;
        let power_on = kvm_vm.platform_state().map_err(Error::Platform)?;
        let (entry, placement) = load_guest(ram.memory(), config)?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
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
        let pci = crate::pci::PciDevices::build(
            kvm_vm.clone(),
            &mmio,
            &pio,
            ram.memory(),
            config.mem_bytes(),
            &config.devices,
        )?;

        let control = Arc::new(VcpuControl::new(dup(&events.fault)?));
        let supported = hv.supported_cpuid().map_err(Error::Cpuid)?;
        let count = config.machine.vcpu_count as u8;
        let mut unstarted = Vec::with_capacity(count as usize);
        let mut counters = Vec::with_capacity(count as usize);
        for id in 0..count {
            let vcpu = kvm_vm.create_vcpu(id).map_err(Error::Platform)?;
            let vcpu_err = |source| Error::Vcpu { id, source };
            let cpuid = cpuid::vcpu_cpuid(&supported, id, count, hv.kind())
                .map_err(|source| Error::BuildCpuid { id, source })?;
            vcpu.set_cpuid(&cpuid).map_err(vcpu_err)?;
            vcpu.setup_lapic().map_err(vcpu_err)?;
            let boot_lapic = vcpu.lapic().map_err(vcpu_err)?;
            if id == 0 {
                vcpu.setup_long_mode(&entry).map_err(vcpu_err)?;
            } else {
                vcpu.setup_application_processor().map_err(vcpu_err)?;
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
        Ok(Vm {
            config: config.clone(),
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

    /// Where kernel, initrd and command line were loaded.
    pub fn placement(&self) -> &BootPlacement {
        &self.placement
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
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
