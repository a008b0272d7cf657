use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backing::Backing;
use crate::blk::device::VolumeDevice;
use crate::table::VolumeStore;
use crate::testutil::{Rng, TempDir};
use crate::throttle::{Limit, Limits};
use crate::xts::{XtsKey, KEY_LEN};

/// Serves volume "v" (8 MiB) on a socket in a background thread until the client leaves.
fn serve(
    dir: &TempDir,
    key: bool,
    limits: Limits,
    queues: usize,
) -> (PathBuf, Arc<VolumeDevice>, std::thread::JoinHandle<()>) {
    let path = dir.path().join("store");
    File::create(&path).unwrap().set_len(32 << 20).unwrap();
    let mut store = VolumeStore::format(&path).unwrap();
    let vol = store.create("v", 8 << 20).unwrap();
    let key = key.then(|| {
        let mut k = [0u8; KEY_LEN];
        Rng(5).fill(&mut k);
        XtsKey::from_bytes(&k).unwrap()
    });
    let dev = Arc::new(
        VolumeDevice::new(vol, Arc::new(Backing::open(&path).unwrap()), key, limits).unwrap(),
    );
    let sock = dir.path().join("sock");
    let d = dev.clone();
    let s = sock.clone();
    let h = std::thread::spawn(move || crate::vhost::serve(d, &s, queues, true).unwrap());
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    (sock, dev, h)
}

#[test]
fn mixed_verified_load_over_two_queues() {
    let dir = TempDir::new("loadgen");
    let (sock, dev, server) = serve(&dir, true, Limits::default(), 2);
    let mut c = Client::connect(&sock, 2, 8, 16384).unwrap();
    assert_eq!(c.capacity(), 8 << 20);
    let spec = LoadSpec {
        queues: 2,
        depth: 8,
        block_size: 16384,
        read_pct: 50,
        duration: Duration::from_millis(500),
        verify: true,
        ..LoadSpec::default()
    };
    let r = c.run(&spec).unwrap();
    assert_eq!(r.errors, 0);
    assert_eq!(r.verify_failures, 0);
    assert!(r.reads > 0 && r.writes > 0, "{r:?}");
    assert_eq!(r.latencies_ns.len() as u64, r.ops());
    // A second run on the same connection verifies the first run's writes too.
    let r2 = c
        .run(&LoadSpec {
            read_pct: 100,
            ..spec
        })
        .unwrap();
    assert_eq!((r2.errors, r2.verify_failures), (0, 0));
    let counters = dev.counters.snapshot();
    assert_eq!(counters.read_ops, r.reads + r2.reads);
    assert_eq!(counters.write_ops, r.writes);
    drop(c);
    server.join().unwrap();
}

#[test]
fn bad_specs_are_rejected() {
    let dir = TempDir::new("loadgen");
    let (sock, _dev, server) = serve(&dir, false, Limits::default(), 1);
    assert!(matches!(
        Client::connect(&sock, 1, 100, 4096),
        Err(Error::Spec(_))
    ));
    let mut c = Client::connect(&sock, 1, 4, 4096).unwrap();
    assert!(matches!(
        c.run(&LoadSpec {
            depth: 5,
            ..LoadSpec::default()
        }),
        Err(Error::Spec(_))
    ));
    assert!(matches!(
        c.run(&LoadSpec {
            depth: 4,
            read_pct: 101,
            ..LoadSpec::default()
        }),
        Err(Error::Spec(_))
    ));
    drop(c);
    server.join().unwrap();
}

#[test]
fn throttle_holds_through_the_socket() {
    let dir = TempDir::new("loadgen");
    let limits = Limits {
        iops_total: Some(Limit {
            rate: 1000,
            burst: 1,
        }),
        ..Limits::default()
    };
    let (sock, dev, server) = serve(&dir, false, limits, 1);
    let mut c = Client::connect(&sock, 1, 32, 4096).unwrap();
    let r = c
        .run(&LoadSpec {
            depth: 32,
            duration: Duration::from_millis(1500),
            ..LoadSpec::default()
        })
        .unwrap();
    assert_eq!(r.errors, 0);
    // 1.5 s at 1000 IOPS (plus the 32 in flight at the deadline): never above the limit.
    // (Accuracy is measured by the benchmark; here the limit must simply hold.)
    assert!(r.ops() <= 1500 + 32 + 1, "{} ops", r.ops());
    assert!(r.ops() >= 1000, "{} ops", r.ops());
    assert!(dev.counters.snapshot().throttled_ns > 0);
    drop(c);
    server.join().unwrap();
}

