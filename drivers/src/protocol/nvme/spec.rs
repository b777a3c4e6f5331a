//! NVMe wire structures: controller registers, submission and completion
//! queue entries, the commands we send and the Identify data we read. Pure
//! data, no I/O: the queue and controller modules put these on the device.
//!
//! Everything the device reads or writes is little-endian; fields are
//! encoded with `to_le`/`from_le_bytes`, never by casting a pointer.

/// Controller registers, as byte offsets into BAR0.
pub mod reg {
    /// Capabilities (64-bit), read-only.
    pub const CAP: usize = 0x00;
    /// Version (32-bit).
    pub const VS: usize = 0x08;
    /// Controller configuration (32-bit).
    pub const CC: usize = 0x14;
    /// Controller status (32-bit).
    pub const CSTS: usize = 0x1c;
    /// Admin queue attributes: queue sizes, 0-based (32-bit).
    pub const AQA: usize = 0x24;
    /// Admin submission and completion queue base addresses (64-bit).
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    /// The first doorbell; the rest follow at the stride CAP.DSTRD gives.
    pub const DOORBELLS: usize = 0x1000;
}

/// CAP, decoded.
///
/// | bits  | field  | meaning                                        |
/// |-------|--------|------------------------------------------------|
/// | 15:0  | MQES   | largest queue, entries, 0-based                |
/// | 16    | CQR    | queues must be physically contiguous           |
/// | 31:24 | TO     | worst-case enable/disable time, 500 ms units   |
/// | 35:32 | DSTRD  | doorbell stride, 4 << DSTRD bytes              |
/// | 36    | NSSRS  | NVM subsystem reset supported                  |
/// | 44:37 | CSS    | command sets (bit 37: NVM)                     |
/// | 51:48 | MPSMIN | smallest memory page, 4 KiB << MPSMIN          |
/// | 55:52 | MPSMAX | largest memory page                            |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub max_queue_entries: u32,
    pub timeout_ms: u64,
    pub doorbell_stride: usize,
    pub nvm_command_set: bool,
    pub min_page: usize,
    pub max_page: usize,
}

impl Cap {
    pub fn decode(v: u64) -> Cap {
        Cap {
            max_queue_entries: (v & 0xffff) as u32 + 1,
            // A controller that reports 0 still needs time; give it 500 ms.
            timeout_ms: ((v >> 24) & 0xff).max(1) * 500,
            doorbell_stride: 4 << ((v >> 32) & 0xf),
            nvm_command_set: (v >> 37) & 1 == 1,
            min_page: 4096 << ((v >> 48) & 0xf),
            max_page: 4096 << ((v >> 52) & 0xf),
        }
    }
}

/// CC fields.
pub mod cc {
    pub const EN: u32 = 1;
    /// I/O command set NVM (CSS = 0), memory page size 4 KiB << MPS.
    pub fn mps(page: usize) -> u32 {
        (page.trailing_zeros() - 12) << 7
    }
    /// Round-robin arbitration (AMS = 0) is the default; nothing to set.
    /// Normal shutdown notification.
    pub const SHN_NORMAL: u32 = 1 << 14;
    pub const SHN_MASK: u32 = 3 << 14;
    /// Entry sizes, as powers of two: 64-byte SQ entries, 16-byte CQ entries.
    pub const IOSQES: u32 = 6 << 16;
    pub const IOCQES: u32 = 4 << 20;
}

/// CSTS fields.
pub mod csts {
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 3 << 2;
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
    /// Feature: number of queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
    /// Feature: volatile write cache.
    pub const FEAT_VWC: u32 = 0x06;
    /// Identify CNS values.
    pub const CNS_NAMESPACE: u32 = 0;
    pub const CNS_CONTROLLER: u32 = 1;
}

/// NVM command set opcodes.
pub mod nvm {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
    /// CDW12 of read/write/write zeroes: force unit access.
    pub const FUA: u32 = 1 << 30;
    /// CDW12 of write zeroes: deallocate the blocks if the device can.
    pub const DEAC: u32 = 1 << 25;
    /// CDW11 of dataset management: deallocate.
    pub const DSM_AD: u32 = 1 << 2;
}

