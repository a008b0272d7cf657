use outboard_hypervisor::kvm_bindings::{kvm_irqchip, kvm_pit_state2};

use super::*;

fn vcpu() -> VcpuState {
    VcpuState {
        mp_state: Default::default(),
        regs: outboard_hypervisor::kvm_bindings::kvm_regs {
            rip: 0x10_0000,
            ..Default::default()
        },
        sregs: Default::default(),
        fpu: Default::default(),
        xcrs: None,
        lapic: Default::default(),
        msrs: vec![(0x10, 12345)],
        events: Default::default(),
        debugregs: Default::default(),
    }
}

fn state() -> VmState {
    let size = 128u64 << 20;
    VmState {
        vmm_version: "test".into(),
        machine: MachineState {
            vcpu_count: 1,
            mem_size_mib: 128,
        },
        boot: None,
        memory: MemoryState {
            size,
            ranges: outboard_boot::layout::ram_ranges(size)
                .iter()
                .map(|r| RamRangeState {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    file_offset: r.file_offset,
                })
                .collect(),
        },
        vcpus: vec![vcpu()],
        platform: PlatformState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: kvm_pit_state2::default(),
        },
        clock_ns: 987_654_321,
        devices: BTreeMap::from([("acpi_pm".into(), serde_json::json!({"status": 1}))]),
        pci_devices: Vec::new(),
    }
}

/// Re-frames `payload` as version `version` with a correct CRC.
fn framed(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn round_trip() {
    let bytes = encode(&state()).unwrap();
    assert_eq!(&bytes[..8], b"OBVMSTAT");
    let back = decode(&bytes).unwrap();
    assert_eq!(back.vcpus[0].regs.rip, 0x10_0000);
    assert_eq!(back.vcpus[0].msrs, vec![(0x10, 12345)]);
    assert_eq!(back.clock_ns, 987_654_321);
    assert_eq!(back.memory, state().memory);
    assert_eq!(back.devices["acpi_pm"]["status"], 1);
}

#[test]
fn rejects_damaged_and_foreign_files() {
    let bytes = encode(&state()).unwrap();
    assert!(matches!(
        decode(b"garbage!garbage!garbage!"),
        Err(Error::BadMagic)
    ));
    assert!(matches!(decode(b"OBVM"), Err(Error::Truncated(4))));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        Err(Error::Truncated(_))
    ));
    let mut flipped = bytes.clone();
    flipped[40] ^= 1;
    assert!(matches!(decode(&flipped), Err(Error::Checksum { .. })));
    let mut huge = bytes.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(decode(&huge), Err(Error::TooLarge(_))));
    let payload = &bytes[20..bytes.len() - 4];
    let err = decode(&framed(FORMAT_VERSION + 1, payload)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooNew {
                found: 4,
                newest: 3
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this VMM reads"));
    assert!(matches!(
        decode(&framed(0, payload)),
        Err(Error::TooOld { .. })
    ));
    assert!(matches!(
        decode(&framed(1, b"{\"x\":1}")),
        Err(Error::Json(_))
    ));
}

#[test]
fn rejects_inconsistent_documents() {
    let mut two = state();
    two.machine.vcpu_count = 2;
    let err = decode(&encode(&two).unwrap()).unwrap_err();
    assert!(err.to_string().contains("1 saved"), "{err}");
    let mut small = state();
    small.machine.mem_size_mib = 64;
    assert!(matches!(
        decode(&encode(&small).unwrap()),
        Err(Error::Inconsistent(_))
    ));
    let mut moved = state();
    moved.memory.ranges[0].file_offset = 4096;
    assert!(matches!(
        decode(&encode(&moved).unwrap()),
        Err(Error::Inconsistent(_))
    ));
    let mut absurd = state();
    absurd.machine.mem_size_mib = u64::MAX;
    assert!(matches!(
        decode(&encode(&absurd).unwrap()),
        Err(Error::Inconsistent(_))
    ));
}

/// A v1 state file written by a real outboard-vmm (the test guest's heartbeat, 1 vCPU,
/// 128 MiB). Every later release must keep loading it (N−1 → N, then by upgrade chain).
#[test]
fn v1_fixture_keeps_loading() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vmstate-v1.obvm"
    );
    let state = read_file(Path::new(path)).unwrap();
    assert_eq!(state.machine.vcpu_count as usize, state.vcpus.len());
    assert_eq!(state.memory.size, state.machine.mem_size_mib << 20);
    // Long mode (EFER.LMA) with paging on: a running guest, not a power-on state.
    assert_ne!(state.vcpus[0].sregs.efer & (1 << 10), 0);
    assert_ne!(state.vcpus[0].sregs.cr0 & (1 << 31), 0);
    assert!(state.clock_ns > 0);
    assert!(state.devices.contains_key("serial"));
}

