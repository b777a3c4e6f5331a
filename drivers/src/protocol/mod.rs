//! Protocol drivers: where bytes finally live.

pub mod file;
pub mod nvme;
pub(crate) mod sys;

pub use sys::parallel_dio_writes;
