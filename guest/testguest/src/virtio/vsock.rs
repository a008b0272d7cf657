//! virtio-vsock (virtio 1.2, 5.10): receive queue 0, transmit queue 1, event queue 2 (given a
//! few buffers, never read: a transport reset only matters to long-lived connections). One
//! stream connection at a time, with credit accounting (5.10.6.3).

use super::packet::{Pair, BUF_LEN};
use super::queue::Buf;
use super::{Device, Error};
use crate::mem;
use outboard_testguest_parse::vsock::{self, Header, HEADER_LEN};

pub const DEVICE_ID: u16 = 0x1053;
/// Receive space the guest advertises.
pub const BUF_ALLOC: u32 = 64 * 1024;
const EVENT_BUFS: u16 = 4;
const EVENT_LEN: u32 = 8;

/// A configured virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    pub dev: Device,
    pub queues: Pair,
    pub guest_cid: u64,
    /// Bytes of payload consumed (for `fwd_cnt`).
    pub fwd_cnt: u32,
}

impl Vsock {
    pub fn open() -> Result<Vsock, Error> {
        let mut dev = Device::open(DEVICE_ID)?;
        dev.initialize(0)?;
        dev.require_config(8)?;
        let guest_cid = u64::from(dev.config.read32(0)) | u64::from(dev.config.read32(4)) << 32;
        let queues = Pair::setup(&dev, 0, 1)?;
        let mut events = dev.setup_queue(2, 8, 1, EVENT_BUFS)?;
        let ev_mem = mem::alloc(1)?;
        dev.driver_ok();
        while let Some(slot) = events.peek_free() {
            let addr = ev_mem + u64::from(slot) * u64::from(EVENT_LEN);
            if events
                .submit(&[Buf {
                    addr,
                    len: EVENT_LEN,
                    write: true,
                }])
                .is_none()
            {
                break;
            }
        }
        events.notify();
        let mut v = Vsock {
            dev,
            queues,
            guest_cid,
            fwd_cnt: 0,
        };
        v.queues.fill_rx();
        Ok(v)
    }

    /// A header from this guest's `src_port` to the host's `dst_port`.
    pub fn header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: self.guest_cid,
            dst_cid: vsock::HOST_CID,
            src_port,
            dst_port,
            len,
            kind: vsock::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Sends a packet (header and payload in one buffer); `Ok(false)` when the queue is full.
    pub fn send(&mut self, mut hdr: Header, payload: &[u8]) -> Result<bool, Error> {
        let payload = &payload[..payload.len().min(BUF_LEN as usize - HEADER_LEN)];
        hdr.len = payload.len() as u32;
        self.queues.send(HEADER_LEN + payload.len(), |buf| {
            let mut h = [0u8; HEADER_LEN];
            hdr.encode(&mut h);
            buf[..HEADER_LEN].copy_from_slice(&h);
            buf[HEADER_LEN..].copy_from_slice(payload);
        })
    }

    /// The next packet: its header and payload (copied into `out`).
    pub fn recv<'a>(&mut self, out: &'a mut [u8]) -> Result<Option<(Header, &'a [u8])>, Error> {
        let Some(len) = self.queues.recv(out)? else {
            return Ok(None);
        };
        let Some(hdr) = Header::decode(&out[..len]) else {
            return Ok(Some((Header::default(), &out[..0])));
        };
        let end = (HEADER_LEN + hdr.len as usize).min(len);
        Ok(Some((hdr, &out[HEADER_LEN..end])))
    }
}
