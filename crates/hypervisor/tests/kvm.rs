//! Real-KVM checks of the set-up calls outboard-vmm makes (skipped without /dev/kvm).

use outboard_hypervisor::{cpuid, regs, Hypervisor};

fn hypervisor(test: &str) -> Option<Hypervisor> {
    match Hypervisor::new() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("SKIP: {test}: /dev/kvm unusable: {e}");
            None
        }
    }
}

#[test]
fn platform_vcpu_and_boot_state_are_accepted() {
    let Some(hv) = hypervisor("platform_vcpu_and_boot_state_are_accepted") else {
        return;
    };
    assert!(hv.max_vcpus() >= 1);
    let vm = hv.create_vm().unwrap();
    vm.setup_platform(0xfffb_d000, 0xfffb_c000).unwrap();
    let power_on = vm.platform_state().unwrap();
    vm.set_platform_state(&power_on).unwrap();
    let supported = hv.supported_cpuid().unwrap();
    for id in 0..2u8 {
        let vcpu = vm.create_vcpu(id).unwrap();
        let cpuid = cpuid::vcpu_cpuid(&supported, id, 2, hv.kind()).unwrap();
        vcpu.set_cpuid(&cpuid).unwrap();
        vcpu.setup_lapic().unwrap();
        let lapic = vcpu.lapic().unwrap();
        vcpu.set_lapic(&lapic).unwrap();
        if id == 0 {
            let entry = regs::LongModeEntry {
                rip: 0x10_0000,
                rsi: 0x7000,
                rsp: 0x8ff0,
                pml4: 0x9000,
                gdt_base: 0x500,
                gdt: [
                    0,
                    regs::gdt_entry(regs::GDT_CODE64, 0, 0xfffff),
                    regs::gdt_entry(regs::GDT_DATA, 0, 0xfffff),
                    regs::gdt_entry(regs::GDT_TSS, 0, 0xfffff),
                ],
                idt_base: 0x520,
            };
            vcpu.setup_long_mode(&entry).unwrap();
            assert_eq!(vcpu.regs().unwrap().rip, 0x10_0000);
        } else {
            vcpu.setup_application_processor().unwrap();
        }
    }
}

#[test]
fn vcpu_state_round_trips_between_vms() {
    let Some(hv) = hypervisor("vcpu_state_round_trips_between_vms") else {
        return;
    };
    let supported = hv.supported_cpuid().unwrap();
    let msr_indices = hv.msr_index_list().unwrap();
    let cpuid = cpuid::vcpu_cpuid(&supported, 0, 1, hv.kind()).unwrap();
    let entry = regs::LongModeEntry {
        rip: 0x12_3456,
        rsi: 0x7000,
        rsp: 0x8ff0,
        pml4: 0x9000,
        gdt_base: 0x500,
        gdt: [
            0,
            regs::gdt_entry(regs::GDT_CODE64, 0, 0xfffff),
            regs::gdt_entry(regs::GDT_DATA, 0, 0xfffff),
            regs::gdt_entry(regs::GDT_TSS, 0, 0xfffff),
        ],
        idt_base: 0x520,
    };

    let source_vm = hv.create_vm().unwrap();
    source_vm.setup_platform(0xfffb_d000, 0xfffb_c000).unwrap();
    let source = source_vm.create_vcpu(0).unwrap();
    source.set_cpuid(&cpuid).unwrap();
    source.setup_lapic().unwrap();
    source.setup_long_mode(&entry).unwrap();
    let saved = source.save_state(&msr_indices).unwrap();
    // Through the serialized form a snapshot or a successor VMM gets.
    let json = serde_json::to_string(&saved).unwrap();
    let saved: outboard_hypervisor::state::VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(saved.regs.rip, 0x12_3456);
    assert!(saved
        .msrs
        .contains(&(regs::MSR_IA32_MISC_ENABLE, regs::MISC_ENABLE_FAST_STRING)));

    let target_vm = hv.create_vm().unwrap();
    target_vm.setup_platform(0xfffb_d000, 0xfffb_c000).unwrap();
    let target = target_vm.create_vcpu(0).unwrap();
    target.set_cpuid(&cpuid).unwrap();
    target.restore_state(&saved).unwrap();
    let restored = target.save_state(&msr_indices).unwrap();
    assert_eq!(restored.regs.rip, saved.regs.rip);
    assert_eq!(restored.regs.rsi, saved.regs.rsi);
    assert_eq!(restored.sregs.cr3, saved.sregs.cr3);
    assert_eq!(restored.sregs.efer, saved.sregs.efer);
    assert_eq!(restored.sregs.cs.l, 1);
    assert_eq!(restored.lapic.regs[..], saved.lapic.regs[..]);
    assert!(restored
        .msrs
        .contains(&(regs::MSR_IA32_MISC_ENABLE, regs::MISC_ENABLE_FAST_STRING)));
    assert_eq!(restored.mp_state.mp_state, saved.mp_state.mp_state);
}
