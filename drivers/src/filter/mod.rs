//! Filter drivers: nodes that sit on a whole image and change how it behaves.

pub mod blkdebug;
pub mod preallocate;
