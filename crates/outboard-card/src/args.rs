//! Command-line syntax.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "outboard-card",
    about = "Outboard card: encrypted, throttled volumes over vhost-user-blk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the card daemon with its REST control API on a Unix socket.
    Serve {
        /// Backing block device or file (formatted with `volume format`); repeat for several
        /// stores. Volume names must be unique across them.
        #[arg(long, required = true)]
        backing: Vec<PathBuf>,
        /// Unix socket of the control API (created with mode 0600).
        #[arg(long)]
        api: PathBuf,
    },
    /// Manage the volumes of a backing store.
    Volume {
        /// Backing block device or file.
        #[arg(long)]
        backing: PathBuf,
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Serve a volume to a VM on a vhost-user-blk socket.
    Attach {
        #[arg(long)]
        backing: PathBuf,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        socket: PathBuf,
        /// AES-256-XTS key: 64 raw bytes or 128 hex digits. Without it the volume is plain.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// IOPS limit (256 KiB counts as one operation).
        #[arg(long)]
        iops: Option<u64>,
        /// Operations that may go at once after idling (default: a tenth of a second's worth).
        #[arg(long, requires = "iops")]
        iops_burst: Option<u64>,
        /// Bandwidth limit in bytes per second (suffixes K, M, G).
        #[arg(long)]
        bw: Option<String>,
        /// Bytes that may go at once after idling (default: a tenth of a second's worth).
        #[arg(long, requires = "bw")]
        bw_burst: Option<String>,
        /// Virtqueues (one worker thread each).
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// Exit when the first front end disconnects.
        #[arg(long)]
        once: bool,
    },
    /// Microbenchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run one overlay NIC: a TAP joined to the Geneve multipath underlay.
    Net(crate::net::NetArgs),
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Write an empty volume table (destroys existing volumes).
    Format,
    /// Create a volume of SIZE bytes (suffixes K, M, G, T).
    Create { name: String, size: String },
    /// Grow a volume to SIZE bytes.
    Grow { name: String, size: String },
    /// Delete a volume.
    Delete { name: String },
    /// List volumes and free space.
    List,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// AES-256-XTS throughput of one core at 4 KiB data units.
    Xts {
        #[arg(long, default_value = "1G")]
        bytes: String,
    },
    /// Drive any vhost-user-blk backend with the load generator and report.
    Load {
        /// The backend's vhost-user socket.
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 32)]
        depth: usize,
        /// Request size (suffixes K, M).
        #[arg(long, default_value = "4K")]
        bs: String,
        /// Percentage of reads.
        #[arg(long, default_value_t = 100)]
        read_pct: u8,
        /// Sequential instead of random offsets.
        #[arg(long)]
        sequential: bool,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Check every read against what this run wrote.
        #[arg(long)]
        verify: bool,
    },
    /// The card against qemu-storage-daemon through the load generator (needs
    /// qemu-storage-daemon and qemu-img); prints a table and a `RESULT storage` line.
    Storage {
        /// Where to put the temporary backing files (a real disk, not tmpfs).
        #[arg(long, default_value = "/var/tmp")]
        dir: std::path::PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Measurements per side and row (interleaved card/qsd; medians are reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Serve loop devices over /dev/shm files (a device faster than either backend, as
        /// NVMe is) instead of files under --dir. Needs root.
        #[arg(long)]
        ram: bool,
    },
}

/// Parses `123`, `4K`, `16M`, `2G`, `1T` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("Unknown size suffix in {s:?}"),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("Bad size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow::anyhow!("Size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