/// Data written through one backend instance is read back intact by a fresh one: a card
/// restart (after a graceful disconnect) loses no acknowledged write.
#[test]
fn writes_survive_a_backend_restart() {
    let dir = TempDir::new("loadgen");
    let (sock, _dev, server) = serve(&dir, true, Limits::default(), 1);
    let mut c = Client::connect(&sock, 1, 16, 4096).unwrap();
    let write = LoadSpec {
        depth: 16,
        read_pct: 0,
        duration: Duration::from_millis(300),
        verify: true,
        span: 1 << 20,
        ..LoadSpec::default()
    };
    let w = c.run(&write).unwrap();
    assert_eq!(w.errors, 0);
    let history = c.history().clone();
    assert!(history.len() > 100, "{} blocks written", history.len());
    drop(c);
    server.join().unwrap();

    // A new backend process would open the same store: here, a new device and server.
    let path = dir.path().join("store");
    let vol = VolumeStore::open(&path)
        .unwrap()
        .table()
        .volume("v")
        .unwrap()
        .clone();
    let mut k = [0u8; KEY_LEN];
    Rng(5).fill(&mut k);
    let key = Some(XtsKey::from_bytes(&k).unwrap());
    let dev = Arc::new(
        VolumeDevice::new(
            vol,
            Arc::new(Backing::open(&path).unwrap()),
            key,
            Limits::default(),
        )
        .unwrap(),
    );
    let sock2 = dir.path().join("sock2");
    let s2 = sock2.clone();
    let server = std::thread::spawn(move || crate::vhost::serve(dev, &s2, 1, true).unwrap());
    while !sock2.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::connect(&sock2, 1, 16, 4096).unwrap();
    c.set_history(history);
    let r = c
        .run(&LoadSpec {
            read_pct: 100,
            random: false,
            ..write
        })
        .unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    assert!(r.reads > 100);
    drop(c);
    server.join().unwrap();
}

/// A background server can be stopped while a front end is connected and while idle; after
/// stopping, nothing holds the device (so its key is dropped and zeroized).
#[test]
fn server_stops_connected_or_idle() {
    let dir = TempDir::new("loadgen");
    let path = dir.path().join("store");
    File::create(&path).unwrap().set_len(32 << 20).unwrap();
    let vol = VolumeStore::format(&path)
        .unwrap()
        .create("v", 8 << 20)
        .unwrap();
    let dev = Arc::new(
        VolumeDevice::new(
            vol,
            Arc::new(Backing::open(&path).unwrap()),
            None,
            Limits::default(),
        )
        .unwrap(),
    );
    let sock = dir.path().join("sock");
    let server = crate::vhost::Server::start(dev.clone(), &sock, 1).unwrap();
    assert!(sock.exists());
    let mut c = Client::connect(&sock, 1, 4, 4096).unwrap();
    let short = LoadSpec {
        depth: 4,
        duration: Duration::from_millis(100),
        ..LoadSpec::default()
    };
    assert_eq!(c.run(&short).unwrap().errors, 0);
    drop(c);
    // Reconnecting after a disconnect works: the socket keeps listening.
    let mut c = Client::connect(&sock, 1, 4, 4096).unwrap();
    assert_eq!(c.run(&short).unwrap().errors, 0);
    server.stop().unwrap();
    assert!(!sock.exists());
    drop(c);
    assert_eq!(
        Arc::strong_count(&dev),
        1,
        "the stopped server still holds the device"
    );

    let idle = crate::vhost::Server::start(dev.clone(), &sock, 1).unwrap();
    idle.stop().unwrap();
    assert_eq!(Arc::strong_count(&dev), 1);
}
