//! The fanotify path: file-backed EROFS over sparse local blob files.
//!
//! For every registered blob the daemon keeps `<cache>/blobs/<hex>`, a
//! sparse file as long as the blob's uncompressed layout, marked for
//! `FAN_PRE_ACCESS` while any chunk is missing. The bootstrap is written
//! whole to `<cache>/bootstraps/<fsid>` (its digest is the fsid, checked at
//! registration) and is what `kite mount` mounts, with one `device=` per
//! blob file. A read of a missing range raises an event; the daemon fetches
//! the chunks it covers (in-flight dedup and merging as on the cachefiles
//! path: the same [`BlobState`]), writes them through the event's fd, and
//! allows the read, or denies it with EIO. When every chunk of a blob is on
//! disk the file is synced, its state saved and its mark removed, so a
//! complete blob costs no round trip at all.
//!
//! Here the persisted fetch bitmap is authoritative: a chunk marked fetched
//! is never fetched again. It is saved only after the blob file is synced,
//! so after a crash it can under-report (refetch) but never over-report.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kite_format::Digest;
use kite_kernel::fanotify::{PreContent, PreContentEvent};
use kite_kernel::uring::Writer;

use crate::blob::BlobState;
use crate::daemon::Daemon;
use crate::dispatch::{Answer, Miss};
use crate::registry::Image;
use crate::DaemonError;

/// One blob's local file.
pub struct BlobFile {
    pub blob: Arc<BlobState>,
    pub path: PathBuf,
    file: File,
    marked: AtomicBool,
    /// Events raised for this file.
    pub events: AtomicU64,
}

/// Reads a blob file for the chunk index and peers (see
/// [`crate::blob::index`]). Its descriptor is held from registration, so
/// whether a read through it raises a pre-content event is not something
/// to rely on (kernel-notes/fanotify.md): callers read only chunks marked
/// fetched, and verify them.
struct LocalBlobFile {
    file: File,
    path: PathBuf,
}

impl crate::blob::LocalRead for LocalBlobFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, off)
    }
    /// A one-byte read through a descriptor opened now, while the file is
    /// marked: it raises an event the daemon answers, which hands the
    /// blob a cache object (as `kite pull` starts).
    fn poke(&self, off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut one = [0u8; 1];
        File::open(&self.path)?.read_at(&mut one, off).map(|_| ())
    }
}

/// Files to mount for a registered image.
pub struct MountFiles {
    pub bootstrap: PathBuf,
    pub devices: Vec<PathBuf>,
}

