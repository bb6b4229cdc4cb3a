//! The kite image format: chunk parameters, the per-chunk codec, digests,
//! and the bootstrap (EROFS image + index section).
//!
//! A kite image is a bootstrap plus one data blob per source layer. Regular
//! files are cut at fixed offsets into chunks; a chunk's identity is the
//! sha256 of its uncompressed bytes; each chunk is stored as one independent
//! zstd frame, or raw when compression does not make it smaller. In a blob's
//! *uncompressed layout* (what the kernel reads) every chunk starts at a
//! 4 KiB-aligned offset; the index section maps that layout onto the stored
//! bytes. This crate owns those rules; it does no file or network I/O.

#![forbid(unsafe_code)]

pub mod index;
pub mod prefetch;

use std::fmt;

use sha2::{Digest as _, Sha256};

pub use index::{encode_index, BlobEntry, BlobRecord, BlobView, ChunkRecord, Index};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default zstd level.
pub const DEFAULT_LEVEL: i32 = 3;

/// Errors of the image format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    BadChunkSize(u64),
    #[error("malformed index section: {0}")]
    BadIndex(String),
    #[error("index section checksum mismatch (bootstrap corrupt or truncated)")]
    IndexChecksum,
    #[error("index section version {0} is not supported (this kite reads version 1)")]
    UnsupportedVersion(u32),
    #[error("bootstrap: {0}")]
    Erofs(#[from] kite_erofs::ErofsError),
    #[error("chunk {chunk} of blob {blob}: {why}")]
    BadChunk {
        blob: Digest,
        chunk: usize,
        why: String,
    },
    #[error("zstd compression failed")]
    Compress(#[source] std::io::Error),
    #[error("compressed bootstrap: {0}")]
    CompressedBootstrap(String),
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// `sha256:<hex>`, the OCI form.
    pub fn oci(&self) -> String {
        format!("sha256:{}", self.hex())
    }
    /// Parse `sha256:<hex>` or bare hex.
    pub fn parse(s: &str) -> Option<Self> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out).ok()?;
        Some(Digest(out))
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

/// Round up to 4 KiB.
pub fn align4k(v: u64) -> u64 {
    (v + 4095) & !4095
}

/// A validated chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSize(u32);

impl ChunkSize {
    /// The default chunk size of ELF files (`kite convert --elf-chunk-size`).
    pub const DEFAULT_ELF: ChunkSize = ChunkSize(64 << 10);
    pub fn new(bytes: u64) -> Result<Self, FormatError> {
        if bytes.is_power_of_two()
            && (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&bytes)
        {
            Ok(Self(bytes as u32))
        } else {
            Err(FormatError::BadChunkSize(bytes))
        }
    }
    /// Parse `4K`, `1M`, `16M`, `65536`...
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        let t = s.trim();
        let (num, mul) = match t.char_indices().last() {
            Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
            Some((i, 'M' | 'm')) => (&t[..i], 1u64 << 20),
            _ => (t, 1),
        };
        let n: u64 = num.parse().map_err(|_| FormatError::BadChunkSize(0))?;
        Self::new(
            n.checked_mul(mul)
                .ok_or(FormatError::BadChunkSize(u64::MAX))?,
        )
    }
    pub fn bytes(self) -> u32 {
        self.0
    }
    pub fn bits(self) -> u8 {
        self.0.trailing_zeros() as u8
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self(DEFAULT_CHUNK_SIZE)
    }
}

/// A reusable per-thread chunk compressor (zstd contexts are costly to
/// create, so the converter keeps one per worker).
pub struct ChunkEncoder {
    zstd: zstd::bulk::Compressor<'static>,
}

impl ChunkEncoder {
    pub fn new(level: i32) -> Result<Self, FormatError> {
        let mut zstd = zstd::bulk::Compressor::new(level).map_err(FormatError::Compress)?;
        // Frames carry their content size; no zstd checksum (sha256 covers it).
        zstd.include_contentsize(true)
            .map_err(FormatError::Compress)?;
        Ok(Self { zstd })
    }

    /// Compress one chunk. Returns the stored bytes and the chunk flags; the
    /// bytes are the input itself (raw) when zstd does not make them smaller.
    pub fn encode(&mut self, data: &[u8]) -> Result<(Vec<u8>, u32), FormatError> {
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
        let n = self
            .zstd
            .compress_to_buffer(data, &mut out)
            .map_err(FormatError::Compress)?;
        if n < data.len() {
            out.truncate(n);
            Ok((out, index::CHUNK_FLAG_ZSTD))
        } else {
            Ok((data.to_vec(), 0))
        }
    }
}

