//! A vCPU's complete architectural state, read from one vCPU and written into another (of this
//! VM after a restart, or of a successor VMM's VM after a live update).
//!
//! The order of the writes follows KVM's dependencies: MP state first, then registers and
//! special registers, FPU and XCRs, the local APIC, MSRs (some depend on CPUID and APIC mode),
//! and pending events last, since setting the other state may clear them.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, Msrs, KVM_MAX_MSR_ENTRIES,
};

use crate::vcpu::Vcpu;

/// Errors of saving and restoring vCPU state; each names the piece that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot {action} the {piece} of vCPU {vcpu}")]
    Ioctl {
        action: &'static str,
        piece: &'static str,
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot build an MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("vCPU {vcpu} accepted only {set} of {total} MSRs (first rejected: {rejected:#x})")]
    MsrsRejected {
        vcpu: u8,
        set: usize,
        total: usize,
        rejected: u32,
    },
}

/// Everything KVM holds for one vCPU. Serializable (KVM structures as their raw bytes, which
/// KVM's ABI keeps stable) so it can go into a snapshot or to a successor VMM.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    #[serde(with = "fpu_serde")]
    pub fpu: kvm_fpu,
    /// `None` where the host has no XCRs (no XSAVE, as under PVM).
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// `kvm_fpu` is the one vCPU structure kvm-bindings does not serialize: field by field here.
mod fpu_serde {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Fpu {
        fpr: [[u8; 16]; 8],
        fcw: u16,
        fsw: u16,
        ftwx: u8,
        last_opcode: u16,
        last_ip: u64,
        last_dp: u64,
        xmm: [[u8; 16]; 16],
        mxcsr: u32,
    }

    pub fn serialize<S: Serializer>(f: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let f = Fpu::deserialize(d)?;
        Ok(kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        })
    }
}

fn msr_list(indices: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(Error::MsrList)
}

impl Vcpu {
    fn ioctl_err(
        &self,
        action: &'static str,
        piece: &'static str,
    ) -> impl Fn(kvm_ioctls::Error) -> Error {
        let vcpu = self.id();
        move |source| Error::Ioctl {
            action,
            piece,
            vcpu,
            source,
        }
    }

    /// Reads the MSRs in `indices` that KVM can read; unreadable ones are left out.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
        let mut values = Vec::with_capacity(indices.len());
        let mut pos = 0;
        while pos < indices.len() {
            let chunk = &indices[pos..(pos + KVM_MAX_MSR_ENTRIES).min(indices.len())];
            let mut msrs = msr_list(chunk.iter().map(|&i| (i, 0)))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.ioctl_err("read", "MSRs"))?;
            values.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
            pos += read;
            if read < chunk.len() {
                // KVM stops at the first MSR it can't read: leave that one out.
                pos += 1;
            }
        }
        Ok(values)
    }

    /// Reads the whole state; `msr_indices` is normally [`crate::Hypervisor::msr_index_list`].
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, Error> {
        let xcrs = match self.fd.get_xcrs() {
            Ok(xcrs) => Some(xcrs),
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENXIO => None,
            Err(e) => return Err(self.ioctl_err("read", "XCRs")(e)),
        };
        Ok(VcpuState {
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.ioctl_err("read", "MP state"))?,
            regs: self
                .fd
                .get_regs()
                .map_err(self.ioctl_err("read", "registers"))?,
            sregs: self
                .fd
                .get_sregs()
                .map_err(self.ioctl_err("read", "special registers"))?,
            fpu: self
                .fd
                .get_fpu()
                .map_err(self.ioctl_err("read", "FPU state"))?,
            xcrs,
            lapic: self
                .fd
                .get_lapic()
                .map_err(self.ioctl_err("read", "local APIC"))?,
            msrs: self.read_msrs(msr_indices)?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.ioctl_err("read", "pending events"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.ioctl_err("read", "debug registers"))?,
        })
    }

    /// Writes state saved by [`Vcpu::save_state`] (CPUID must already be set).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), Error> {
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.ioctl_err("write", "MP state"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.ioctl_err("write", "special registers"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.ioctl_err("write", "registers"))?;
        self.fd
            .set_fpu(&state.fpu)
            .map_err(self.ioctl_err("write", "FPU state"))?;
        if let Some(xcrs) = &state.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(self.ioctl_err("write", "XCRs"))?;
        }
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.ioctl_err("write", "local APIC"))?;
        for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = msr_list(chunk.iter().copied())?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(self.ioctl_err("write", "MSRs"))?;
            if set != chunk.len() {
                return Err(Error::MsrsRejected {
                    vcpu: self.id(),
                    set,
                    total: chunk.len(),
                    rejected: chunk[set].0,
                });
            }
        }
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(self.ioctl_err("write", "debug registers"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.ioctl_err("write", "pending events"))
    }
}
