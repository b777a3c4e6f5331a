//! ringblk's NBD: the wire protocol shared by both sides (`proto`), the
//! server behind `ringblk-nbd` (`server`), the client and its `nbd` protocol
//! driver (`client`), `-L` listing (`list`) and the kernel client (`kernel`).
//!
//! The `nbd` driver lives here rather than in the drivers crate, next to the
//! protocol code it shares with the server: the server opens images through
//! the drivers crate, so drivers cannot depend on this crate. `registry()`
//! is every driver of the drivers crate plus `nbd`; front-ends use it.

pub mod client;
pub mod kernel;
pub mod list;
pub mod proto;
pub mod server;
pub mod stream;
pub mod tls;
pub mod wire;

use std::sync::Arc;

use engine::block::Registry;

/// Every driver ringblk has, `nbd` included.
pub fn registry() -> Arc<Registry> {
    let mut r = drivers::new_registry();
    r.register(Box::new(client::driver::NbdDriver));
    Arc::new(r)
}