pub struct FanotifyPath {
    daemon: Arc<Daemon>,
    group: Arc<dyn PreContent>,
    writer: Arc<Writer>,
    cache_dir: PathBuf,
    by_id: Mutex<HashMap<(u64, u64), Arc<BlobFile>>>,
    by_digest: Mutex<HashMap<Digest, Arc<BlobFile>>>,
    /// All events received.
    pub events: AtomicU64,
    /// Bootstraps locked in memory, by fsid, within `pin_budget` bytes.
    pinned: Mutex<HashMap<String, kite_kernel::pin::PinnedFile>>,
    pin_budget: u64,
    own_pid: i32,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

impl FanotifyPath {
    /// Serve `group` (the holder's). `pin_budget`: bytes of bootstraps to
    /// keep locked in memory (0: none).
    pub fn new(
        daemon: Arc<Daemon>,
        group: Arc<dyn PreContent>,
        writer: Arc<Writer>,
        cache_dir: &Path,
        pin_budget: u64,
    ) -> Result<Arc<Self>, DaemonError> {
        for sub in ["blobs", "bootstraps"] {
            let d = cache_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(Arc::new(Self {
            daemon,
            group,
            writer,
            cache_dir: cache_dir.to_path_buf(),
            by_id: Mutex::new(HashMap::new()),
            by_digest: Mutex::new(HashMap::new()),
            events: AtomicU64::new(0),
            pinned: Mutex::new(HashMap::new()),
            pin_budget,
            own_pid: std::process::id() as i32,
        }))
    }

    /// Lock an image's bootstrap in memory, budget permitting: file-backed
    /// EROFS reads metadata through this file's page cache, so lookups,
    /// stat and readdir then never wait for the disk, even after memory
    /// pressure or drop_caches. Failure only costs that speed.
    fn pin_bootstrap(&self, fsid: &str, path: &Path) {
        let Ok(mut pinned) = self.pinned.lock() else {
            return;
        };
        if pinned.contains_key(fsid) {
            return;
        }
        let used: u64 = pinned.values().map(|p| p.len() as u64).sum();
        let res = File::open(path).and_then(|f| {
            let len = f.metadata()?.len();
            if used + len > self.pin_budget {
                return Err(std::io::Error::other(format!(
                    "{len} bytes would exceed the pinning budget ({used} of {} bytes used)",
                    self.pin_budget
                )));
            }
            kite_kernel::pin::PinnedFile::pin(&f)
        });
        match res {
            Ok(p) => {
                tracing::info!(fsid, bytes = p.len(), "bootstrap locked in memory");
                pinned.insert(fsid.to_string(), p);
            }
            Err(e) => tracing::info!(fsid, "bootstrap not locked in memory: {e}"),
        }
    }

    /// An image was mounted: lock its bootstrap in memory, budget
    /// permitting (registered images that are not mounted are not locked:
    /// a node keeping many images cached does not hold their metadata).
    pub fn pin(&self, fsid: &str) {
        if self.pin_budget > 0 {
            self.pin_bootstrap(fsid, &crate::adopt::bootstrap_path(&self.cache_dir, fsid));
        }
    }

    /// Release the memory lock of an image's bootstrap.
    pub fn unpin(&self, fsid: &str) {
        if let Ok(mut p) = self.pinned.lock() {
            p.remove(fsid);
        }
    }

    /// Bytes of bootstraps locked in memory.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned
            .lock()
            .map(|p| p.values().map(|x| x.len() as u64).sum())
            .unwrap_or(0)
    }

    /// Make the files for a newly registered image ready to mount.
    pub fn prepare(&self, img: &Image) -> Result<MountFiles, DaemonError> {
        // Written (and checked against the fsid) by registration or
        // adoption before this is called.
        let boot = crate::adopt::bootstrap_path(&self.cache_dir, &img.fsid);
        let mut devices = Vec::new();
        for b in &img.blobs {
            devices.push(self.prepare_blob(b)?.path.clone());
        }
        Ok(MountFiles {
            bootstrap: boot,
            devices,
        })
    }

    fn prepare_blob(&self, blob: &Arc<BlobState>) -> Result<Arc<BlobFile>, DaemonError> {
        let mut by_digest = self.by_digest.lock().map_err(|_| DaemonError::Poisoned)?;
        if let Some(f) = by_digest.get(&blob.digest) {
            if Arc::ptr_eq(&f.blob, blob) {
                // Another image may need chunks the first did not: watch
                // the file again if so.
                if !blob.is_complete_for_mounts() && !f.marked.swap(true, Ordering::SeqCst) {
                    if let Err(e) = self.group.mark(&f.path) {
                        f.marked.store(false, Ordering::SeqCst);
                        return Err(e.into());
                    }
                    tracing::info!(blob = %blob.digest, "blob file watched again: a new image needs chunks not on disk");
                }
                return Ok(Arc::clone(f));
            }
            // Registered again after being forgotten: the file on disk is
            // the same, so the new state starts from what the old one knew.
            blob.restore_fetched(&f.blob.fetched_map());
        }
        let path = self.cache_dir.join("blobs").join(blob.digest.hex());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io_err(format!("stat {}", path.display())))?
            .len();
        if len != blob.uncompressed_size {
            // New, or of another size: start empty (holes everywhere).
            file.set_len(0)
                .map_err(io_err(format!("truncating {}", path.display())))?;
            file.set_len(blob.uncompressed_size)
                .map_err(io_err(format!("sizing {}", path.display())))?;
            blob.restore_fetched(&vec![false; blob.chunks.len()]);
        }
        let md = file
            .metadata()
            .map_err(io_err(format!("stat {}", path.display())))?;
        // Other blobs may copy chunks from this file (the chunk index),
        // and peers read it: only chunks marked fetched, verified.
        match file.try_clone() {
            Ok(f) => blob.set_local_reader(Arc::new(LocalBlobFile {
                file: f,
                path: path.clone(),
            })),
            Err(e) => {
                tracing::warn!(blob = %blob.digest, "no local chunk copies from this blob: {e}")
            }
        }
        let bf = Arc::new(BlobFile {
            blob: Arc::clone(blob),
            path: path.clone(),
            file,
            marked: AtomicBool::new(false),
            events: AtomicU64::new(0),
        });
        if !blob.is_complete_for_mounts() {
            self.group.mark(&path)?;
            bf.marked.store(true, Ordering::SeqCst);
        }
        tracing::info!(
            blob = %blob.digest,
            path = %path.display(),
            fetched = blob.fetched_chunks.load(Ordering::Relaxed),
            chunks = blob.chunks.len(),
            marked = bf.marked.load(Ordering::SeqCst),
            "blob file ready"
        );
        self.by_id
            .lock()
            .map_err(|_| DaemonError::Poisoned)?
            .insert((md.dev(), md.ino()), Arc::clone(&bf));
        by_digest.insert(blob.digest, Arc::clone(&bf));
        Ok(bf)
    }

