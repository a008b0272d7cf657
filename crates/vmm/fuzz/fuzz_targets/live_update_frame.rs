//! Arbitrary bytes from the other end of the live-update channel: receiving must fail with an
//! error (or yield a message), never panic or allocate without bound.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use outboard_vmm::live_update::Channel;

fuzz_target!(|data: &[u8]| {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let channel = Channel::new(ours).unwrap();
    // Small inputs fit in the socket buffer, so writing before reading cannot block.
    theirs.write_all(&data[..data.len().min(64 << 10)]).unwrap();
    drop(theirs);
    while channel.recv().is_ok() {}
});
