//! The CPUID a vCPU sees: what KVM supports on this host, with the per-vCPU topology (APIC IDs in
//! leaves 1, 0xb and 0x1f), the hypervisor bit and KVM's paravirtual leaves (kvmclock).
//!
//! On a PVM host the features PVM's instruction emulator cannot execute are hidden too
//! (`shared/research/pvm.md`): a guest that honours CPUID then never reaches them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::HostKind;

/// Errors of building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Too many CPUID entries")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
pub const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Leaf 1 ECX: the hypervisor-present bit.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: hyper-threading (more than one logical CPU per package).
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bits PVM's emulator cannot run: cx16, movbe, popcnt, xsave, osxsave, rdrand.
const PVM_HIDDEN_LEAF1_ECX: u32 =
    (1 << 13) | (1 << 22) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 30);
/// Leaf 7 EBX: fsgsbase, rdseed, smap.
const PVM_HIDDEN_LEAF7_EBX: u32 = (1 << 0) | (1 << 18) | (1 << 20);
/// Leaf 7 ECX: rdpid.
const PVM_HIDDEN_LEAF7_ECX: u32 = 1 << 22;

/// KVM feature bits (leaf 0x4000_0001 EAX): kvmclock (both MSR sets) and the stable-clock hint.
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
pub const KVM_FEATURE_CLOCKSOURCE_STABLE: u32 = 1 << 24;

/// Bits needed to number `count` logical CPUs in an x2APIC ID.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Builds the CPUID of vCPU `apic_id` of `cpu_count` from the host's supported set.
/// The topology is one package with `cpu_count` cores and one thread per core.
pub fn vcpu_cpuid(
    supported: &CpuId,
    apic_id: u8,
    cpu_count: u8,
    host: HostKind,
) -> Result<CpuId, Error> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    if !entries.iter().any(|e| e.function == LEAF_KVM_SIGNATURE) {
        entries.push(kvm_signature_leaf());
    }
    if !entries.iter().any(|e| e.function == LEAF_KVM_FEATURES) {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_CLOCKSOURCE2,
            ..Default::default()
        });
    }
    for entry in &mut entries {
        patch_entry(entry, apic_id, cpu_count, host);
    }
    CpuId::from_entries(&entries).map_err(Error::TooManyEntries)
}

fn kvm_signature_leaf() -> kvm_cpuid_entry2 {
    let sig = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    kvm_cpuid_entry2 {
        function: LEAF_KVM_SIGNATURE,
        eax: LEAF_KVM_FEATURES,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u8, cpu_count: u8, host: HostKind) {
    let apic = u32::from(apic_id);
    let count = u32::from(cpu_count.max(1));
    match entry.function {
        LEAF_FEATURES => {
            // EBX: initial APIC ID [31:24], logical CPUs per package [23:16], CLFLUSH size [15:8].
            entry.ebx = (apic << 24) | (count << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
            if host == HostKind::Pvm {
                entry.ecx &= !PVM_HIDDEN_LEAF1_ECX;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: logical CPUs sharing the cache - 1.
            entry.eax &= 0x3fff;
            if entry.eax & 0x1f != 0 {
                entry.eax |= (count - 1) << 26;
            }
        }
        LEAF_EXT_FEATURES if entry.index == 0 && host == HostKind::Pvm => {
            entry.ebx &= !PVM_HIDDEN_LEAF7_EBX;
            entry.ecx &= !PVM_HIDDEN_LEAF7_ECX;
        }
        LEAF_XSAVE if host == HostKind::Pvm => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            entry.edx = apic;
            let (shift, cpus, level_type) = match entry.index {
                // SMT level: one thread per core.
                0 => (0, 1, 1),
                // Core level: the whole package.
                1 => (id_bits(cpu_count), count, 2),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = cpus;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
        }
        LEAF_KVM_FEATURES => {
            entry.eax |= KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_CLOCKSOURCE2;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            leaf(1, 0),
            leaf(7, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x1f, 1),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let cpuid = vcpu_cpuid(&supported(), 3, 4, HostKind::Hardware).unwrap();
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        // Hardware hosts keep xsave and popcnt.
        assert_ne!(l1.ecx & (1 << 26), 0);
    }

    #[test]
    fn topology_leaves_carry_x2apic_id() {
        let cpuid = vcpu_cpuid(&supported(), 1, 2, HostKind::Hardware).unwrap();
        let smt = find(&cpuid, 0xb, 0);
        let core = find(&cpuid, 0xb, 1);
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 1));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert_eq!(find(&cpuid, 0x1f, 1).edx, 1);
    }

    #[test]
    fn kvm_leaves_are_added_with_kvmclock() {
        let cpuid = vcpu_cpuid(&supported(), 0, 1, HostKind::Hardware).unwrap();
        let sig = find(&cpuid, LEAF_KVM_SIGNATURE, 0);
        assert_eq!(&sig.ebx.to_le_bytes(), b"KVMK");
        let features = find(&cpuid, LEAF_KVM_FEATURES, 0);
        assert_ne!(features.eax & KVM_FEATURE_CLOCKSOURCE2, 0);
    }

    #[test]
    fn pvm_hides_what_its_emulator_cannot_run() {
        let cpuid = vcpu_cpuid(&supported(), 0, 1, HostKind::Pvm).unwrap();
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ecx & PVM_HIDDEN_LEAF1_ECX, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        let l7 = find(&cpuid, 7, 0);
        assert_eq!(l7.ebx & PVM_HIDDEN_LEAF7_EBX, 0);
        assert_eq!(l7.ecx & PVM_HIDDEN_LEAF7_ECX, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(255), 8);
    }
}
