//! A KVM vCPU: boot-state set-up and the `KVM_RUN` call, with its exits translated to [`Exit`].

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_run__bindgen_ty_1__bindgen_ty_4, CpuId, Msrs, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::kick;
use crate::regs::{self, LongModeEntry};

/// Errors of vCPU ioctls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("Cannot set MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {total} boot MSRs (first rejected: {rejected:#x})")]
    MsrsRejected {
        set: usize,
        total: usize,
        rejected: u32,
    },
    #[error("Cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("Cannot access general-purpose registers")]
    Regs(#[source] kvm_ioctls::Error),
    #[error("Cannot access special registers")]
    Sregs(#[source] kvm_ioctls::Error),
    #[error("Cannot set the FPU state")]
    Fpu(#[source] kvm_ioctls::Error),
    #[error("Cannot access the local APIC")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("Cannot set the multiprocessing state")]
    MpState(#[source] kvm_ioctls::Error),
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    #[error("Unexpected {0} while completing an I/O exit")]
    PendingIo(&'static str),
}

/// Why `KVM_RUN` returned, in the terms the VMM acts on.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port input of `data.len() / size` accesses of `size` bytes each (more than one for
    /// `rep ins`); fill `data` in order.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// Port output, `size` bytes per access as for [`Exit::IoIn`].
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    Hlt,
    /// Triple fault (or another reason the CPU shut down).
    Shutdown,
    /// KVM could not run or emulate the guest; see [`Vcpu::internal_error`].
    InternalError,
    FailEntry {
        reason: u64,
    },
    SystemEvent {
        kind: u32,
    },
    /// A signal (a kick) or `immediate_exit` interrupted the run.
    Interrupted,
    /// Any exit the VMM does not handle, by name.
    Unhandled(&'static str),
}

/// Details KVM gives with `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalError {
    pub suberror: u32,
    pub data: Vec<u64>,
}

/// One vCPU of a [`crate::Vm`].
#[derive(Debug)]
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    id: u8,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u8) -> Self {
        Vcpu { fd, id }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), Error> {
        self.fd.set_cpuid2(cpuid).map_err(Error::SetCpuid)
    }

    /// Sets MSRs; every one must be accepted.
    pub fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<(), Error> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
        let set = self.fd.set_msrs(&list).map_err(Error::SetMsrs)?;
        if set != msrs.len() {
            return Err(Error::MsrsRejected {
                set,
                total: msrs.len(),
                rejected: msrs[set].0,
            });
        }
        Ok(())
    }

    /// Puts the bootstrap processor at the 64-bit entry: registers, segments, paging, FPU, MSRs.
    pub fn setup_long_mode(&self, entry: &LongModeEntry) -> Result<(), Error> {
        self.set_msrs(&regs::boot_msrs())?;
        let mut sregs = self.fd.get_sregs().map_err(Error::Sregs)?;
        entry.apply_sregs(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(Error::Sregs)?;
        self.fd.set_regs(&entry.regs()).map_err(Error::Regs)?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(Error::Fpu)?;
        self.set_mp_state(true)
    }

    /// An application processor waits for INIT/SIPI from the BSP; only its MSRs are preset.
    pub fn setup_application_processor(&self) -> Result<(), Error> {
        self.set_msrs(&regs::boot_msrs())?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(Error::Fpu)?;
        self.set_mp_state(false)
    }

    fn set_mp_state(&self, runnable: bool) -> Result<(), Error> {
        let mp_state = if runnable {
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(Error::MpState)
    }

    /// LINT0 = ExtINT, LINT1 = NMI.
    pub fn setup_lapic(&self) -> Result<(), Error> {
        let mut lapic = self.fd.get_lapic().map_err(Error::Lapic)?;
        regs::setup_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(Error::Lapic)
    }

    pub fn lapic(&self) -> Result<kvm_lapic_state, Error> {
        self.fd.get_lapic().map_err(Error::Lapic)
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), Error> {
        self.fd.set_lapic(lapic).map_err(Error::Lapic)
    }

    pub fn regs(&self) -> Result<kvm_regs, Error> {
        self.fd.get_regs().map_err(Error::Regs)
    }

    /// The guest RIP, for error messages (0 if KVM cannot tell).
    pub fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Publishes this vCPU's `kvm_run` to the kick handler of the calling thread. Call on the
    /// thread that runs the vCPU, before its first [`Vcpu::run`]; undo with [`Vcpu::unbind_kick`].
    pub fn bind_kick(&mut self) {
        kick::bind_kvm_run(self.fd.get_kvm_run());
    }

    pub fn unbind_kick(&mut self) {
        kick::bind_kvm_run(std::ptr::null_mut());
    }

    /// Clears a pending kick so that the next `KVM_RUN` enters the guest.
    pub fn clear_kick(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Details of the last `KVM_EXIT_INTERNAL_ERROR`.
    pub fn internal_error(&mut self) -> InternalError {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            return InternalError {
                suberror: 0,
                data: Vec::new(),
            };
        }
        // SAFETY: the exit reason says the `internal` member of the union is the valid one; it is
        // plain integers, so any bit pattern is a valid value.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }

    /// Finishes an I/O or MMIO exit the VMM has handled but KVM has not: the data of an `IN` or
    /// MMIO read reaches the register, and RIP moves past the instruction, only on the next
    /// `KVM_RUN`. With `immediate_exit` set KVM does that and returns without running guest
    /// code. Needed before saving the state for another VM, or that instruction runs twice.
    pub fn complete_pending_io(&mut self) -> Result<(), Error> {
        self.fd.set_kvm_immediate_exit(1);
        let outcome = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::Run(e)),
            Ok(VcpuExit::Intr) => Ok(()),
            Ok(other) => Err(Error::PendingIo(exit_name(&other))),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// Runs the vCPU until the next exit.
    pub fn run(&mut self) -> Result<Exit<'_>, Error> {
        let run: *const u8 = (self.fd.get_kvm_run() as *const kvm_run).cast();
        let io_size = || {
            let field = run.wrapping_add(
                std::mem::offset_of!(kvm_run, __bindgen_anon_1)
                    + std::mem::offset_of!(kvm_run__bindgen_ty_1__bindgen_ty_4, size),
            );
            // SAFETY: `run` points to this vCPU's mapped `kvm_run`, and after a KVM_EXIT_IO its
            // `io` member is the valid one. Nothing borrows the `io.size` byte: the exit's data
            // slice lies at `io.data_offset`, past the structure.
            usize::from(unsafe { std::ptr::read_volatile(field) }).max(1)
        };
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => Exit::IoIn {
                    port,
                    size: io_size(),
                    data,
                },
                VcpuExit::IoOut(port, data) => Exit::IoOut {
                    port,
                    size: io_size(),
                    data,
                },
                VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
                VcpuExit::Hlt => Exit::Hlt,
                VcpuExit::Shutdown => Exit::Shutdown,
                VcpuExit::InternalError => Exit::InternalError,
                VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
                VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
                VcpuExit::Intr => Exit::Interrupted,
                other => Exit::Unhandled(exit_name(&other)),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(Error::Run(e)),
        }
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN",
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION",
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL",
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG",
        VcpuExit::IrqWindowOpen => "KVM_EXIT_IRQ_WINDOW_OPEN",
        VcpuExit::SetTpr => "KVM_EXIT_SET_TPR",
        VcpuExit::TprAccess => "KVM_EXIT_TPR_ACCESS",
        VcpuExit::Nmi => "KVM_EXIT_NMI",
        VcpuExit::IoapicEoi(_) => "KVM_EXIT_IOAPIC_EOI",
        VcpuExit::Hyperv => "KVM_EXIT_HYPERV",
        VcpuExit::X86Rdmsr(_) => "KVM_EXIT_X86_RDMSR",
        VcpuExit::X86Wrmsr(_) => "KVM_EXIT_X86_WRMSR",
        VcpuExit::MemoryFault { .. } => "KVM_EXIT_MEMORY_FAULT",
        VcpuExit::Watchdog => "KVM_EXIT_WATCHDOG",
        _ => "an exit outboard-vmm does not handle",
    }
}
