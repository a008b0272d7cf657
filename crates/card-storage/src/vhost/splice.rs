//! The inflight messages in front of vhost-user-backend's protocol handler.
//!
//! vhost-user-backend 0.24 keeps its request handler private and answers GET/SET_INFLIGHT_FD
//! with "not supported". Rather than fork the whole handler, the card sits between the front
//! end and an unmodified `VhostUserDaemon` on a private (abstract) socket and relays whole
//! messages, file descriptors included:
//!
//! ```text
//!  front end ══ socket ══► splice ──► GET/SET_INFLIGHT_FD: answered here (region → Slot)
//!      ▲                     │ └────► SET_VRING_KICK: relayed, then kicked once (restart)
//!      │                     │ └────► SET_BACKEND_REQ_FD: relayed, a copy kept (config_change)
//!      │                     └──────► everything else: relayed as is ──► VhostUserDaemon
//!      └──────────── replies (relayed as is) ◄──────────────────────────────────┘
//! ```
//!
//! The front end waits for each reply it expects before sending its next request, so replies
//! made here never interleave with the daemon's. Either side closing closes both.

use std::fs::File;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use outboard_vhost_wire::{recv, send, Message as Msg, NEED_REPLY, REPLY, VERSION};
use vhost::vhost_user::message::VhostUserInflight;

use super::inflight::Region;
use super::{config_change, InflightSlot};

const SET_VRING_KICK: u32 = 12;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const VRING_NOFD: u64 = 0x100;

/// The inflight request's payload (`mmap_size, mmap_offset, num_queues, queue_size`).
fn inflight(msg: &Msg) -> Option<VhostUserInflight> {
    let p = msg.payload();
    let u64_at = |o: usize| Some(u64::from_le_bytes(p.get(o..o + 8)?.try_into().ok()?));
    let u16_at = |o: usize| Some(u16::from_le_bytes(p.get(o..o + 2)?.try_into().ok()?));
    Some(VhostUserInflight::new(
        u64_at(0)?,
        u64_at(8)?,
        u16_at(16)?,
        u16_at(18)?,
    ))
}

fn reply(out: &Mutex<UnixStream>, req: u32, payload: &[u8], file: Option<File>) -> io::Result<()> {
    let mut msg = Msg::new(req, VERSION | REPLY, payload);
    msg.files.extend(file);
    let s = out.lock().unwrap_or_else(|p| p.into_inner());
    send(&s, &msg)
}

fn inflight_payload(i: &VhostUserInflight) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&i.mmap_size.to_le_bytes());
    p.extend_from_slice(&i.mmap_offset.to_le_bytes());
    p.extend_from_slice(&i.num_queues.to_le_bytes());
    p.extend_from_slice(&i.queue_size.to_le_bytes());
    p.resize(24, 0);
    p
}

struct Front {
    front: UnixStream,
    out: Arc<Mutex<UnixStream>>,
    inner: UnixStream,
    slot: InflightSlot,
    backend_req: config_change::Slot,
}

impl Front {
    fn run(&self) -> io::Result<()> {
        while let Some(msg) = recv(&self.front)? {
            match msg.request() {
                GET_INFLIGHT_FD => self.get_inflight(&msg)?,
                SET_INFLIGHT_FD => self.set_inflight(&msg)?,
                req => {
                    if req == config_change::SET_BACKEND_REQ_FD {
                        config_change::keep(&self.backend_req, &msg);
                    }
                    let kick = (req == SET_VRING_KICK).then(|| kick_fd(&msg)).flatten();
                    send(&self.inner, &msg)?;
                    // A kick right after the ring starts makes its worker resubmit what the
                    // inflight region says was in flight, take what the driver made available
                    // while no card listened (its kicks went nowhere) and notify once for what
                    // a killed card published silently, all without waiting for the guest.
                    if let Some(mut k) = kick {
                        let _ = k.write_all(&1u64.to_ne_bytes());
                    }
                }
            }
        }
        Ok(())
    }

