//! Walking a descriptor chain the inflight region names (resubmission after a card restart)
//! over hostile guest memory: loops, nested or empty indirect tables and addresses outside
//! memory must give `None` or a bounded chain, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_card_storage::vhost::inflight::chain_at;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<5>() else { return };
    let table = u64::from(u16::from_le_bytes([head[0], head[1]])) & 0xfff0;
    let size = u16::from_le_bytes([head[2], head[3]]);
    let index = u16::from(head[4]);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
    let len = rest.len().min(0x1_0000);
    mem.write_slice(&rest[..len], GuestAddress(0)).expect("in range");
    if let Some(chain) = chain_at(&mem, GuestAddress(table), size, index) {
        assert!(!chain.is_empty());
        assert!(chain.len() <= usize::from(size).max(1) + 65536);
    }
});
