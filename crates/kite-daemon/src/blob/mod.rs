//! One data blob as the daemon serves it: its chunk table, its backend,
//! what has been fetched, and the fetches in flight.
//!
//! Shared by every registered image that uses the blob (images sharing a
//! layer share this state, as they share the kernel's cache file through
//! the domain). [`BlobState::ensure`] makes a set of chunks present in a
//! cache object: chunks already being fetched are awaited, not fetched
//! again; missing adjacent chunks are fetched together as one range of at
//! most `merge_bound` stored bytes, with the speculation the planner adds.
//! Each chunk is decompressed and checked against its sha256 before it is
//! written; a chunk that fails is never written, and only the requests
//! that need it fail. A requested chunk that failed remotely is answered as
//! failed for [`FAILURE_TTL`] without refetching (the kernel retries at
//! once), and fetches in flight are shared only by requests for the same
//! cache file.
//!
//! Cancellation: a fetch runs in its own task, so a READ task that goes
//! away does not abort a fetch others wait for.
//!
//! # Parts
//! - this module: [`BlobState`], its state and the queries on it;
//! - [`plan`]: the pure fetch planner (what a miss, a reader's readahead or
//!   the prefetcher fetches, in which runs);
//! - `fetch`: starting runs, fetching, verifying, writing and publishing
//!   each chunk's outcome ([`Batch`], [`ChunkError`]);
//! - `prefetch`: the profile queue and the prefetcher;
//! - [`index`]: the node-wide chunk index, so a chunk already on disk in
//!   another blob is copied locally (verified) instead of fetched.
//!
//! # Locking
//! All mutable chunk state is in one mutex ([`BlobState::state`]). It is a
//! leaf lock: held only for bookkeeping (no await, no I/O, no other lock
//! taken while it is held, no callback run under it), so there is no lock
//! order to get wrong. Counters that status and the fanotify path read on
//! every event are atomics outside it, updated under it where they must
//! agree with the maps.

mod fetch;
pub mod index;
pub mod plan;
mod prefetch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kite_format::{ChunkRecord, Digest};
use kite_kernel::cachefiles::CacheObject;
use tokio::sync::watch;

use crate::backend::Backend;

pub use fetch::{Batch, ChunkError, Waits, FAILURE_TTL};
pub use index::{ChunkIndex, LocalRead};

/// Per-chunk outcome published to waiters: `None` while in flight.
type Outcome = Option<Result<(), ChunkError>>;

/// Small-file misses this close in time (and [`plan::BURST_DISTANCE`] in
/// chunk index) form a burst.
const BURST_WINDOW: Duration = Duration::from_millis(500);

/// Orders first accesses across blobs (a profile interleaves blobs).
static ACCESS_SEQ: AtomicU64 = AtomicU64::new(0);

/// Chunks read by the kernel, in the order of their first read.
#[derive(Default)]
struct AccessLog {
    seen: Vec<bool>,
    order: Vec<(u64, u32)>,
}

/// Profile chunks waiting for the prefetcher, and what it writes into.
#[derive(Default)]
struct Prefetch {
    queue: Vec<usize>,
    /// Every other missing chunk (`kite pull`, `--prefetch all`): fetched
    /// after the profile queue, one small request at a time, only while
    /// no reader has fetched anything for a moment.
    background: Vec<usize>,
    running: bool,
    /// Chunks some profile listed (each is queued once).
    profiled: Vec<bool>,
    /// The last cache object the kernel path handed over for this blob,
    /// while it is usable.
    object: Option<Arc<dyn CacheObject>>,
    merge_bound: u64,
    /// Bumped when the object goes away or the blob is forgotten: a
    /// running prefetcher stops at its next run.
    generation: u64,
}

/// Everything about a blob's chunks that changes, under one lock.
struct Chunks {
    /// Chunks written to the cache by this daemon (or found so at start).
    fetched: Vec<bool>,
    /// Chunks some registered image's files reference (None: all). A layer
    /// blob also holds chunks of files a later layer deleted or replaced;
    /// nobody reads those, so they must not keep the blob "incomplete".
    needed: Option<Vec<bool>>,
    /// Fetches in flight, by (chunk, target cache file).
    inflight: HashMap<(usize, u64), watch::Receiver<Outcome>>,
    /// Recent remote failures of requested chunks: not fetched again for
    /// [`FAILURE_TTL`], so the kernel's immediate retries of a failed range
    /// fail at once instead of each waiting out the fetch timeout again.
    failed: HashMap<usize, (Instant, ChunkError)>,
    /// When and where the last non-sequential small-file miss was.
    last_small_miss: Option<(Instant, usize)>,
    access: AccessLog,
    prefetch: Prefetch,
}

