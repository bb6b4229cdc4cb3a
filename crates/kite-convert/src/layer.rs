//! Reading one layer: decompress, verify the layer digest and the config's
//! diff_id (both hashed while streaming, in one read), walk its tar
//! entries, and apply each to the merged tree while its file data is cut
//! into chunks for the layer's blob.
//!
//! Every error names the layer (its digest) and the tar entry, so a bad
//! image can be traced to the exact culprit.

use std::io::{self, Read};

use kite_erofs::{FileData, Metadata, NodeKind};
use kite_oci::Compression;
use sha2::{Digest as _, Sha256};

use crate::blob::BlobBuilder;
use crate::tarstream::{kind, TarEntry, TarReader};
use crate::tree::{split_path, Components, Hide, MergedTree, TreeError};
use crate::{ConvertError, Interrupt, Progress};

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

/// What of the layer being read reaches the tree only at the layer's end
/// (see [`Applier::finish`]), each with its tar name for errors.
#[derive(Default)]
pub(crate) struct Deferred {
    markers: Vec<(Vec<u8>, Hide)>,
    /// Entries other than markers, in tar order; their file data is
    /// already chunked.
    entries: Vec<(Vec<u8>, Components, DeferredNode)>,
}

enum DeferredNode {
    Node(Metadata, NodeKind),
    Hardlink(Components),
}

/// Applies entries of one layer to the tree and its blob.
///
/// Entries reach the tree at [`Applier::finish`], when the whole layer has
/// been read: first all its whiteouts and opaque markers, then the other
/// entries in tar order. The OCI spec applies a layer's whiteouts before
/// its other entries "regardless of the ordering" in the tar, so a marker
/// read after entries of its own layer (`d/x` then `.wh.d`, or `a/b/` then
/// `a/.wh..wh..opq`) still hides only what lower layers put there, and a
/// hard link never names a file its own layer whites out.
pub(crate) struct Applier<'a> {
    pub tree: &'a mut MergedTree,
    pub blob: &'a mut BlobBuilder,
    pub layer: u32,
    pub chunk_size: u32,
    /// Chunk size of ELF files, if below `chunk_size` (0: none).
    pub elf_chunk_size: u32,
    /// Files cut at `elf_chunk_size`.
    pub fine_files: u64,
    pub inline_max: u64,
    pub files: u64,
    pub file_bytes: u64,
    /// Checked at every entry and chunk.
    pub interrupt: &'a Interrupt,
    /// This layer's entries so far.
    pub deferred: Deferred,
}

