use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{FromRawFd, IntoRawFd};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::*;
use crate::backing::Backing;
use crate::blk::request::defs::{S_OK, T_IN, T_OUT};
use crate::table::VolumeStore;
use crate::testutil::TempDir;
use crate::throttle::Limits;

fn backend(dir: &TempDir, queues: usize) -> Arc<BlkBackend> {
    backend_with(dir, queues, Limits::default())
}

fn backend_with(dir: &TempDir, queues: usize, limits: Limits) -> Arc<BlkBackend> {
    let path = dir.path().join("store");
    File::create(&path).unwrap().set_len(32 << 20).unwrap();
    let mut store = VolumeStore::format(&path).unwrap();
    let vol = store.create("v", 8 << 20).unwrap();
    let backing = Arc::new(Backing::open(&path).unwrap());
    let dev = Arc::new(VolumeDevice::new(vol, backing, None, limits).unwrap());
    Arc::new(BlkBackend::new(dev, queues).unwrap())
}

#[test]
fn config_space_and_features() {
    let dir = TempDir::new("vhost");
    let b = backend(&dir, 2);
    let cfg = b.get_config(0, CONFIG_LEN as u32);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), SIZE_MAX);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    // A plain volume: write zeroes are fallocate, with their own 1 GiB limit, and may unmap.
    assert_eq!(
        u32::from_le_bytes(cfg[48..52].try_into().unwrap()),
        (1 << 30) / 512
    );
    assert_eq!(cfg[56], 1);
    // Reads past the end are zero filled, never a panic.
    assert_eq!(b.get_config(58, 8), vec![0u8; 8]);
    assert_eq!(b.get_config(u32::MAX, 4), vec![0u8; 4]);
    assert_eq!(b.get_config(0, 0), Vec::<u8>::new());
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(b.queues_per_thread(), vec![1, 2]);
    assert!(matches!(
        BlkBackend::new(b.device().clone(), 0),
        Err(Error::QueueCount(0))
    ));
    assert!(matches!(
        BlkBackend::new(b.device().clone(), 65),
        Err(Error::QueueCount(65))
    ));
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

/// Header, one 4 KiB data buffer (device-readable for writes), status.
fn chain(write_data: bool) -> [RawDescriptor; 3] {
    let data_flags = if write_data {
        0
    } else {
        VRING_DESC_F_WRITE as u16
    };
    [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 4096, data_flags, 0)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ]
}

/// Drives the backend through its vring like the epoll loop would: a kick, then completion
/// events until the used ring advances.
#[test]
fn requests_through_a_vring() {
    let dir = TempDir::new("vhost");
    let b = backend(&dir, 1);
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mock = MockSplitQueue::create(&gm, GuestAddress(0), 16);
    let atomic = GuestMemoryAtomic::new(gm.clone());
    let vrings = ring_at(&b, &atomic, &mock, 0);

    let run = |kind: u32, sector: u64, write: bool, idx: u16| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        gm.write_slice(&h, GuestAddress(HDR)).unwrap();
        gm.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let descs = chain(write);
        mock.build_desc_chain(&descs).unwrap();
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        complete_until(&b, b.uring_event(), &vrings, &mock, idx);
        gm.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    };
    gm.write_slice(&[0x42u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(run(T_OUT, 8, true, 1), S_OK);
    gm.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(run(T_IN, 8, false, 2), S_OK);
    let mut back = [0u8; 4096];
    gm.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&x| x == 0x42));
    // stop_vring with nothing outstanding returns at once.
    b.stop_vring(0).unwrap();
    let c = b.device().counters.snapshot();
    assert_eq!((c.read_ops, c.write_ops, c.queue_depth), (1, 1, 0));
    // A plain volume and page-aligned guest buffers: both went straight to guest memory.
    assert_eq!(c.zero_copy, 2);
}

/// GET_VRING_BASE (stop_vring) completes every accepted request, throttled ones included, so
/// the ring state handed to the front end leaves nothing in limbo.
#[test]
fn stop_vring_completes_throttled_requests() {
    let dir = TempDir::new("vhost");
    let limits = Limits {
        iops_total: Some(crate::throttle::Limit {
            rate: 100,
            burst: 1,
        }),
        ..Limits::default()
    };
    let b = backend_with(&dir, 1, limits);
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mock = MockSplitQueue::create(&gm, GuestAddress(0), 16);
    let atomic = GuestMemoryAtomic::new(gm.clone());
    let vrings = ring_at(&b, &atomic, &mock, 0);
    three_reads(&gm, &mock);
    b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    // At 100 IOPS with a burst of one, two of them are waiting for the throttle now.
    assert!(b.device().counters.snapshot().queue_depth >= 2);
    b.stop_vring(0).unwrap();
    assert_eq!(mock.used().idx().load(), 3);
    for i in 0..3 {
        assert_eq!(gm.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), S_OK);
    }
    assert_eq!(b.device().counters.snapshot().queue_depth, 0);
}

/// The vring a front end hands a (re)connected backend, at used index `used` (0 for a new
/// device): SET_VRING_ADDR reads the used index from guest memory; after a crash
/// SET_VRING_BASE is that index too.
fn ring_at(
    b: &BlkBackend,
    mem: &GuestMemoryAtomic<GuestMemoryMmap<()>>,
    mock: &MockSplitQueue<GuestMemoryMmap<()>>,
    used: u16,
) -> [Vring; 1] {
    b.update_memory(mem.clone()).unwrap();
    let vring = VringRwLock::new(mem.clone(), 16).unwrap();
    vring.set_queue_size(16);
    vring
        .set_queue_info(
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        )
        .unwrap();
    vring.set_queue_next_used(used);
    vring.set_queue_next_avail(used);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    [vring]
}