/// Compress one chunk with a fresh encoder (see [`ChunkEncoder::encode`]).
pub fn compress_chunk(data: &[u8], level: i32) -> Result<(Vec<u8>, u32), FormatError> {
    ChunkEncoder::new(level)?.encode(data)
}

/// zstd level of the bootstrap as published: it is compressed once and
/// fetched before every first mount, so it gets more effort than chunks.
pub const BOOTSTRAP_ZSTD_LEVEL: i32 = 9;

/// The bootstrap as one zstd frame (with its content size), for publishing.
pub fn compress_bootstrap(bootstrap: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut enc =
        zstd::bulk::Compressor::new(BOOTSTRAP_ZSTD_LEVEL).map_err(FormatError::Compress)?;
    enc.include_contentsize(true)
        .map_err(FormatError::Compress)?;
    enc.compress(bootstrap).map_err(FormatError::Compress)
}

/// Decompress a published bootstrap that must be `size` bytes with sha256
/// `digest`. Memory grows with what the frame actually produces (at most
/// `size` + 1 bytes; callers bound `size`), not with what it declares.
pub fn decompress_bootstrap(
    frame: &[u8],
    size: u64,
    digest: &Digest,
) -> Result<Vec<u8>, FormatError> {
    let bad = |why: String| FormatError::CompressedBootstrap(why);
    // A frame can be no larger than zstd's bound for its content.
    let bound = usize::try_from(size)
        .ok()
        .map(zstd::zstd_safe::compress_bound)
        .ok_or_else(|| bad(format!("declared size {size} is too large")))?;
    if frame.len() > bound {
        return Err(bad(format!(
            "{} bytes of zstd cannot hold {size} bytes",
            frame.len()
        )));
    }
    let limit = size
        .checked_add(1)
        .ok_or_else(|| bad(format!("declared size {size} is too large")))?;
    let mut out = Vec::new();
    out.try_reserve(size.min(64 << 20) as usize)
        .map_err(|e| bad(format!("reserving memory: {e}")))?;
    // One byte more than declared, to tell "too long" from "exactly".
    let mut reader = std::io::Read::take(
        zstd::stream::read::Decoder::new(frame).map_err(|e| bad(e.to_string()))?,
        limit,
    );
    std::io::Read::read_to_end(&mut reader, &mut out).map_err(|e| bad(format!("zstd: {e}")))?;
    if out.len() as u64 != size {
        return Err(bad(format!(
            "{} bytes after decompression, the manifest says {size}",
            if out.len() as u64 > size {
                format!("more than {size}")
            } else {
                out.len().to_string()
            }
        )));
    }
    let got = Digest::of(&out);
    if &got != digest {
        return Err(bad(format!(
            "decompresses to {}, the manifest says {}",
            got.oci(),
            digest.oci()
        )));
    }
    Ok(out)
}

/// A reusable chunk decoder that verifies everything it returns.
pub struct ChunkDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl ChunkDecoder {
    pub fn new() -> Result<Self, FormatError> {
        let zstd = zstd::bulk::Decompressor::new().map_err(FormatError::Compress)?;
        Ok(Self { zstd })
    }

    /// Decode the stored bytes of chunk `chunk` of `blob` into `out` (cleared
    /// first) and verify size and sha256. On error `out` is left empty.
    pub fn decode(
        &mut self,
        blob: Digest,
        chunk: usize,
        rec: &ChunkRecord,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        out.clear();
        out.resize(rec.uncompressed_size as usize, 0);
        match self.decode_into(blob, chunk, rec, stored, out) {
            Ok(_) => Ok(()),
            Err(e) => {
                out.clear();
                Err(e)
            }
        }
    }
}