    /// Serve events until the group fails.
    pub async fn serve(self: Arc<Self>) -> Result<(), DaemonError> {
        loop {
            match Arc::clone(&self.group).next_events().await {
                Ok(events) => self.dispatch(events),
                Err(e) => {
                    // One bad batch (or EMFILE) must not stop serving.
                    tracing::error!("fanotify: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Answer a batch of events: hits at once, misses through the shared
    /// dispatcher (planned together, so adjacent chunks are fetched in one
    /// request), events for unknown files denied.
    pub fn dispatch(self: &Arc<Self>, events: Vec<Box<dyn PreContentEvent>>) {
        let mut misses = Vec::new();
        for ev in events {
            self.events.fetch_add(1, Ordering::Relaxed);
            self.daemon.stats.reads.fetch_add(1, Ordering::Relaxed);
            let bf = ev
                .file_id()
                .ok()
                .and_then(|id| self.by_id.lock().ok().and_then(|m| m.get(&id).cloned()));
            let Some(bf) = bf else {
                // Not a blob file this worker knows (a forgotten blob, a
                // failed fstat): fail closed. Allowing it would let the
                // read see the sparse file's holes as zeros.
                self.daemon
                    .stats
                    .reads_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    pid = ev.pid(),
                    "pre-content event for an unknown file: denied with EIO"
                );
                ev.answer(Err(EIO));
                continue;
            };
            bf.events.fetch_add(1, Ordering::Relaxed);
            let range = ev.range();
            let (off, count) = range.unwrap_or((0, bf.blob.uncompressed_size));
            // Every read of a marked blob file is an event, of fetched
            // chunks too: the access log sees them all (an event without
            // a range says nothing about which chunks were read).
            // The daemon's own reads (copying a chunk to another blob) are
            // not the workload's: no access recorded, and a hit starts no
            // readahead for nobody. (They still hand over the event's fd:
            // `kite pull` and background prefetch start that way.)
            let own = ev.pid() == self.own_pid;
            if range.is_some() && !own {
                bf.blob.record_access(bf.blob.chunks_for(off, count));
            }
            // The event's fd writes without raising events: a queued
            // profile can start filling the file through it.
            bf.blob
                .object_available(|| ev.object(&self.writer), self.daemon.merge_bound);
            let want: Vec<usize> = bf
                .blob
                .chunks_for(off, count)
                .filter(|&i| !bf.blob.is_fetched(i))
                .collect();
            tracing::debug!(blob = %bf.blob.digest, off, count, missing = want.len(), "pre-content event");
            if want.is_empty() {
                // A hit: move a sequential reader's window forward before
                // it gets there.
                if let Some(at) = bf.blob.chunks_for(off, count).last().filter(|_| !own) {
                    if at > 0 && bf.blob.is_fetched(at - 1) {
                        bf.blob.read_ahead_from(
                            at,
                            &ev.object(&self.writer),
                            self.daemon.merge_bound,
                        );
                    }
                }
                ev.answer(Ok(()));
                // Readahead may have fetched the last chunk with no event
                // waiting on it: finish the blob here.
                self.finish_if_complete(&bf.blob);
                continue;
            }
            misses.push(Miss {
                blob: Arc::clone(&bf.blob),
                object: ev.object(&self.writer),
                want,
                answer: Answer::Event(ev),
                off,
                len: count,
            });
        }
        let me = Arc::clone(self);
        crate::dispatch::dispatch(
            &self.daemon,
            misses,
            Some(Arc::new(move |blob: &Arc<BlobState>| {
                me.finish_if_complete(blob)
            })),
        );
    }

    /// Once every chunk a mount needs is on disk: sync, save state and
    /// unmark the blob's file (on the blocking pool).
    fn finish_if_complete(self: &Arc<Self>, blob: &Arc<BlobState>) {
        if !blob.is_complete_for_mounts() {
            return;
        }
        let Some(bf) = self
            .by_digest
            .lock()
            .ok()
            .and_then(|m| m.get(&blob.digest).cloned())
        else {
            return;
        };
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.complete(&bf));
    }

    /// A blob is fully on disk: sync, save state, stop watching.
    fn complete(&self, bf: &BlobFile) {
        if !bf.marked.swap(false, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = bf.file.sync_data() {
            tracing::warn!(blob = %bf.blob.digest, "sync: {e}");
            bf.marked.store(true, Ordering::SeqCst);
            return;
        }
        if let Err(e) = crate::state::save(
            &self.cache_dir.join("kite-state"),
            &bf.blob.digest,
            &bf.blob.fetched_map(),
        ) {
            tracing::warn!(blob = %bf.blob.digest, "saving state: {e}");
        }
        match self.group.unmark(&bf.path) {
            Ok(()) => tracing::info!(blob = %bf.blob.digest, "blob complete on disk: mark removed"),
            Err(e) => tracing::warn!(blob = %bf.blob.digest, "removing mark: {e}"),
        }
    }

    /// Release the files of blobs no registered image uses any more: close
    /// them (marks stay, so reads of missing ranges fail closed). Their
    /// data and saved state stay in the cache for the next registration.
    pub fn forget(&self, digests: &[Digest]) {
        let Ok(mut by_digest) = self.by_digest.lock() else {
            return;
        };
        for d in digests {
            let Some(bf) = by_digest.remove(d) else {
                continue;
            };
            if let Ok(mut by_id) = self.by_id.lock() {
                by_id.retain(|_, f| !Arc::ptr_eq(f, &bf));
            }
            // An incomplete file keeps its mark: a mount that still uses
            // it (unregistered under it) then gets EIO for missing
            // ranges, as an unknown file, never the holes' zeros.
        }
    }

    /// Sync the files of `blobs` (before their fetch state is saved).
    pub fn sync_blobs(&self, blobs: &[Arc<BlobState>]) {
        let files: Vec<Arc<BlobFile>> = self
            .by_digest
            .lock()
            .map(|m| {
                blobs
                    .iter()
                    .filter_map(|b| m.get(&b.digest).cloned())
                    .collect()
            })
            .unwrap_or_default();
        for f in files {
            if let Err(e) = f.file.sync_data() {
                tracing::warn!(blob = %f.blob.digest, "sync: {e}");
            }
        }
    }

    /// Sync every blob file (before its fetch state is saved).
    pub fn sync_all(&self) {
        let files: Vec<Arc<BlobFile>> = self
            .by_digest
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for f in files {
            if let Err(e) = f.file.sync_data() {
                tracing::warn!(blob = %f.blob.digest, "sync: {e}");
            }
        }
    }

    /// Events per blob (for status).
    pub fn blob_events(&self, digest: &Digest) -> u64 {
        self.by_digest
            .lock()
            .ok()
            .and_then(|m| m.get(digest).map(|f| f.events.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }
}

const EIO: i32 = nix::errno::Errno::EIO as i32;
