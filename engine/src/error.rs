//! The one error type of the engine: a matchable kind, the context it happened in
//! (file, node, offset, operation) and the OS error underneath. It does not decide
//! how a front-end reports it: the CLI turns it into a message and an exit code, the
//! NBD server into an errno.

use std::fmt;
use std::io;

/// What went wrong, for callers to match on. Never match on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Io,
    InvalidImage,
    Corrupt,
    Unsupported,
    OutOfBounds,
    PermissionDenied,
    NotFound,
    InvalidArgument,
    NoSpace,
    /// Another process holds a conflicting image lock.
    Locked,
    ReadOnly,
}

impl ErrorKind {
    /// The errno an NBD reply or a POSIX caller should see.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io | ErrorKind::InvalidImage | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::PermissionDenied | ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Locked => libc::EAGAIN,
        }
    }

    fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT => ErrorKind::NoSpace,
            libc::ENOENT => ErrorKind::NotFound,
            libc::EACCES | libc::EPERM => ErrorKind::PermissionDenied,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::EINVAL => ErrorKind::InvalidArgument,
            libc::ENOTSUP | libc::ENOSYS => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        }
    }
}

/// An engine error: kind, what we were doing, where, and the OS error if any.
pub struct Error {
    kind: ErrorKind,
    msg: String,
    file: Option<String>,
    offset: Option<u64>,
    source: Option<io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error { kind, msg: msg.into(), file: None, offset: None, source: None }
    }

    /// An OS error from `op` (e.g. "read", "fallocate"), kind derived from errno.
    pub fn os(op: &str, err: io::Error) -> Error {
        let kind = err.raw_os_error().map_or(ErrorKind::Io, ErrorKind::from_errno);
        Error { kind, msg: op.to_string(), file: None, offset: None, source: Some(err) }
    }

    /// A negative errno returned by io_uring, Linux AIO or a syscall wrapper.
    pub fn errno(op: &str, errno: i32) -> Error {
        Error::os(op, io::Error::from_raw_os_error(errno))
    }

    pub fn with_file(mut self, file: impl Into<String>) -> Error {
        if self.file.is_none() {
            self.file = Some(file.into());
        }
        self
    }

    pub fn at(mut self, offset: u64) -> Error {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The OS errno underneath, or the kind's default.
    pub fn to_errno(&self) -> i32 {
        self.source.as_ref().and_then(|e| e.raw_os_error()).unwrap_or_else(|| self.kind.errno())
    }

    /// The message without the file prefix, for callers that print the file themselves.
    pub fn detail(&self) -> String {
        let mut s = self.msg.clone();
        if let Some(off) = self.offset {
            s.push_str(&format!(" at offset {off}"));
        }
        if let Some(src) = &self.source {
            s.push_str(&format!(": {src}"));
        }
        s
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "'{file}': ")?;
        }
        f.write_str(&self.detail())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Shorthand constructors.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

pub fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_in_message_and_errno_kept() {
        let e = Error::errno("write", libc::ENOSPC).with_file("/x.img").at(4096);
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.to_errno(), libc::ENOSPC);
        let s = e.to_string();
        assert!(s.starts_with("'/x.img': write at offset 4096: "), "{s}");
    }
}
