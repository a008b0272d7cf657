//! A vhost-user-blk load generator: a minimal virtio-blk driver in this process that drives
//! any vhost-user-blk backend (ours, qemu-storage-daemon) with no VM.
//!
//! "Guest memory" is a memfd shared with the backend over the vhost-user socket; each queue
//! has its own rings, kick/call eventfds and thread. Each queue keeps `depth` requests in
//! flight (closed loop) for a duration, at a chosen block size and read/write mix, and records
//! per-request latency, completions per second and, optionally, verifies data: every slot owns
//! a disjoint set of blocks, writes a pattern derived from (block, generation), and every read
//! of a block it wrote must return exactly the last pattern.
//!
//! ```text
//!  connect ─► features/protocol ─► mem table (memfd) ─► per queue: num, addr, base, call,
//!  kick, enable ─► threads: post `depth` chains ─► wait call ─► used ring ─► verify, repost
//! ```

mod ring;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ring::{Chain, DriverRing, RingLayout};

/// Entries per virtqueue.
pub const QUEUE_SIZE: u16 = 256;
const RING_AREA: u64 = 64 * 1024;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create shared guest memory")]
    Memory(#[source] io::Error),
    #[error("Cannot map shared guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("vhost-user handshake failed at {step}")]
    Handshake {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("Bad load parameters: {0}")]
    Spec(String),
    #[error("Backend stalled: no completion for {0:?}")]
    Stalled(Duration),
    #[error("Waiting for completions failed")]
    Wait(#[source] io::Error),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub queues: usize,
    /// Requests in flight per queue.
    pub depth: usize,
    pub block_size: u32,
    /// Percentage of reads (0..=100).
    pub read_pct: u8,
    /// Random offsets (else sequential per slot).
    pub random: bool,
    pub duration: Duration,
    /// Bytes of the device to use, from offset 0 (0: all of it).
    pub span: u64,
    pub verify: bool,
    pub seed: u64,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: 32,
            block_size: 4096,
            read_pct: 100,
            random: true,
            duration: Duration::from_secs(1),
            span: 0,
            verify: false,
            seed: 1,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub elapsed: Duration,
    /// Request latencies in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
    /// Completions in each whole second of the run.
    pub per_second: Vec<u64>,
    /// Longest time between two consecutive completions on one queue (a stall), in ns.
    pub max_gap_ns: u64,
}

impl Report {
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    pub fn iops(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// Latency percentile `p` (0..=100) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        self.latencies_ns[i.min(self.latencies_ns.len() - 1)] as f64 / 1e3
    }
}

/// One queue's report and its updated write history.
type QueueOutcome = (Report, HashMap<u64, u64>);

struct Queue {
    ring: DriverRing,
    kick: EventFd,
    call: EventFd,
}

/// A connected front end with its shared memory and queues.
pub struct Client {
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    capacity: u64,
    /// Queue count fixed at connect (`queues` is moved out while a run is in progress).
    nqueues: usize,
    /// Generation of the last verified-mode write of each block (see [`Client::history`]).
    history: HashMap<u64, u64>,
    depth: usize,
    block_size: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn hs<T>(step: &'static str, r: vhost::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Handshake { step, source })
}

fn memfd(size: u64) -> Result<File, Error> {
    // SAFETY: the name is a valid NUL-terminated string and the call touches no other memory.
    let fd = unsafe { libc::memfd_create(c"outboard-loadgen".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::Memory)?;
    Ok(file)
}

impl Client {
    /// Connects to the backend at `socket` and sets up `queues` queues for `depth` requests of
    /// up to `block_size` bytes each.
    pub fn connect(
        socket: &Path,
        queues: usize,
        depth: usize,
        block_size: u32,
    ) -> Result<Self, Error> {
        if queues == 0 || depth == 0 || depth * 3 > usize::from(QUEUE_SIZE) || block_size == 0 {
            return Err(Error::Spec(format!(
                "queues={queues} depth={depth} block_size={block_size}"
            )));
        }
        debug_assert!(RingLayout::bytes(QUEUE_SIZE) <= RING_AREA);
        let data_base = 2 * RING_AREA * queues as u64;
        let size =
            (data_base + (queues * depth) as u64 * u64::from(block_size)).next_multiple_of(2 << 20);
        let file = memfd(size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(Error::Map)?;
        let region = mem.iter().next().expect("one region");
        let region_info =
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|source| {
                Error::Handshake {
                    step: "memory region",
                    source,
                }
            })?;

        let mut fe = hs("connect", Frontend::connect(socket, queues as u64))?;
        hs("set owner", fe.set_owner())?;
        let offered = hs("get features", fe.get_features())?;
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let acked = offered & (VIRTIO_F_VERSION_1 | proto);
        if offered & proto != 0 {
            let pf = hs("get protocol features", fe.get_protocol_features())?;
            let want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            hs("set protocol features", fe.set_protocol_features(pf & want))?;
            if pf.contains(VhostUserProtocolFeatures::MQ) {
                let n = hs("get queue num", fe.get_queue_num())?;
                if (n as usize) < queues {
                    return Err(Error::Spec(format!(
                        "backend has {n} queues, {queues} asked"
                    )));
                }
            }
        }
        hs("set features", fe.set_features(acked))?;
        hs("set mem table", fe.set_mem_table(&[region_info]))?;
        let (_, cfg) = hs(
            "get config",
            fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8]),
        )?;
        let capacity = u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes")) * 512;

        let mut qs = Vec::with_capacity(queues);
        for q in 0..queues {
            let layout = RingLayout::new(GuestAddress(q as u64 * RING_AREA), QUEUE_SIZE);
            let hva = |a: GuestAddress| {
                mem.get_host_address(a)
                    .map(|p| p as u64)
                    .expect("ring in memory")
            };
            let cfg = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: hva(layout.desc),
                used_ring_addr: hva(layout.used),
                avail_ring_addr: hva(layout.avail),
                log_addr: None,
            };
            let kick = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            hs("set vring num", fe.set_vring_num(q, QUEUE_SIZE))?;
            hs("set vring addr", fe.set_vring_addr(q, &cfg))?;
            hs("set vring base", fe.set_vring_base(q, 0))?;
            hs("set vring call", fe.set_vring_call(q, &call))?;
            hs("set vring kick", fe.set_vring_kick(q, &kick))?;
            if acked & proto != 0 {
                hs("set vring enable", fe.set_vring_enable(q, true))?;
            }
            qs.push(Queue {
                ring: DriverRing::new(layout),
                kick,
                call,
            });
        }
        Ok(Self {
            _frontend: fe,
            mem,
            queues: qs,
            capacity,
            nqueues: queues,
            history: HashMap::new(),
            depth,
            block_size,
        })
    }

    /// What verified runs wrote (block → write generation). Every verified read of a block in
    /// it must return that write's pattern, including in later runs.
    pub fn history(&self) -> &HashMap<u64, u64> {
        &self.history
    }

    /// Adopts another connection's history, e.g. to verify after the backend restarted.
    pub fn set_history(&mut self, history: HashMap<u64, u64>) {
        self.history = history;
    }

    /// The device's capacity in bytes (from its config space).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn hdr(&self, q: usize, slot: usize) -> GuestAddress {
        GuestAddress(RING_AREA * (self.nqueues + q) as u64 + 32 * slot as u64)
    }

    fn data(&self, q: usize, slot: usize) -> GuestAddress {
        let base = 2 * RING_AREA * self.nqueues as u64;
        GuestAddress(base + ((q * self.depth + slot) as u64) * u64::from(self.block_size))
    }

    /// Runs `spec` (its queues, depth and block size must fit the connection).
    pub fn run(&mut self, spec: &LoadSpec) -> Result<Report, Error> {
        if spec.queues > self.nqueues
            || spec.depth > self.depth
            || spec.block_size > self.block_size
        {
            return Err(Error::Spec("load exceeds the connection's setup".into()));
        }
        let bs = u64::from(spec.block_size);
        let span = if spec.span == 0 {
            self.capacity
        } else {
            spec.span.min(self.capacity)
        };
        let slots_total = (spec.queues * spec.depth) as u64;
        let blocks = span / bs;
        if blocks < slots_total || !spec.block_size.is_multiple_of(4096) || spec.read_pct > 100 {
            return Err(Error::Spec(format!(
                "span {span} too small or bad block size/mix"
            )));
        }
        // Hand each queue the history of the blocks its slots own in this run.
        let depth = spec.depth as u64;
        let mut per_queue: Vec<HashMap<u64, u64>> = vec![HashMap::new(); spec.queues];
        for (block, g) in self.history.drain() {
            if block < blocks {
                per_queue[((block % slots_total) / depth) as usize].insert(block, g);
            }
        }
        let start = Instant::now();
        let mut queues = std::mem::take(&mut self.queues);
        let this = &*self;
        let results: Vec<Result<QueueOutcome, Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter_mut()
                .take(spec.queues)
                .zip(per_queue)
                .enumerate()
                .map(|(q, (queue, hist))| {
                    s.spawn(move || this.run_queue(q, queue, spec, blocks, start, hist))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("load thread panicked"))
                .collect()
        });
        self.queues = queues;
        let mut total = Report {
            elapsed: start.elapsed(),
            ..Report::default()
        };
        for r in results {
            let (r, hist) = r?;
            self.history.extend(hist);
            total.reads += r.reads;
            total.writes += r.writes;
            total.bytes += r.bytes;
            total.errors += r.errors;
            total.verify_failures += r.verify_failures;
            total.max_gap_ns = total.max_gap_ns.max(r.max_gap_ns);
            total.latencies_ns.extend(r.latencies_ns);
            if total.per_second.len() < r.per_second.len() {
                total.per_second.resize(r.per_second.len(), 0);
            }
            for (i, n) in r.per_second.iter().enumerate() {
                total.per_second[i] += n;
            }
        }
        total.latencies_ns.sort_unstable();
        Ok(total)
    }

    fn run_queue(
        &self,
        q: usize,
        queue: &mut Queue,
        spec: &LoadSpec,
        blocks: u64,
        start: Instant,
        mut written: HashMap<u64, u64>,
    ) -> Result<QueueOutcome, Error> {
        let mem = &self.mem;
        let bs = spec.block_size as usize;
        let nslots = (spec.queues * spec.depth) as u64;
        let mut rng = spec.seed ^ (q as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut report = Report::default();
        let deadline = start + spec.duration;
        // Per slot: (block, is_read, posted at), and the generation last written to each block.
        let mut inflight: Vec<Option<(u64, bool, Instant)>> = vec![None; spec.depth];
        let mut seq = vec![0u64; spec.depth];
        let mut generation = written.values().copied().max().unwrap_or(0);
        let mut buf = vec![0u8; bs];
        let mut post = |slot: usize,
                        inflight: &mut Vec<Option<(u64, bool, Instant)>>,
                        ring: &mut DriverRing,
                        written: &mut HashMap<u64, u64>| {
            let g = q as u64 * spec.depth as u64 + slot as u64;
            let per_slot = (blocks - g).div_ceil(nslots);
            let k = if spec.random {
                next() % per_slot
            } else {
                seq[slot] % per_slot
            };
            seq[slot] += 1;
            let block = g + k * nslots;
            let read = (next() % 100) < u64::from(spec.read_pct);
            let data = self.data(q, slot);
            if !read {
                generation += 1;
                fill(&mut buf, block, generation);
                mem.write_slice(&buf, data).expect("data area in memory");
                if spec.verify {
                    written.insert(block, generation);
                }
            }
            let hdr = self.hdr(q, slot);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&(if read { 0u32 } else { 1u32 }).to_le_bytes());
            h[8..16].copy_from_slice(&(block * bs as u64 / 512).to_le_bytes());
            mem.write_slice(&h, hdr).expect("header area in memory");
            mem.write_obj(0xffu8, status_of(hdr))
                .expect("status in memory");
            let chain = Chain {
                slot: slot as u16,
                hdr,
                data,
                len: bs as u32,
                read,
                status: status_of(hdr),
            };
            ring.post(mem, &chain);
            inflight[slot] = Some((block, read, Instant::now()));
        };
        for slot in 0..spec.depth {
            post(slot, &mut inflight, &mut queue.ring, &mut written);
        }
        queue.kick.write(1).map_err(Error::Wait)?;
        let mut used = Vec::new();
        let mut last_completion = Instant::now();
        let mut check = vec![0u8; bs];
        let mut expect = vec![0u8; bs];
        while inflight.iter().any(Option::is_some) {
            wait_readable(&queue.call, Duration::from_secs(10))?;
            let _ = queue.call.read();
            used.clear();
            queue.ring.take_used(mem, &mut used);
            let mut posted = false;
            for &(slot, _len) in &used {
                let slot = usize::from(slot);
                let Some((block, read, t0)) = inflight.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                let now = Instant::now();
                report
                    .latencies_ns
                    .push(now.duration_since(t0).as_nanos() as u64);
                let gap = now.duration_since(last_completion).as_nanos() as u64;
                report.max_gap_ns = report.max_gap_ns.max(gap);
                last_completion = now;
                let sec = now.duration_since(start).as_secs() as usize;
                if report.per_second.len() <= sec {
                    report.per_second.resize(sec + 1, 0);
                }
                report.per_second[sec] += 1;
                let status: u8 = mem
                    .read_obj(status_of(self.hdr(q, slot)))
                    .expect("status in memory");
                if status != 0 {
                    report.errors += 1;
                } else if read {
                    report.reads += 1;
                    if spec.verify {
                        if let Some(&g) = written.get(&block) {
                            mem.read_slice(&mut check, self.data(q, slot))
                                .expect("data area in memory");
                            fill(&mut expect, block, g);
                            if check != expect {
                                report.verify_failures += 1;
                            }
                        }
                    }
                } else {
                    report.writes += 1;
                }
                report.bytes += bs as u64;
                if now < deadline {
                    post(slot, &mut inflight, &mut queue.ring, &mut written);
                    posted = true;
                }
            }
            if posted {
                queue.kick.write(1).map_err(Error::Wait)?;
            }
        }
        Ok((report, written))
    }
}

/// The status byte of a slot sits right after its 16-byte header.
fn status_of(hdr: GuestAddress) -> GuestAddress {
    GuestAddress(hdr.0 + 16)
}

/// The pattern of `block` at write generation `g`: distinct per block and per write.
fn fill(buf: &mut [u8], block: u64, g: u64) {
    let mut x =
        block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ g.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// Waits until `fd` is readable or `timeout` passes (then the backend is stuck).
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<(), Error> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        match n {
            n if n > 0 => return Ok(()),
            0 => return Err(Error::Stalled(timeout)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Error::Wait(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
