//! The local side of a dataplane: the port its VM's frames come from and go to. A VM's NIC is
//! a vhost-user-net virtual port ([`crate::vport`]); hosts and tests use a TAP device. Both are
//! read and written one frame at a time as `virtio-net header ‖ frame` (a TAP only with
//! offloads on), non-blocking, with a descriptor to poll.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use crate::sys::Tap;
use crate::vport::VirtualPort;

/// Which local port a dataplane serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSpec {
    /// A TAP device of this name (created, or attached to).
    Tap(String),
    /// A vhost-user-net socket a VMM (or QEMU) connects to.
    VhostUser(PathBuf),
}

/// The open local port.
#[derive(Debug)]
pub(crate) enum Nic {
    Tap(Tap),
    Vhost(VirtualPort),
}

impl Nic {
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Nic::Tap(t) => t.file().as_raw_fd(),
            Nic::Vhost(v) => v.as_raw_fd(),
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Nic::Tap(t) => t.file().read(buf),
            Nic::Vhost(v) => v.read(buf),
        }
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Nic::Tap(t) => t.file().write(buf),
            Nic::Vhost(v) => v.write(buf),
        }
    }

    pub(crate) fn vnet_hdr(&self) -> bool {
        match self {
            Nic::Tap(t) => t.vnet_hdr(),
            Nic::Vhost(v) => v.vnet_hdr(),
        }
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Nic::Tap(t) => t.name().to_owned(),
            Nic::Vhost(v) => v.name(),
        }
    }
}