/// A submission queue entry: 64 bytes, as sixteen little-endian dwords.
///
/// | dword | field                                                  |
/// |-------|--------------------------------------------------------|
/// | 0     | opcode 7:0, fused 9:8, PSDT 15:14, command id 31:16    |
/// | 1     | namespace id                                           |
/// | 2-3   | reserved                                               |
/// | 4-5   | metadata pointer                                       |
/// | 6-7   | PRP entry 1 (or SGL descriptor, first half)            |
/// | 8-9   | PRP entry 2                                            |
/// | 10-15 | command specific                                       |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct Sqe(pub [u32; 16]);

impl Sqe {
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        let mut s = Sqe([0; 16]);
        s.0[0] = u32::from(opcode);
        s.0[1] = nsid;
        s
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
    pub fn set_cid(&mut self, cid: u16) {
        self.0[0] = (self.0[0] & 0xffff) | (u32::from(cid) << 16);
    }
    pub fn cid(&self) -> u16 {
        (self.0[0] >> 16) as u16
    }
    pub fn set_prp(&mut self, prp1: u64, prp2: u64) {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
    }
    /// The data pointer as one SGL Data Block descriptor (PSDT = 01): the
    /// whole transfer in one contiguous IOVA range, no PRP list.
    ///
    /// | bytes | field                                            |
    /// |-------|--------------------------------------------------|
    /// | 0-7   | address                                          |
    /// | 8-11  | length                                           |
    /// | 15    | identifier: type 7:4 (0, data block), subtype 3:0 (0, address) |
    pub fn set_sgl(&mut self, addr: u64, len: u32) {
        self.0[0] = (self.0[0] & !(3 << 14)) | (1 << 14);
        self.0[6] = addr as u32;
        self.0[7] = (addr >> 32) as u32;
        self.0[8] = len;
        self.0[9] = 0;
    }
    pub fn prp(&self) -> (u64, u64) {
        (u64::from(self.0[6]) | (u64::from(self.0[7]) << 32), u64::from(self.0[8]) | (u64::from(self.0[9]) << 32))
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        debug_assert!((10..16).contains(&n), "command dwords are 10 to 15");
        self.0[n] = v;
    }
    pub fn cdw(&self, n: usize) -> u32 {
        self.0[n]
    }
    /// The starting LBA of a read, write or write zeroes (CDW10-11).
    pub fn set_slba(&mut self, lba: u64) {
        self.0[10] = lba as u32;
        self.0[11] = (lba >> 32) as u32;
    }
    /// Read, write or write zeroes of `blocks` blocks from `lba`; `cdw12`
    /// carries flags (FUA, DEAC) above the 0-based block count.
    pub fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32, flags: u32) -> Sqe {
        debug_assert!((1..=0x1_0000).contains(&blocks), "one command moves 1 to 65536 blocks");
        let mut s = Sqe::new(opcode, nsid);
        s.set_slba(lba);
        s.0[12] = (blocks - 1) | flags;
        s
    }
    /// The bytes as the device reads them.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        for (i, d) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry (16 bytes).
///
/// | dword | field                                                   |
/// |-------|---------------------------------------------------------|
/// | 0     | command specific result                                 |
/// | 1     | reserved                                                |
/// | 2     | SQ head pointer 15:0, SQ identifier 31:16               |
/// | 3     | command id 15:0, phase tag 16, status 31:17             |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub phase: bool,
    pub status: Status,
}

impl Cqe {
    pub fn decode(d: [u32; 4]) -> Cqe {
        Cqe {
            result: d[0],
            sq_head: d[2] as u16,
            sq_id: (d[2] >> 16) as u16,
            cid: d[3] as u16,
            phase: (d[3] >> 16) & 1 == 1,
            status: Status((d[3] >> 17) as u16),
        }
    }
}

