//! virtio-blk (virtio 1.2, 5.2) over the transport: up to [`MAX_QUEUES`] request queues, each
//! with up to [`MAX_DEPTH`] requests in flight, every request a three-descriptor chain (header,
//! data, status). [`Blk::transfer`] writes or reads-and-verifies numbered blocks spread over the
//! disk (the pattern is `outboard_testguest_parse::pattern`).

use super::queue::Buf;
use super::{Deadline, Device, Error, Queue};
use crate::clock::Clock;
use crate::{mem, println};
use outboard_testguest_parse::pattern::{self, Mismatch};

pub const DEVICE_ID: u16 = 0x1042;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const MAX_QUEUES: usize = 8;
pub const MAX_DEPTH: u16 = 32;
pub const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// The largest block a request moves (one DMA page).
const MAX_UNIT: u64 = 4096;
/// Status byte offset in a slot's header page; 0xFF until the device writes it.
const STATUS_AT: u64 = 16;
/// Pages per slot: header + status, data.
const SLOT_PAGES: u64 = 2;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the pattern.
    Write,
    /// Read into a zeroed buffer and check the pattern.
    ReadVerify,
    /// Write whatever the buffer holds (benchmarks: no pattern generation).
    WriteRaw,
    /// Read without checking (benchmarks).
    Read,
}

impl Op {
    fn kind(self) -> u32 {
        match self {
            Op::Write | Op::WriteRaw => T_OUT,
            Op::ReadVerify | Op::Read => T_IN,
        }
    }
}

/// What a request's data buffer gets before it is submitted.
#[derive(Debug, Clone, Copy)]
enum Prep {
    Fill(u64),
    Zero,
    Keep,
}

/// A configured virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    pub dev: Device,
    pub queues: [Option<Queue>; MAX_QUEUES],
    pub nqueues: usize,
    pub depth: u16,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Bytes per request: the device's block size (512 if it names none), at most 4 KiB.
    pub unit: u64,
    /// First slot page of each queue.
    slot_mem: [u64; MAX_QUEUES],
    /// Block index carried by each slot.
    carried: [[u64; MAX_DEPTH as usize]; MAX_QUEUES],
}

/// What a [`Blk::transfer`] does.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub op: Op,
    pub seed: u64,
    /// First block number.
    pub first: u64,
    /// Blocks to move.
    pub n: u64,
    /// Blocks spread over the disk (block `b` goes where block `b % count` of them lies).
    pub count: u64,
    /// Time without a completion before the device counts as stuck.
    pub stall_ns: u64,
    /// Keep waiting after a stall (printing a note) instead of failing.
    pub patient: bool,
}

/// Outcome of a [`Blk::transfer`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub done: u64,
    pub verified: u64,
    pub errors: u64,
    /// Request status of the first failed request.
    pub first_status: Option<(u64, u8)>,
    /// First block that did not verify: (sector, mismatch).
    pub first_mismatch: Option<(u64, Mismatch)>,
}

impl Blk {
    /// Opens the first virtio-blk device with up to `queues` queues of depth `depth`.
    pub fn open(queues: u16, depth: u16) -> Result<Blk, Error> {
        let mut dev = Device::open(DEVICE_ID)?;
        Self::setup(&mut dev)?;
        // capacity .. blk_size, and num_queues with MQ (virtio 1.2, 5.2.4).
        dev.require_config(if dev.features & F_MQ != 0 { 0x24 } else { 0x18 })?;
        let capacity = u64::from(dev.config.read32(0)) | u64::from(dev.config.read32(4)) << 32;
        let blk_size = if dev.features & F_BLK_SIZE != 0 {
            u64::from(dev.config.read32(20))
        } else {
            SECTOR
        };
        let unit = if blk_size.is_power_of_two() {
            blk_size.clamp(SECTOR, MAX_UNIT)
        } else {
            SECTOR
        };
        let nqueues = if dev.features & F_MQ != 0 {
            usize::from(dev.config.read16(0x22)).clamp(1, MAX_QUEUES)
        } else {
            1
        }
        .min(usize::from(queues.max(1)));
        let mut blk = Blk {
            dev,
            queues: Default::default(),
            nqueues,
            depth: depth.clamp(1, MAX_DEPTH),
            capacity,
            unit,
            slot_mem: [0; MAX_QUEUES],
            carried: [[0; MAX_DEPTH as usize]; MAX_QUEUES],
        };
        blk.start()?;
        Ok(blk)
    }