impl ChunkDecoder {
    /// Like [`ChunkDecoder::decode`], but into a caller-provided buffer
    /// (at least the chunk's uncompressed size), avoiding a copy. Returns
    /// the chunk's length; on error the buffer's content must not be used.
    pub fn decode_into(
        &mut self,
        blob: Digest,
        chunk: usize,
        rec: &ChunkRecord,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<usize, FormatError> {
        let bad = |why: String| FormatError::BadChunk { blob, chunk, why };
        let n = rec.uncompressed_size as usize;
        if stored.len() != rec.compressed_size as usize {
            return Err(bad(format!(
                "{} stored bytes, index says {}",
                stored.len(),
                rec.compressed_size
            )));
        }
        if out.len() < n {
            return Err(bad(format!(
                "buffer of {} bytes for a {n}-byte chunk",
                out.len()
            )));
        }
        let out = &mut out[..n];
        if rec.is_zstd() {
            let got = self
                .zstd
                .decompress_to_buffer(stored, out)
                .map_err(|e| bad(format!("zstd: {e}")))?;
            if got != n {
                return Err(bad(format!("decompressed to {got} bytes, index says {n}")));
            }
        } else {
            if rec.compressed_size != rec.uncompressed_size {
                return Err(bad("raw chunk with differing sizes".into()));
            }
            out.copy_from_slice(stored);
        }
        let got = Digest::of(out);
        if got != rec.digest {
            return Err(bad(format!("digest mismatch: content is {}", got.oci())));
        }
        Ok(n)
    }
}

/// Decode and verify one chunk with a fresh decoder (see [`ChunkDecoder::decode`]).
pub fn decode_chunk(
    blob: Digest,
    chunk: usize,
    rec: &ChunkRecord,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    ChunkDecoder::new()?.decode(blob, chunk, rec, stored, out)
}

/// A parsed bootstrap: the EROFS image and its index section.
pub struct Bootstrap<'a> {
    pub erofs: kite_erofs::Image<'a>,
    pub index: Index<'a>,
    /// Byte offset of the index section.
    pub index_offset: u64,
}

impl<'a> Bootstrap<'a> {
    /// Parse a whole bootstrap file's bytes and cross-check the device table
    /// against the blob table.
    pub fn parse(data: &'a [u8]) -> Result<Self, FormatError> {
        let erofs = kite_erofs::Image::open(data)?;
        let index_offset = erofs.image_len();
        let index = Index::parse(&data[index_offset as usize..])?;
        let devices = erofs.devices()?;
        if devices.len() != index.blob_count() {
            return Err(FormatError::BadIndex(format!(
                "device table has {} blobs, index has {}",
                devices.len(),
                index.blob_count()
            )));
        }
        for (i, (dev, blob)) in devices.iter().zip(index.blobs()).enumerate() {
            if dev.tag_str() != blob.record.digest.hex()
                || dev.blocks as u64 * 4096 != blob.record.uncompressed_size
            {
                return Err(FormatError::BadIndex(format!(
                    "device slot {i} ({}) does not match blob table entry {}",
                    dev.tag_str(),
                    blob.record.digest
                )));
            }
        }
        Ok(Self {
            erofs,
            index,
            index_offset,
        })
    }

