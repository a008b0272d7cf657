//! outboard-card: the card daemon. Owns backing stores, carves them into volumes and serves
//! each attached volume to a VM as a vhost-user-blk device, encrypted and throttled.
//!
//! `serve` runs the daemon with its REST control API on a Unix socket
//! (openapi/outboard-card.yaml); the other verbs work on a store directly:
//!
//! ```text
//! outboard-card serve --backing FILE [--backing FILE…] --api SOCKET
//! outboard-card volume --backing FILE format
//! outboard-card volume --backing FILE create|grow NAME SIZE
//! outboard-card volume --backing FILE delete NAME
//! outboard-card volume --backing FILE list
//! outboard-card attach --backing FILE --volume NAME --socket PATH [--key-file F]
//!                      [--iops N [--iops-burst N]] [--bw B/s [--bw-burst B]]
//!                      [--queues N] [--once]
//! outboard-card bench xts [--bytes N]
//! outboard-card bench load --socket S [--queues N --depth N --bs 4K --read-pct P --sequential
//!                          --seconds S --verify]
//! outboard-card bench storage [--dir D] [--seconds S] [--repeats N] [--ram]
//! outboard-card net --tap T --vni N --mac M --ip A --path ADDR:PORT… --remote MAC=IP@HOST…
//! ```

mod api;
mod args;
mod bench;
mod net;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use outboard_card_storage::backing::Backing;
use outboard_card_storage::blk::device::VolumeDevice;
use outboard_card_storage::table::VolumeStore;
use outboard_card_storage::throttle::{Limit, Limits};
use outboard_card_storage::xts::{self, XtsKey, KEY_LEN};
use zeroize::Zeroizing;

use args::{parse_size, BenchCmd, Cli, Cmd, VolumeCmd};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Volume { backing, cmd } => volume(&backing, cmd),
        Cmd::Attach {
            backing,
            volume,
            socket,
            key_file,
            iops,
            iops_burst,
            bw,
            bw_burst,
            queues,
            once,
        } => {
            let limits = limits(iops, iops_burst, bw.as_deref(), bw_burst.as_deref())?;
            let key = key_file.as_deref().map(read_key).transpose()?;
            attach(&backing, &volume, &socket, key, limits, queues, once)
        }
        Cmd::Serve { backing, api } => api::serve(Arc::new(api::Card::open(&backing)?), &api),
        Cmd::Bench(BenchCmd::Xts { bytes }) => bench_xts(&bytes),
        Cmd::Bench(BenchCmd::Load {
            socket,
            queues,
            depth,
            bs,
            read_pct,
            sequential,
            seconds,
            verify,
        }) => {
            let bs = u32::try_from(parse_size(&bs)?).context("Block size too large")?;
            let spec = outboard_card_storage::loadgen::LoadSpec {
                queues,
                depth,
                block_size: bs,
                read_pct,
                random: !sequential,
                duration: std::time::Duration::from_secs_f64(seconds),
                span: 0,
                verify,
                seed: 1,
            };
            let mut c =
                outboard_card_storage::loadgen::Client::connect(&socket, queues, depth, bs)?;
            let r = c.run(&spec)?;
            println!(
                "RESULT load iops={:.0} mb_s={:.1} p50_us={:.1} p99_us={:.1} p999_us={:.1} errors={} verify_failures={} max_stall_ms={:.1} per_second={:?}",
                r.iops(),
                r.mb_per_s(),
                r.percentile_us(50.0),
                r.percentile_us(99.0),
                r.percentile_us(99.9),
                r.errors,
                r.verify_failures,
                r.max_gap_ns as f64 / 1e6,
                r.per_second
            );
            if r.errors > 0 || r.verify_failures > 0 {
                anyhow::bail!("{} errors, {} verify failures", r.errors, r.verify_failures);
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Storage {
            dir,
            seconds,
            repeats,
            ram,
        }) => bench::storage(&bench::Options {
            dir,
            seconds,
            repeats,
            ram,
        }),
        Cmd::Net(args) => net::run(args),
    }
}

