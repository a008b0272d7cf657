//! How devices reach KVM without a VMM thread on the data path: MSI routes with irqfds (the
//! backend signals an eventfd, KVM injects the MSI-X message) and ioeventfds (a guest write to a
//! notify address signals an eventfd inside KVM, no exit to the VMM).
//!
//! [`MsiRouter`] and [`IoEventRegistrar`] are the seams; [`KvmInterrupts`] implements both over a
//! `VmFd`. KVM_SET_GSI_ROUTING replaces the whole table, so the KVM side keeps the full table,
//! including the default PIC/IOAPIC routes of GSIs 0–23 that KVM_CREATE_IRQCHIP installed.
//! [`RecordingInterrupts`] stands in where no VM exists (unit and host-only tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// First GSI free for MSI routes: 0–23 are the IOAPIC pins.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's routing table limit (KVM_CAP_IRQ_ROUTING answers 4096 here).
pub const MAX_GSI: u32 = 4095;

/// Errors of interrupt and notification plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("No GSI left for an MSI route")]
    GsiExhausted,
    #[error("Cannot set the GSI routing table")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("Cannot build the GSI routing table")]
    BuildRouting,
    #[error("Cannot (un)register irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot (un)register ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot inject MSI")]
    SignalMsi(#[source] kvm_ioctls::Error),
}

/// An MSI message: what a device writes, and where, to interrupt a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// MSI delivery: GSI routes, irqfds bound to them, and direct injection.
pub trait MsiRouter: Send + Sync {
    fn allocate_gsi(&self) -> Result<u32, Error>;
    /// Points `gsi` at `msg`, or removes the route (`None`).
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error>;
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error>;
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error>;
    /// Injects `msg` once (interrupts the VMM raises itself, e.g. a config change).
    fn signal_msi(&self, msg: MsiMessage) -> Result<(), Error>;
}

/// Guest MMIO writes that signal an eventfd in KVM.
pub trait IoEventRegistrar: Send + Sync {
    /// A write of any length at `addr` signals `evt`.
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error>;
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error>;
}

/// Gives access to the VM's fd (implemented for the hypervisor crate's `Vm` and a bare `VmFd`).
pub trait AsVmFd: Send + Sync {
    fn vm_fd(&self) -> &VmFd;
}

impl AsVmFd for VmFd {
    fn vm_fd(&self) -> &VmFd {
        self
    }
}

impl AsVmFd for outboard_hypervisor::vm::Vm {
    fn vm_fd(&self) -> &VmFd {
        self.fd()
    }
}

#[derive(Debug, Default)]
struct Routes {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// [`MsiRouter`] and [`IoEventRegistrar`] over a KVM VM with the in-kernel irqchip.
pub struct KvmInterrupts {
    vm: Arc<dyn AsVmFd>,
    routes: Mutex<Routes>,
}

impl std::fmt::Debug for KvmInterrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmInterrupts").finish_non_exhaustive()
    }
}

impl KvmInterrupts {
    pub fn new(vm: Arc<dyn AsVmFd>) -> Self {
        KvmInterrupts {
            vm,
            routes: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    }

    /// The routing table KVM gets: the irqchip defaults plus every MSI route.
    fn table(routes: &Routes) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::new();
        for gsi in 0..16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(Self::irqchip_entry(gsi, chip, gsi % 8));
        }
        for gsi in 0..FIRST_MSI_GSI {
            entries.push(Self::irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, msg) in &routes.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        entries
    }

    fn commit(&self, routes: &Routes) -> Result<(), Error> {
        let table =
            KvmIrqRouting::from_entries(&Self::table(routes)).map_err(|_| Error::BuildRouting)?;
        self.vm
            .vm_fd()
            .set_gsi_routing(&table)
            .map_err(Error::SetRouting)
    }
}

