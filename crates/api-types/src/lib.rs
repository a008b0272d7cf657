//! Types of the outboard-vmm control API, shared by the server, the VMM and clients.
//!
//! The wire format is JSON; `openapi/outboard-vmm.yaml` at the repository root describes every
//! route and body, and a test in `outboard-api-server` checks that the two agree. Names follow
//! Firecracker's API where one exists (`/machine-config`, `/boot-source`, `/actions`, `PATCH /vm`),
//! because that is what users of micro-VMs already know.
//!
//! Every request body rejects unknown fields: a typo in a client must be an error, not a silently
//! ignored setting.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `PUT /machine-config`: the vCPU count and guest memory size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to the host's KVM limit.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
        }
    }
}

/// `PUT /boot-source`: what to load into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// A bzImage or an ELF kernel (vmlinux, or any ELF with a 64-bit entry).
    pub kernel_image_path: PathBuf,
    /// An initramfs, loaded high in guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /serial`: where COM1 goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file to write the console to; absent means the VMM's standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
}

/// `PUT /disks`: adds a virtio-blk disk served by a vhost-user-blk backend (the card, or any
/// other backend) listening on `socket`. Only before the VM is loaded; disks take PCI slots in
/// the order they are added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// Request queues (default 1; the backend must offer at least as many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// Descriptors per queue, a power of two (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// `PUT /network-interfaces`: adds a virtio-net NIC served by a vhost-user-net backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// The guest MAC, `aa:bb:cc:dd:ee:ff` (unicast); absent lets the backend choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Virtqueues, an RX/TX pair per queue pair (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// Descriptors per queue, a power of two (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// `PUT /vsock`: the VM's vsock device (Firecracker's hybrid model: guest port P connects to
/// the Unix socket `<uds_path>_P`; host clients connect to `uds_path` and send `CONNECT <port>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// The host-side Unix socket path.
    pub uds_path: PathBuf,
}

/// `PUT /actions`: a one-shot action on the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// Which action.
    pub action_type: ActionType,
}

/// Actions accepted by `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Phase 1 of an attested launch: build the VM, load kernel, initrd and command line into
    /// guest memory and measure them; the vCPUs stay stopped (state `Loaded`).
    InstanceLoad,
    /// Start the VM (its vCPUs begin at the kernel entry). From `NotStarted` this loads and
    /// measures first. Refused (409) when a launch policy does not approve the measurements.
    InstanceStart,
    /// Stop the VM and make the VMM exit 0 once the response is sent.
    InstanceStop,
    /// Tear the VM down, zero its guest memory, and make the VMM exit 0.
    InstanceAbort,
}

/// `PATCH /vm`: the state the client wants the VM in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatePatch {
    /// The requested state.
    pub state: RequestedVmState,
}

/// `PUT /snapshot/create`: where to write the state and guest memory of the paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The VM state file (versioned; see `outboard_vmm::snapshot`).
    pub state_path: std::path::PathBuf,
    /// The guest memory file (written sparsely).
    pub memory_path: std::path::PathBuf,
}

/// `PUT /live-update`: the outboard-vmm binary to hand the running VM to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveUpdate {
    pub binary: std::path::PathBuf,
}

/// States a client may request through `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestedVmState {
    /// Stop every vCPU; guest memory and devices stay as they are.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// Lifecycle state of the VM, as reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Configured (or being configured), vCPUs never ran.
    NotStarted,
    /// Built, loaded and measured (phase 1); vCPUs not started. `GET /attestation` proves what
    /// was loaded; `InstanceStart` runs it, `InstanceAbort` discards it.
    Loaded,
    /// vCPUs are running.
    Running,
    /// vCPUs are parked by `PATCH /vm {"state":"Paused"}`.
    Paused,
    /// The VM has ended (power-off, reset, stop, abort or error); the VMM is exiting.
    Stopped,
}

/// `GET /`: who and what this VMM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance identifier (the VMM's choice, or `--id`).
    pub id: String,
    /// Current lifecycle state.
    pub state: VmState,
    /// The VMM's version string.
    pub vmm_version: String,
    /// Always `outboard-vmm`.
    pub app_name: String,
    /// `kvm` on a hardware-virtualization host, `pvm` where /dev/kvm is the PVM software backend.
    pub host_kvm: String,
}

/// `GET /vm/config`: the configuration the VM runs (or will run) with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPUs and memory.
    pub machine_config: MachineConfig,
    /// Kernel, initrd and command line, once set.
    pub boot_source: Option<BootSource>,
    /// Console destination.
    pub serial: SerialConfig,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in PCI slot order after the disks.
    #[serde(default)]
    pub network_interfaces: Vec<NetConfig>,
    /// The vsock device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmVersion {
    /// The VMM's version string.
    pub vmm_version: String,
}

/// Body of every 4xx and 5xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A short, capitalised description of what went wrong.
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_rejects_unknown_fields() {
        let err = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn action_round_trips_with_firecracker_names() {
        let a: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"InstanceStart"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceStart);
        assert_eq!(
            serde_json::to_string(&VmStatePatch {
                state: RequestedVmState::Paused
            })
            .unwrap(),
            r#"{"state":"Paused"}"#
        );
    }

    #[test]
    fn two_phase_actions_and_state_names() {
        let a: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"InstanceLoad"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceLoad);
        let a: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"InstanceAbort"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceAbort);
        assert_eq!(
            serde_json::to_string(&VmState::Loaded).unwrap(),
            r#""Loaded""#
        );
    }

    #[test]
    fn boot_source_optional_fields_default_to_none() {
        let b: BootSource = serde_json::from_str(r#"{"kernel_image_path":"/k"}"#).unwrap();
        assert_eq!(b.initrd_path, None);
        assert_eq!(b.boot_args, None);
    }

    #[test]
    fn negative_or_fractional_sizes_are_rejected() {
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":-1,"mem_size_mib":1}"#).is_err()
        );
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":1,"mem_size_mib":1.5}"#)
                .is_err()
        );
    }
}
