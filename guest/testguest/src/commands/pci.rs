//! `pci`: one `OUTBOARD_PCI dev=<bb:dd.f> id=<vendor:device> class=<class:subclass:prog-if>`
//! line per function, with its memory BARs and MSI-X table size, then
//! `OUTBOARD_PCI_DONE functions=<n> access=ecam|legacy`.

use super::Env;
use crate::pci::{self, Msix};
use crate::println;
use core::fmt::Write;
use outboard_testguest_parse::pci as decode;

/// Room for six BARs in a line.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        let room = self.buf.len() - self.len;
        let n = b.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(())
    }
}

pub fn run(_: &Env) {
    let mut functions = 0u32;
    pci::for_each_function(|bdf, cfg| {
        functions += 1;
        let vendor = u16::from_le_bytes([cfg[0], cfg[1]]);
        let device = u16::from_le_bytes([cfg[2], cfg[3]]);
        let class = &cfg[decode::CLASS_REV..decode::CLASS_REV + 4];
        let mut extra = Line {
            buf: [0; 256],
            len: 0,
        };
        if cfg[decode::HEADER_TYPE] & 0x7F == 0 {
            let bars = pci::memory_bars(bdf);
            for (i, bar) in bars.iter().enumerate() {
                if let Some(b) = bar {
                    let _ = write!(extra, " bar{i}={:#x}+{:#x}", b.base, b.size);
                }
            }
            if let Some(m) = Msix::find(bdf, cfg, &bars) {
                let _ = write!(extra, " msix={}", m.cap.table_size);
            }
        }
        if let Some(Err(e)) = decode::capabilities(cfg).find(Result::is_err) {
            let _ = write!(extra, " caps_error=\"{e}\"");
        }
        println!(
            "OUTBOARD_PCI dev={bdf} id={vendor:04x}:{device:04x} class={:02x}:{:02x}:{:02x}{}",
            class[3],
            class[2],
            class[1],
            core::str::from_utf8(&extra.buf[..extra.len]).unwrap_or("")
        );
    });
    println!(
        "OUTBOARD_PCI_DONE functions={functions} access={}",
        pci::access_name()
    );
}