fn volume(backing: &Path, cmd: VolumeCmd) -> Result<()> {
    if let VolumeCmd::Format = cmd {
        let s = VolumeStore::format(backing)
            .with_context(|| format!("Cannot format {}", backing.display()))?;
        println!(
            "formatted {} ({} bytes free)",
            backing.display(),
            s.table().free_bytes()
        );
        return Ok(());
    }
    let mut store =
        VolumeStore::open(backing).with_context(|| format!("Cannot open {}", backing.display()))?;
    match cmd {
        VolumeCmd::Format => unreachable!("handled above"),
        VolumeCmd::Create { name, size } => {
            let v = store.create(&name, parse_size(&size)?)?;
            println!(
                "created {} size={} extents={}",
                v.name,
                v.size,
                v.extents.len()
            );
        }
        VolumeCmd::Grow { name, size } => {
            let v = store.grow(&name, parse_size(&size)?)?;
            println!(
                "grown {} size={} extents={}",
                v.name,
                v.size,
                v.extents.len()
            );
        }
        VolumeCmd::Delete { name } => {
            store.delete(&name)?;
            println!("deleted {name}");
        }
        VolumeCmd::List => {
            for v in store.list() {
                let extents: Vec<String> = v
                    .extents
                    .iter()
                    .map(|e| format!("{:#x}+{:#x}", e.physical, e.length))
                    .collect();
                println!("{} size={} extents={}", v.name, v.size, extents.join(","));
            }
            println!("free={}", store.table().free_bytes());
        }
    }
    Ok(())
}

/// Reads a 64-byte key: raw bytes, or 128 hex digits (whitespace ignored).
fn read_key(path: &Path) -> Result<XtsKey> {
    let raw = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("Cannot read key file {}", path.display()))?,
    );
    if raw.len() == KEY_LEN {
        return Ok(XtsKey::from_bytes(&raw)?);
    }
    let hex: Zeroizing<Vec<u8>> = Zeroizing::new(
        raw.iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect(),
    );
    if hex.len() != 2 * KEY_LEN {
        bail!(
            "Key file {} must hold {KEY_LEN} raw bytes or {} hex digits",
            path.display(),
            2 * KEY_LEN
        );
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => key[i] = h << 4 | l,
            _ => bail!("Key file {} is not hex", path.display()),
        }
    }
    Ok(XtsKey::from_bytes(&key[..])?)
}

/// QoS limits from the command line; a burst defaults to a tenth of a second's worth.
fn limits(
    iops: Option<u64>,
    iops_burst: Option<u64>,
    bw: Option<&str>,
    bw_burst: Option<&str>,
) -> Result<Limits> {
    let with_burst = |rate: u64, burst: Option<u64>| match burst {
        Some(burst) => Limit { rate, burst },
        None => Limit::rate(rate),
    };
    let bw = bw.map(parse_size).transpose()?;
    let bw_burst = bw_burst.map(parse_size).transpose()?;
    Ok(Limits {
        iops_total: iops.map(|r| with_burst(r, iops_burst)),
        bw_total: bw.map(|r| with_burst(r, bw_burst)),
        ..Limits::default()
    })
}

fn attach(
    backing: &Path,
    name: &str,
    socket: &Path,
    key: Option<XtsKey>,
    limits: Limits,
    queues: usize,
    once: bool,
) -> Result<()> {
    let store =
        VolumeStore::open(backing).with_context(|| format!("Cannot open {}", backing.display()))?;
    let volume = store
        .table()
        .volume(name)
        .with_context(|| format!("No volume named {name}"))?
        .clone();
    drop(store);
    let backing = Arc::new(Backing::open(backing)?);
    let dev = Arc::new(VolumeDevice::new(volume, backing, key, limits)?);
    outboard_card_storage::vhost::serve(dev.clone(), socket, queues, once)?;
    let c = dev.counters.snapshot();
    log::info!(
        "Volume {name}: read_ops={} write_ops={} zero_copy={} errors={} throttled_ms={}",
        c.read_ops,
        c.write_ops,
        c.zero_copy,
        c.errors,
        c.throttled_ns / 1_000_000
    );
    Ok(())
}

fn bench_xts(bytes: &str) -> Result<()> {
    let total = parse_size(bytes)?;
    let mut enc = Vec::new();
    let mut dec = Vec::new();
    for _ in 0..5 {
        let r = xts::bench(total)?;
        enc.push(r.encrypt_gbps);
        dec.push(r.decrypt_gbps);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "RESULT xts unit=4096 bytes_per_run={total} runs=5 encrypt_gbps={:.2} decrypt_gbps={:.2}",
        median(&mut enc),
        median(&mut dec)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_raw_or_hex() {
        let dir = std::env::temp_dir().join(format!("outboard-card-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw: Vec<u8> = (0..64u8).collect();
        std::fs::write(dir.join("raw"), &raw).unwrap();
        assert!(read_key(&dir.join("raw")).is_ok());
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("hex"), format!("{}\n{}\n", &hex[..64], &hex[64..])).unwrap();
        assert!(read_key(&dir.join("hex")).is_ok());
        std::fs::write(dir.join("short"), &raw[..32]).unwrap();
        assert!(read_key(&dir.join("short")).is_err());
        std::fs::write(dir.join("nothex"), "zz".repeat(64)).unwrap();
        assert!(read_key(&dir.join("nothex")).is_err());
        assert!(read_key(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
