//! The KVM VM: platform devices KVM emulates in the kernel (PIC, IOAPIC, PIT), memory slots,
//! irqfds and vCPU creation.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Vcpu;

/// Errors of VM-level KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("Cannot set the identity map address")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("Cannot create the in-kernel interrupt controllers")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("Cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM offers only {0} memory slots")]
    NoMemorySlot(usize),
    #[error("Cannot register guest memory at {guest_phys_addr:#x} ({size:#x} bytes) with KVM")]
    SetMemoryRegion {
        guest_phys_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot register an irqfd for GSI {gsi}")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot create vCPU {id}")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot read the KVM clock")]
    GetClock(#[source] kvm_ioctls::Error),
    #[error("Cannot set the KVM clock")]
    SetClock(#[source] kvm_ioctls::Error),
    #[error("Cannot access the in-kernel interrupt controller state")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("Cannot access the in-kernel PIT state")]
    Pit(#[source] kvm_ioctls::Error),
}

/// The state of the platform devices KVM emulates: both PICs, the IOAPIC and the PIT.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

impl std::fmt::Debug for PlatformState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformState").finish_non_exhaustive()
    }
}

/// One guest-physical range backed by host memory, as KVM sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// A KVM VM.
pub struct Vm {
    fd: VmFd,
    max_slots: usize,
    next_slot: std::sync::atomic::AtomicU32,
    /// The mappings behind the memory slots, kept alive as long as KVM may touch them.
    #[allow(clippy::type_complexity)]
    slot_memory: std::sync::Mutex<Vec<std::sync::Arc<dyn std::any::Any + Send + Sync>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl Vm {
    pub(crate) fn new(fd: VmFd, max_slots: usize) -> Self {
        Vm {
            fd,
            max_slots,
            next_slot: std::sync::atomic::AtomicU32::new(0),
            slot_memory: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Sets up the x86 platform KVM provides: the 3-page TSS and the identity-map page that VT-x
    /// needs for real mode (harmless elsewhere), the PIC+IOAPIC pair and the PIT.
    /// Must run before any vCPU is created.
    pub fn setup_platform(&self, tss_addr: u64, identity_map_addr: u64) -> Result<(), Error> {
        self.fd
            .set_identity_map_address(identity_map_addr)
            .map_err(Error::SetIdentityMap)?;
        self.fd
            .set_tss_address(tss_addr as usize)
            .map_err(Error::SetTssAddress)?;
        self.fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        // The speaker port is left to KVM's dummy so that a guest poking port 0x61 never exits.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(Error::CreatePit)
    }

    /// Registers host memory as guest-physical memory. The VM keeps `mapping` alive until it is
    /// dropped, so the range stays mapped while KVM can reach it.
    ///
    /// # Safety
    ///
    /// `slot.host_addr .. + slot.size` must lie inside the mapping that `mapping` owns (and unmaps
    /// only when dropped): the guest reads and writes that range.
    pub unsafe fn add_memory_slot(
        &self,
        slot: MemorySlot,
        mapping: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<u32, Error> {
        let index = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if index as usize >= self.max_slots {
            return Err(Error::NoMemorySlot(self.max_slots));
        }
        let region = kvm_userspace_memory_region {
            slot: index,
            flags: 0,
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: the caller guarantees the range lies in `mapping`, which is stored below and so
        // outlives the VM fd: struct fields drop in declaration order, `fd` before `slot_memory`.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
            Error::SetMemoryRegion {
                guest_phys_addr: slot.guest_phys_addr,
                size: slot.size,
                source,
            }
        })?;
        self.slot_memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(mapping);
        Ok(index)
    }

    /// Makes a write to `evt` raise `gsi` on the in-kernel interrupt controllers.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::RegisterIrqfd { gsi, source })
    }

    /// Creates vCPU `id`; its APIC ID equals `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, Error> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| Error::CreateVcpu { id, source })?;
        Ok(Vcpu::new(fd, id))
    }

    /// The KVM clock (ns), for state that must survive a pause.
    pub fn clock_ns(&self) -> Result<u64, Error> {
        self.fd
            .get_clock()
            .map(|c| c.clock)
            .map_err(Error::GetClock)
    }

    /// The whole KVM clock (kvmclock ns and flags), for a snapshot or a successor VMM.
    pub fn clock(&self) -> Result<kvm_clock_data, Error> {
        self.fd.get_clock().map_err(Error::GetClock)
    }

    /// Sets the KVM clock to `ns`, so guest time continues from where a saved VM stopped instead
    /// of jumping by the time it spent saved.
    pub fn set_clock_ns(&self, ns: u64) -> Result<(), Error> {
        let clock = kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(Error::SetClock)
    }

    /// Reads the in-kernel PICs, IOAPIC and PIT.
    pub fn platform_state(&self) -> Result<PlatformState, Error> {
        let chip = |chip_id| -> Result<kvm_irqchip, Error> {
            let mut state = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut state).map_err(Error::Irqchip)?;
            Ok(state)
        };
        Ok(PlatformState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(Error::Pit)?,
        })
    }

    /// Writes back state from [`Vm::platform_state`] (e.g. the power-on state, for a restart).
    pub fn set_platform_state(&self, state: &PlatformState) -> Result<(), Error> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(Error::Irqchip)?;
        }
        self.fd.set_pit2(&state.pit).map_err(Error::Pit)
    }

    /// The raw VM fd, for ioctls later layers add (irq routing, ioeventfds).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
