//! Card storage: the part of the card that turns a physical store into encrypted, throttled
//! volumes served to VMs (US 11868617: storage virtualization on a peripheral device).
//!
//! ```text
//!  backing store (O_DIRECT) ── table: volume → extents (crash-safe, two copies)
//!        ▲                                   │ attach (key, QoS)
//!        │ io_uring                          ▼
//!  blk::engine ◄─ blk::request ◄─ vhost (vhost-user-blk, one worker per queue) ◄─ VM / loadgen
//!   │ throttle (GCRA, exact waits)   xts (AES-256-XTS, 4 KiB units, bounce buffers)
//!   └ plain volumes: zero copy, io_uring straight to/from guest memory (blk::direct)
//! ```
//!
//! - [`table`]: the volume table on the backing store (format, recovery, extent allocator).
//! - [`backing`]: the backing store (O_DIRECT file or block device); [`aligned`] buffers.
//! - [`xts`]: per-volume AES-256-XTS; keys zeroized, never printed.
//! - [`throttle`]: IOPS/bandwidth limits with burst, exact admission times.
//! - [`blk`]: virtio-blk request parsing (guest input) and execution on io_uring.
//! - [`vhost`]: the vhost-user-blk backend and its socket server.
//! - [`loadgen`]: a vhost-user-blk front end that generates, verifies and measures load.

pub mod aligned;
pub mod backing;
pub mod blk;
pub mod loadgen;
pub mod table;
pub mod throttle;
pub mod vhost;
pub mod xts;

#[cfg(test)]
pub(crate) mod testutil;
