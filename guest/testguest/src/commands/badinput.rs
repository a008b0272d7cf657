//! Bad-input commands for virtio-blk: the guest programs the device in ways the spec forbids and
//! reports what the device did. Each case prints
//! `OUTBOARD_BADINPUT <command> done status=<device status> case=<case> needs_reset=<0|1>
//! saw="<what the guest observed>"`, then resets the device, sets it up again and moves a few
//! blocks: `OUTBOARD_BADINPUT <command> recovered=<0|1> case=<case> status=<status>`. The last
//! line is `OUTBOARD_BADINPUT_RESULT ok=<1 when every case recovered> name=<command>`.
//!
//! Cases: `bad-queue-addr` (rings outside RAM and in the MMIO hole), `bad-queue-size` (3, and
//! more than the maximum), `bad-msix` (vectors past the table, a table entry with a garbage
//! address), `bad-bar` (the virtio BAR moved onto RAM, then onto the MSI-X BAR), `bad-desc` (a
//! looping chain, a 4 GiB length, a buffer outside RAM). `outboard.bad_wait_ms=` (500) is how
//! long each case waits for the device to react.

use super::Env;
use crate::mem::{self, Mmio};
use crate::pci;
use crate::println;
use crate::virtio::blk::{self, Blk, Op, Plan};
use crate::virtio::queue::Queue;
use crate::virtio::{self, Deadline, STATUS_NEEDS_RESET};
use core::fmt::Write;
use outboard_testguest_parse::virtq::{DESC_F_NEXT, DESC_F_WRITE};

/// Far outside any guest's RAM (and inside the 48-bit physical address space).
const OUTSIDE_RAM: u64 = 0x7FFF_0000_0000;
/// The IOAPIC's registers: MMIO, not RAM.
const MMIO_HOLE: u64 = 0xFEC0_0000;
/// Where `bad-bar` moves the BAR: RAM the guest does not use (the VM has at least 128 MiB).
const RAM_TARGET: u64 = 0x0400_0000;

/// Rewrites descriptors of a request chain (given the queue and the request's buffer).
type Tweak<'a> = &'a dyn Fn(&Queue, u64);

/// Text of what a case saw.
struct Saw {
    buf: [u8; 160],
    len: usize,
}

