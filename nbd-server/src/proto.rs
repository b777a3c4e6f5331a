//! The NBD wire protocol (fixed newstyle, structured replies, extended
//! headers), shared by the server and the client: magic numbers, option and
//! command codes, flag bits, and the encoding of the fixed-size headers.
//! It owns no sockets and no policy; all integers are big-endian on the wire.

/// "NBDMAGIC", the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bits).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Errors a reply may carry (the protocol's own numbering, equal to Linux's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const CTX_BASE_ALLOCATION: &str = "base:allocation";
pub const CTX_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Largest string (export name, description, context name) the spec lets
/// either side send.
pub const MAX_STRING: usize = 4096;

/// Map a host errno to the few the protocol defines (others become EIO,
/// except a bad argument, which stays EINVAL).
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP | libc::ENOSYS => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// The host errno for an error a server sent.
pub fn host_errno(wire: u32) -> i32 {
    match wire {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// A transmission request header.
///
/// | compact | extended | field |
/// |---|---|---|
/// | 0..4 | 0..4 | magic (REQUEST_MAGIC / EXTENDED_REQUEST_MAGIC) |
/// | 4..6 | 4..6 | command flags |
/// | 6..8 | 6..8 | type |
/// | 8..16 | 8..16 | cookie |
/// | 16..24 | 16..24 | offset |
/// | 24..28 (u32) | 24..32 (u64) | length |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

impl Request {
    /// Size of a request header in the negotiated form.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Parse a header of `header_len(extended)` bytes; Err names the bad magic.
    pub fn parse(b: &[u8], extended: bool) -> Result<Request, u32> {
        let magic = be32(&b[0..4]);
        let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != want {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            ty: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: if extended { be64(&b[24..32]) } else { u64::from(be32(&b[24..28])) },
        })
    }

    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        v.extend_from_slice(&(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.ty.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            v.extend_from_slice(&self.len.to_be_bytes());
        } else {
            v.extend_from_slice(&(self.len as u32).to_be_bytes());
        }
        v
    }
}

/// The reply forms a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// Only simple replies.
    #[default]
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: structured chunks, 32-bit lengths.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies, 64-bit lengths.
    Extended,
}

/// Simple reply header: magic (4), error (4), cookie (8).
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// A structured chunk header: magic (4), flags (2), type (2), cookie (8),
/// length (4); or with extended headers magic (4), flags (2), type (2),
/// cookie (8), offset (8), length (8).
pub fn chunk_header(out: &mut Vec<u8>, mode: ReplyMode, flags: u16, ty: u16, cookie: u64, offset: u64, len: u64) {
    if mode == ReplyMode::Extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// An option reply header: magic (8), option (4), type (4), length (4).
pub fn option_reply(opt: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// A reader over an option's payload that fails instead of reading past it.
pub struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Cursor<'a> {
        Cursor { b }
    }

    pub fn remaining(&self) -> usize {
        self.b.len()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(be64)
    }

    /// A 32-bit length then that many bytes of UTF-8 (at most MAX_STRING).
    pub fn string32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_in_both_forms() {
        let r =
            Request { flags: CMD_FLAG_FUA, ty: CMD_WRITE, cookie: 0x0102_0304_0506_0708, offset: 1 << 40, len: 4096 };
        for ext in [false, true] {
            let b = r.encode(ext);
            assert_eq!(b.len(), Request::header_len(ext));
            assert_eq!(Request::parse(&b, ext), Ok(r));
            assert!(Request::parse(&b, !ext).is_err(), "the other form's magic is refused");
        }
        let big = Request { len: 1 << 33, ..r };
        assert_eq!(Request::parse(&big.encode(true), true).unwrap().len, 1 << 33);
    }

    #[test]
    fn headers_have_the_spec_layout() {
        assert_eq!(simple_reply(7, EIO), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]);
        let mut v = Vec::new();
        chunk_header(&mut v, ReplyMode::Structured, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 0, 0);
        assert_eq!(v.len(), 20);
        assert_eq!(&v[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.clear();
        chunk_header(&mut v, ReplyMode::Extended, 0, REPLY_TYPE_OFFSET_DATA, 9, 512, 8 + 4096);
        assert_eq!(v.len(), 32);
        assert_eq!(be64(&v[16..24]), 512);
        assert_eq!(be64(&v[24..32]), 4104);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(be64(&o[..8]), REPLY_MAGIC_OPT);
    }

    #[test]
    fn cursor_never_reads_past_the_payload() {
        let mut c = Cursor::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(c.string32(), None);
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.string32(), None, "a huge length is refused, not allocated");
        assert_eq!(wire_errno(libc::ENOENT), EIO);
        assert_eq!(wire_errno(libc::EROFS), EPERM);
    }
}
