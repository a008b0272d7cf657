//! Signals: kicking a vCPU thread out of `KVM_RUN`, and turning SIGINT/SIGTERM into an eventfd
//! wake-up for the control loop.
//!
//! A kick is race-free: the handler sets `immediate_exit` in the kicked thread's `kvm_run`, so a
//! signal that lands just before the thread enters `KVM_RUN` still makes it return at once
//! (`EINTR`) instead of being lost. The vCPU thread publishes its `kvm_run` in a thread-local
//! (`Vcpu::bind_kick`), which the handler (running on that same thread) reads.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Errors of installing signal handlers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot install the handler for signal {signal}")]
    Install {
        signal: c_int,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("Cannot create the termination eventfd")]
    EventFd(#[source] std::io::Error),
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads (the first real-time signal).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        let immediate_exit = run
            .cast::<u8>()
            .wrapping_add(std::mem::offset_of!(kvm_run, immediate_exit));
        // SAFETY: `run` is this thread's mapped `kvm_run` page, published by `bind_kvm_run` and
        // withdrawn before the page is unmapped, so the byte is valid; a volatile byte store
        // cannot tear, and KVM reads the flag only when `KVM_RUN` starts.
        unsafe { std::ptr::write_volatile(immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    let signal = kick_signal();
    INSTALLED
        .get_or_init(|| register_signal_handler(signal, handle_kick))
        .map_err(|source| Error::Install { signal, source })
}

/// Publishes (or with null, withdraws) the calling thread's `kvm_run` for the kick handler.
pub(crate) fn bind_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

static TERMINATION_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_termination(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let fd: RawFd = TERMINATION_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd kept open for the process's
        // life (leaked in `termination_eventfd`) and the buffer is a live 8-byte value.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Returns an eventfd that becomes readable when SIGINT or SIGTERM arrives.
/// The handlers are installed on the first call; later calls return clones of the same eventfd.
pub fn termination_eventfd() -> Result<EventFd, Error> {
    static EVENT: OnceLock<EventFd> = OnceLock::new();
    if let Some(evt) = EVENT.get() {
        return evt.try_clone().map_err(Error::EventFd);
    }
    let evt = EventFd::new(libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
    let evt = EVENT.get_or_init(|| evt);
    TERMINATION_FD.store(evt.as_raw_fd(), Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(signal, handle_termination)
            .map_err(|source| Error::Install { signal, source })?;
    }
    evt.try_clone().map_err(Error::EventFd)
}