impl Write for Saw {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Saw {
    fn new() -> Saw {
        Saw {
            buf: [0; 160],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

struct Run<'a> {
    env: &'a Env,
    name: &'static str,
    blk: Blk,
    wait_ns: u64,
    all_recovered: bool,
}

impl Run<'_> {
    /// Waits for the device to complete something on `queue` or to ask for a reset.
    fn settle(&self, queue: Option<&mut Queue>, status_at: Option<u64>, saw: &mut Saw) {
        let mut deadline = Deadline::new(self.env.clock, self.wait_ns);
        let mut queue = queue;
        loop {
            if let Some(q) = queue.as_deref_mut() {
                match q.poll() {
                    Ok(Some((slot, len))) => {
                        let status = status_at.map_or(0xFF, mem::read8);
                        let _ = write!(saw, "completed slot={slot} len={len} req_status={status} ");
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = write!(saw, "bad used ring: {e} ");
                        return;
                    }
                }
            }
            if self.blk.dev.status() & STATUS_NEEDS_RESET != 0 || deadline.expired() {
                return;
            }
        }
    }

    /// Prints the case's outcome, resets the device and proves it works again.
    fn finish(&mut self, case: &str, saw: &Saw) {
        let status = self.blk.dev.status();
        println!(
            "OUTBOARD_BADINPUT {} done status={status:#x} case={case} needs_reset={} saw=\"{}\"",
            self.name,
            u8::from(status & STATUS_NEEDS_RESET != 0),
            saw.as_str().trim_end()
        );
        let recovered = self.recover();
        if let Err(e) = &recovered {
            println!("outboard-testguest: {}: {case}: {e}", self.name);
        }
        self.all_recovered &= recovered.is_ok();
        println!(
            "OUTBOARD_BADINPUT {} recovered={} case={case} status={:#x}",
            self.name,
            u8::from(recovered.is_ok()),
            self.blk.dev.status()
        );
    }

    fn recover(&mut self) -> Result<(), virtio::Error> {
        self.blk.dev.reset()?;
        self.blk.restart()?;
        let mut plan = Plan {
            op: Op::Write,
            seed: 0xBAD,
            first: 0,
            n: 4,
            count: 4,
            stall_ns: 10_000_000_000,
            patient: false,
        };
        self.blk.transfer(&plan, self.env.clock)?;
        self.blk.flush(self.env.clock, plan.stall_ns, false)?;
        plan.op = Op::ReadVerify;
        let c = self.blk.transfer(&plan, self.env.clock)?;
        if c.errors != 0 || c.verified != 4 {
            return Err(virtio::Error::Device {
                what: "bad data after recovery",
            });
        }
        Ok(())
    }

    /// Features negotiated, no queue set up yet: what the queue cases start from.
    fn initialize(&mut self) -> Result<(), virtio::Error> {
        self.blk
            .dev
            .initialize(blk::F_BLK_SIZE | blk::F_FLUSH)
            .map(|_| ())
    }
}

fn start<'a>(env: &'a Env, name: &'static str) -> Option<Run<'a>> {
    let wait_ms = env.param_u64(name, "outboard.bad_wait_ms", 500)?;
    match Blk::open(1, 4) {
        Ok(blk) => Some(Run {
            env,
            name,
            blk,
            wait_ns: wait_ms.saturating_mul(1_000_000),
            all_recovered: true,
        }),
        Err(e) => {
            println!("OUTBOARD_GUEST_ERROR {name}: {e}");
            None
        }
    }
}

fn end(run: &Run<'_>) {
    println!(
        "OUTBOARD_BADINPUT_RESULT ok={} name={}",
        u8::from(run.all_recovered),
        run.name
    );
    let _ = run.blk.dev.reset();
}

pub fn queue_addr(env: &Env) {
    let Some(mut run) = start(env, "bad-queue-addr") else {
        return;
    };
    let mut saw = Saw::new();
    match run.initialize() {
        Ok(()) => {
            let c = run.blk.dev.common;
            c.write16(virtio::QUEUE_SELECT, 0);
            c.write16(virtio::QUEUE_SIZE, 8);
            c.write64(virtio::QUEUE_DESC, OUTSIDE_RAM);
            c.write64(virtio::QUEUE_DRIVER, MMIO_HOLE);
            c.write64(virtio::QUEUE_DEVICE, OUTSIDE_RAM + 0x1000);
            c.write16(virtio::QUEUE_ENABLE, 1);
            run.blk.dev.driver_ok();
            if let Ok(addr) = run.blk.dev.notify_address(0) {
                if let Some(w) = Mmio::new(addr, 2) {
                    w.write16(0, 0);
                }
            }
            run.settle(None, None, &mut saw);
        }
        Err(e) => {
            let _ = write!(saw, "{e}");
        }
    }
    run.finish("rings-outside-ram", &saw);
    end(&run);
}

pub fn queue_size(env: &Env) {
    let Some(mut run) = start(env, "bad-queue-size") else {
        return;
    };
    let mut saw = Saw::new();
    match run.initialize() {
        Ok(()) => {
            let dev = &run.blk.dev;
            let c = dev.common;
            c.write16(virtio::QUEUE_SELECT, 0);
            let max = c.read16(virtio::QUEUE_SIZE);
            c.write16(virtio::QUEUE_SIZE, u16::MAX);
            let huge = c.read16(virtio::QUEUE_SIZE);
            c.write16(virtio::QUEUE_SIZE, 3);
            let three = c.read16(virtio::QUEUE_SIZE);
            let _ = write!(saw, "max={max} after_65535={huge} after_3={three} ");
            // Rings sized for 4 entries, the device told 3, and a normal write request.
            match dev
                .notify_address(0)
                .and_then(|n| Queue::allocate(0, 4, 3, 1, n).map_err(Into::into))
            {
                Ok(mut q) => {
                    c.write16(virtio::QUEUE_SELECT, 0);
                    c.write64(virtio::QUEUE_DESC, q.desc);
                    c.write64(virtio::QUEUE_DRIVER, q.avail);
                    c.write64(virtio::QUEUE_DEVICE, q.used);
                    c.write16(virtio::QUEUE_ENABLE, 1);
                    dev.driver_ok();
                    let status_at = submit_raw_write(&mut q, None);
                    q.notify();
                    run.settle(Some(&mut q), status_at, &mut saw);
                }
                Err(e) => {
                    let _ = write!(saw, "{e}");
                }
            }
        }
        Err(e) => {
            let _ = write!(saw, "{e}");
        }
    }
    run.finish("size-3-and-65535", &saw);
    end(&run);
}

/// A write request of one sector at sector 0 in fresh DMA memory, chained in descriptors 0..3
/// (slot 0 of an idle queue); `tweak` rewrites the chain before it is published. Returns the
/// address of the request's status byte.
fn submit_raw_write(q: &mut Queue, tweak: Option<Tweak<'_>>) -> Option<u64> {
    let buf = mem::alloc(1).ok()?;
    if q.claim()? != 0 {
        return None;
    }
    mem::write32(buf, 1);
    mem::write64(buf + 8, 0);
    mem::write8(buf + 16, 0xFF);
    q.write_desc(0, buf, 16, DESC_F_NEXT, 1);
    q.write_desc(1, buf + 512, 512, DESC_F_NEXT, 2);
    q.write_desc(2, buf + 16, 1, DESC_F_WRITE, 0);
    if let Some(t) = tweak {
        t(q, buf);
    }
    q.publish(0);
    Some(buf + 16)
}

pub fn msix(env: &Env) {
    let Some(mut run) = start(env, "bad-msix") else {
        return;
    };
    let mut saw = Saw::new();
    match run.blk.dev.msix {
        None => {
            let _ = write!(saw, "no MSI-X capability");
        }
        Some(m) => {
            let c = run.blk.dev.common;
            let beyond = m.cap.table_size.saturating_add(5);
            c.write16(virtio::CONFIG_MSIX_VECTOR, beyond);
            let config = c.read16(virtio::CONFIG_MSIX_VECTOR);
            c.write16(virtio::QUEUE_SELECT, 0);
            c.write16(virtio::QUEUE_MSIX_VECTOR, beyond);
            let queue = c.read16(virtio::QUEUE_MSIX_VECTOR);
            let _ = write!(
                saw,
                "table={} config_vector={config:#x} queue_vector={queue:#x} ",
                m.cap.table_size
            );
            // Queue 0 back on entry 1, which now points at no APIC.
            c.write16(virtio::QUEUE_MSIX_VECTOR, 1);
            m.program(1, 0xDEAD_BEEF_0000, 0xFFFF_FFFF, false);
            let plan = Plan {
                op: Op::Write,
                seed: 1,
                first: 0,
                n: 4,
                count: 4,
                stall_ns: run.wait_ns.max(1_000_000_000),
                patient: false,
            };
            match run.blk.transfer(&plan, env.clock) {
                Ok(cnt) => {
                    let _ = write!(saw, "requests_done={} errors={}", cnt.done, cnt.errors);
                }
                Err(e) => {
                    let _ = write!(saw, "requests: {e}");
                }
            }
        }
    }
    run.finish("vector-past-table-and-garbage-address", &saw);
    end(&run);
}

pub fn bar(env: &Env) {
    let Some(mut run) = start(env, "bad-bar") else {
        return;
    };
    let dev = &run.blk.dev;
    let bdf = dev.bdf;
    let common = dev.common.base;
    let found = dev.bars.iter().enumerate().find_map(|(i, b)| {
        b.filter(|b| (b.base..b.base.saturating_add(b.size)).contains(&common))
            .map(|b| (i, b))
    });
    let other = dev
        .bars
        .iter()
        .flatten()
        .find(|b| !(b.base..b.base.saturating_add(b.size)).contains(&common))
        .copied();
    let mut saw = Saw::new();
    let ram_ok = crate::platform::get().is_some_and(|p| p.ram_bytes >= 2 * RAM_TARGET);
    match found {
        Some((index, b)) if ram_ok => {
            let off = 0x10 + 4 * index;
            let status_off = common - b.base + virtio::DEVICE_STATUS;
            let set = |addr: u64| {
                pci::write32(bdf, off, addr as u32 | (pci::read32(bdf, off) & 0xF));
                if b.is64 {
                    pci::write32(bdf, off + 4, (addr >> 32) as u32);
                }
            };
            set(RAM_TARGET);
            let at_ram = Mmio::new(RAM_TARGET + status_off, 1).map_or(0, |w| w.read8(0));
            let old = run.blk.dev.common.read8(virtio::DEVICE_STATUS);
            let _ = write!(saw, "on_ram={at_ram:#x} old_place={old:#x} ");
            if let Some(o) = other {
                set(o.base);
                let overlap = Mmio::new(o.base.saturating_add(status_off), 1)
                    .filter(|_| status_off < o.size)
                    .map_or(0xFF, |w| w.read8(0));
                let _ = write!(saw, "over_bar={:#x} read={overlap:#x} ", o.base);
            }
            set(b.base);
        }
        _ => {
            let _ = write!(saw, "no movable BAR (or under 128 MiB of RAM)");
        }
    }
    run.finish("bar-on-ram-then-on-msix-bar", &saw);
    end(&run);
}

pub fn desc(env: &Env) {
    let Some(mut run) = start(env, "bad-desc") else {
        return;
    };
    let cases: [(&str, Tweak<'_>); 3] = [
        ("loop", &|q: &Queue, buf: u64| {
            q.write_desc(2, buf + 16, 1, DESC_F_WRITE | DESC_F_NEXT, 0)
        }),
        ("len-4g", &|q: &Queue, buf: u64| {
            q.write_desc(1, buf + 512, u32::MAX, DESC_F_NEXT, 2)
        }),
        ("addr-outside-ram", &|q: &Queue, _| {
            q.write_desc(1, OUTSIDE_RAM, 512, DESC_F_NEXT, 2)
        }),
    ];
    for (case, tweak) in cases {
        let mut saw = Saw::new();
        // A fresh device whose queue 0 has nothing in flight.
        if let Err(e) = run.blk.dev.reset().and_then(|()| run.blk.restart()) {
            let _ = write!(saw, "setup: {e}");
        } else if let Some(q) = run.blk.queues[0].as_mut() {
            let status_at = submit_raw_write(q, Some(tweak));
            q.notify();
            let mut q = run.blk.queues[0].take();
            run.settle(q.as_mut(), status_at, &mut saw);
        }
        run.finish(case, &saw);
    }
    end(&run);
}
