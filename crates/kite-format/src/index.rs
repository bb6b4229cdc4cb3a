//! The bootstrap's index section: blob table and per-blob chunk tables.
//!
//! The section starts at the first block after the EROFS image (the
//! superblock's block count says where) and runs to the end of the
//! bootstrap. It is fixed-size little-endian records, so the daemon can mmap
//! the bootstrap and binary-search a blob's chunks by uncompressed offset
//! without parsing anything else:
//!
//! ```text
//! header   128 B   magic "KITEINDX", version, counts, table offsets, the
//!                  fine chunk size (offset 56; 0: none), sha256 of the
//!                  whole section (with this field zeroed)
//! blobs    128 B each, in device-table order (blob i = device_id i+1)
//! chunks    64 B each, grouped by blob, sorted by uncompressed offset
//! ```

use sha2::{Digest as _, Sha256};

use crate::{Digest, FormatError};

pub const INDEX_MAGIC: [u8; 8] = *b"KITEINDX";
pub const INDEX_VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 128;
pub const BLOB_RECORD_SIZE: usize = 128;
pub const CHUNK_RECORD_SIZE: usize = 64;
const CHECKSUM_OFF: usize = 64;

/// Chunk flag: the stored bytes are one zstd frame (otherwise raw).
pub const CHUNK_FLAG_ZSTD: u32 = 0x1;

/// One data blob: its OCI digest and its two address spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    /// sha256 of the blob's (compressed) bytes: its OCI descriptor digest.
    pub digest: Digest,
    pub compressed_size: u64,
    /// Size of the uncompressed layout the kernel reads (4 KiB multiple).
    pub uncompressed_size: u64,
    /// Digest of the source layer this blob was made from (zero if none).
    pub source_layer: Digest,
}

/// One chunk of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    /// sha256 of the uncompressed chunk bytes.
    pub digest: Digest,
    /// Offset in the blob's uncompressed layout (4 KiB aligned).
    pub uncompressed_offset: u64,
    /// Offset of the stored bytes in the blob.
    pub compressed_offset: u64,
    pub uncompressed_size: u32,
    pub compressed_size: u32,
    pub flags: u32,
}

