//! virtio devices of outboard-vmm: the virtio-pci modern transport and the device models
//! behind it (vhost-user block and net, whose data path runs in another process).
//!
//! A [`VirtioDevice`] is what sits behind a [`transport::VirtioPciTransport`]: it offers
//! features and a config space, and is *activated* with the queues the driver set up, each with
//! a kick eventfd (a KVM ioeventfd on the notify address) and a call eventfd (a KVM irqfd on the
//! queue's MSI-X vector). A vhost-user device hands both to its backend, so neither a kick nor
//! an interrupt passes through a VMM thread.
//!
//! ```text
//!  reset ──ACKNOWLEDGE|DRIVER──► negotiating ──FEATURES_OK──► queue set-up ──DRIVER_OK──► active
//!    ▲                                │ bad features: FEATURES_OK refused       │
//!    │                                ▼                                          ▼
//!    └──────── status 0 ◄──── NEEDS_RESET (bad queue, vector, BAR; backend error) ◄─┘
//! ```

//! # Wiring into the VMM
//!
//! ```text
//! let disk = VhostUserDevice::disk(&"socket=/run/d.sock,num_queues=2".parse()?, ram.memory().clone())?;
//! let t = Arc::new(VirtioPciTransport::new("virtio-blk", disk, mem, irqs.clone(), irqs.clone())?);
//! root.add_device(t.clone())?;            // BAR placed: ioeventfds registered on notify addresses
//! lifecycle_devices.push(t);              // pause/resume/save/restore/counters
//! ```
//!
//! Kicks reach backends through KVM ioeventfds and completions return through irqfds on the
//! MSI-X routes, so the VMM has no thread on the data path (`vmm_notifications` counts the
//! exceptions). The vsock device ([`vsock::VsockDevice`]) is the one emulated in the VMM.

pub mod options;
pub mod transport;
#[cfg(test)]
mod transport_tests;
pub mod vhost_user;
pub mod vsock;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use transport::VirtioPciTransport;

/// virtio device IDs (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors of device activation and control.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user request {request} failed")]
    VhostUser {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("Queue {index} address {addr:#x} is not in guest memory")]
    QueueAddress { index: usize, addr: u64 },
    #[error("Backend is disconnected")]
    Disconnected,
    #[error("vhost-user backend gave no answer to {request} within {}s", vhost_user::REPLY_TIMEOUT.as_secs())]
    NoReply { request: &'static str },
    #[error("Handed-over eventfds don't match the device's {queues} queues")]
    EventfdCount { queues: usize },
    #[error("Cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("vhost-user backend gave a device configuration of {len} bytes")]
    ConfigSize { len: usize },
    #[error("Cannot create the vhost-user backend request channel")]
    Channel(#[source] std::io::Error),
    #[error("Cannot set up MSI-X")]
    Interrupts(#[source] outboard_pci::interrupt::Error),
}

/// A queue as the driver configured it (split virtqueue addresses are guest-physical).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One queue handed to a device at activation.
#[derive(Clone, Debug)]
pub struct ActiveQueue {
    pub index: usize,
    pub config: QueueConfig,
    /// Signalled by KVM when the guest writes the queue's notify address.
    pub kick: Arc<EventFd>,
    /// Signalled by the device (or its backend) to interrupt the guest.
    pub call: Arc<EventFd>,
}

/// What a device calls when its configuration changed on its own (a disk grown by its
/// backend): the transport bumps the config generation and raises the config-change interrupt.
/// Called with none of the device's locks held (the transport calls into the device under its
/// own lock).
pub type ConfigNotifier = Arc<dyn Fn() + Send + Sync>;

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send + Sync {
    fn device_type(&self) -> u32;
    fn num_queues(&self) -> usize;
    fn queue_max_size(&self) -> u16;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with these features and queues.
    fn activate(&self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), Error>;
    /// The driver reset the device: stop using the queues.
    fn reset(&self);
    /// Stops the queues at a consistent point (live update, snapshot).
    fn pause(&self) -> Result<(), Error> {
        Ok(())
    }
    fn resume(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Device-specific state for a successor VMM.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Given by the transport at its creation; devices whose configuration never changes
    /// ignore it.
    fn set_config_notifier(&self, _notifier: ConfigNotifier) {}
}