impl Applier<'_> {
    pub fn apply(
        &mut self,
        raw_path: &[u8],
        kind: EntryKind,
        meta: Metadata,
        data: &mut dyn Read,
    ) -> Result<(), EntryError> {
        self.interrupt.check().map_err(EntryError::Fatal)?;
        let comps = split_path(raw_path)?;
        if let Some(last) = comps.last() {
            if let Some(target) = last.strip_prefix(b".wh.") {
                let parent = &comps[..comps.len() - 1];
                let hide = if last == b".wh..wh..opq" {
                    Hide::Children(parent.to_vec())
                } else if target.starts_with(b".wh.") {
                    // Other AUFS metadata (.wh..wh.plnk etc.): not content.
                    return Ok(());
                } else if target.is_empty() {
                    return Err(EntryError::Bad("empty whiteout name".into()));
                } else if target == b"." || target == b".." {
                    return Err(EntryError::Bad(format!(
                        "whiteout {:?} names {:?}, which is not an entry",
                        lossy(last),
                        lossy(target)
                    )));
                } else {
                    let mut victim = parent.to_vec();
                    victim.push(target.to_vec());
                    Hide::Entry(victim)
                };
                self.deferred.markers.push((raw_path.to_vec(), hide));
                return Ok(());
            }
        }
        let node = match kind {
            EntryKind::Hardlink(target) => {
                let t = split_path(&target).map_err(|e| {
                    EntryError::Bad(format!("hardlink target {:?}: {}", lossy(&target), e.0))
                })?;
                self.deferred
                    .entries
                    .push((raw_path.to_vec(), comps, DeferredNode::Hardlink(t)));
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
            EntryKind::Char(major, minor) | EntryKind::Block(major, minor)
                if !kite_erofs::ondisk::dev_fits(major, minor) =>
            {
                return Err(EntryError::Bad(format!(
                    "device number {major}:{minor} does not fit EROFS (major below 4096, minor below 1048576)"
                )));
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
        self.deferred
            .entries
            .push((raw_path.to_vec(), comps, DeferredNode::Node(meta, node)));
        Ok(())
    }

    /// Apply the layer read so far: its markers, then its other entries
    /// in tar order. An error comes with the culprit's tar path.
    pub fn finish(&mut self) -> Result<(), (Vec<u8>, TreeError)> {
        let Deferred { markers, entries } = std::mem::take(&mut self.deferred);
        let (names, hides): (Vec<_>, Vec<_>) = markers.into_iter().unzip();
        self.tree
            .hide(&hides, self.layer)
            .map_err(|(i, e)| (names[i].clone(), e))?;
        for (name, comps, node) in entries {
            let r = match node {
                DeferredNode::Node(meta, node) => self.tree.insert(&comps, meta, node, self.layer),
                DeferredNode::Hardlink(target) => self.tree.hardlink(&comps, &target, self.layer),
            };
            r.map_err(|e| (name, e))?;
        }
        Ok(())
    }

    fn read_file(&mut self, data: &mut dyn Read) -> Result<FileData, EntryError> {
        self.files += 1;
        let mut size = 0u64;
        let mut chunks = Vec::new();
        // The chunk size of this file: an ELF file longer than the ELF
        // chunk size gets that, any other file the image's. The first
        // chunk is read at the ELF size, looked at, and topped up to a
        // full chunk if the file is not ELF.
        let mut chunk_size = self.chunk_size;
        let mut first = true;
        loop {
            self.interrupt.check().map_err(EntryError::Fatal)?;
            let mut buf = Vec::with_capacity(chunk_size as usize);
            if first && self.elf_chunk_size != 0 {
                let fine = u64::from(self.elf_chunk_size);
                data.take(fine)
                    .read_to_end(&mut buf)
                    .map_err(EntryError::Read)?;
                let elf = buf.len() as u64 == fine && buf.starts_with(b"\x7fELF");
                if elf {
                    chunk_size = self.elf_chunk_size;
                    self.fine_files += 1;
                } else if buf.len() as u64 == fine {
                    data.take(u64::from(chunk_size) - fine)
                        .read_to_end(&mut buf)
                        .map_err(EntryError::Read)?;
                }
            } else {
                data.take(chunk_size as u64)
                    .read_to_end(&mut buf)
                    .map_err(EntryError::Read)?;
            }
            first = false;
            if buf.is_empty() {
                break;
            }
            let n = buf.len() as u64;
            if size == 0 && n <= self.inline_max && n < chunk_size as u64 {
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
            chunks.push(self.blob.add_chunk(buf).map_err(EntryError::Fatal)?);
            if n < chunk_size as u64 {
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
            chunk_bits: chunk_size.trailing_zeros() as u8,
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

/// Hashes the uncompressed tar stream as the tar reader consumes it, for
/// the diff_id (no hasher: the stream is the stored layer, hashed already).
struct DiffIdReader<R> {
    inner: R,
    hasher: Option<Sha256>,
}

impl<R: Read> Read for DiffIdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A layer to read from a file.
pub(crate) struct LayerFile<'a> {
    /// The stored (compressed) layer bytes.
    pub input: Box<dyn Read + 'a>,
    /// `sha256:...` the bytes must hash to.
    pub digest: &'a str,
    pub size: u64,
    pub compression: Compression,
    /// `sha256:...` the uncompressed tar stream must hash to (the image
    /// config's diff_id for this layer).
    pub diff_id: &'a str,
}

/// Stream one tar layer into the applier. Returns uncompressed tar bytes.
pub(crate) fn apply_tar_layer(
    layer: LayerFile<'_>,
    app: &mut Applier<'_>,
    progress: &dyn Progress,
) -> Result<u64, ConvertError> {
    let label = layer.digest.to_string();
    let mut raw = DigestReader {
        inner: io::BufReader::with_capacity(1 << 20, layer.input),
        hasher: Sha256::new(),
        count: 0,
        progress,
    };
    let stream_err = |after: &Option<String>, source: io::Error| ConvertError::Stream {
        layer: label.clone(),
        at: after
            .as_ref()
            .map(|a| format!(" after tar entry {a:?}"))
            .unwrap_or_default(),
        source,
    };
    let mut last: Option<String> = None;
    let tar_bytes;
    let diff_id;
    {
        let decoder: Box<dyn Read + '_> = match layer.compression {
            Compression::None => Box::new(&mut raw),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut raw)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut raw).map_err(|e| stream_err(&None, e))?,
            ),
        };
        // An uncompressed layer is its own tar stream: its diff_id is its
        // digest, hashed already.
        let mut tr = TarReader::new(DiffIdReader {
            inner: decoder,
            hasher: (layer.compression != Compression::None).then(Sha256::new),
        });
        loop {
            let entry = match tr.next_entry() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => return Err(stream_err(&last, e)),
            };
            let name = lossy(&entry.path);
            let bad = |why: String| ConvertError::Entry {
                layer: label.clone(),
                entry: name.clone(),
                why,
            };
            let (kind, meta) = entry_meta(&entry).map_err(bad)?;
            match app.apply(&entry.path, kind, meta, &mut tr) {
                Ok(()) => {}
                Err(EntryError::Bad(why)) => return Err(bad(why)),
                Err(EntryError::Read(e)) => {
                    return Err(ConvertError::Stream {
                        layer: label.clone(),
                        at: format!(" in the data of tar entry {name:?}"),
                        source: e,
                    })
                }
                Err(EntryError::Fatal(e)) => return Err(e),
            }
            last = Some(name);
        }
        // Read the rest of the decompressed stream so a truncated or corrupt
        // compressed stream is detected even after the tar's end block.
        let archive_bytes = tr.position;
        let mut rest = tr.into_inner();
        let trailing = io::copy(&mut rest, &mut io::sink()).map_err(|e| stream_err(&last, e))?;
        tar_bytes = archive_bytes + trailing;
        diff_id = rest
            .hasher
            .map(|h| format!("sha256:{}", hex::encode(h.finalize())));
    }
    io::copy(&mut raw, &mut io::sink()).map_err(|e| stream_err(&last, e))?;
    let actual = format!("sha256:{}", hex::encode(raw.hasher.finalize()));
    if actual == layer.digest && raw.count != layer.size {
        return Err(ConvertError::LayerSize {
            layer: label,
            expected: layer.size,
            actual: raw.count,
        });
    }
    if actual != layer.digest || raw.count != layer.size {
        return Err(ConvertError::LayerDigest {
            layer: label,
            expected: format!("{} ({} bytes)", layer.digest, layer.size),
            actual: format!("{actual} ({} bytes)", raw.count),
        });
    }
    let diff_id = diff_id.unwrap_or(actual);
    if diff_id != layer.diff_id {
        return Err(ConvertError::DiffId {
            layer: label,
            expected: layer.diff_id.to_string(),
            actual: diff_id,
        });
    }
    // The whole layer is read and verified: apply it to the tree.
    app.finish().map_err(|(name, e)| ConvertError::Entry {
        layer: label.clone(),
        entry: lossy(&name),
        why: e.0,
    })?;
    Ok(tar_bytes)
}

/// Map a tar entry to the applier's kind and metadata.
fn entry_meta(e: &TarEntry) -> Result<(EntryKind, Metadata), String> {
    let meta = Metadata {
        perm: (e.mode & 0o7777) as u16,
        uid: u32::try_from(e.uid).map_err(|_| format!("uid {} too large", e.uid))?,
        gid: u32::try_from(e.gid).map_err(|_| format!("gid {} too large", e.gid))?,
        mtime: e.mtime,
        mtime_nsec: e.mtime_nsec,
        xattrs: e.xattrs.clone(),
    };
    let kind = match e.kind {
        kind::REGULAR | kind::REGULAR_OLD | kind::CONTIGUOUS => EntryKind::File,
        kind::DIR => EntryKind::Dir,
        kind::SYMLINK => EntryKind::Symlink(e.link.clone()),
        kind::LINK => EntryKind::Hardlink(e.link.clone()),
        kind::CHAR => EntryKind::Char(e.dev_major, e.dev_minor),
        kind::BLOCK => EntryKind::Block(e.dev_major, e.dev_minor),
        kind::FIFO => EntryKind::Fifo,
        other => return Err(format!("unsupported tar entry type {:?}", other as char)),
    };
    Ok((kind, meta))
}
