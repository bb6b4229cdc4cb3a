//! Reading a converted image back: statistics and tree listing (`inspect`),
//! full verification (`check`), and writing a blob's uncompressed layout
//! (`unpack`). These are the converter's own acceptance tools: they trust
//! nothing in the bootstrap or the blobs and report the first culprit by
//! blob digest and chunk index.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kite_erofs::{ChunkIndex, Inode};
use kite_format::{BlobView, Bootstrap, ChunkDecoder, Digest};
use sha2::{Digest as _, Sha256};

/// Errors of check/unpack.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] kite_format::FormatError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest}: not found under {dir}")]
    MissingBlob { digest: Digest, dir: PathBuf },
    #[error("blob {blob} chunk {chunk}: {why}")]
    BadChunk {
        blob: Digest,
        chunk: usize,
        why: String,
    },
    #[error("blob {blob}: {why}")]
    BadBlob { blob: Digest, why: String },
    #[error("inode {path}: chunk {index}: {why}")]
    BadReference {
        path: String,
        index: usize,
        why: String,
    },
    #[error("{0} is not a blob of this bootstrap")]
    UnknownBlob(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Image statistics for `inspect`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub bootstrap_size: u64,
    pub erofs_size: u64,
    pub index_size: u64,
    pub inodes: u64,
    pub paths: u64,
    pub files: u64,
    /// Apparent bytes of all regular files (each inode once).
    pub file_bytes: u64,
    /// Uncompressed bytes that chunk references point to (each inode once).
    pub referenced_bytes: u64,
    /// Uncompressed bytes stored in blobs (each chunk once).
    pub stored_bytes: u64,
    pub compressed_bytes: u64,
    pub chunk_size: u32,
    /// Chunk size of the files cut finer (ELF), 0 if none.
    pub fine_chunk_size: u32,
    pub blobs: Vec<BlobStats>,
}

#[derive(Debug, Clone)]
pub struct BlobStats {
    pub digest: Digest,
    pub source_layer: Option<Digest>,
    pub chunks: usize,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub raw_chunks: usize,
}

