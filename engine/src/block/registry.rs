//! The driver registry: every format and protocol driver by name, probing, and
//! the create-option tables `create -o help` prints. Drivers live in the drivers
//! crate and register themselves there.

use std::sync::Arc;

use super::{BlockNode, BoxFuture, OpenCtx, Perm};
use crate::error::Result;
use crate::options::OptionTree;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Format,
    Protocol,
    /// Sits on top of a whole image (blkdebug, preallocate, ...).
    Filter,
}

/// One option `create -o` accepts.
#[derive(Clone, Copy, Debug)]
pub struct CreateOpt {
    pub name: &'static str,
    /// "size", "str", "bool" or "num", as `-o help` shows it.
    pub ty: &'static str,
    pub help: &'static str,
}

pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn kind(&self) -> DriverKind;

    /// Formats: how sure (0-100) we are that an image starting with `header` is ours.
    fn probe(&self, _header: &[u8], _filename: &str) -> u32 {
        0
    }
    /// Protocols: how well a bare filename fits (host_device claims block devices).
    fn probe_filename(&self, _filename: &str) -> u32 {
        0
    }
    /// Permissions a format lets others have on its `file` child.
    fn child_shared(&self) -> Perm {
        Perm::ALL
    }

    /// Open a protocol node from its options.
    fn open_protocol<'a>(&'a self, _ctx: &'a OpenCtx, _opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move { Err(crate::error::unsupported(format!("'{}' is not a protocol driver", self.name()))) })
    }
    /// Open a format node over an already open `file` child.
    fn open_format<'a>(
        &'a self,
        _ctx: &'a OpenCtx,
        _opts: OptionTree,
        _file: Arc<dyn BlockNode>,
        _probed: bool,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move { Err(crate::error::unsupported(format!("'{}' is not a format driver", self.name()))) })
    }

    /// Open a filter node; it opens its children itself.
    fn open_filter<'a>(&'a self, _ctx: &'a OpenCtx, _opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move { Err(crate::error::unsupported(format!("'{}' is not a filter driver", self.name()))) })
    }

    fn create_opts(&self) -> &'static [CreateOpt] {
        &[]
    }
    /// Create an image at `filename`; `opts` holds `size` and the `-o` options.
    fn create<'a>(&'a self, _ctx: &'a OpenCtx, _filename: &'a str, _opts: OptionTree) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Err(crate::error::unsupported(format!("Driver '{}' does not support image creation", self.name())))
        })
    }
}

#[derive(Default)]
pub struct Registry {
    drivers: Vec<Box<dyn Driver>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, d: Box<dyn Driver>) {
        self.drivers.push(d);
    }

    pub fn get(&self, name: &str) -> Option<&dyn Driver> {
        self.drivers.iter().find(|d| d.name() == name).map(|d| d.as_ref())
    }

    pub fn names(&self, kind: DriverKind) -> Vec<&'static str> {
        let mut v: Vec<_> = self.drivers.iter().filter(|d| d.kind() == kind).map(|d| d.name()).collect();
        v.sort_unstable();
        v
    }

    /// The best-scoring format for this header, if any scores above zero.
    pub fn probe_format(&self, header: &[u8], filename: &str) -> Option<&dyn Driver> {
        self.drivers
            .iter()
            .filter(|d| d.kind() == DriverKind::Format)
            .map(|d| (d.probe(header, filename), d))
            .filter(|(s, _)| *s > 0)
            .max_by_key(|(s, _)| *s)
            .map(|(_, d)| d.as_ref())
    }

    /// The protocol for a bare filename.
    pub fn probe_protocol(&self, filename: &str) -> Option<&dyn Driver> {
        self.drivers
            .iter()
            .filter(|d| d.kind() == DriverKind::Protocol)
            .map(|d| (d.probe_filename(filename), d))
            .filter(|(s, _)| *s > 0)
            .max_by_key(|(s, _)| *s)
            .map(|(_, d)| d.as_ref())
    }
}
