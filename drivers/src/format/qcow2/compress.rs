//! Cluster compression for qcow2: raw deflate (QEMU calls it zlib; no zlib
//! header) and zstd, with output bounded by the cluster size whatever the
//! input, so a hostile compressed cluster cannot make us allocate more.

use engine::error::{Error, ErrorKind, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::CompressionType;

fn corrupt(msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// Compress one cluster. None when the result would not be smaller than the
/// cluster (it is then stored uncompressed).
pub fn compress(ty: CompressionType, data: &[u8], cluster_size: usize) -> Result<Option<Vec<u8>>> {
    // Compressed data must save at least one sector to be worth a descriptor.
    let limit = cluster_size - 512;
    match ty {
        CompressionType::Zlib => {
            // Window bits 12, as QEMU uses: the stream must decode with a 4 KiB
            // window in any reader.
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() <= limit => Ok(Some(out)),
                Ok(_) => Ok(None),
                Err(e) => Err(Error::new(ErrorKind::Io, format!("deflate failed: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(data, 0).map_err(|e| Error::new(ErrorKind::Io, format!("zstd failed: {e}")))?;
            Ok((out.len() <= limit).then_some(out))
        }
    }
}

/// Decompress one cluster from `src` (which may carry trailing bytes of the
/// last sector).
pub fn decompress(ty: CompressionType, src: &[u8], cluster_size: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match ty {
        CompressionType::Zlib => {
            // The full window decodes streams made with any smaller one.
            let mut d = Decompress::new(false);
            match d.decompress(src, &mut out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => Ok(out),
                Ok(_) => Err(corrupt(format!(
                    "compressed cluster decodes to {} bytes, not {cluster_size}",
                    d.total_out()
                ))),
                Err(e) => Err(corrupt(format!("compressed cluster is not valid deflate data: {e}"))),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| Error::new(ErrorKind::Io, format!("zstd: {e}")))?;
            let mut input = InBuffer::around(src);
            let mut output = OutBuffer::around(&mut out[..]);
            // Trailing bytes after the frame are the sector's padding: stop
            // once the cluster is full or the frame ends.
            loop {
                let before = (input.pos(), output.pos());
                let hint = d.run(&mut input, &mut output).map_err(|e| corrupt(format!("compressed cluster is not valid zstd data: {e}")))?;
                if output.pos() == cluster_size || hint == 0 {
                    break;
                }
                if (input.pos(), output.pos()) == before || input.pos() == src.len() {
                    break;
                }
            }
            let n = output.pos();
            if n != cluster_size {
                return Err(corrupt(format!("compressed cluster decodes to {n} bytes, not {cluster_size}")));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_types_round_trip_and_refuse_garbage() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data, 65536).unwrap().expect("compressible");
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xAA; 300]); // sector tail
            assert_eq!(decompress(ty, &padded, 65536).unwrap(), data, "{ty:?}");
            assert!(decompress(ty, &[1, 2, 3, 4, 5], 65536).is_err());
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &random, 65536).unwrap().is_none());
    }
}
