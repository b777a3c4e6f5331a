//! Image format drivers.

pub mod raw;