impl Stats {
    /// referenced / stored: how much dedup saved (1.0 = nothing).
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            1.0
        } else {
            self.referenced_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// One line of the tree listing.
#[derive(Debug, Clone)]
pub struct ListEntry {
    pub path: String,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nid: u64,
    pub symlink: Option<String>,
}

/// Resolve a chunk index of an inode to (blob index, chunk index).
pub(crate) fn resolve(
    bs: &Bootstrap<'_>,
    blobs: &[BlobView],
    ci: &ChunkIndex,
) -> Result<(usize, usize), String> {
    let dev = ci.device_id as usize;
    if dev == 0 || dev > blobs.len() {
        return Err(format!(
            "device {} does not exist ({} blobs)",
            ci.device_id,
            blobs.len()
        ));
    }
    let blob = &blobs[dev - 1];
    let off = ci.blkaddr as u64 * 4096;
    match bs.index.find_chunk(blob, off) {
        Some((i, rec)) if rec.uncompressed_offset == off => Ok((dev - 1, i)),
        _ => Err(format!(
            "blob {} has no chunk at offset {off}",
            blob.record.digest
        )),
    }
}

/// Walk the bootstrap: statistics and (optionally) the listing.
pub fn inspect(
    data: &[u8],
    mut list: Option<&mut dyn FnMut(ListEntry)>,
) -> Result<Stats, VerifyError> {
    let bs = Bootstrap::parse(data)?;
    let blobs: Vec<BlobView> = bs.index.blobs().collect();
    let mut st = Stats {
        bootstrap_size: data.len() as u64,
        erofs_size: bs.index_offset,
        index_size: data.len() as u64 - bs.index_offset,
        chunk_size: bs.index.chunk_size,
        fine_chunk_size: bs.index.fine_chunk_size,
        ..Default::default()
    };
    for b in &blobs {
        let mut raw = 0;
        for c in 0..b.chunk_count {
            let r = bs.index.chunk(b, c);
            st.stored_bytes += r.uncompressed_size as u64;
            raw += usize::from(!r.is_zstd());
        }
        st.compressed_bytes += b.record.compressed_size;
        st.blobs.push(BlobStats {
            digest: b.record.digest,
            source_layer: (!b.record.source_layer.is_zero()).then_some(b.record.source_layer),
            chunks: b.chunk_count,
            compressed_size: b.record.compressed_size,
            uncompressed_size: b.record.uncompressed_size,
            raw_chunks: raw,
        });
    }
    let mut seen = HashSet::new();
    bs.erofs
        .walk(&mut |path, inode: &Inode| {
            st.paths += 1;
            let first = seen.insert(inode.nid);
            if first {
                st.inodes += 1;
            }
            if inode.is_reg() && first {
                st.files += 1;
                st.file_bytes += inode.raw.size;
                for ci in bs.erofs.chunk_indexes(inode)? {
                    if ci.is_hole() {
                        continue;
                    }
                    if let Ok((b, c)) = resolve(&bs, &blobs, &ci) {
                        st.referenced_bytes +=
                            bs.index.chunk(&blobs[b], c).uncompressed_size as u64;
                    }
                }
            }
            if let Some(f) = list.as_mut() {
                let symlink = if inode.is_symlink() {
                    Some(String::from_utf8_lossy(&bs.erofs.flat_data(inode)?).into_owned())
                } else {
                    None
                };
                f(ListEntry {
                    path: String::from_utf8_lossy(path).into_owned(),
                    mode: inode.raw.mode,
                    uid: inode.raw.uid,
                    gid: inode.raw.gid,
                    size: inode.raw.size,
                    nid: inode.nid,
                    symlink,
                });
            }
            Ok(())
        })
        .map_err(kite_format::FormatError::from)?;
    Ok(st)
}

pub(crate) fn find_blob_file(dir: &Path, digest: &Digest) -> Option<PathBuf> {
    let hex = digest.hex();
    [dir.join(&hex), dir.join("blobs").join("sha256").join(&hex)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Stream a blob file, decoding and verifying every chunk in order, and
/// the blob's own digest and size. `sink(chunk index, uncompressed offset,
/// bytes)` receives verified data only.
fn stream_blob(
    path: &Path,
    bs: &Bootstrap<'_>,
    blob: &BlobView,
    sink: &mut dyn FnMut(usize, u64, &[u8]) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    let digest = blob.record.digest;
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    if len != blob.record.compressed_size {
        return Err(VerifyError::BadBlob {
            blob: digest,
            why: format!(
                "file is {len} bytes, index says {}",
                blob.record.compressed_size
            ),
        });
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut dec = ChunkDecoder::new()?;
    let mut stored = Vec::new();
    let mut out = Vec::new();
    let mut pos = 0u64;
    for c in 0..blob.chunk_count {
        let rec = bs.index.chunk(blob, c);
        if rec.compressed_offset != pos {
            // Gap between chunks: hash it as well.
            let gap = rec.compressed_offset - pos;
            let mut g = vec![0u8; gap as usize];
            r.read_exact(&mut g).map_err(io(path))?;
            hasher.update(&g);
            pos += gap;
        }
        stored.resize(rec.compressed_size as usize, 0);
        r.read_exact(&mut stored).map_err(io(path))?;
        hasher.update(&stored);
        pos += stored.len() as u64;
        dec.decode(digest, c, &rec, &stored, &mut out)
            .map_err(|e| match e {
                kite_format::FormatError::BadChunk { blob, chunk, why } => {
                    VerifyError::BadChunk { blob, chunk, why }
                }
                other => VerifyError::Bootstrap(other),
            })?;
        sink(c, rec.uncompressed_offset, &out)?;
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).map_err(io(path))?;
    hasher.update(&rest);
    let actual = Digest(hasher.finalize().into());
    if actual != digest {
        return Err(VerifyError::BadBlob {
            blob: digest,
            why: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Summary of a successful check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub inodes: u64,
    pub chunk_refs: u64,
    pub chunks_verified: u64,
    pub bytes_verified: u64,
}

/// Verify a bootstrap and its blobs completely.
pub fn check(data: &[u8], blob_dir: &Path) -> Result<CheckReport, VerifyError> {
    let bs = Bootstrap::parse(data)?;
    bs.validate()?;
    let blobs: Vec<BlobView> = bs.index.blobs().collect();
    let mut rep = CheckReport::default();
    // 1. Every inode and every chunk reference resolves.
    let mut seen = HashSet::new();
    let mut bad: Option<VerifyError> = None;
    bs.erofs
        .walk(&mut |path, inode| {
            if !seen.insert(inode.nid) {
                return Ok(());
            }
            rep.inodes += 1;
            bs.erofs.xattrs(inode)?;
            if inode.is_dir() || inode.is_symlink() {
                bs.erofs.flat_data(inode)?;
            }
            for (i, ci) in bs.erofs.chunk_indexes(inode)?.iter().enumerate() {
                if ci.is_hole() {
                    continue;
                }
                rep.chunk_refs += 1;
                if let Err(why) = resolve(&bs, &blobs, ci) {
                    if bad.is_none() {
                        bad = Some(VerifyError::BadReference {
                            path: String::from_utf8_lossy(path).into_owned(),
                            index: i,
                            why,
                        });
                    }
                }
            }
            Ok(())
        })
        .map_err(kite_format::FormatError::from)?;
    if let Some(e) = bad {
        return Err(e);
    }
    // 2. Every chunk of every blob decodes to its digest.
    for blob in &blobs {
        let path = find_blob_file(blob_dir, &blob.record.digest).ok_or_else(|| {
            VerifyError::MissingBlob {
                digest: blob.record.digest,
                dir: blob_dir.to_path_buf(),
            }
        })?;
        stream_blob(&path, &bs, blob, &mut |_, _, d| {
            rep.chunks_verified += 1;
            rep.bytes_verified += d.len() as u64;
            Ok(())
        })?;
    }
    Ok(rep)
}

/// Write `blob_file`'s uncompressed layout to `out` (temporary name, then
/// rename). The blob is identified by its content digest.
pub fn unpack(data: &[u8], blob_file: &Path, out: &Path) -> Result<Digest, VerifyError> {
    let bs = Bootstrap::parse(data)?;
    let mut f = File::open(blob_file).map_err(io(blob_file))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut HashWriter(&mut h)).map_err(io(blob_file))?;
    let digest = Digest(h.finalize().into());
    let blob = bs
        .index
        .blobs()
        .find(|b| b.record.digest == digest)
        .ok_or_else(|| VerifyError::UnknownBlob(blob_file.to_path_buf()))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.kite-tmp-{}", std::process::id()));
    let result = (|| {
        let o = File::create(&tmp).map_err(io(&tmp))?;
        o.set_len(blob.record.uncompressed_size).map_err(io(&tmp))?;
        stream_blob(blob_file, &bs, &blob, &mut |_, off, d| {
            o.write_all_at(d, off).map_err(io(&tmp))
        })?;
        o.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| digest)
}

struct HashWriter<'a>(&'a mut Sha256);
impl Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
