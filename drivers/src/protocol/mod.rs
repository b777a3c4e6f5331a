//! Protocol drivers: where bytes finally live.

pub mod file;
mod sys;
