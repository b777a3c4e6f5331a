//! ringblk drivers: every format, filter and protocol driver, registered by name.

pub mod filter;
pub mod format;
pub mod protocol;

use std::sync::Arc;

use engine::block::Registry;

/// A registry holding every driver of this crate.
pub fn registry() -> Arc<Registry> {
    Arc::new(new_registry())
}

/// The drivers of this crate, for a front-end to add its own to (the `nbd`
/// driver of the nbd crate).
pub fn new_registry() -> Registry {
    let mut r = Registry::new();
    r.register(Box::new(protocol::file::FileDriver::file()));
    r.register(Box::new(protocol::file::FileDriver::host_device()));
    r.register(Box::new(protocol::nvme::NvmeDriver));
    r.register(Box::new(protocol::nvme::passthru::PassthruDriver));
    r.register(Box::new(format::raw::RawDriver));
    r.register(Box::new(format::qcow2::Qcow2Driver));
    r.register(Box::new(filter::blkdebug::BlkdebugDriver));
    r.register(Box::new(filter::preallocate::PreallocDriver));
    r
}