pub struct BlobState {
    pub digest: Digest,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    pub chunks: Vec<ChunkRecord>,
    pub backend: Arc<dyn Backend>,
    /// The one lock (see the module doc).
    state: Mutex<Chunks>,
    pub fetched_bytes: AtomicU64,
    pub fetched_chunks: AtomicU64,
    /// Chunks refused because their content did not match the digest.
    pub corrupt_chunks: AtomicU64,
    pub timeout: Duration,
    /// Chunks to fetch ahead when a miss follows a fetched chunk (0 = off).
    pub readahead: usize,
    /// Needed chunks not yet fetched (usize::MAX while `needed` is None,
    /// i.e. every chunk counts), kept so the completeness check on every
    /// fanotify event is a load, not a scan.
    needed_missing: AtomicUsize,
    /// The largest chunk: the image's chunk size, in practice.
    full_chunk: u32,
    /// The image's fine chunk size (ELF files), 0 if none: a planning
    /// hint (see [`plan`]).
    pub fine_chunk: u32,
    /// Profile chunks the prefetcher found missing and fetched.
    pub prefetched_chunks: AtomicU64,
    /// Unix milliseconds of the last kernel request for this blob's data
    /// (0: none). Cache hits never reach the daemon, so this is the last
    /// miss, not the last read. Milliseconds, so the cache's LRU order
    /// holds between images used within one second.
    pub last_miss: AtomicU64,
    /// The node's chunk index this blob belongs to, and its slot there.
    index: OnceLock<(Arc<ChunkIndex>, u32)>,
    /// How the index reads this blob's chunks for other blobs (set by the
    /// kernel path when it can).
    local: OnceLock<Arc<dyn LocalRead>>,
    /// Chunks (and their bytes) copied from another blob's local data
    /// instead of fetched.
    pub copied_chunks: AtomicU64,
    pub copied_bytes: AtomicU64,
    /// The site's peers, asked before the backend (none: not configured).
    pub peers: Option<Arc<crate::peer::Peers>>,
    /// Chunks (and their uncompressed bytes) a peer served, verified.
    pub peer_chunks: AtomicU64,
    pub peer_bytes: AtomicU64,
}

impl Drop for BlobState {
    fn drop(&mut self) {
        if let Some((index, slot)) = self.index.get() {
            index.detach(*slot);
        }
    }
}

impl BlobState {
    pub fn new(
        digest: Digest,
        uncompressed_size: u64,
        compressed_size: u64,
        chunks: Vec<ChunkRecord>,
        backend: Arc<dyn Backend>,
        timeout: Duration,
    ) -> Self {
        let n = chunks.len();
        let full_chunk = chunks
            .iter()
            .map(|c| c.uncompressed_size)
            .max()
            .unwrap_or(0);
        Self {
            digest,
            uncompressed_size,
            compressed_size,
            chunks,
            backend,
            state: Mutex::new(Chunks {
                fetched: vec![false; n],
                needed: None,
                inflight: HashMap::new(),
                failed: HashMap::new(),
                last_small_miss: None,
                access: AccessLog::default(),
                prefetch: Prefetch::default(),
            }),
            fetched_bytes: AtomicU64::new(0),
            fetched_chunks: AtomicU64::new(0),
            corrupt_chunks: AtomicU64::new(0),
            timeout,
            readahead: 0,
            needed_missing: AtomicUsize::new(usize::MAX),
            full_chunk,
            fine_chunk: 0,
            prefetched_chunks: AtomicU64::new(0),
            last_miss: AtomicU64::new(0),
            index: OnceLock::new(),
            local: OnceLock::new(),
            copied_chunks: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            peers: None,
            peer_chunks: AtomicU64::new(0),
            peer_bytes: AtomicU64::new(0),
        }
    }

    /// Let other blobs copy chunks from this one's local data (the kernel
    /// path calls this when it can read its cache directly).
    pub fn set_local_reader(&self, reader: Arc<dyn LocalRead>) {
        let _ = self.local.set(reader);
    }

    /// How this node reads the blob's cache directly, if it can (peer
    /// serving, local copies).
    pub fn local_reader(&self) -> Option<Arc<dyn LocalRead>> {
        self.local.get().cloned()
    }

    /// Tell the chunk index that chunks `chunks` are on disk now.
    fn index_add(&self, chunks: &[usize]) {
        if let Some((index, slot)) = self.index.get() {
            index.add(*slot, self, chunks);
        }
    }

    /// The state. A panic while it was held cannot have left it half
    /// updated in a way that matters more than losing the blob would (the
    /// sections are plain bookkeeping on checked indexes), so a poisoned
    /// lock is taken as it is rather than failing every later request.
    fn lock(&self) -> MutexGuard<'_, Chunks> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The planner's fixed parameters for this blob.
    fn plan_config(&self, merge_bound: u64) -> plan::PlanConfig {
        plan::PlanConfig {
            readahead: self.readahead,
            merge_bound,
            full_chunk: self.full_chunk,
            fine_chunk: self.fine_chunk,
        }
    }

