//! The virtio-blk device model of a volume: request parsing and execution.
//!
//! - [`request`]: turns a guest descriptor chain into a validated [`request::Request`].
//! - [`engine`]: executes requests for one worker thread: throttling, XTS, io_uring.

pub mod crypt;
pub mod device;
pub mod direct;
pub mod engine;
mod pool;
pub mod request;