/// The status field of a completion (CQE dword 3 bits 31:17).
///
/// | bits  | field                                   |
/// |-------|-----------------------------------------|
/// | 7:0   | status code                             |
/// | 10:8  | status code type (0 generic, 1 command specific, 2 media, 3 path) |
/// | 12:11 | command retry delay                     |
/// | 13    | more                                    |
/// | 14    | do not retry                            |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    pub fn ok(self) -> bool {
        self.0 & 0x7ff == 0
    }
    pub fn code(self) -> u8 {
        self.0 as u8
    }
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    pub fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// The errno a block-layer caller gets for this status.
    pub fn errno(self) -> i32 {
        match (self.code_type(), self.code()) {
            (0, 0) => 0,
            (0, 0x01) => libc::EOPNOTSUPP,
            // Invalid field, LBA out of range.
            (0, 0x02) | (0, 0x80) => libc::EINVAL,
            (0, 0x81) => libc::ENOSPC,
            (0, 0x82) => libc::EAGAIN,
            (0, 0x20) => libc::EROFS,
            // Aborted (by a reset or a delete of its queue).
            (0, 0x07) | (0, 0x08) => libc::EINTR,
            _ => libc::EIO,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status type {:#x} code {:#04x}", self.code_type(), self.code())
    }
}

/// The Identify Controller fields we use (4096-byte structure).
///
/// | offset | size | field                                             |
/// |--------|------|---------------------------------------------------|
/// | 4      | 20   | serial number (ASCII, space padded)               |
/// | 24     | 40   | model number                                      |
/// | 64     | 8    | firmware revision                                 |
/// | 77     | 1    | MDTS: max transfer, 2^n minimum pages (0: none)   |
/// | 512    | 1    | SQES: required 3:0, maximum 7:4 (powers of two)   |
/// | 513    | 1    | CQES, the same for completions                    |
/// | 516    | 4    | NN: number of namespaces (LE)                     |
/// | 520    | 2    | ONCS: optional commands (LE): bit 2 DSM, bit 3 write zeroes |
/// | 525    | 1    | VWC: bit 0, a volatile write cache is present     |
/// | 536    | 4    | SGLS: SGL support (LE), bits 1:0 nonzero if any   |
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdController {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub mdts: u8,
    pub namespaces: u32,
    pub oncs: u16,
    pub volatile_cache: bool,
    pub sgls: u32,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).trim_start().to_string()
}

impl IdController {
    pub fn parse(b: &[u8; 4096]) -> IdController {
        IdController {
            serial: ascii(&b[4..24]),
            model: ascii(&b[24..64]),
            firmware: ascii(&b[64..72]),
            mdts: b[77],
            namespaces: u32::from_le_bytes(b[516..520].try_into().expect("4 bytes")),
            oncs: u16::from_le_bytes([b[520], b[521]]),
            volatile_cache: b[525] & 1 == 1,
            sgls: u32::from_le_bytes(b[536..540].try_into().expect("4 bytes")),
        }
    }
    pub fn has_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
    /// SGLs for NVM commands (SGLS bits 1:0 = 01, any alignment, or 10,
    /// dword aligned: our addresses always are).
    pub fn has_sgl(&self) -> bool {
        matches!(self.sgls & 3, 1 | 2)
    }
    pub fn has_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
    /// The largest transfer in bytes, given the controller's minimum page
    /// size; None when the controller sets no limit.
    pub fn max_transfer(&self, min_page: usize) -> Option<usize> {
        (self.mdts != 0).then(|| min_page << self.mdts.min(20))
    }
}

/// The Identify Namespace fields we use.
///
/// | offset | size | field                                               |
/// |--------|------|-----------------------------------------------------|
/// | 0      | 8    | NSZE: size in logical blocks (LE)                   |
/// | 25     | 1    | NLBAF: number of LBA formats, 0-based               |
/// | 26     | 1    | FLBAS: format in use, bits 3:0 (and 6:5 above 16)   |
/// | 128    | 4×64 | LBA formats: metadata size 15:0, LBADS 23:16 (2^n)  |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdNamespace {
    pub blocks: u64,
    pub block_size: u32,
    pub metadata_size: u16,
}

impl IdNamespace {
    /// None when the namespace is inactive (all zeroes) or its format is
    /// one we cannot drive (block size outside 512 B to 64 KiB).
    pub fn parse(b: &[u8; 4096]) -> Option<IdNamespace> {
        let blocks = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let nlbaf = usize::from(b[25]) + 1;
        let flbas = usize::from(b[26] & 0xf) | (usize::from((b[26] >> 5) & 3) << 4);
        if blocks == 0 || flbas >= nlbaf.min(64) {
            return None;
        }
        let f = u32::from_le_bytes(b[128 + 4 * flbas..132 + 4 * flbas].try_into().expect("4 bytes"));
        let lbads = (f >> 16) & 0xff;
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(IdNamespace { blocks, block_size: 1 << lbads, metadata_size: f as u16 })
    }
}