    /// Record that the kernel read chunks `chunks` (hits included where
    /// the path sees them): the first read of each is kept, in order, for
    /// [`BlobState::access_order`].
    pub fn record_access(&self, chunks: impl IntoIterator<Item = usize>) {
        self.last_miss
            .store(crate::unix_now_ms(), Ordering::Relaxed);
        let mut st = self.lock();
        let log = &mut st.access;
        if log.seen.is_empty() {
            log.seen = vec![false; self.chunks.len()];
        }
        for i in chunks {
            if let Some(false) = log.seen.get(i) {
                log.seen[i] = true;
                let seq = ACCESS_SEQ.fetch_add(1, Ordering::Relaxed);
                log.order.push((seq, i as u32));
            }
        }
    }

    /// First reads so far: (global sequence number, chunk), in order.
    pub fn access_order(&self) -> Vec<(u64, u32)> {
        self.lock().access.order.clone()
    }

    /// Where chunk `i` starts in the uncompressed layout.
    pub fn chunk_offset(&self, i: usize) -> u64 {
        self.chunks[i].uncompressed_offset
    }

    /// Add the chunks an image references to the needed set (the union
    /// over the images using this blob).
    pub fn add_needed(&self, chunks: &[usize]) {
        let mut st = self.lock();
        let st = &mut *st;
        let set = st
            .needed
            .get_or_insert_with(|| vec![false; self.chunks.len()]);
        for &i in chunks {
            if let Some(b) = set.get_mut(i) {
                *b = true;
            }
        }
        self.recount_needed_missing(set, &st.fetched);
    }

    fn recount_needed_missing(&self, needed: &[bool], fetched: &[bool]) {
        let missing = needed
            .iter()
            .zip(fetched)
            .filter(|(n, f)| **n && !**f)
            .count();
        self.needed_missing.store(missing, Ordering::Relaxed);
    }

    /// Chunks a registered image can read that are not on disk yet.
    pub fn missing_needed(&self) -> u64 {
        match self.needed_missing.load(Ordering::Relaxed) {
            usize::MAX => (self.chunks.len() as u64)
                .saturating_sub(self.fetched_chunks.load(Ordering::Relaxed)),
            n => n as u64,
        }
    }

    /// Whether every chunk a registered image can read is on disk: the
    /// blob file can then be read without the daemon.
    pub fn is_complete_for_mounts(&self) -> bool {
        self.is_complete() || self.needed_missing.load(Ordering::Relaxed) == 0
    }

    /// Chunk indexes whose padded extents intersect `[off, off + len)`.
    pub fn chunks_for(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let end = off.saturating_add(len);
        let first = self.chunks.partition_point(|c| c.uncompressed_end() <= off);
        let last = self.chunks.partition_point(|c| c.uncompressed_offset < end);
        first..last.max(first)
    }

    /// Whether chunk `i` was written to the cache by this node.
    pub fn is_fetched(&self, i: usize) -> bool {
        self.lock().fetched.get(i).copied().unwrap_or(false)
    }

    /// Whether every chunk is on disk.
    pub fn is_complete(&self) -> bool {
        self.fetched_chunks.load(Ordering::Relaxed) as usize == self.chunks.len()
    }

    /// The fetched bitmap (for persistence and status).
    pub fn fetched_map(&self) -> Vec<bool> {
        self.lock().fetched.clone()
    }

    /// Restore a persisted bitmap (lengths must match).
    pub fn restore_fetched(&self, map: &[bool]) {
        let mut st = self.lock();
        if map.len() != st.fetched.len() {
            return;
        }
        st.fetched.copy_from_slice(map);
        // Counters follow the map exactly.
        let n = map.iter().filter(|&&b| b).count() as u64;
        let bytes: u64 = map
            .iter()
            .zip(&self.chunks)
            .filter(|(b, _)| **b)
            .map(|(_, c)| u64::from(c.uncompressed_size))
            .sum();
        self.fetched_chunks.store(n, Ordering::Relaxed);
        self.fetched_bytes.store(bytes, Ordering::Relaxed);
        if let Some(set) = st.needed.as_ref() {
            self.recount_needed_missing(set, &st.fetched);
        }
        drop(st);
        let held: Vec<usize> = (0..map.len()).filter(|&i| map[i]).collect();
        self.index_add(&held);
    }

    /// Record chunk `i` as written (under the lock the caller holds).
    fn mark_fetched(&self, st: &mut Chunks, i: usize) {
        if let Some(f @ false) = st.fetched.get_mut(i) {
            *f = true;
            self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
            self.fetched_bytes.fetch_add(
                u64::from(self.chunks[i].uncompressed_size),
                Ordering::Relaxed,
            );
            if st.needed.as_ref().and_then(|n| n.get(i)) == Some(&true) {
                self.needed_missing.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The miss history the planner sees now.
    fn history(st: &Chunks) -> plan::History {
        plan::History {
            recent_small_miss: st
                .last_small_miss
                .filter(|(t, _)| t.elapsed() < BURST_WINDOW)
                .map(|(_, c)| c),
        }
    }
}
