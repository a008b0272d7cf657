//! `vsock-echo`: connects to the host (CID 2) on `outboard.vsock_port=` (1234), sends
//! `outboard.vsock_bytes=` (64) bytes, reads until they all came back, compares, shuts down.
//! Waits `outboard.vsock_timeout_ms=` (5000) for each step. With `outboard.vsock_rounds=` (1)
//! it echoes that many times on the one connection, `outboard.vsock_interval_ms=` (0) apart,
//! printing `OUTBOARD_VSOCK_PROGRESS round=<r>` after each (a connection that must survive
//! live updates).
//!
//! Result: `OUTBOARD_VSOCK_RESULT ok=<0|1> bytes=<echoed> cid=<guest CID> [error="…"]`.

use super::Env;
use crate::println;
use crate::virtio::packet::BUF_LEN;
use crate::virtio::vsock::Vsock;
use crate::virtio::Deadline;
use outboard_testguest_parse::vsock::{self as proto, HEADER_LEN};

const NAME: &str = "vsock-echo";
const LOCAL_PORT: u32 = 49_152;
const MAX_MESSAGE: usize = BUF_LEN as usize - HEADER_LEN;

/// Why the exchange stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Error {
    #[error("Transport: {0}")]
    Transport(#[from] crate::virtio::Error),
    #[error("Host reset the connection")]
    Reset,
    #[error("Timed out in {0}")]
    Timeout(&'static str),
    #[error("Host offers {0} bytes of credit, less than the message")]
    Credit(u32),
    #[error("Echo differs at byte {0}")]
    Mismatch(usize),
}

pub fn run(env: &Env) {
    let (Some(port), Some(bytes), Some(timeout_ms), Some(rounds), Some(interval_ms)) = (
        env.param_u64(NAME, "outboard.vsock_port", 1234),
        env.param_u64(NAME, "outboard.vsock_bytes", 64),
        env.param_u64(NAME, "outboard.vsock_timeout_ms", 5000),
        env.param_u64(NAME, "outboard.vsock_rounds", 1),
        env.param_u64(NAME, "outboard.vsock_interval_ms", 0),
    ) else {
        return;
    };
    let mut v = match Vsock::open() {
        Ok(v) => v,
        Err(e) => {
            println!("OUTBOARD_GUEST_ERROR {NAME}: {e}");
            return;
        }
    };
    let mut message = [0u8; MAX_MESSAGE];
    let len = (bytes as usize).clamp(1, MAX_MESSAGE);
    for (i, b) in message[..len].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    let result = exchange(
        env,
        &mut v,
        port as u32,
        &message[..len],
        timeout_ms * 1_000_000,
        (rounds.max(1), interval_ms.saturating_mul(1_000_000)),
    );
    crate::irq::report();
    match result {
        Ok(n) => println!(
            "OUTBOARD_VSOCK_RESULT ok=1 bytes={n} cid={} irqs={}",
            v.guest_cid,
            crate::irq::device_interrupts()
        ),
        Err(e) => println!(
            "OUTBOARD_VSOCK_RESULT ok=0 bytes=0 cid={} error=\"{e}\"",
            v.guest_cid
        ),
    }
    let _ = v.dev.reset();
}

fn exchange(
    env: &Env,
    v: &mut Vsock,
    port: u32,
    message: &[u8],
    timeout: u64,
    (rounds, interval): (u64, u64),
) -> Result<usize, Error> {
    let mut rx = [0u8; BUF_LEN as usize];
    let request = v.header(LOCAL_PORT, port, proto::OP_REQUEST, 0);
    send(env, v, request, &[], timeout)?;
    let mut deadline = Deadline::new(env.clock, timeout);
    let peer_credit = loop {
        match v.recv(&mut rx)? {
            Some((h, _)) if h.op == proto::OP_RESPONSE && h.dst_port == LOCAL_PORT => {
                break h.buf_alloc
            }
            Some((h, _)) if h.op == proto::OP_RST => return Err(Error::Reset),
            _ if deadline.expired() => return Err(Error::Timeout("connect")),
            None => crate::irq::wait(),
            _ => {}
        }
    };
    // Nothing was sent yet, so the whole advertised buffer is credit (5.10.6.3).
    if (peer_credit as usize) < message.len() {
        return Err(Error::Credit(peer_credit));
    }
    let mut total = 0;
    for round in 0..rounds {
        if round > 0 {
            let mut pause = Deadline::new(env.clock, interval);
            while !pause.expired() {
                core::hint::spin_loop();
            }
        }
        total += echo_once(env, v, port, message, timeout)?;
        if rounds > 1 {
            println!("OUTBOARD_VSOCK_PROGRESS round={round}");
        }
    }
    let mut shutdown = v.header(LOCAL_PORT, port, proto::OP_SHUTDOWN, 0);
    shutdown.flags = proto::SHUTDOWN_BOTH;
    send(env, v, shutdown, &[], timeout)?;
    Ok(total)
}

/// Sends `message` on the open connection and reads its echo.
fn echo_once(
    env: &Env,
    v: &mut Vsock,
    port: u32,
    message: &[u8],
    timeout: u64,
) -> Result<usize, Error> {
    let mut rx = [0u8; BUF_LEN as usize];
    send(
        env,
        v,
        v.header(LOCAL_PORT, port, proto::OP_RW, 0),
        message,
        timeout,
    )?;
    let mut got = 0;
    let mut deadline = Deadline::new(env.clock, timeout);
    while got < message.len() {
        match v.recv(&mut rx)? {
            Some((h, payload)) if h.op == proto::OP_RW && h.dst_port == LOCAL_PORT => {
                let want = &message[got..(got + payload.len()).min(message.len())];
                if let Some(i) = want.iter().zip(payload).position(|(a, b)| a != b) {
                    return Err(Error::Mismatch(got + i));
                }
                got += payload.len();
                v.fwd_cnt = v.fwd_cnt.wrapping_add(payload.len() as u32);
                deadline = Deadline::new(env.clock, timeout);
            }
            Some((h, _)) if h.op == proto::OP_CREDIT_REQUEST => {
                let update = v.header(LOCAL_PORT, port, proto::OP_CREDIT_UPDATE, 0);
                send(env, v, update, &[], timeout)?;
            }
            Some((h, _)) if h.op == proto::OP_RST || h.op == proto::OP_SHUTDOWN => {
                return Err(Error::Reset)
            }
            _ if deadline.expired() => return Err(Error::Timeout("echo")),
            None => crate::irq::wait(),
            _ => {}
        }
    }
    Ok(got)
}

fn send(
    env: &Env,
    v: &mut Vsock,
    hdr: proto::Header,
    payload: &[u8],
    timeout: u64,
) -> Result<(), Error> {
    let mut deadline = Deadline::new(env.clock, timeout);
    while !v.send(hdr, payload)? {
        if deadline.expired() {
            return Err(Error::Timeout("send"));
        }
        crate::irq::wait();
    }
    Ok(())
}
