//! The volume table parser must reject any byte string it does not accept as a valid table,
//! and anything it accepts must re-encode to a table that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_card_storage::table::{decode, encode, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = decode(data) {
        validate(&table).expect("decoded tables are valid");
        let bytes = encode(&table).expect("a decoded table fits its copy");
        assert_eq!(decode(&bytes).expect("re-decodes"), table);
    }
});