    fn setup(dev: &mut Device) -> Result<(), Error> {
        let features = dev.initialize(F_BLK_SIZE | F_FLUSH | F_MQ | F_RO)?;
        if features & F_RO != 0 {
            return Err(Error::Device {
                what: "a read-only disk",
            });
        }
        Ok(())
    }

    /// Sets up the queues and their slot buffers, then DRIVER_OK.
    fn start(&mut self) -> Result<(), Error> {
        for q in 0..self.nqueues {
            let queue = self.dev.setup_queue(q as u16, 256, 3, self.depth)?;
            self.slot_mem[q] = mem::alloc(SLOT_PAGES * u64::from(queue.slots()))?;
            self.queues[q] = Some(queue);
        }
        self.dev.driver_ok();
        Ok(())
    }

    /// Resets the device and sets it up again (after a bad-input experiment).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.queues = Default::default();
        Self::setup(&mut self.dev)?;
        self.start()
    }

    /// Moves `bytes` per request instead of one device block: a power of two, a multiple of the
    /// block size, at most 4 KiB. Returns whether it was accepted.
    pub fn set_unit(&mut self, bytes: u64) -> bool {
        let ok = bytes.is_power_of_two()
            && (self.unit..=MAX_UNIT).contains(&bytes)
            && bytes.is_multiple_of(self.unit);
        if ok {
            self.unit = bytes;
        }
        ok
    }

    /// Reads the capacity again (a grown disk), the same config generation before and after
    /// (virtio 1.2, 4.1.4.3.1); keeps the old value if the device never holds still.
    pub fn reread_capacity(&mut self) -> u64 {
        for _ in 0..100 {
            let generation = self.dev.config_generation();
            let capacity =
                u64::from(self.dev.config.read32(0)) | u64::from(self.dev.config.read32(4)) << 32;
            if self.dev.config_generation() == generation {
                self.capacity = capacity;
                break;
            }
        }
        self.capacity
    }

    pub fn sectors_per_unit(&self) -> u64 {
        self.unit / SECTOR
    }

    fn slot_addr(&self, q: usize, slot: u16) -> u64 {
        self.slot_mem[q] + u64::from(slot) * SLOT_PAGES * 4096
    }

    /// Fills the slot queue `q` will take next with a request and makes it available.
    fn submit(&mut self, q: usize, kind: u32, sector: u64, prep: Prep) -> Option<u16> {
        let unit = self.unit;
        let base = self.slot_mem[q];
        let queue = self.queues[q].as_mut()?;
        let slot = queue.peek_free()?;
        let hdr = base + u64::from(slot) * SLOT_PAGES * 4096;
        let data = hdr + 4096;
        mem::write32(hdr, kind);
        mem::write32(hdr + 4, 0);
        mem::write64(hdr + 8, sector);
        mem::write8(hdr + STATUS_AT, 0xFF);
        match prep {
            Prep::Fill(seed) => pattern::fill(seed, sector, mem::bytes_mut(data, unit as usize)),
            // A read must not verify from what an earlier write left in the buffer.
            Prep::Zero => mem::bytes_mut(data, unit as usize).fill(0),
            Prep::Keep => {}
        }
        let header = Buf {
            addr: hdr,
            len: 16,
            write: false,
        };
        let status = Buf {
            addr: hdr + STATUS_AT,
            len: 1,
            write: true,
        };
        let taken = match kind {
            T_FLUSH => queue.submit(&[header, status]),
            _ => {
                let payload = Buf {
                    addr: data,
                    len: unit as u32,
                    write: kind == T_IN,
                };
                queue.submit(&[header, payload, status])
            }
        }?;
        // Slots hands out the lowest free slot, the one peeked at.
        (taken == slot).then_some(taken)
    }

    /// Writes or reads and verifies the blocks of `plan`, each with the pattern for its seed and
    /// sector, over all queues with up to `depth` requests in flight per queue.
    pub fn transfer(&mut self, plan: &Plan, clock: &Clock) -> Result<Counts, Error> {
        let Plan {
            op,
            seed,
            first,
            n,
            count,
            stall_ns,
            patient,
        } = *plan;
        let spu = self.sectors_per_unit();
        let capacity = self.capacity;
        let sector_of =
            move |b: u64| pattern::spread_sector(b % count.max(1), count, capacity, spu);
        if sector_of(first).is_none() {
            return Err(Error::Device {
                what: "a disk too small for the blocks asked for",
            });
        }
        let kind = op.kind();
        let mut counts = Counts::default();
        let mut next = first;
        let end = first + n;
        let mut deadline = Deadline::new(clock, stall_ns);
        while counts.done < n {
            for q in 0..self.nqueues {
                let mut submitted = false;
                while next < end {
                    let sector = sector_of(next).unwrap_or(0);
                    let prep = match op {
                        Op::Write => Prep::Fill(seed),
                        Op::ReadVerify => Prep::Zero,
                        Op::WriteRaw | Op::Read => Prep::Keep,
                    };
                    let Some(slot) = self.submit(q, kind, sector, prep) else {
                        break;
                    };
                    self.carried[q][usize::from(slot)] = next;
                    next += 1;
                    submitted = true;
                }
                if submitted {
                    if let Some(queue) = &self.queues[q] {
                        queue.notify();
                    }
                }
            }
            let mut progressed = false;
            for q in 0..self.nqueues {
                while let Some((slot, _len)) =
                    self.queues[q].as_mut().map_or(Ok(None), |x| x.poll())?
                {
                    progressed = true;
                    counts.done += 1;
                    let block = self.carried[q][usize::from(slot)];
                    let sector = sector_of(block).unwrap_or(0);
                    let hdr = self.slot_addr(q, slot);
                    let status = mem::read8(hdr + STATUS_AT);
                    if status != 0 {
                        counts.errors += 1;
                        counts.first_status.get_or_insert((sector, status));
                    } else if op == Op::ReadVerify {
                        let data = mem::bytes_mut(hdr + 4096, self.unit as usize);
                        match pattern::verify(seed, sector, data) {
                            Ok(()) => counts.verified += 1,
                            Err(m) => {
                                counts.errors += 1;
                                counts.first_mismatch.get_or_insert((sector, m));
                            }
                        }
                    }
                }
            }
            if progressed {
                deadline = Deadline::new(clock, stall_ns);
            } else if !deadline.expired() {
                crate::irq::wait();
            } else {
                self.dev.check()?;
                if !patient {
                    return Err(Error::Timeout {
                        status: self.dev.status(),
                    });
                }
                println!(
                    "outboard-testguest: blk: no completion for {} ms ({} in flight), waiting",
                    stall_ns / 1_000_000,
                    next - first - counts.done
                );
                deadline = Deadline::new(clock, stall_ns);
            }
        }
        Ok(counts)
    }

    /// A FLUSH on queue 0 (when negotiated), waited for (through stalls when `patient`).
    pub fn flush(&mut self, clock: &Clock, timeout_ns: u64, patient: bool) -> Result<(), Error> {
        if self.dev.features & F_FLUSH == 0 {
            return Ok(());
        }
        let slot = self
            .submit(0, T_FLUSH, 0, Prep::Keep)
            .ok_or(Error::Device {
                what: "no free slot for a flush",
            })?;
        let queue = self.queues[0].as_mut().ok_or(Error::NoQueue { index: 0 })?;
        queue.notify();
        let (done, _) = loop {
            match self.dev.wait(queue, clock, timeout_ns) {
                Err(Error::Timeout { .. }) if patient => println!(
                    "outboard-testguest: blk: flush not done after {} ms, waiting",
                    timeout_ns / 1_000_000
                ),
                other => break other?,
            }
        };
        let status = mem::read8(self.slot_addr(0, slot) + STATUS_AT);
        if done != slot || status != 0 {
            return Err(Error::Device {
                what: "a failed flush",
            });
        }
        Ok(())
    }
}