    /// Validate the whole bootstrap, as every registration does before the
    /// kernel sees it: the EROFS metadata in full
    /// ([`kite_erofs::check`]), and every chunk index of every file against
    /// the index section: the file's chunk size is the image's (or its
    /// fine chunk size), and each chunk starts a chunk of the blob's table
    /// whose extent holds the file's chunk, so a read of any byte of a
    /// file is served by exactly the chunk the converter stored for it.
    pub fn validate(&self) -> Result<kite_erofs::check::CheckReport, FormatError> {
        let blobs: Vec<_> = self.index.blobs().collect();
        let sizes = [self.index.chunk_size, self.index.fine_chunk_size];
        let mut bad = None;
        let report = kite_erofs::check::check_with(&self.erofs, &mut |inode, idx| {
            let nid = inode.nid;
            let bits = inode.chunk_bits().unwrap_or(0);
            let chunk = 1u64 << bits;
            if !sizes.iter().any(|&s| s as u64 == chunk) {
                bad = Some(format!(
                    "nid {nid}: chunk size {chunk} is neither the image's {} nor its fine {}",
                    sizes[0], sizes[1]
                ));
                return Err(kite_erofs::ErofsError::Corrupt("chunk size".into()));
            }
            for (i, ci) in idx.iter().enumerate() {
                if ci.is_hole() {
                    continue;
                }
                // The EROFS check put device_id in 1..=devices, and parse()
                // matched the devices with the blob table one to one.
                let Some(blob) = (ci.device_id as usize)
                    .checked_sub(1)
                    .and_then(|d| blobs.get(d))
                else {
                    bad = Some(format!("nid {nid} chunk {i}: device {}", ci.device_id));
                    return Err(kite_erofs::ErofsError::Corrupt("device".into()));
                };
                let start = ci.blkaddr as u64 * 4096;
                let len = chunk.min(inode.raw.size - i as u64 * chunk);
                let fits = self.index.find_chunk(blob, start).is_some_and(|(_, r)| {
                    r.uncompressed_offset == start && start + len <= r.uncompressed_end()
                });
                if !fits {
                    bad = Some(format!(
                        "nid {nid} chunk {i}: bytes {start}+{len} of blob {} are not one chunk of its table",
                        blob.record.digest
                    ));
                    return Err(kite_erofs::ErofsError::Corrupt("chunk".into()));
                }
            }
            Ok(())
        });
        match (report, bad) {
            (Ok(r), _) => Ok(r),
            (Err(_), Some(why)) => Err(FormatError::BadIndex(why)),
            (Err(e), None) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_compression_round_trips_and_checks_size_and_digest() {
        let boot: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let frame = compress_bootstrap(&boot).unwrap();
        assert!(frame.len() < boot.len() / 4, "{} bytes", frame.len());
        let d = Digest::of(&boot);
        let n = boot.len() as u64;
        assert_eq!(decompress_bootstrap(&frame, n, &d).unwrap(), boot);
        let e = decompress_bootstrap(&frame, n - 1, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("more than {}", n - 1)), "{e}");
        let e = decompress_bootstrap(&frame, n + 1, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{n} bytes after")), "{e}");
        let e = decompress_bootstrap(&frame, n, &Digest::of(b"x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&d.oci()), "{e}");
        let mut bad = frame.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        assert!(decompress_bootstrap(&bad, n, &d).is_err());
        assert!(decompress_bootstrap(b"not zstd", n, &d).is_err());
        // Declared sizes that cannot be true are refused before decoding.
        let e = decompress_bootstrap(&frame, u64::MAX, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        let e = decompress_bootstrap(&frame, 10, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot hold 10 bytes"), "{e}");
    }

    #[test]
    fn chunk_size_parsing() {
        assert_eq!(ChunkSize::parse("1M").unwrap().bytes(), 1 << 20);
        assert_eq!(ChunkSize::parse("4k").unwrap().bits(), 12);
        assert_eq!(ChunkSize::parse("16M").unwrap().bytes(), 16 << 20);
        for bad in ["3K", "2K", "32M", "x", "", "0"] {
            assert!(ChunkSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codec_roundtrip_raw_and_zstd() {
        let text = b"hello hello hello hello hello hello".repeat(100);
        let (stored, flags) = compress_chunk(&text, 3).unwrap();
        assert_eq!(flags, index::CHUNK_FLAG_ZSTD);
        assert!(stored.len() < text.len());
        let rec = ChunkRecord {
            digest: Digest::of(&text),
            uncompressed_offset: 0,
            compressed_offset: 0,
            uncompressed_size: text.len() as u32,
            compressed_size: stored.len() as u32,
            flags,
        };
        let mut out = Vec::new();
        decode_chunk(Digest::ZERO, 0, &rec, &stored, &mut out).unwrap();
        assert_eq!(out, text);
        // Incompressible data is stored raw.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (stored, flags) = compress_chunk(&noise, 3).unwrap();
        if flags == 0 {
            assert_eq!(stored, noise);
        }
    }

    #[test]
    fn decode_into_matches_decode_and_checks_the_buffer() {
        let text = b"kite kite kite ".repeat(500);
        let (stored, flags) = compress_chunk(&text, 3).unwrap();
        let rec = ChunkRecord {
            digest: Digest::of(&text),
            uncompressed_offset: 0,
            compressed_offset: 0,
            uncompressed_size: text.len() as u32,
            compressed_size: stored.len() as u32,
            flags,
        };
        let mut dec = ChunkDecoder::new().unwrap();
        let mut buf = vec![0u8; 8192];
        let n = dec
            .decode_into(Digest::ZERO, 3, &rec, &stored, &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &text[..]);
        let mut short = vec![0u8; 10];
        assert!(dec
            .decode_into(Digest::ZERO, 3, &rec, &stored, &mut short)
            .is_err());
        let mut bad = stored.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = dec
            .decode_into(Digest::ZERO, 3, &rec, &bad, &mut buf)
            .unwrap_err();
        assert!(err.to_string().contains("chunk 3"), "{err}");
    }

    #[test]
    fn corrupt_chunk_is_refused_naming_blob_and_index() {
        let text = b"abcdefgh".repeat(1000);
        let (mut stored, flags) = compress_chunk(&text, 3).unwrap();
        let rec = ChunkRecord {
            digest: Digest::of(&text),
            uncompressed_offset: 0,
            compressed_offset: 0,
            uncompressed_size: text.len() as u32,
            compressed_size: stored.len() as u32,
            flags,
        };
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        let mut out = Vec::new();
        let err = decode_chunk(Digest([7; 32]), 42, &rec, &stored, &mut out).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("chunk 42") && msg.contains("sha256:0707"),
            "{msg}"
        );
    }
}
