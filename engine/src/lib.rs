//! ringblk engine: the thread-per-core runtime, the I/O backends and the block
//! graph core (node trait, driver registry, options, image locking).

pub mod aio;
pub mod block;
pub mod error;
pub mod net;
pub mod options;
pub mod runtime;
pub mod secret;
pub mod size;

pub use error::{Error, ErrorKind, Result};
