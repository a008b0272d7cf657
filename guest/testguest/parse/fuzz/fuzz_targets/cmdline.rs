//! Command-line parsing of arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_testguest_parse::cmdline::Cmdline;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Cmdline::new(data) {
        for (key, value) in c.params() {
            let _ = (key.len(), value.map(str::len));
        }
        let _ = c.get_u64("outboard.count");
        let _ = c.has("outboard.poweroff");
    }
});