/// A v2 state document handed over by a real outboard-vmm in a live update (the test guest's
/// `live-mix` with a qemu-storage-daemon disk and a vhost-user-net NIC, 1 vCPU, 128 MiB).
#[test]
fn v2_fixture_with_virtio_devices_keeps_loading() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vmstate-v2.obvm"
    );
    let state = read_file(Path::new(path)).unwrap();
    assert_eq!(state.machine.vcpu_count as usize, state.vcpus.len());
    let labels: Vec<&str> = state.pci_devices.iter().map(|d| d.label.as_str()).collect();
    assert_eq!(labels, ["virtio-blk0", "virtio-net0"]);
    for dev in &state.pci_devices {
        // Driver up (DRIVER_OK), BAR placed, vhost-user rings stopped at the pause.
        let transport = &dev.state["transport"];
        assert_ne!(
            transport["status"].as_u64().unwrap() & 4,
            0,
            "{}",
            dev.label
        );
        assert!(transport["bar_addr"].as_u64().is_some());
        assert_eq!(dev.state["device"]["paused"], true);
        assert!(!dev.state["device"]["vrings"].as_array().unwrap().is_empty());
    }
    assert!(matches!(
        state.pci_devices[0].config,
        PciDeviceConfig::Disk(_)
    ));
}

#[test]
fn a_v1_document_claiming_devices_is_refused() {
    let mut with_devices = state();
    with_devices.pci_devices.push(PciDeviceState {
        label: "virtio-blk0".into(),
        slot: 1,
        config: PciDeviceConfig::Disk("socket=/x".parse().unwrap()),
        inflight: false,
        state: serde_json::Value::Null,
    });
    let v2 = encode(&with_devices).unwrap();
    let payload = &v2[20..v2.len() - 4];
    assert!(decode(&v2).is_ok());
    assert!(matches!(
        decode(&framed(1, payload)),
        Err(Error::Inconsistent(_))
    ));
}

/// A v3 state document handed over by a real outboard-vmm in a live update (the test guest's
/// `vsock-echo` holding one connection to a host echo server, 1 vCPU, 128 MiB).
#[test]
fn v3_fixture_with_a_vsock_connection_keeps_loading() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vmstate-v3.obvm"
    );
    let state = read_file(Path::new(path)).unwrap();
    assert_eq!(version_for(&state), 3);
    let dev = &state.pci_devices[0];
    assert!(matches!(dev.config, PciDeviceConfig::Vsock(_)));
    let vsock: outboard_virtio_devices::vsock::VsockState =
        serde_json::from_value(dev.state["device"].clone()).unwrap();
    assert_eq!(vsock.cid, 3);
    assert_eq!(vsock.connections.len(), 1);
    assert!(vsock.connections[0].established);
    assert!(vsock.rx.is_some() && vsock.tx.is_some());
}

#[test]
fn the_oldest_version_that_holds_the_state_is_written() {
    let mut plain = state();
    assert_eq!(
        u32::from_le_bytes(encode(&plain).unwrap()[8..12].try_into().unwrap()),
        2
    );
    plain.pci_devices.push(PciDeviceState {
        label: "virtio-vsock0".into(),
        slot: 1,
        config: PciDeviceConfig::Vsock("cid=3,uds_path=/x".parse().unwrap()),
        inflight: false,
        state: serde_json::Value::Null,
    });
    let v3 = encode(&plain).unwrap();
    assert_eq!(u32::from_le_bytes(v3[8..12].try_into().unwrap()), 3);
    assert!(decode(&v3).is_ok());
    // A v2 document can't hold a vsock device.
    let payload = &v3[20..v3.len() - 4];
    assert!(matches!(
        decode(&framed(2, payload)),
        Err(Error::Inconsistent(_))
    ));
}

#[test]
fn device_configurations_are_checked_like_the_command_line() {
    let mut hostile = state();
    let mut disk: outboard_virtio_devices::options::DiskConfig = "socket=/x".parse().unwrap();
    hostile.pci_devices.push(PciDeviceState {
        label: "virtio-blk0".into(),
        slot: 1,
        config: PciDeviceConfig::Disk(disk.clone()),
        inflight: false,
        state: serde_json::Value::Null,
    });
    assert!(decode(&encode(&hostile).unwrap()).is_ok());
    for (queues, size) in [(0, 256), (u16::MAX, 256), (1, 0), (1, 100)] {
        disk.num_queues = queues;
        disk.queue_size = size;
        hostile.pci_devices[0].config = PciDeviceConfig::Disk(disk.clone());
        assert!(
            matches!(
                decode(&encode(&hostile).unwrap()),
                Err(Error::Inconsistent(_))
            ),
            "{queues} queues of {size}"
        );
    }
    let net: outboard_virtio_devices::options::NetConfig =
        "socket=/n,mac=52:54:00:12:34:56".parse().unwrap();
    hostile.pci_devices[0].config = PciDeviceConfig::Net(net);
    assert!(decode(&encode(&hostile).unwrap()).is_ok());
    let vsock: outboard_virtio_devices::options::VsockConfig = "cid=3,uds_path=/v".parse().unwrap();
    hostile.pci_devices[0].config = PciDeviceConfig::Vsock(vsock.clone());
    assert!(decode(&encode(&hostile).unwrap()).is_ok());
    hostile.pci_devices[0].config =
        PciDeviceConfig::Vsock(outboard_virtio_devices::options::VsockConfig { cid: 1, ..vsock });
    assert!(decode(&encode(&hostile).unwrap()).is_err());
}
