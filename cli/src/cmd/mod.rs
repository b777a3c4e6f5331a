//! One module per subcommand.

pub mod amend;
pub mod bench;
mod bench_nvme;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
