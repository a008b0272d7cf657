//! virtio-net (virtio 1.2, 5.1): one receive and one transmit queue, VERSION_1 and MAC only (no
//! offloads, no mergeable buffers: every frame is preceded by a zeroed 12-byte header).

use super::packet::Pair;
use super::{Device, Error};

pub const DEVICE_ID: u16 = 0x1041;
pub const F_MAC: u64 = 1 << 5;
/// `struct virtio_net_hdr` with VERSION_1 (`num_buffers` included).
pub const HDR_LEN: usize = 12;
/// The MAC used when the device names none (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x0B, 0x0A, 0x01];

/// A configured virtio-net device.
#[derive(Debug)]
pub struct Net {
    pub dev: Device,
    pub queues: Pair,
    pub mac: [u8; 6],
}

impl Net {
    pub fn open() -> Result<Net, Error> {
        let mut dev = Device::open(DEVICE_ID)?;
        let features = dev.initialize(F_MAC)?;
        let mut mac = DEFAULT_MAC;
        if features & F_MAC != 0 {
            dev.require_config(6)?;
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config.read8(i as u64);
            }
        }
        let queues = Pair::setup(&dev, 0, 1)?;
        dev.driver_ok();
        let mut net = Net { dev, queues, mac };
        net.queues.fill_rx();
        Ok(net)
    }

    /// Sends one frame; `Ok(false)` when the transmit queue is full.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, Error> {
        self.queues.send(HDR_LEN + frame.len(), |buf| {
            buf[..HDR_LEN].fill(0);
            buf[HDR_LEN..].copy_from_slice(frame);
        })
    }

    /// The next received frame (without the header) copied into `out`.
    pub fn recv<'a>(&mut self, out: &'a mut [u8]) -> Result<Option<&'a [u8]>, Error> {
        match self.queues.recv(out)? {
            Some(len) if len >= HDR_LEN => Ok(Some(&out[HDR_LEN..len])),
            Some(_) => Ok(Some(&out[..0])),
            None => Ok(None),
        }
    }
}
