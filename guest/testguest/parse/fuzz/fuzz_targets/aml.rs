//! `_S5_` search over arbitrary AML.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = outboard_testguest_parse::aml::find_s5(data);
});
