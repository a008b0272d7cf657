//! A receive/transmit queue pair with one-descriptor buffers of [`BUF_LEN`] bytes, shared by
//! virtio-net and virtio-vsock: the receive queue is kept full, a transmit buffer is reused once
//! the device returns it.

use super::queue::Buf;
use super::{Device, Error, Queue};
use crate::mem;

pub const BUF_LEN: u64 = 2048;
/// Buffers per queue.
pub const DEPTH: u16 = 32;

/// The two queues and their buffers.
#[derive(Debug)]
pub struct Pair {
    pub rx: Queue,
    pub tx: Queue,
    rx_mem: u64,
    tx_mem: u64,
}

impl Pair {
    /// Sets up queues `rx` and `tx` of `dev` (before DRIVER_OK).
    pub fn setup(dev: &Device, rx: u16, tx: u16) -> Result<Pair, Error> {
        let rxq = dev.setup_queue(rx, 256, 1, DEPTH)?;
        let txq = dev.setup_queue(tx, 256, 1, DEPTH)?;
        let pages = |q: &Queue| (u64::from(q.slots()) * BUF_LEN).div_ceil(4096);
        let rx_mem = mem::alloc(pages(&rxq))?;
        let tx_mem = mem::alloc(pages(&txq))?;
        Ok(Pair {
            rx: rxq,
            tx: txq,
            rx_mem,
            tx_mem,
        })
    }

    /// Makes every free receive buffer available and notifies.
    pub fn fill_rx(&mut self) {
        let mut added = false;
        while let Some(slot) = self.rx.peek_free() {
            let addr = self.rx_mem + u64::from(slot) * BUF_LEN;
            if self
                .rx
                .submit(&[Buf {
                    addr,
                    len: BUF_LEN as u32,
                    write: true,
                }])
                .is_none()
            {
                break;
            }
            added = true;
        }
        if added {
            self.rx.notify();
        }
    }

    /// Sends the `len` bytes `build` writes into a transmit buffer; `Ok(false)` when every buffer
    /// is still with the device.
    pub fn send(&mut self, len: usize, build: impl FnOnce(&mut [u8])) -> Result<bool, Error> {
        while self.tx.poll()?.is_some() {}
        let Some(slot) = self.tx.peek_free() else {
            return Ok(false);
        };
        let len = len.min(BUF_LEN as usize);
        let addr = self.tx_mem + u64::from(slot) * BUF_LEN;
        build(mem::bytes_mut(addr, len));
        let sent = self.tx.submit(&[Buf {
            addr,
            len: len as u32,
            write: false,
        }]);
        if sent.is_some() {
            self.tx.notify();
        }
        Ok(sent.is_some())
    }

    /// The next received buffer's bytes (copied out into `out`, at most its length); the buffer
    /// goes back to the device.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>, Error> {
        let Some((slot, len)) = self.rx.poll()? else {
            return Ok(None);
        };
        let len = (len as usize).min(BUF_LEN as usize).min(out.len());
        let addr = self.rx_mem + u64::from(slot) * BUF_LEN;
        out[..len].copy_from_slice(&mem::bytes_mut(addr, len)[..len]);
        self.fill_rx();
        Ok(Some(len))
    }

    /// Transmit buffers the device still holds.
    pub fn tx_in_flight(&mut self) -> Result<u16, Error> {
        while self.tx.poll()?.is_some() {}
        Ok(self.tx.in_flight())
    }
}
