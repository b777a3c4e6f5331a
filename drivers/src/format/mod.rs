//! Image format drivers.

pub mod raw;
pub mod qcow2;