impl ChunkRecord {
    pub fn is_zstd(&self) -> bool {
        self.flags & CHUNK_FLAG_ZSTD != 0
    }
    /// End of this chunk's (4 KiB-padded) extent in the uncompressed layout.
    pub fn uncompressed_end(&self) -> u64 {
        self.uncompressed_offset + crate::align4k(self.uncompressed_size as u64)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.uncompressed_offset.to_le_bytes());
        out.extend_from_slice(&self.compressed_offset.to_le_bytes());
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&self.compressed_size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Self {
            digest: Digest(b[0..32].try_into().expect("32 bytes")),
            uncompressed_offset: u64_at(b, 32),
            compressed_offset: u64_at(b, 40),
            uncompressed_size: u32_at(b, 48),
            compressed_size: u32_at(b, 52),
            flags: u32_at(b, 56),
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A blob with its chunks, as the converter produces it.
#[derive(Debug, Clone)]
pub struct BlobEntry {
    pub record: BlobRecord,
    pub chunks: Vec<ChunkRecord>,
}

/// Encode the index section for `blobs` (device-table order).
/// `fine_chunk_size`: the smaller chunk size some files were cut in (ELF
/// files: see `kite convert --elf-chunk-size`), 0 if none. Readers that
/// predate the field ignore it (it was a zero reserved word).
pub fn encode_index(chunk_size: u32, fine_chunk_size: u32, blobs: &[BlobEntry]) -> Vec<u8> {
    let total_chunks: usize = blobs.iter().map(|b| b.chunks.len()).sum();
    let blob_off = HEADER_SIZE;
    let chunk_off = blob_off + blobs.len() * BLOB_RECORD_SIZE;
    let size = chunk_off + total_chunks * CHUNK_RECORD_SIZE;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    out.extend_from_slice(&(total_chunks as u64).to_le_bytes());
    out.extend_from_slice(&(blob_off as u64).to_le_bytes());
    out.extend_from_slice(&(chunk_off as u64).to_le_bytes());
    out.extend_from_slice(&(size as u64).to_le_bytes());
    out.extend_from_slice(&fine_chunk_size.to_le_bytes());
    out.resize(HEADER_SIZE, 0);
    let mut first = 0u64;
    for b in blobs {
        let r = &b.record;
        out.extend_from_slice(&r.digest.0);
        out.extend_from_slice(&r.compressed_size.to_le_bytes());
        out.extend_from_slice(&r.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&(b.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&r.source_layer.0);
        out.resize(out.len() + 32, 0);
        first += b.chunks.len() as u64;
    }
    for b in blobs {
        for c in &b.chunks {
            c.encode(&mut out);
        }
    }
    debug_assert_eq!(out.len(), size);
    seal_index(&mut out);
    out
}

/// Write a section's checksum (sha256 of the section with the checksum
/// field zeroed) over whatever its bytes are: the encoder's last step, and
/// how the fuzz targets reach past the checksum into the tables. Sections
/// shorter than a header are left alone.
pub fn seal_index(section: &mut [u8]) {
    if section.len() < HEADER_SIZE {
        return;
    }
    section[CHECKSUM_OFF..CHECKSUM_OFF + 32].fill(0);
    let sum = Sha256::digest(&*section);
    section[CHECKSUM_OFF..CHECKSUM_OFF + 32].copy_from_slice(&sum);
}

/// A validated, zero-copy view of an index section.
#[derive(Debug, Clone, Copy)]
pub struct Index<'a> {
    data: &'a [u8],
    pub chunk_size: u32,
    /// The chunk size of files cut finer than `chunk_size` (0: none). A
    /// hint for fetch planning only: every chunk is bounded by its record.
    pub fine_chunk_size: u32,
    blob_count: usize,
    chunk_count: usize,
    blob_off: usize,
    chunk_off: usize,
}

/// One blob as seen through an [`Index`].
#[derive(Debug, Clone)]
pub struct BlobView {
    pub record: BlobRecord,
    first_chunk: usize,
    pub chunk_count: usize,
}

impl<'a> Index<'a> {
    /// Parse and fully validate a section: magic, version, checksum, table
    /// bounds, chunk ordering and extents. After this, lookups cannot fail.
    pub fn parse(data: &'a [u8]) -> Result<Self, FormatError> {
        let bad = |why: String| FormatError::BadIndex(why);
        if data.len() < HEADER_SIZE {
            return Err(bad(format!(
                "section is {} bytes, header needs {HEADER_SIZE}",
                data.len()
            )));
        }
        if data[..8] != INDEX_MAGIC {
            return Err(bad("magic is not KITEINDX".into()));
        }
        let version = u32_at(data, 8);
        if version != INDEX_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let size = u64_at(data, 48);
        if size != data.len() as u64 {
            return Err(bad(format!(
                "section says {size} bytes, have {}",
                data.len()
            )));
        }
        let mut copy = data.to_vec();
        copy[CHECKSUM_OFF..CHECKSUM_OFF + 32].fill(0);
        if Sha256::digest(&copy).as_slice() != &data[CHECKSUM_OFF..CHECKSUM_OFF + 32] {
            return Err(FormatError::IndexChecksum);
        }
        let chunk_size = u32_at(data, 16);
        let blob_count = u32_at(data, 20) as usize;
        let chunk_count =
            usize::try_from(u64_at(data, 24)).map_err(|_| bad("chunk count".into()))?;
        let blob_off = usize::try_from(u64_at(data, 32)).map_err(|_| bad("blob offset".into()))?;
        let chunk_off =
            usize::try_from(u64_at(data, 40)).map_err(|_| bad("chunk offset".into()))?;
        let blob_end = blob_count
            .checked_mul(BLOB_RECORD_SIZE)
            .and_then(|n| n.checked_add(blob_off));
        let chunk_end = chunk_count
            .checked_mul(CHUNK_RECORD_SIZE)
            .and_then(|n| n.checked_add(chunk_off));
        match (blob_end, chunk_end) {
            (Some(be), Some(ce))
                if blob_off >= HEADER_SIZE && be <= chunk_off && ce == data.len() => {}
            _ => return Err(bad("tables do not tile the section".into())),
        }
        if !chunk_size.is_power_of_two() {
            return Err(bad(format!("chunk size {chunk_size}")));
        }
        let fine_chunk_size = u32_at(data, 56);
        if fine_chunk_size != 0
            && (!fine_chunk_size.is_power_of_two()
                || fine_chunk_size < 4096
                || fine_chunk_size >= chunk_size)
        {
            return Err(bad(format!(
                "fine chunk size {fine_chunk_size} (chunk size {chunk_size})"
            )));
        }
        let idx = Self {
            data,
            chunk_size,
            fine_chunk_size,
            blob_count,
            chunk_count,
            blob_off,
            chunk_off,
        };
        let mut next = 0usize;
        for i in 0..blob_count {
            let b = idx.blob(i);
            // Checked sums throughout: offsets near u64::MAX must not wrap
            // past these checks (found by the index fuzz target).
            let end = b.first_chunk.checked_add(b.chunk_count);
            if b.first_chunk != next || end.is_none_or(|e| e > chunk_count) {
                return Err(bad(format!("blob {i}: chunk range out of order")));
            }
            next += b.chunk_count;
            let mut uend = 0u64;
            let mut cend = 0u64;
            for c in 0..b.chunk_count {
                let r = idx.chunk(&b, c);
                let r_uend = r
                    .uncompressed_offset
                    .checked_add(crate::align4k(r.uncompressed_size as u64));
                let r_cend = r.compressed_offset.checked_add(r.compressed_size as u64);
                let ok = r.uncompressed_offset.is_multiple_of(4096)
                    && r.uncompressed_offset >= uend
                    && r.compressed_offset >= cend
                    && r.uncompressed_size > 0
                    && r.uncompressed_size <= chunk_size
                    && r_uend.is_some_and(|e| e <= b.record.uncompressed_size)
                    && r_cend.is_some_and(|e| e <= b.record.compressed_size)
                    && r.flags & !CHUNK_FLAG_ZSTD == 0;
                let (Some(u), Some(ce), true) = (r_uend, r_cend, ok) else {
                    return Err(bad(format!("blob {i} chunk {c}: bad extent")));
                };
                uend = u;
                cend = ce;
            }
        }
        if next != chunk_count {
            return Err(bad("chunks not covered by blobs".into()));
        }
        Ok(idx)
    }

    pub fn blob_count(&self) -> usize {
        self.blob_count
    }
    pub fn chunk_count(&self) -> usize {
        self.chunk_count
    }

    /// Blob `i` (device_id `i + 1`). Panics if `i >= blob_count()`.
    pub fn blob(&self, i: usize) -> BlobView {
        let b = &self.data[self.blob_off + i * BLOB_RECORD_SIZE..][..BLOB_RECORD_SIZE];
        BlobView {
            record: BlobRecord {
                digest: Digest(b[0..32].try_into().expect("32 bytes")),
                compressed_size: u64_at(b, 32),
                uncompressed_size: u64_at(b, 40),
                source_layer: Digest(b[64..96].try_into().expect("32 bytes")),
            },
            first_chunk: u64_at(b, 48) as usize,
            chunk_count: u64_at(b, 56) as usize,
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = BlobView> + '_ {
        (0..self.blob_count).map(|i| self.blob(i))
    }

    /// Chunk `c` of `blob`. Panics if out of range.
    pub fn chunk(&self, blob: &BlobView, c: usize) -> ChunkRecord {
        assert!(c < blob.chunk_count);
        let off = self.chunk_off + (blob.first_chunk + c) * CHUNK_RECORD_SIZE;
        ChunkRecord::decode(&self.data[off..off + CHUNK_RECORD_SIZE])
    }

    /// The chunk whose padded extent contains uncompressed offset `off`:
    /// binary search over the blob's sorted chunk table.
    pub fn find_chunk(&self, blob: &BlobView, off: u64) -> Option<(usize, ChunkRecord)> {
        let (mut lo, mut hi) = (0usize, blob.chunk_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = self.chunk(blob, mid);
            if off < r.uncompressed_offset {
                hi = mid;
            } else if off >= r.uncompressed_end() {
                lo = mid + 1;
            } else {
                return Some((mid, r));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<BlobEntry> {
        let mk = |u: u64, c: u64, us: u32, cs: u32| ChunkRecord {
            digest: Digest([u as u8; 32]),
            uncompressed_offset: u,
            compressed_offset: c,
            uncompressed_size: us,
            compressed_size: cs,
            flags: CHUNK_FLAG_ZSTD,
        };
        vec![
            BlobEntry {
                record: BlobRecord {
                    digest: Digest([1; 32]),
                    compressed_size: 300,
                    uncompressed_size: 3 * 4096 + 8192,
                    source_layer: Digest([9; 32]),
                },
                chunks: vec![
                    mk(0, 0, 4096, 100),
                    mk(4096, 100, 8192, 100),
                    mk(3 * 4096, 200, 5000, 100),
                ],
            },
            BlobEntry {
                record: BlobRecord {
                    digest: Digest([2; 32]),
                    compressed_size: 10,
                    uncompressed_size: 4096,
                    source_layer: Digest::ZERO,
                },
                chunks: vec![mk(0, 0, 1, 10)],
            },
        ]
    }

    #[test]
    fn roundtrip_and_lookup() {
        let bytes = encode_index(8192, 4096, &sample());
        let idx = Index::parse(&bytes).unwrap();
        assert_eq!(idx.fine_chunk_size, 4096);
        assert_eq!(idx.blob_count(), 2);
        assert_eq!(idx.chunk_count(), 4);
        let b0 = idx.blob(0);
        assert_eq!(b0.record.source_layer, Digest([9; 32]));
        assert_eq!(idx.find_chunk(&b0, 0).unwrap().0, 0);
        assert_eq!(idx.find_chunk(&b0, 4096 + 8191).unwrap().0, 1);
        assert_eq!(idx.find_chunk(&b0, 3 * 4096 + 4999).unwrap().0, 2);
        // Padding of the last chunk still maps to it.
        assert_eq!(idx.find_chunk(&b0, 3 * 4096 + 8191).unwrap().0, 2);
        assert!(idx.find_chunk(&b0, 5 * 4096).is_none());
        let b1 = idx.blob(1);
        assert_eq!(idx.chunk(&b1, 0).compressed_size, 10);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let bytes = encode_index(8192, 0, &sample());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Index::parse(&b).is_err(), "flip at {i} accepted");
        }
        assert!(matches!(
            Index::parse(&bytes[..100]),
            Err(FormatError::BadIndex(_))
        ));
    }

    /// A section written before the fine chunk size existed has zeros
    /// there (parsed as "none"); a fine size that is not a power of two
    /// below the chunk size is refused even with a valid checksum.
    #[test]
    fn extents_near_the_end_of_u64_are_refused_not_wrapped() {
        // Found by the index fuzz target: a chunk whose compressed offset
        // plus size overflows. Unchecked, a release build wrapped the sum
        // below the blob's size and accepted the extent.
        let mut blobs = sample();
        let last = blobs[1].chunks.last_mut().unwrap();
        last.compressed_offset = u64::MAX - 4;
        last.compressed_size = 16;
        let e = Index::parse(&encode_index(8192, 0, &blobs)).err().unwrap();
        assert!(e.to_string().contains("bad extent"), "{e}");
        let mut blobs = sample();
        blobs[1].chunks[0].uncompressed_offset = u64::MAX - 4095;
        let e = Index::parse(&encode_index(8192, 0, &blobs)).err().unwrap();
        assert!(e.to_string().contains("bad extent"), "{e}");
    }

    #[test]
    fn fine_chunk_size_is_checked() {
        assert_eq!(
            Index::parse(&encode_index(8192, 0, &sample()))
                .unwrap()
                .fine_chunk_size,
            0
        );
        for bad in [8192, 16384, 5000, 2048] {
            let bytes = encode_index(8192, bad, &sample());
            assert!(
                matches!(Index::parse(&bytes), Err(FormatError::BadIndex(_))),
                "fine chunk size {bad} accepted"
            );
        }
    }
}
