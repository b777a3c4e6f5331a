//! The NBD client: negotiation (`handshake.rs`), a connection in transmission
//! (`conn.rs`) and the `nbd` protocol driver built on them (`driver.rs`).

pub mod conn;
pub mod driver;
pub mod handshake;

pub use handshake::{connect, list, Addr, Connected, ExportInfo};