    fn get_inflight(&self, msg: &Msg) -> io::Result<()> {
        let created = inflight(msg)
            .ok_or_else(|| io::Error::other("Short GET_INFLIGHT_FD"))
            .and_then(|ask| {
                Region::create(ask.num_queues, ask.queue_size).map_err(io::Error::other)
            });
        match created {
            Ok((region, file, info)) => {
                log::info!("New inflight region: {region:?}");
                *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
                reply(
                    &self.out,
                    GET_INFLIGHT_FD,
                    &inflight_payload(&info),
                    Some(file),
                )
            }
            Err(e) => {
                log::warn!("GET_INFLIGHT_FD failed: {e}");
                // No fd: the front end treats the reply as a failure.
                reply(&self.out, GET_INFLIGHT_FD, &[0; 24], None)
            }
        }
    }

    fn set_inflight(&self, msg: &Msg) -> io::Result<()> {
        let mapped = match (inflight(msg), msg.files.first()) {
            (Some(info), Some(file)) => Region::map(file, &info).map_err(io::Error::other),
            _ => Err(io::Error::other("SET_INFLIGHT_FD without a region")),
        };
        let status: u64 = match mapped {
            Ok(region) => {
                log::info!("Front end's inflight region: {region:?}");
                *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
                0
            }
            Err(e) => {
                log::warn!("SET_INFLIGHT_FD failed: {e}");
                1
            }
        };
        if msg.flags() & NEED_REPLY != 0 {
            reply(&self.out, SET_INFLIGHT_FD, &status.to_le_bytes(), None)?;
        }
        Ok(())
    }
}

/// A copy of SET_VRING_KICK's eventfd, to kick the queue ourselves.
fn kick_fd(msg: &Msg) -> Option<File> {
    let v = u64::from_le_bytes(msg.payload().get(..8)?.try_into().ok()?);
    if v & VRING_NOFD != 0 {
        return None;
    }
    msg.files.first()?.try_clone().ok()
}

fn relay_replies(inner: &UnixStream, out: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(msg) = recv(inner)? {
        let s = out.lock().unwrap_or_else(|p| p.into_inner());
        send(&s, &msg)?;
    }
    Ok(())
}

/// A running splice: its two threads and a handle on the front end's connection.
pub(super) struct Splice {
    threads: [JoinHandle<()>; 2],
    front: UnixStream,
}

impl Splice {
    /// Closes the front end's connection (it sees a disconnect and may reconnect) and waits for
    /// both threads.
    pub(super) fn close(self) {
        let _ = self.front.shutdown(Shutdown::Both);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Relays between `front` (the front end's connection) and `inner` (the daemon's) until either
/// side closes; inflight messages are served from and into `slot`.
pub(super) fn spawn(
    front: UnixStream,
    inner: UnixStream,
    slot: InflightSlot,
    backend_req: config_change::Slot,
) -> io::Result<Splice> {
    let handle = front.try_clone()?;
    let out = Arc::new(Mutex::new(front.try_clone()?));
    let f = Front {
        front,
        out: out.clone(),
        inner: inner.try_clone()?,
        slot,
        backend_req,
    };
    let up = std::thread::Builder::new()
        .name("vhost-splice-req".into())
        .spawn(move || {
            if let Err(e) = f.run() {
                log::debug!("vhost-user front end connection ended: {e}");
            }
            let _ = f.inner.shutdown(Shutdown::Both);
            let _ = f.front.shutdown(Shutdown::Both);
        })?;
    let down = std::thread::Builder::new()
        .name("vhost-splice-rep".into())
        .spawn(move || {
            let _ = relay_replies(&inner, &out);
            let _ = inner.shutdown(Shutdown::Both);
            let s = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.shutdown(Shutdown::Both);
        })?;
    Ok(Splice {
        threads: [up, down],
        front: handle,
    })
}
