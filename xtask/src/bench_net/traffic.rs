//! Traffic of the net benchmark, run from threads that enter the endpoint namespaces: one
//! TCP stream (goodput, and a 1 ms timeline of what arrived, to time a path cut's recovery)
//! and TCP request/response (64-byte ping-pong, latency percentiles).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Moves the calling thread into network namespace `name`.
fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("Cannot open network namespace {name}"))?;
    // SAFETY: `f` is an open namespace file for the whole call; setns changes only this
    // thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        bail!(
            "Cannot enter network namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("Traffic thread panicked"))?
}

/// Binds a listener in `ns` and returns it once bound (so the client cannot race it).
fn listen(ns: &str, addr: SocketAddrV4) -> Result<TcpListener> {
    join(in_netns(ns, move || {
        TcpListener::bind(addr).with_context(|| format!("Cannot listen on {addr}"))
    }))
}

fn connect(addr: SocketAddrV4) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
        .with_context(|| format!("Cannot connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// What one stream measured.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub mbps: f64,
    /// Milliseconds from the event to the first 10 ms window after it that carried at least
    /// 75% of `full_mbps` (one surviving path's rate); `None` when it never did.
    pub recovery_ms: Option<f64>,
}

/// One TCP stream from `client` to `server_ip` in `server` for `seconds`; `event` runs
/// `at` seconds in (a path cut) and its recovery is timed against `full_mbps`.
pub fn stream(
    client: &str,
    server: &str,
    server_ip: Ipv4Addr,
    seconds: f64,
    event: Option<(f64, &dyn Fn() -> Result<()>)>,
    full_mbps: f64,
) -> Result<Stream> {
    let addr = SocketAddrV4::new(server_ip, 5301);
    let listener = listen(server, addr)?;
    let base = Instant::now();
    // Goodput over the whole sending time: a stream that dies at a cut scores what it moved.
    let receiver = thread::spawn(move || -> Result<(Vec<u64>, f64)> {
        let (mut s, _) = listener.accept()?;
        // A dead tunnel never delivers the FIN: stop after a quiet spell.
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut ms = vec![0u64; ((seconds + 10.0) * 1000.0) as usize];
        let mut buf = vec![0u8; 256 << 10];
        let mut first = None;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let t = base.elapsed().as_secs_f64();
            first.get_or_insert(t);
            if let Some(b) = ms.get_mut((t * 1000.0) as usize) {
                *b += n as u64;
            }
        }
        let total: u64 = ms.iter().sum();
        let _ = first.context("Nothing arrived")?;
        Ok((ms, total as f64 * 8.0 / seconds / 1e6))
    });
    let (up_tx, up_rx) = mpsc::channel();
    let sender = in_netns(client, move || {
        let mut s = connect(addr)?;
        let _ = up_tx.send(());
        s.set_write_timeout(Some(Duration::from_secs(1)))?;
        let chunk = vec![0x5au8; 128 << 10];
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            if s.write_all(&chunk).is_err() {
                break; // a dead tunnel: the receiver's timeline shows it
            }
        }
        Ok(())
    });
    let mut event_ms = None;
    // Timed from the connection, which may take a SYN retry over a fresh tunnel.
    if let (Some((at, f)), Ok(())) = (event, up_rx.recv_timeout(Duration::from_secs(6))) {
        thread::sleep(Duration::from_secs_f64(at));
        event_ms = Some(base.elapsed().as_secs_f64() * 1000.0);
        f()?;
    }
    join(sender)?;
    let (ms, mbps) = receiver
        .join()
        .map_err(|_| anyhow!("Stream receiver panicked"))??;
    let recovery_ms = event_ms.and_then(|e| recovery(&ms, e, full_mbps));
    Ok(Stream { mbps, recovery_ms })
}

/// First 10 ms window at or after `event_ms` carrying 75% of `full_mbps`: its start.
fn recovery(ms: &[u64], event_ms: f64, full_mbps: f64) -> Option<f64> {
    const WINDOW: usize = 10;
    let need = (full_mbps * 1e6 / 8.0 * WINDOW as f64 / 1000.0 * 0.75) as u64;
    let from = event_ms as usize;
    (from..ms.len().saturating_sub(WINDOW))
        .find(|&t| ms[t..t + WINDOW].iter().sum::<u64>() >= need)
        .map(|t| (t as f64 - event_ms).max(0.0))
}

/// Request/response latency: p50, p99 and max in µs.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// 64-byte TCP ping-pong from `client` to `server_ip` for `seconds`; `event` as in [`stream`].
pub fn rr(
    client: &str,
    server: &str,
    server_ip: Ipv4Addr,
    seconds: f64,
    event: Option<(f64, &dyn Fn() -> Result<()>)>,
) -> Result<Rr> {
    let addr = SocketAddrV4::new(server_ip, 5302);
    let listener = listen(server, addr)?;
    thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
        Ok(())
    });
    let (done_tx, done_rx) = mpsc::channel();
    let (up_tx, up_rx) = mpsc::channel();
    let client_h = in_netns(client, move || {
        let mut s = connect(addr)?;
        let _ = up_tx.send(());
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut lat = Vec::new();
        let mut b = [7u8; 64];
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            let ok = s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok();
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if !ok {
                break; // a dead tunnel: the timeout is the last sample
            }
        }
        let _ = done_tx.send(());
        Ok(lat)
    });
    if let (Some((at, f)), Ok(())) = (event, up_rx.recv_timeout(Duration::from_secs(6))) {
        if done_rx.recv_timeout(Duration::from_secs_f64(at)).is_err() {
            f()?;
        }
    }
    let mut lat = join(client_h)?;
    if lat.is_empty() {
        bail!("No request/response completed");
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(Rr {
        p50_us: q(0.5),
        p99_us: q(0.99),
        max_us: lat[lat.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_finds_the_first_good_window() {
        // 1000 Mbit/s is 125 000 bytes per ms; 75% of it over 10 ms is 937 500 bytes.
        let mut ms = vec![125_000u64; 100];
        for b in &mut ms[40..70] {
            *b = 0;
        }
        assert_eq!(recovery(&ms, 40.0, 1000.0), Some(28.0));
        assert_eq!(recovery(&ms, 10.0, 1000.0), Some(0.0));
        assert_eq!(recovery(&vec![0; 100], 10.0, 1000.0), None);
    }
}