/// One range of a dataset management command (16 bytes): context
/// attributes (dword 0), length in blocks, 1-based (dword 1), starting LBA
/// (dwords 2-3).
pub fn dsm_range(lba: u64, blocks: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[4..8].copy_from_slice(&blocks.to_le_bytes());
    r[8..16].copy_from_slice(&lba.to_le_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<Sqe>(), 64);
        assert_eq!(std::mem::align_of::<Sqe>(), 64);
    }

    #[test]
    fn cap_decodes_every_field() {
        // MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let v: u64 = 0x7ff | (1 << 16) | (15 << 24) | (1 << 37) | (4 << 52);
        let c = Cap::decode(v);
        assert_eq!(c.max_queue_entries, 2048);
        assert_eq!(c.timeout_ms, 7500);
        assert_eq!(c.doorbell_stride, 4);
        assert!(c.nvm_command_set);
        assert_eq!((c.min_page, c.max_page), (4096, 65536));
        assert_eq!(Cap::decode(2 << 32).doorbell_stride, 16);
    }

    #[test]
    fn sqe_fields_land_where_the_spec_puts_them() {
        let mut s = Sqe::rw(nvm::WRITE, 1, 0x1_2345_6789, 8, nvm::FUA);
        s.set_cid(0xbeef);
        s.set_prp(0x1000, 0x2_0000_3000);
        let b = s.to_bytes();
        assert_eq!(b[0], nvm::WRITE);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0xbeef);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2_0000_3000);
        assert_eq!(u64::from_le_bytes(b[40..48].try_into().unwrap()), 0x1_2345_6789);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7 | (1 << 30));
        assert_eq!((s.cid(), s.opcode(), s.prp()), (0xbeef, nvm::WRITE, (0x1000, 0x2_0000_3000)));
        s.set_sgl(0x3_0000_1000, 8192);
        let b = s.to_bytes();
        assert_eq!((b[1] >> 6) & 3, 1, "PSDT says SGL");
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0xbeef, "the command id survives");
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x3_0000_1000);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 8192);
        assert_eq!(b[39], 0, "data block descriptor, address subtype");
    }

    #[test]
    fn cqe_status_and_phase() {
        let c = Cqe::decode([5, 0, 0x0003_0010, 0x0001_0007]);
        assert_eq!((c.result, c.sq_head, c.sq_id, c.cid, c.phase), (5, 0x10, 3, 7, true));
        assert!(c.status.ok());
        // LBA out of range (generic 0x80), do not retry, phase 0.
        let c = Cqe::decode([0, 0, 0, 9 | (u32::from(0x80u16 | (1 << 14)) << 17)]);
        assert!(!c.phase && !c.status.ok() && c.status.do_not_retry());
        assert_eq!((c.status.code_type(), c.status.code(), c.status.errno()), (0, 0x80, libc::EINVAL));
    }

    #[test]
    fn identify_parsing() {
        let mut b = [0u8; 4096];
        b[4..24].copy_from_slice(b"rb0                 ");
        b[24..33].copy_from_slice(b"QEMU NVMe");
        b[77] = 7;
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        b[520..522].copy_from_slice(&0x0c_u16.to_le_bytes());
        b[525] = 1;
        let c = IdController::parse(&b);
        assert_eq!((c.serial.as_str(), c.model.as_str()), ("rb0", "QEMU NVMe"));
        assert_eq!(c.max_transfer(4096), Some(512 * 1024));
        assert!(c.has_dsm() && c.has_write_zeroes() && c.volatile_cache);
        assert_eq!(c.namespaces, 256);

        let mut n = [0u8; 4096];
        n[0..8].copy_from_slice(&1000u64.to_le_bytes());
        n[25] = 1; // two formats
        n[26] = 1; // the second in use
        n[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        n[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        assert_eq!(IdNamespace::parse(&n), Some(IdNamespace { blocks: 1000, block_size: 4096, metadata_size: 0 }));
        n[26] = 2; // beyond the formats it has
        assert_eq!(IdNamespace::parse(&n), None);
        assert_eq!(IdNamespace::parse(&[0u8; 4096]), None);
    }

    #[test]
    fn dsm_range_layout() {
        let r = dsm_range(0x10, 8);
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 8);
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 0x10);
    }
}
