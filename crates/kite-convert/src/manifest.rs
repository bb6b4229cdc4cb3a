//! A converted image's merged tree as a tree manifest: the JSON that
//! `tests/tools/refapply.py` (the independent reference applier) and
//! `tests/tools/treemanifest.py` (a walk of a mounted tree) print, so
//! `tests/tools/manifestdiff.py` can compare kite's tree with the
//! reference without mounting anything, and so without root.
//!
//! Everything comes from the bootstrap and the blobs, read the way the
//! kernel reads them: a chunk index names a device (blob) and a block
//! address in its uncompressed layout; the chunk record at that offset is
//! read from the blob file, decoded and checked against its sha256. Bytes
//! past a chunk's end up to the next 4 KiB boundary are the layout's zero
//! padding; a file that would read further is reported, not guessed.
//!
//! Format (see refapply.py): `{"entries": {"/path": {"type", "mode",
//! "uid", "gid", "mtime", "xattrs": {name: hex}, "size" and "sha256"
//! (files), "target" (symlinks), "rdev": [major, minor] (devices),
//! "link_group" (non-directories with several paths: the smallest path in
//! byte order)}}}`. Paths and symlink targets that are not UTF-8 are shown
//! lossily.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kite_erofs::ondisk::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use kite_erofs::Inode;
use kite_format::{align4k, BlobView, Bootstrap, ChunkDecoder};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::inspect::{find_blob_file, resolve, VerifyError};

/// The manifest of the image whose bootstrap is `data`, with its blobs
/// under `blob_dir` (as `<hex>` or `blobs/sha256/<hex>`, e.g. the
/// directory `kite convert --to` wrote).
pub fn tree_manifest(data: &[u8], blob_dir: &Path) -> Result<Value, VerifyError> {
    let bs = Bootstrap::parse(data)?;
    let blobs: Vec<BlobView> = bs.index.blobs().collect();
    let mut reader = ContentReader {
        bs: &bs,
        blobs: &blobs,
        blob_dir,
        files: HashMap::new(),
        decoder: ChunkDecoder::new()?,
    };
    let mut entries: BTreeMap<Vec<u8>, Map<String, Value>> = BTreeMap::new();
    let mut paths_of: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    let mut failed: Option<VerifyError> = None;
    bs.erofs
        .walk(&mut |path, inode| {
            if failed.is_some() {
                return Ok(());
            }
            match entry(&bs, &mut reader, path, inode) {
                Ok(e) => {
                    if !inode.is_dir() {
                        paths_of.entry(inode.nid).or_default().push(path.to_vec());
                    }
                    entries.insert(path.to_vec(), e);
                }
                Err(EntryFailure::Erofs(e)) => return Err(e),
                Err(EntryFailure::Verify(e)) => failed = Some(e),
            }
            Ok(())
        })
        .map_err(kite_format::FormatError::from)?;
    if let Some(e) = failed {
        return Err(e);
    }
    for paths in paths_of.values().filter(|p| p.len() > 1) {
        let canon = paths.iter().min().expect("several paths");
        for p in paths {
            let e = entries.get_mut(p).expect("walked path");
            e.insert("link_group".into(), Value::String(lossy(canon)));
        }
    }
    let entries: Map<String, Value> = entries
        .into_iter()
        .map(|(p, e)| (lossy(&p), Value::Object(e)))
        .collect();
    Ok(json!({ "entries": entries }))
}

enum EntryFailure {
    Erofs(kite_erofs::ErofsError),
    Verify(VerifyError),
}