impl MsiRouter for KvmInterrupts {
    fn allocate_gsi(&self) -> Result<u32, Error> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let gsi = routes.next_gsi;
        if gsi > MAX_GSI {
            return Err(Error::GsiExhausted);
        }
        routes.next_gsi += 1;
        Ok(gsi)
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = match msg {
            Some(m) => routes.msi.insert(gsi, m) != Some(m),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&routes)?;
        }
        Ok(())
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.vm
            .vm_fd()
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::Irqfd { gsi, source })
    }

    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.vm
            .vm_fd()
            .unregister_irqfd(evt, gsi)
            .map_err(|source| Error::Irqfd { gsi, source })
    }

    fn signal_msi(&self, msg: MsiMessage) -> Result<(), Error> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.vm
            .vm_fd()
            .signal_msi(msi)
            .map(|_| ())
            .map_err(Error::SignalMsi)
    }
}

impl IoEventRegistrar for KvmInterrupts {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error> {
        self.vm
            .vm_fd()
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| Error::Ioeventfd { addr, source })
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error> {
        self.vm
            .vm_fd()
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| Error::Ioeventfd { addr, source })
    }
}

/// What [`RecordingInterrupts`] saw, for assertions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub routes: BTreeMap<u32, MsiMessage>,
    /// (eventfd raw fd, gsi) currently bound.
    pub irqfds: Vec<(i32, u32)>,
    /// (eventfd raw fd, address) currently registered.
    pub ioevents: Vec<(i32, u64)>,
    pub injected: Vec<MsiMessage>,
}

/// Records routes and registrations instead of programming KVM: for tests where no VM exists.
/// Bound eventfds are left alone, so a test reads a "call" eventfd as KVM would.
#[derive(Debug, Default)]
pub struct RecordingInterrupts {
    next_gsi: Mutex<u32>,
    pub recorded: Mutex<Recorded>,
}

impl RecordingInterrupts {
    pub fn snapshot(&self) -> Recorded {
        self.recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Recorded) -> R) -> R {
        f(&mut self.recorded.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl MsiRouter for RecordingInterrupts {
    fn allocate_gsi(&self) -> Result<u32, Error> {
        let mut next = self.next_gsi.lock().unwrap_or_else(PoisonError::into_inner);
        let gsi = FIRST_MSI_GSI + *next;
        *next += 1;
        Ok(gsi)
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        self.with(|r| match msg {
            Some(m) => r.routes.insert(gsi, m),
            None => r.routes.remove(&gsi),
        });
        Ok(())
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        self.with(|r| r.irqfds.push((evt.as_raw_fd(), gsi)));
        Ok(())
    }

    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        self.with(|r| r.irqfds.retain(|e| *e != (evt.as_raw_fd(), gsi)));
        Ok(())
    }

    fn signal_msi(&self, msg: MsiMessage) -> Result<(), Error> {
        self.with(|r| r.injected.push(msg));
        Ok(())
    }
}

impl IoEventRegistrar for RecordingInterrupts {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        self.with(|r| r.ioevents.push((evt.as_raw_fd(), addr)));
        Ok(())
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        self.with(|r| r.ioevents.retain(|e| *e != (evt.as_raw_fd(), addr)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_routes_irqfds_and_ioeventfds() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("SKIP: /dev/kvm unavailable ({e})");
                return;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let irqs = KvmInterrupts::new(Arc::new(vm));
        let gsi = irqs.allocate_gsi().unwrap();
        assert_eq!(gsi, FIRST_MSI_GSI);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        irqs.set_route(gsi, Some(msg)).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        irqs.register_irqfd(&evt, gsi).unwrap();
        // KVM consumes the eventfd: the signal is injected, not left for a VMM thread.
        evt.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(evt.read().is_err(), "irqfd did not consume the signal");
        irqs.unregister_irqfd(&evt, gsi).unwrap();
        irqs.set_route(gsi, None).unwrap();
        irqs.register_ioevent(&evt, 0xc000_3000).unwrap();
        irqs.unregister_ioevent(&evt, 0xc000_3000).unwrap();
    }
}
