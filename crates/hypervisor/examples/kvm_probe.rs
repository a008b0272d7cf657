//! Prints what this host's /dev/kvm offers outboard-vmm: `cargo run -p outboard-hypervisor
//! --example kvm_probe`. Useful on a new host kind (PVM answers some queries differently).

use outboard_hypervisor::{cpuid, Hypervisor};

fn main() {
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
    };
    println!("host kind: {:?}", hv.kind());
    println!("max vCPUs per VM: {}", hv.max_vcpus());
    let supported = hv.supported_cpuid().expect("KVM_GET_SUPPORTED_CPUID");
    let entries = supported.as_slice();
    println!("supported CPUID entries: {}", entries.len());
    let find = |f: u32| entries.iter().find(|e| e.function == f && e.index == 0);
    if let Some(sig) = find(cpuid::LEAF_KVM_SIGNATURE) {
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        println!(
            "leaf 0x40000000: {:?}, max leaf {:#x}",
            String::from_utf8_lossy(&name),
            sig.eax
        );
    } else {
        println!("leaf 0x40000000: absent (outboard-vmm adds it)");
    }
    if let Some(features) = find(cpuid::LEAF_KVM_FEATURES) {
        println!("leaf 0x40000001 eax (KVM features): {:#x}", features.eax);
    }
    if let Some(l1) = find(1) {
        let bit = |r: u32, b: u32| (r >> b) & 1;
        println!(
            "leaf 1: x2apic={} tsc_deadline={} xsave={} popcnt={} cx16={} hypervisor={}",
            bit(l1.ecx, 21),
            bit(l1.ecx, 24),
            bit(l1.ecx, 26),
            bit(l1.ecx, 23),
            bit(l1.ecx, 13),
            bit(l1.ecx, 31)
        );
    }
    let vm = hv.create_vm().expect("KVM_CREATE_VM");
    match vm.setup_platform(0xfffb_d000, 0xfffb_c000) {
        Ok(()) => println!("identity map, TSS, irqchip, PIT2: accepted"),
        Err(e) => println!("platform set-up failed: {e}"),
    }
    let msrs = hv.msr_index_list().expect("KVM_GET_MSR_INDEX_LIST");
    println!("MSRs KVM saves: {}", msrs.len());
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = cpuid::vcpu_cpuid(&supported, 0, 1, hv.kind()).expect("CPUID");
    vcpu.set_cpuid(&cpuid).expect("KVM_SET_CPUID2");
    match vcpu.save_state(&msrs) {
        Ok(state) => println!(
            "vCPU state: {} MSRs readable, XCRs {}",
            state.msrs.len(),
            if state.xcrs.is_some() {
                "present"
            } else {
                "absent"
            }
        ),
        Err(e) => println!("vCPU state save failed: {e}"),
    }
    match vm.clock_ns() {
        Ok(ns) => println!("KVM_GET_CLOCK: {ns} ns"),
        Err(e) => println!("KVM_GET_CLOCK failed: {e}"),
    }
}