impl From<kite_erofs::ErofsError> for EntryFailure {
    fn from(e: kite_erofs::ErofsError) -> Self {
        EntryFailure::Erofs(e)
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One path's manifest entry, without `link_group`.
fn entry(
    bs: &Bootstrap<'_>,
    reader: &mut ContentReader<'_>,
    path: &[u8],
    inode: &Inode,
) -> Result<Map<String, Value>, EntryFailure> {
    let mode = inode.raw.mode;
    let kind = match mode & S_IFMT {
        S_IFREG => "file",
        S_IFDIR => "dir",
        S_IFLNK => "symlink",
        S_IFCHR => "char",
        S_IFBLK => "block",
        S_IFIFO => "fifo",
        S_IFSOCK => "socket",
        _ => {
            return Err(EntryFailure::Erofs(kite_erofs::ErofsError::Corrupt(
                format!("nid {}: file type {:o}", inode.nid, mode & S_IFMT),
            )))
        }
    };
    let xattrs: Map<String, Value> = bs
        .erofs
        .xattrs(inode)?
        .into_iter()
        .map(|(name, value)| (lossy(&name), Value::String(hex::encode(value))))
        .collect();
    let mut e = Map::new();
    e.insert("type".into(), kind.into());
    e.insert("mode".into(), (mode & 0o7777).into());
    e.insert("uid".into(), inode.raw.uid.into());
    e.insert("gid".into(), inode.raw.gid.into());
    e.insert("mtime".into(), inode.mtime.into());
    e.insert("xattrs".into(), Value::Object(xattrs));
    match kind {
        "file" => {
            e.insert("size".into(), inode.raw.size.into());
            let digest = reader.sha256(path, inode)?;
            e.insert("sha256".into(), digest.into());
        }
        "symlink" => {
            let target = bs.erofs.flat_data(inode)?;
            e.insert("target".into(), lossy(&target).into());
        }
        "char" | "block" => {
            let (major, minor) = inode.rdev();
            e.insert("rdev".into(), json!([major, minor]));
        }
        _ => {}
    }
    Ok(e)
}

/// Reads regular files' content from the bootstrap (flat layouts) or the
/// blobs (chunk-based), one decoded chunk at a time.
struct ContentReader<'a> {
    bs: &'a Bootstrap<'a>,
    blobs: &'a [BlobView],
    blob_dir: &'a Path,
    files: HashMap<usize, File>,
    decoder: ChunkDecoder,
}

impl ContentReader<'_> {
    /// Hex sha256 of a regular file's content.
    fn sha256(&mut self, path: &[u8], inode: &Inode) -> Result<String, EntryFailure> {
        let mut h = Sha256::new();
        let Some(bits) = inode.chunk_bits() else {
            h.update(self.bs.erofs.flat_data(inode)?);
            return Ok(hex::encode(h.finalize()));
        };
        let chunk_len = 1u64 << bits;
        let size = inode.raw.size;
        let bad = |index: usize, why: String| {
            EntryFailure::Verify(VerifyError::BadReference {
                path: lossy(path),
                index,
                why,
            })
        };
        let mut out = Vec::new();
        for (i, ci) in self.bs.erofs.chunk_indexes(inode)?.iter().enumerate() {
            let want = (size - i as u64 * chunk_len).min(chunk_len) as usize;
            if ci.is_hole() {
                h.update(vec![0u8; want]);
                continue;
            }
            let (b, c) = resolve(self.bs, self.blobs, ci).map_err(|why| bad(i, why))?;
            let blob = &self.blobs[b];
            let rec = self.bs.index.chunk(blob, c);
            let file = match self.files.entry(b) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let p =
                        find_blob_file(self.blob_dir, &blob.record.digest).ok_or_else(|| {
                            EntryFailure::Verify(VerifyError::MissingBlob {
                                digest: blob.record.digest,
                                dir: self.blob_dir.to_path_buf(),
                            })
                        })?;
                    let f = File::open(&p).map_err(|source| {
                        EntryFailure::Verify(VerifyError::Io { path: p, source })
                    })?;
                    v.insert(f)
                }
            };
            let mut stored = vec![0u8; rec.compressed_size as usize];
            file.read_exact_at(&mut stored, rec.compressed_offset)
                .map_err(|e| bad(i, format!("reading blob {}: {e}", blob.record.digest)))?;
            self.decoder
                .decode(blob.record.digest, c, &rec, &stored, &mut out)
                .map_err(|e| EntryFailure::Verify(VerifyError::Bootstrap(e)))?;
            if want > out.len() {
                // The uncompressed layout pads each chunk with zeros to
                // 4 KiB; beyond that the kernel would read the next chunk.
                if want as u64 > align4k(out.len() as u64) {
                    return Err(bad(
                        i,
                        format!("chunk of {} bytes, the file reads {want}", out.len()),
                    ));
                }
                out.resize(want, 0);
            }
            h.update(&out[..want]);
        }
        Ok(hex::encode(h.finalize()))
    }
}
