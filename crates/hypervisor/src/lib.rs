//! KVM access for outboard-vmm: the only crate that talks to `/dev/kvm`.
//!
//! It owns the system handle ([`Hypervisor`]), the VM ([`Vm`]) and its vCPUs ([`Vcpu`]), the
//! CPUID and MSR policy a guest boots with, and the signal used to kick a vCPU out of `KVM_RUN`.
//! Everything above this crate is safe code: each `unsafe` block here is small and says why it
//! holds.
//!
//! It also tells a hardware-virtualization host from a PVM host (`kvm_pvm`: KVM's ABI implemented
//! in software, see `shared/research/pvm.md`), because only PVM-aware kernels and the Outboard test
//! guest run on the latter.

pub mod cpuid;
pub mod kick;
pub mod regs;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

pub use kvm_bindings;
pub use vcpu::{Exit, Vcpu};
pub use vm::{MemorySlot, PlatformState, Vm};

/// Errors of the system-level KVM handle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("Host KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    #[error("Cannot query the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("Cannot list the MSRs KVM saves")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("Cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// What implements `/dev/kvm` on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization (VT-x or AMD-V) under KVM.
    Hardware,
    /// PVM: KVM's ioctl ABI in software; unmodified ring-0 code runs in an emulator.
    Pvm,
}

impl HostKind {
    /// Short name used by the API (`host_kvm`).
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Hardware => "kvm",
            HostKind::Pvm => "pvm",
        }
    }

    /// Detects the host kind from sysfs and `/proc/cpuinfo`.
    pub fn detect() -> HostKind {
        // The sysfs check is cheap; /proc/cpuinfo (every CPU's flags) only when it is inconclusive.
        if Path::new("/sys/module/kvm_pvm").exists() {
            return HostKind::Pvm;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::classify(false, &cpuinfo)
    }

    /// PVM if its module is loaded, or if the CPU flags show no VT-x/AMD-V (while `/dev/kvm`
    /// works, which the caller has established).
    pub fn classify(pvm_module_loaded: bool, cpuinfo: &str) -> HostKind {
        let has_hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if pvm_module_loaded || !has_hw_virt {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }
}

/// Capabilities outboard-vmm cannot run without, with the names used in error messages.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// The opened `/dev/kvm` with its capabilities checked.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    kind: HostKind,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks the API version and the capabilities we rely on.
    pub fn new() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        Ok(Hypervisor {
            kvm,
            kind: HostKind::detect(),
        })
    }

    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// Largest vCPU count KVM accepts for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID leaves KVM can present to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, Error> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)
    }

    /// Every MSR KVM can save and restore on this host (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, Error> {
        self.kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(Error::MsrIndexList)
    }

    /// Creates an empty VM (no irqchip, no memory yet): see [`Vm::setup_platform`].
    pub fn create_vm(&self) -> Result<Vm, Error> {
        let fd = self.kvm.create_vm().map_err(Error::CreateVm)?;
        Ok(Vm::new(fd, self.kvm.get_nr_memslots()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_means_pvm() {
        let cpuinfo = "flags\t: fpu vme vmx sse\n";
        assert_eq!(HostKind::classify(true, cpuinfo), HostKind::Pvm);
    }

    #[test]
    fn vmx_or_svm_without_pvm_is_hardware() {
        assert_eq!(
            HostKind::classify(false, "flags\t: fpu vmx sse\n"),
            HostKind::Hardware
        );
        assert_eq!(
            HostKind::classify(false, "flags\t: fpu svm sse\n"),
            HostKind::Hardware
        );
    }

    #[test]
    fn no_virt_flags_is_pvm() {
        assert_eq!(
            HostKind::classify(false, "flags\t: fpu sse hypervisor\n"),
            HostKind::Pvm
        );
        assert_eq!(HostKind::Pvm.as_str(), "pvm");
    }
}
