//! Registered images and the blobs they use.
//!
//! An image is known by its fsid, the hex sha256 of its bootstrap: the
//! cookie key the kernel sends in the bootstrap's OPEN. Blobs are known by
//! their digest (the device-table tag the kernel sends as cookie key) and
//! shared between images. Registration validates the whole bootstrap (EROFS
//! superblock, index checksum, device table against blob table, then every
//! inode, directory, xattr and chunk index: `Bootstrap::validate`) before
//! anything is served from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kite_format::prefetch::{Entry, Profile};
use kite_format::{Bootstrap, Digest};

use crate::backend::Backend;
use crate::blob::BlobState;
use crate::DaemonError;

/// An image's bootstrap bytes: in memory, or, once the daemon keeps them
/// on disk (`<cache>/bootstraps/<fsid>`, written from the verified bytes
/// before the image is linked in), read from that file, so a node with
/// many registered images does not hold every bootstrap in its heap. The
/// kept file has the trust of the cache's blob files: written whole from
/// verified bytes, read back as it is.
#[derive(Clone)]
pub enum BootstrapData {
    Memory(Arc<Vec<u8>>),
    Kept { file: Arc<std::fs::File>, len: u64 },
}

impl BootstrapData {
    pub fn len(&self) -> u64 {
        match self {
            BootstrapData::Memory(b) => b.len() as u64,
            BootstrapData::Kept { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` from offset `off` (blocking: a file read when kept).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "bytes {off}+{} beyond the bootstrap's {}",
                    buf.len(),
                    self.len()
                ))
            })?;
        match self {
            BootstrapData::Memory(b) => {
                buf.copy_from_slice(&b[off as usize..end as usize]);
                Ok(())
            }
            BootstrapData::Kept { file, .. } => {
                std::os::unix::fs::FileExt::read_exact_at(&**file, buf, off)
            }
        }
    }
}

pub struct Image {
    pub fsid: String,
    pub bootstrap: BootstrapData,
    pub blobs: Vec<Arc<BlobState>>,
    /// Where it was registered from (for status).
    pub source: String,
    /// The image's chunk size, in bytes.
    pub chunk_size: u32,
    /// The chunk size of its ELF files, if cut finer (0: none).
    pub fine_chunk: u32,
    /// fanotify path: mountpoints of this image (and whether switched yet)
    /// to remount with direct I/O once every blob is complete (see
    /// [`Image::switch_to_direct_io`]).
    pub direct_io_mounts: std::sync::Mutex<Vec<(std::path::PathBuf, bool)>>,
    /// Unix seconds: when this worker registered (or adopted) the image.
    pub registered_at: u64,
    /// Pulled for keeping (`kite pull`): a last unmount or the
    /// snapshotter's removal leaves it registered; `kite rm` forgets it.
    pub kept: std::sync::atomic::AtomicBool,
    /// Every chunk is being fetched in the background (`kite mount
    /// --prefetch all`).
    pub prefetch_all: std::sync::atomic::AtomicBool,
}

impl Image {
    /// Once every blob is on disk, remount the image's file-backed mounts
    /// with `directio`: EROFS then reads the blob files with direct I/O
    /// instead of through their page cache, which reads a complete image
    /// at the disk's speed and keeps image data out of the page cache
    /// twice. (While chunks are still being written, buffered reads are
    /// faster: a direct read of a just-written range waits for its
    /// writeback.) Returns how many mounts were switched.
    pub fn switch_to_direct_io(&self) -> usize {
        let Ok(mut mounts) = self.direct_io_mounts.lock() else {
            return 0;
        };
        if mounts.iter().all(|m| m.1) || !self.blobs.iter().all(|b| b.is_complete_for_mounts()) {
            return 0;
        }
        let mut switched = 0;
        for (mnt, done) in mounts.iter_mut().filter(|m| !m.1) {
            *done = true;
            match kite_kernel::mount::remount_direct_io(mnt) {
                Ok(()) => {
                    switched += 1;
                    tracing::info!(fsid = %self.fsid, mountpoint = %mnt.display(), "image complete on disk: remounted with direct I/O");
                }
                // Unmounted meanwhile, or another filesystem there now.
                Err(e) => tracing::warn!(fsid = %self.fsid, "{e}"),
            }
        }
        switched
    }

    /// Queue a profile's chunks (checked against this image's bootstrap)
    /// for prefetching; returns how many were not queued already.
    pub fn queue_prefetch(&self, profile: &Profile) -> usize {
        let mut per_blob: Vec<Vec<usize>> = vec![Vec::new(); self.blobs.len()];
        for e in &profile.entries {
            if let Some(v) = per_blob.get_mut(e.blob as usize) {
                v.push(e.chunk as usize);
            }
        }
        self.blobs
            .iter()
            .zip(per_blob)
            .map(|(blob, chunks)| blob.queue_prefetch(&chunks))
            .sum()
    }

    /// What the kernel has read of this image's blobs so far, as a profile:
    /// every chunk once, in the order of its first read across blobs.
    pub fn access_profile(&self) -> Profile {
        let mut all: Vec<(u64, Entry)> = Vec::new();
        for (b, blob) in self.blobs.iter().enumerate() {
            all.extend(blob.access_order().into_iter().map(|(seq, chunk)| {
                (
                    seq,
                    Entry {
                        blob: b as u32,
                        chunk,
                    },
                )
            }));
        }
        all.sort_by_key(|(seq, _)| *seq);
        Profile {
            // The fsid is the bootstrap's sha256, checked at registration.
            bootstrap: Digest::parse(&self.fsid).unwrap_or_default(),
            entries: all.into_iter().map(|(_, e)| e).collect(),
        }
    }
}

#[derive(Default)]
pub struct Registry {
    images: HashMap<String, Arc<Image>>,
    blobs: HashMap<Digest, Arc<BlobState>>,
    state_dir: Option<PathBuf>,
    /// Sequential readahead, in chunks, for new blobs.
    pub readahead: usize,
    /// Where each chunk's content is on disk, across all blobs.
    pub chunk_index: Arc<crate::blob::ChunkIndex>,
    /// Fsids whose registration is keeping their bootstrap on disk before
    /// inserting the image: collection treats them as registered.
    pub registering: std::collections::HashSet<String>,
    /// The site's peers, for new blobs (none: not configured).
    pub peers: Option<Arc<crate::peer::Peers>>,
}

impl Registry {
    pub fn new(state_dir: Option<PathBuf>) -> Self {
        Self {
            state_dir,
            ..Default::default()
        }
    }

    /// Register a bootstrap whose blobs come from `backend` ([`prepare`]
    /// then [`Registry::insert`]; callers that hold the registry behind a
    /// lock prepare outside it).
    pub fn register(
        &mut self,
        bootstrap: Vec<u8>,
        backend: Arc<dyn Backend>,
        timeout: Duration,
        source: String,
    ) -> Result<Arc<Image>, DaemonError> {
        let p = prepare(bootstrap, source, self.state_dir.as_deref())?;
        Ok(self.insert(p, backend, timeout))
    }

    /// Add a prepared image (cheap: no parsing, hashing or I/O). An image
    /// registered already is returned as it is; blobs already known are
    /// shared.
    pub fn insert(
        &mut self,
        p: Prepared,
        backend: Arc<dyn Backend>,
        timeout: Duration,
    ) -> Arc<Image> {
        self.registering.remove(&p.fsid);
        if let Some(img) = self.images.get(&p.fsid) {
            return Arc::clone(img);
        }
        let mut blobs = Vec::new();
        for b in p.blobs {
            let state = match self.blobs.get(&b.digest) {
                Some(s) => Arc::clone(s),
                None => {
                    let mut s = BlobState::new(
                        b.digest,
                        b.uncompressed_size,
                        b.compressed_size,
                        b.chunks,
                        Arc::clone(&backend),
                        timeout,
                    );
                    s.readahead = self.readahead;
                    s.fine_chunk = p.fine_chunk;
                    s.peers = self.peers.clone();
                    let s = Arc::new(s);
                    self.chunk_index.attach(&s);
                    if let Some(map) = &b.saved {
                        s.restore_fetched(map);
                    }
                    self.blobs.insert(b.digest, Arc::clone(&s));
                    s
                }
            };
            match &b.referenced {
                Some(refs) => state.add_needed(refs),
                None => {
                    tracing::warn!(fsid = %p.fsid, blob = %b.digest, "could not list the chunks the image references; the blob completes only when every chunk is fetched")
                }
            }
            blobs.push(state);
        }
        let img = Arc::new(Image {
            fsid: p.fsid.clone(),
            bootstrap: p.bootstrap,
            blobs,
            source: p.source,
            chunk_size: p.chunk_size,
            fine_chunk: p.fine_chunk,
            direct_io_mounts: std::sync::Mutex::new(Vec::new()),
            registered_at: crate::unix_now(),
            kept: std::sync::atomic::AtomicBool::new(false),
            prefetch_all: std::sync::atomic::AtomicBool::new(false),
        });
        self.images.insert(p.fsid, Arc::clone(&img));
        img
    }

    /// Forget an image; blobs no other image uses are forgotten too.
    pub fn unregister(&mut self, fsid: &str) -> bool {
        let Some(img) = self.images.remove(fsid) else {
            return false;
        };
        for b in &img.blobs {
            let used = self
                .images
                .values()
                .any(|i| i.blobs.iter().any(|x| x.digest == b.digest));
            if !used {
                self.blobs.remove(&b.digest);
                // A prefetch into the forgotten blob stops.
                b.object_gone(None);
            }
        }
        true
    }

    pub fn image(&self, fsid: &str) -> Option<Arc<Image>> {
        self.images.get(fsid).cloned()
    }

    pub fn blob(&self, digest: &Digest) -> Option<Arc<BlobState>> {
        self.blobs.get(digest).cloned()
    }

    pub fn images(&self) -> Vec<Arc<Image>> {
        let mut v: Vec<_> = self.images.values().cloned().collect();
        v.sort_by(|a, b| a.fsid.cmp(&b.fsid));
        v
    }

    pub fn blobs(&self) -> Vec<Arc<BlobState>> {
        self.blobs.values().cloned().collect()
    }

    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }
}

/// For each blob (device-table order), the chunk indexes that the image's
/// regular files point at.
fn referenced_chunks(bs: &Bootstrap<'_>) -> Result<Vec<Vec<usize>>, String> {
    let views: Vec<_> = bs.index.blobs().collect();
    let mut out = vec![Vec::new(); views.len()];
    let mut f = |_: &[u8], inode: &kite_erofs::Inode| -> Result<(), kite_erofs::ErofsError> {
        if !inode.is_reg() || inode.chunk_bits().is_none() {
            return Ok(());
        }
        for ci in bs.erofs.chunk_indexes(inode)? {
            if ci.device_id == 0 || ci.blkaddr == kite_erofs::ondisk::NULL_ADDR {
                continue;
            }
            let b = usize::from(ci.device_id - 1);
            if let Some(view) = views.get(b) {
                let off = u64::from(ci.blkaddr) * kite_erofs::BLOCK_SIZE as u64;
                if let Some((i, _)) = bs.index.find_chunk(view, off) {
                    out[b].push(i);
                }
            }
        }
        Ok(())
    };
    bs.erofs.walk(&mut f).map_err(|e| e.to_string())?;
    Ok(out)
}

/// One blob of a prepared image.
pub struct PreparedBlob {
    digest: Digest,
    uncompressed_size: u64,
    compressed_size: u64,
    chunks: Vec<kite_format::index::ChunkRecord>,
    /// Chunks the image's files point at (None: could not be listed).
    referenced: Option<Vec<usize>>,
    /// The persisted fetch map, if any.
    saved: Option<Vec<bool>>,
}

/// A bootstrap validated and indexed, ready for [`Registry::insert`]: the
/// parsing, hashing, tree walk and state reads of a registration, done
/// before the registry lock is taken (on the blocking pool, by callers on
/// a runtime).
pub struct Prepared {
    pub fsid: String,
    bootstrap: BootstrapData,
    source: String,
    chunk_size: u32,
    /// The index's fine chunk size (0: none).
    fine_chunk: u32,
    blobs: Vec<PreparedBlob>,
}

impl Prepared {
    /// Keep the bootstrap in `path` (written whole, atomically, unless it
    /// holds these bytes already) and read it from there from now on.
    pub fn keep_on_disk(&mut self, path: &Path) -> std::io::Result<()> {
        if let BootstrapData::Memory(bytes) = &self.bootstrap {
            crate::write_intact(path, bytes)?;
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            if len != bytes.len() as u64 {
                return Err(std::io::Error::other(format!(
                    "{} holds {len} bytes after writing {}",
                    path.display(),
                    bytes.len()
                )));
            }
            self.bootstrap = BootstrapData::Kept {
                file: Arc::new(file),
                len,
            };
        }
        Ok(())
    }
}

/// Validate and index `bootstrap` (see [`Prepared`]).
pub fn prepare(
    bootstrap: Vec<u8>,
    source: String,
    state_dir: Option<&Path>,
) -> Result<Prepared, DaemonError> {
    let bad = |e: kite_format::FormatError| DaemonError::BadBootstrap {
        source_name: source.clone(),
        why: e.to_string(),
    };
    let parsed = Bootstrap::parse(&bootstrap).map_err(bad)?;
    // The whole metadata, before the kernel sees any of it.
    parsed.validate().map_err(bad)?;
    let fsid = Digest::of(&bootstrap).hex();
    let referenced = referenced_chunks(&parsed);
    if let Err(e) = &referenced {
        tracing::warn!(fsid = %fsid, "listing the chunks the image references: {e}");
    }
    let mut blobs = Vec::new();
    for (i, view) in parsed.index.blobs().enumerate() {
        let digest = view.record.digest;
        blobs.push(PreparedBlob {
            digest,
            uncompressed_size: view.record.uncompressed_size,
            compressed_size: view.record.compressed_size,
            chunks: (0..view.chunk_count)
                .map(|c| parsed.index.chunk(&view, c))
                .collect(),
            referenced: referenced.as_ref().ok().and_then(|r| r.get(i).cloned()),
            saved: state_dir.and_then(|d| {
                match crate::state::load(d, &digest, view.chunk_count) {
                    crate::state::Loaded::Map(m) => Some(m),
                    crate::state::Loaded::Absent => None,
                    // Never trusted: every chunk counts as missing, so a
                    // read fetches (and verifies) it again rather than
                    // reading whatever the blob file holds there.
                    crate::state::Loaded::Corrupt(why) => {
                        tracing::warn!(blob = %digest, "fetch state not used, starting from an empty map: {why}");
                        Some(vec![false; view.chunk_count])
                    }
                }
            }),
        });
    }
    let chunk_size = parsed.index.chunk_size;
    let fine_chunk = parsed.index.fine_chunk_size;
    Ok(Prepared {
        fsid,
        bootstrap: BootstrapData::Memory(Arc::new(bootstrap)),
        source,
        chunk_size,
        fine_chunk,
        blobs,
    })
}
