//! A relay between the front end and the vhost-user daemon that repairs one front-end quirk.
//!
//! QEMU 7.2's vhost-user-net negotiates the protocol features (GET/SET_PROTOCOL_FEATURES) but
//! then sends SET_VRING_ENABLE before any SET_FEATURES, and leaves
//! `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30) out of its SET_FEATURES, which the vhost-user spec
//! later made explicit; vhost-user-backend refuses such a SET_VRING_ENABLE and drops the
//! connection. A front end that sent SET_PROTOCOL_FEATURES has negotiated that bit, so the relay
//! sets it in SET_FEATURES, and sends a SET_FEATURES of just that bit (no reply asked) before a
//! SET_VRING_ENABLE that comes first. Every other message, and every reply, passes unchanged
//! with its descriptors.
//!
//! ```text
//!  front end ══ socket ══► relay ── SET_FEATURES (+bit 30 after SET_PROTOCOL_FEATURES) ──►
//!      ▲                                   everything else as is ──► VhostUserDaemon (private)
//!      └───────────────────── replies as is ◄──────────────────────────────┘
//! ```

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use outboard_vhost_wire::{recv, send, Message as Msg, HDR, VERSION};

const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// Sets bit 30 in a SET_FEATURES message once the front end negotiated protocol features.
fn repair(msg: &mut Msg, protocol_negotiated: bool) {
    if msg.request() != SET_FEATURES || !protocol_negotiated || msg.bytes.len() != HDR + 8 {
        return;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(msg.payload());
    let features = u64::from_le_bytes(v) | PROTOCOL_FEATURES_BIT;
    msg.payload_mut().copy_from_slice(&features.to_le_bytes());
}

/// SET_FEATURES with only `VHOST_USER_F_PROTOCOL_FEATURES`, asking no reply.
fn protocol_features_only() -> Msg {
    Msg::new(SET_FEATURES, VERSION, &PROTOCOL_FEATURES_BIT.to_le_bytes())
}

fn requests(front: &UnixStream, inner: &UnixStream) -> io::Result<()> {
    let (mut protocol_negotiated, mut features_set) = (false, false);
    while let Some(mut msg) = recv(front)? {
        match msg.request() {
            SET_PROTOCOL_FEATURES => protocol_negotiated = true,
            SET_FEATURES => features_set = true,
            SET_VRING_ENABLE if protocol_negotiated && !features_set => {
                send(inner, &protocol_features_only())?;
                features_set = true;
            }
            _ => {}
        }
        repair(&mut msg, protocol_negotiated);
        send(inner, &msg)?;
    }
    Ok(())
}

fn replies(inner: &UnixStream, front: &UnixStream) -> io::Result<()> {
    while let Some(msg) = recv(inner)? {
        send(front, &msg)?;
    }
    Ok(())
}

/// The relay's two threads; closing either side closes both.
pub(super) struct Relay {
    threads: [JoinHandle<()>; 2],
    front: UnixStream,
}

impl Relay {
    pub(super) fn spawn(front: UnixStream, inner: UnixStream) -> io::Result<Relay> {
        let handle = front.try_clone()?;
        let (f1, i1) = (front.try_clone()?, inner.try_clone()?);
        let up = std::thread::Builder::new()
            .name("vport-relay-req".into())
            .spawn(move || {
                if let Err(e) = requests(&f1, &i1) {
                    log::debug!("vhost-user-net front end ended: {e}");
                }
                let _ = i1.shutdown(Shutdown::Both);
                let _ = f1.shutdown(Shutdown::Both);
            })?;
        let down = std::thread::Builder::new()
            .name("vport-relay-rep".into())
            .spawn(move || {
                let _ = replies(&inner, &front);
                let _ = inner.shutdown(Shutdown::Both);
                let _ = front.shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            threads: [up, down],
            front: handle,
        })
    }

    /// Closes the front end's connection and waits for both threads.
    pub(super) fn close(self) {
        let _ = self.front.shutdown(Shutdown::Both);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, payload: &[u8]) -> Msg {
        Msg::new(request, VERSION, payload)
    }

    #[test]
    fn set_features_gains_bit_30_only_after_protocol_negotiation() {
        let features = (1u64 << 32) | 1;
        let mut before = msg(SET_FEATURES, &features.to_le_bytes());
        repair(&mut before, false);
        assert_eq!(before.payload(), features.to_le_bytes());
        let mut after = msg(SET_FEATURES, &features.to_le_bytes());
        repair(&mut after, true);
        assert_eq!(
            after.payload(),
            (features | PROTOCOL_FEATURES_BIT).to_le_bytes()
        );
        // Other requests and malformed SET_FEATURES pass untouched.
        let mut other = msg(SET_PROTOCOL_FEATURES, &features.to_le_bytes());
        repair(&mut other, true);
        assert_eq!(other.payload(), features.to_le_bytes());
        let mut short = msg(SET_FEATURES, &[1, 2, 3]);
        repair(&mut short, true);
        assert_eq!(short.payload(), [1, 2, 3]);
    }

    #[test]
    fn vring_enable_before_set_features_is_preceded_by_protocol_features() {
        let (front, relay_front) = UnixStream::pair().unwrap();
        let (relay_inner, inner) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || requests(&relay_front, &relay_inner));
        send(&front, &msg(SET_PROTOCOL_FEATURES, &1u64.to_le_bytes())).unwrap();
        send(&front, &msg(SET_VRING_ENABLE, &[0; 8])).unwrap();
        send(&front, &msg(SET_FEATURES, &(1u64 << 32).to_le_bytes())).unwrap();
        drop(front);
        let seen: Vec<(u32, Vec<u8>)> = std::iter::from_fn(|| recv(&inner).unwrap())
            .map(|m| (m.request(), m.payload().to_vec()))
            .collect();
        t.join().unwrap().unwrap();
        assert_eq!(
            seen,
            [
                (SET_PROTOCOL_FEATURES, 1u64.to_le_bytes().to_vec()),
                (SET_FEATURES, PROTOCOL_FEATURES_BIT.to_le_bytes().to_vec()),
                (SET_VRING_ENABLE, vec![0; 8]),
                (
                    SET_FEATURES,
                    ((1u64 << 32) | PROTOCOL_FEATURES_BIT)
                        .to_le_bytes()
                        .to_vec()
                ),
            ]
        );
    }
}