/// Feeds the backend `event` (its io_uring or throttle timer) until the used index reaches
/// `idx`; fails after 5 s.
fn complete_until(
    b: &BlkBackend,
    event: u16,
    vrings: &[Vring],
    mock: &MockSplitQueue<GuestMemoryMmap<()>>,
    idx: u16,
) {
    let t = Instant::now();
    while mock.used().idx().load() != idx {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "used index stuck at {} (waiting for {idx})",
            mock.used().idx().load()
        );
        std::thread::sleep(Duration::from_millis(1));
        b.handle_event(event, EventSet::IN, vrings, 0).unwrap();
    }
}

/// Three 4 KiB reads made available at heads 0, 3 and 6, each with its own header, data
/// buffer and status byte (0xff until the device writes it).
fn three_reads(gm: &GuestMemoryMmap<()>, mock: &MockSplitQueue<GuestMemoryMmap<()>>) {
    let mut descs = Vec::new();
    for i in 0..3u64 {
        let hdr = HDR + 64 * i;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        gm.write_slice(&h, GuestAddress(hdr)).unwrap();
        gm.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        let head = (3 * i) as u16;
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let w = VRING_DESC_F_WRITE as u16;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            hdr,
            16,
            next,
            head + 1,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            DATA + 4096 * i,
            4096,
            next | w,
            head + 2,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            STATUS + i,
            1,
            w,
            0,
        )));
    }
    mock.add_desc_chains(&descs, 0).unwrap();
}

/// A card killed with requests in flight: the next instance, given the same inflight region,
/// resubmits them (in submission order) on its first event and resumes the avail ring after
/// them, so every chain the guest made available completes exactly once.
#[test]
fn next_instance_resubmits_what_the_inflight_region_holds() {
    let dir = TempDir::new("vhost");
    let limits = Limits {
        iops_total: Some(crate::throttle::Limit {
            rate: 100,
            burst: 1,
        }),
        ..Limits::default()
    };
    let first = backend_with(&dir, 1, limits);
    let (region, file, info) = inflight::Region::create(1, 16).unwrap();
    *first.inflight.lock().unwrap() = Some(Arc::new(region));
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mock = MockSplitQueue::create(&gm, GuestAddress(0), 16);
    let atomic = GuestMemoryAtomic::new(gm.clone());
    three_reads(&gm, &mock);
    let vrings = ring_at(&first, &atomic, &mock, 0);
    first.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    complete_until(&first, first.uring_event(), &vrings, &mock, 1);
    // Killed here: two reads still wait for the throttle and are marked in the region.
    let dev = first.device().clone();
    drop(vrings);
    drop(first);
    assert_eq!(gm.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), 0xff);

    let second = Arc::new(BlkBackend::new(dev, 1).unwrap());
    let region = inflight::Region::map(&file, &info).unwrap();
    *second.inflight.lock().unwrap() = Some(Arc::new(region));
    let vrings = ring_at(&second, &atomic, &mock, 1);
    second.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(second.resubmitted(), 2);
    assert_eq!(
        vrings[0].queue_next_avail(),
        3,
        "resumes after the resubmitted"
    );
    // The resubmitted reads wait for the throttle: its timer completes them.
    complete_until(&second, second.timer_event(), &vrings, &mock, 3);
    for i in 0..3 {
        assert_eq!(gm.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), S_OK);
    }
    // Nothing is left marked: a third instance would resubmit nothing.
    let region = inflight::Region::map(&file, &info).unwrap();
    assert_eq!(region.queue(0).unwrap().recover(3).0, Vec::<u16>::new());
}

/// A card killed after putting a chain on the used ring but before notifying leaves the
/// driver's `used_event` asking for an interrupt that never came. By EVENT_IDX's rule none of
/// the next instance's completions would notify (they are all past `used_event`), and the
/// driver would wait forever: the next instance notifies on its first kick regardless.
#[test]
fn a_restarted_ring_notifies_what_a_killed_instance_left_unannounced() {
    let dir = TempDir::new("vhost");
    let b = backend(&dir, 1);
    b.set_event_idx(true);
    let (region, _file, _) = inflight::Region::create(1, 16).unwrap();
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mock = MockSplitQueue::create(&gm, GuestAddress(0), 16);
    let atomic = GuestMemoryAtomic::new(gm.clone());
    three_reads(&gm, &mock);
    // The killed instance took all three, completed head 0 (used index 1) and died before
    // notifying; the driver still waits for the used index to pass 0.
    let state = region.queue(0).unwrap();
    for (n, head) in [0u16, 3, 6].into_iter().enumerate() {
        state.mark(head, n as u64 + 1);
    }
    state.pre_put(0);
    gm.write_obj(S_OK, GuestAddress(STATUS)).unwrap();
    let elem = mock.used_addr().0 + 4;
    gm.write_obj(0u32, GuestAddress(elem)).unwrap();
    gm.write_obj(4097u32, GuestAddress(elem + 4)).unwrap();
    mock.used().idx().store(1);
    state.post_put(0, 1);
    let used_event = GuestAddress(mock.avail_addr().0 + 4 + 2 * 16);
    gm.write_obj(0u16, used_event).unwrap();

    *b.inflight.lock().unwrap() = Some(Arc::new(region));
    let vrings = ring_at(&b, &atomic, &mock, 1);
    vrings[0].set_queue_event_idx(true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let fd = call.try_clone().unwrap().into_raw_fd();
    // SAFETY: `fd` was just released by its EventFd, so the File is its only owner.
    vrings[0].set_call(Some(unsafe { File::from_raw_fd(fd) }));
    b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(b.resubmitted(), 2);
    complete_until(&b, b.uring_event(), &vrings, &mock, 3);
    assert!(
        call.read().is_ok(),
        "the driver was never told of the used chains"
    );
}
