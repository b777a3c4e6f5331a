//! Fuzz the NBD server's negotiation: any bytes a client may send during the
//! handshake must get replies or a closed connection, never a panic, a hang
//! or an allocation the input did not pay for.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringblk_nbd::server::negotiate_bytes(Arc::new(ringblk_nbd::server::BlankNode), data);
});
