//! Reading one layer: decompress, verify the layer digest, walk its tar
//! entries, and apply each to the merged tree while its file data is cut
//! into chunks for the layer's blob.
//!
//! Every error names the layer (its digest) and the tar entry, so a bad
//! image can be traced to the exact culprit.

use std::io::{self, Read};
use std::path::Path;

use kite_erofs::{FileData, Metadata, NodeKind};
use kite_oci::Compression;
use sha2::{Digest as _, Sha256};

use crate::blob::{BlobBuilder, ChunkStore};
use crate::tree::{split_path, MergedTree, TreeError};
use crate::{ConvertError, Progress};

/// What an entry is, independent of where it came from (tar or directory).
#[derive(Debug, Clone)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

/// Why one entry failed.
pub(crate) enum EntryError {
    /// The entry itself is invalid.
    Bad(String),
    /// Reading its data failed (a stream problem).
    Read(io::Error),
    /// Anything else (output I/O, pipeline).
    Fatal(ConvertError),
}

impl From<TreeError> for EntryError {
    fn from(e: TreeError) -> Self {
        EntryError::Bad(e.0)
    }
}

/// Applies entries of one layer to the tree and its blob.
pub(crate) struct Applier<'a> {
    pub tree: &'a mut MergedTree,
    pub blob: &'a mut BlobBuilder,
    pub store: &'a mut ChunkStore,
    pub layer: u32,
    pub chunk_size: u32,
    pub inline_max: u64,
    pub files: u64,
    pub file_bytes: u64,
}

impl Applier<'_> {
    pub fn apply(
        &mut self,
        raw_path: &[u8],
        kind: EntryKind,
        meta: Metadata,
        data: &mut dyn Read,
    ) -> Result<(), EntryError> {
        let comps = split_path(raw_path)?;
        if let Some(last) = comps.last() {
            if let Some(target) = last.strip_prefix(b".wh.") {
                let parent = &comps[..comps.len() - 1];
                if last == b".wh..wh..opq" {
                    self.tree.opaque(parent, self.layer)?;
                } else if target.starts_with(b".wh.") {
                    // Other AUFS metadata (.wh..wh.plnk etc.): not content.
                } else if target.is_empty() {
                    return Err(EntryError::Bad("empty whiteout name".into()));
                } else {
                    let mut victim = parent.to_vec();
                    victim.push(target.to_vec());
                    self.tree.whiteout(&victim, self.layer)?;
                }
                return Ok(());
            }
        }
        let node = match kind {
            EntryKind::Hardlink(target) => {
                let t = split_path(&target).map_err(|e| {
                    EntryError::Bad(format!("hardlink target {:?}: {}", lossy(&target), e.0))
                })?;
                self.tree.hardlink(&comps, &t, self.layer)?;
                return Ok(());
            }
            EntryKind::File => NodeKind::File(self.read_file(data)?),
            EntryKind::Dir => NodeKind::Dir(Vec::new()),
            EntryKind::Symlink(t) => {
                if t.is_empty() || t.len() >= 4096 || t.contains(&0) {
                    return Err(EntryError::Bad(format!(
                        "symlink target of {} bytes is invalid",
                        t.len()
                    )));
                }
                NodeKind::Symlink(t)
            }
            EntryKind::Char(major, minor) => NodeKind::CharDev { major, minor },
            EntryKind::Block(major, minor) => NodeKind::BlockDev { major, minor },
            EntryKind::Fifo => NodeKind::Fifo,
            EntryKind::Socket => NodeKind::Socket,
        };
        for (name, _) in &meta.xattrs {
            if kite_erofs::ondisk::split_xattr_name(name).is_none() {
                return Err(EntryError::Bad(format!(
                    "xattr {:?} cannot be stored (supported: user., trusted., security., POSIX ACLs)",
                    lossy(name)
                )));
            }
        }
        self.tree.insert(&comps, meta, node, self.layer)?;
        Ok(())
    }

    fn read_file(&mut self, data: &mut dyn Read) -> Result<FileData, EntryError> {
        self.files += 1;
        let mut size = 0u64;
        let mut chunks = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(self.chunk_size as usize);
            data.take(self.chunk_size as u64)
                .read_to_end(&mut buf)
                .map_err(EntryError::Read)?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len() as u64;
            if size == 0 && n <= self.inline_max && n < self.chunk_size as u64 {
                // Small enough to live in the bootstrap; make sure it ends.
                let mut probe = [0u8; 1];
                if data.read(&mut probe).map_err(EntryError::Read)? == 0 {
                    self.file_bytes += n;
                    return Ok(FileData::Inline(buf));
                }
                return Err(EntryError::Bad(
                    "file data longer than a chunk after a short read".into(),
                ));
            }
            size += n;
            chunks.push(
                self.blob
                    .add_chunk(buf, self.store)
                    .map_err(EntryError::Fatal)?,
            );
            if n < self.chunk_size as u64 {
                // A short read means the end (take() only stops early at EOF).
                let mut probe = [0u8; 1];
                if data.read(&mut probe).map_err(EntryError::Read)? != 0 {
                    return Err(EntryError::Bad(
                        "file data reader returned a short chunk".into(),
                    ));
                }
                break;
            }
        }
        self.file_bytes += size;
        Ok(FileData::Chunked {
            size,
            chunk_bits: self.chunk_size.trailing_zeros() as u8,
            chunks,
        })
    }
}

pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Hashes and counts every byte of the stored layer as it is read.
struct DigestReader<'p, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: &'p dyn Progress,
}

impl<R: Read> Read for DigestReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.progress.bytes(n as u64);
        Ok(n)
    }
}

/// Counts uncompressed tar bytes and keeps the last 512 bytes seen, so a tar
/// stream that stops without its end-of-archive block can be detected.
struct TailReader<R> {
    inner: R,
    count: u64,
    tail: [u8; 512],
    tail_len: usize,
}

impl<R: Read> Read for TailReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        let got = &buf[..n];
        if got.len() >= 512 {
            self.tail.copy_from_slice(&got[got.len() - 512..]);
            self.tail_len = 512;
        } else if !got.is_empty() {
            let keep = (512 - got.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + got.len()].copy_from_slice(got);
            self.tail_len = keep + got.len();
        }
        Ok(n)
    }
}

/// A layer to read from a file.
pub(crate) struct LayerFile<'a> {
    pub path: &'a Path,
    /// `sha256:...` the bytes must hash to.
    pub digest: &'a str,
    pub size: u64,
    pub compression: Compression,
}

/// Stream one tar layer into the applier. Returns uncompressed tar bytes.
pub(crate) fn apply_tar_layer(
    layer: &LayerFile<'_>,
    app: &mut Applier<'_>,
    progress: &dyn Progress,
) -> Result<u64, ConvertError> {
    let label = layer.digest.to_string();
    let file = std::fs::File::open(layer.path).map_err(|e| ConvertError::io(layer.path, e))?;
    let mut raw = DigestReader {
        inner: io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        count: 0,
        progress,
    };
    let stream_err = |after: &Option<String>, source: io::Error| ConvertError::Stream {
        layer: label.clone(),
        after: after.clone(),
        source,
    };
    let mut last: Option<String> = None;
    let tar_bytes;
    {
        let decoder: Box<dyn Read + '_> = match layer.compression {
            Compression::None => Box::new(&mut raw),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut raw)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut raw).map_err(|e| stream_err(&None, e))?,
            ),
        };
        let mut tail = TailReader {
            inner: decoder,
            count: 0,
            tail: [0; 512],
            tail_len: 0,
        };
        {
            let mut archive = tar::Archive::new(&mut tail);
            let entries = archive.entries().map_err(|e| stream_err(&None, e))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| stream_err(&last, e))?;
                let path = entry.path_bytes().into_owned();
                let name = lossy(&path);
                let bad = |why: String| ConvertError::Entry {
                    layer: label.clone(),
                    entry: name.clone(),
                    why,
                };
                let Some((kind, meta)) = tar_entry_meta(&mut entry).map_err(bad)? else {
                    last = Some(name.clone());
                    continue;
                };
                match app.apply(&path, kind, meta, &mut entry) {
                    Ok(()) => {}
                    Err(EntryError::Bad(why)) => return Err(bad(why)),
                    Err(EntryError::Read(e)) => {
                        return Err(ConvertError::Stream {
                            layer: label.clone(),
                            after: Some(format!("{name} (reading its data)")),
                            source: e,
                        })
                    }
                    Err(EntryError::Fatal(e)) => return Err(e),
                }
                last = Some(name);
            }
        }
        if tail.tail_len == 0 && tail.count == 0 {
            return Err(stream_err(
                &None,
                io::Error::new(io::ErrorKind::UnexpectedEof, "empty layer stream"),
            ));
        }
        if tail.tail[..tail.tail_len].iter().any(|&b| b != 0) {
            return Err(stream_err(
                &last,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends without its end-of-archive block (truncated)",
                ),
            ));
        }
        // Read the rest of the decompressed stream so a truncated or corrupt
        // compressed stream is detected even after the tar's end block.
        io::copy(&mut tail, &mut io::sink()).map_err(|e| stream_err(&last, e))?;
        tar_bytes = tail.count;
    }
    io::copy(&mut raw, &mut io::sink()).map_err(|e| stream_err(&last, e))?;
    let actual = format!("sha256:{}", hex::encode(raw.hasher.finalize()));
    if actual != layer.digest || raw.count != layer.size {
        return Err(ConvertError::LayerDigest {
            layer: label,
            expected: format!("{} ({} bytes)", layer.digest, layer.size),
            actual: format!("{actual} ({} bytes)", raw.count),
        });
    }
    Ok(tar_bytes)
}

