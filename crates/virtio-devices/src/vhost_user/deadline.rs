//! A bound on every conversation with a backend: a backend that accepts the connection and then
//! says nothing must not hold a vCPU, the control thread or a boot for ever.
//!
//! SO_RCVTIMEO alone can't do it: the vhost crate takes the EAGAIN of a timed-out read for a
//! signal and reads again, for ever. So a watchdog thread (one per process, started on first
//! use) shuts the socket down when a conversation overruns [`REPLY_TIMEOUT`]; the blocked read
//! returns, the request fails, and [`bounded`] reports [`Error::NoReply`], which callers treat
//! as a lost connection (the monitor reconnects).
//!
//! ```text
//!  bounded(fd, f): arm(fd, now + REPLY_TIMEOUT) ─► f() ─► disarm ─► result (NoReply if fired)
//!  watchdog:       sleeps until the earliest deadline ─► shutdown(fd) if still armed
//! ```

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use super::REPLY_TIMEOUT;
use crate::Error;

struct Entry {
    fd: RawFd,
    deadline: Instant,
    fired: bool,
}

#[derive(Default)]
struct Watchdog {
    entries: Mutex<(u64, BTreeMap<u64, Entry>)>,
    wake: Condvar,
}

static WATCHDOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();

fn watchdog() -> Option<&'static Watchdog> {
    *WATCHDOG.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::default());
        let spawned = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || w.run());
        match spawned {
            Ok(_) => Some(w),
            Err(e) => {
                log::error!("Cannot start the vhost-user watchdog: {e}");
                None
            }
        }
    })
}

impl Watchdog {
    fn run(&self) {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let next = guard
                .1
                .values_mut()
                .filter(|e| !e.fired)
                .min_by_key(|e| e.deadline);
            guard = match next {
                None => self
                    .wake
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(e) if e.deadline <= now => {
                    e.fired = true;
                    // SAFETY: the fd stays open while its entry exists (`bounded` removes the
                    // entry under this lock before its caller may close it); shutdown(2)
                    // touches no memory of ours.
                    unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
                    guard
                }
                Some(e) => {
                    let wait = e.deadline - now;
                    self.wake
                        .wait_timeout(guard, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Runs `f`, a conversation on the socket `fd`, shutting the socket down if it takes longer
/// than [`REPLY_TIMEOUT`]; a request that failed for that is reported as [`Error::NoReply`].
pub(super) fn bounded<T>(
    fd: Option<RawFd>,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    let (Some(fd), Some(w)) = (fd, watchdog()) else {
        return f();
    };
    let id = {
        let mut g = w.entries.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 += 1;
        let id = g.0;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        g.1.insert(
            id,
            Entry {
                fd,
                deadline,
                fired: false,
            },
        );
        id
    };
    w.wake.notify_one();
    let result = f();
    let fired = w
        .entries
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .1
        .remove(&id)
        .is_some_and(|e| e.fired);
    match result {
        Err(Error::VhostUser { request, .. }) if fired => Err(Error::NoReply { request }),
        Err(_) if fired => Err(Error::NoReply {
            request: "a request",
        }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_silent_peer_is_cut_off_and_a_quick_one_is_not() {
        let (mut ours, _theirs) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let quick: Result<u8, Error> = bounded(Some(fd), || Ok(7));
        assert_eq!(quick.unwrap(), 7);
        let start = Instant::now();
        let r: Result<(), Error> = bounded(Some(fd), || {
            let mut b = [0u8; 1];
            // Blocks until the watchdog shuts the socket down.
            let n = ours.read(&mut b).unwrap();
            assert_eq!(n, 0);
            Err(Error::Disconnected)
        });
        assert!(matches!(r, Err(Error::NoReply { .. })));
        assert!(start.elapsed() >= REPLY_TIMEOUT);
    }
}
