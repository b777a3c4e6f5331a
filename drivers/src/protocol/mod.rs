//! Protocol drivers: where bytes finally live.

pub mod file;
pub(crate) mod sys;