/// Decode a tar entry's kind and metadata, with PAX overrides (uid, gid,
/// mtime with fractions, `SCHILY.xattr.*`). `None` for entries that carry no
/// file (global headers).
fn tar_entry_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<(EntryKind, Metadata)>, String> {
    use tar::EntryType as T;
    let h = entry.header();
    let et = h.entry_type();
    let mode = h.mode().map_err(|e| format!("bad mode: {e}"))?;
    let mut meta = Metadata {
        perm: (mode & 0o7777) as u16,
        uid: h.uid().map_err(|e| format!("bad uid: {e}"))? as u32,
        gid: h.gid().map_err(|e| format!("bad gid: {e}"))? as u32,
        mtime: h.mtime().map_err(|e| format!("bad mtime: {e}"))?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let dev = |h: &tar::Header| -> Result<(u32, u32), String> {
        let ma = h
            .device_major()
            .map_err(|e| format!("bad device major: {e}"))?;
        let mi = h
            .device_minor()
            .map_err(|e| format!("bad device minor: {e}"))?;
        Ok((ma.unwrap_or(0), mi.unwrap_or(0)))
    };
    let link = || -> Result<Vec<u8>, String> {
        Ok(entry
            .link_name_bytes()
            .ok_or_else(|| "link entry without a target".to_string())?
            .into_owned())
    };
    let kind = match et {
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink(link()?),
        T::Link => EntryKind::Hardlink(link()?),
        T::Char => {
            let (a, b) = dev(h)?;
            EntryKind::Char(a, b)
        }
        T::Block => {
            let (a, b) = dev(h)?;
            EntryKind::Block(a, b)
        }
        T::Fifo => EntryKind::Fifo,
        T::XGlobalHeader => return Ok(None),
        other => {
            return Err(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            ))
        }
    };
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let num = |what: &str| -> Result<u64, String> {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad PAX {what} {:?}", lossy(value)))
            };
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"uid" {
                meta.uid =
                    u32::try_from(num("uid")?).map_err(|_| "PAX uid too large".to_string())?;
            } else if key == b"gid" {
                meta.gid =
                    u32::try_from(num("gid")?).map_err(|_| "PAX gid too large".to_string())?;
            } else if key == b"mtime" {
                let (secs, nsec) = parse_pax_time(value)
                    .ok_or_else(|| format!("bad PAX mtime {:?}", lossy(value)))?;
                meta.mtime = secs;
                meta.mtime_nsec = nsec;
            }
        }
    }
    Ok(Some((kind, meta)))
}

/// `1700000000.123456789` -> (secs, nsec). Negative times clamp to 0.
fn parse_pax_time(v: &[u8]) -> Option<(u64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    if s.starts_with('-') {
        return Some((0, 0));
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().ok()?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((secs, digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_time_parsing() {
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"12.1234567891"), Some((12, 123_456_789)));
        assert_eq!(parse_pax_time(b"-5.2"), Some((0, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
