//! One data blob as the daemon serves it: its chunk table, its backend,
//! what has been fetched, and the fetches in flight.
//!
//! Shared by every registered image that uses the blob (images sharing a
//! layer share this state, as they share the kernel's cache file through
//! the domain). [`BlobState::ensure`] makes a set of chunks present in a
//! cache object: chunks already being fetched are awaited, not fetched
//! again; missing adjacent chunks are fetched together as one range of at
//! most `merge_bound` stored bytes, with sequential readahead. Each chunk is
//! decompressed and checked against its sha256 before it is written; a
//! chunk that fails is never written, and only the requests that need it
//! fail. A requested chunk that failed remotely is answered as failed for
//! [`FAILURE_TTL`] without refetching (the kernel retries at once), and
//! fetches in flight are shared only by requests for the same cache file.
//!
//! Cancellation: a fetch runs in its own task, so a READ task that goes
//! away does not abort a fetch others wait for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kite_format::{align4k, ChunkDecoder, ChunkRecord, Digest};
use kite_kernel::cachefiles::CacheObject;
use kite_kernel::uring::AlignedBuf;
use tokio::sync::watch;

use crate::backend::{Backend, FetchError};

/// Per-chunk outcome published to waiters: `None` while in flight.
type Outcome = Option<Result<(), String>>;

/// How one chunk of a fetch run ended on the blocking pool and the writer.
enum ChunkStep {
    /// Verified, decoded and written into the cache.
    Written,
    /// The decoder refused it (`corrupt`: the stored bytes were bad) or
    /// had nothing to decode (the fetch failed).
    Decode { corrupt: bool, why: String },
    /// The cache write failed.
    Write(String),
    /// The decode or write task died.
    Task(String),
}

/// Answers the chunks of a fetch run that were not answered when the task
/// ends: if a fetch task panics, its waiters get an error and its in-flight
/// entries are cleared instead of lingering until the blob is forgotten.
struct RunGuard {
    blob: Arc<BlobState>,
    target: u64,
    pending: Vec<(usize, watch::Sender<Outcome>)>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        for (i, tx) in self.pending.drain(..) {
            if let Ok(mut inflight) = self.blob.inflight.lock() {
                inflight.remove(&(i, self.target));
            }
            let _ = tx.send(Some(Err(format!(
                "blob {} chunk {i}: fetch task ended without an outcome",
                self.blob.digest
            ))));
        }
    }
}

/// How long a failed chunk is answered from the negative cache.
pub const FAILURE_TTL: Duration = Duration::from_secs(2);

/// What a READ waits on: one receiver per chunk it needs.
pub type Waits = Vec<(usize, watch::Receiver<Outcome>)>;

/// A batch of requests planned together: per blob, the receivers of every
/// chunk the batch needs (or why planning failed).
#[derive(Default)]
pub struct Batch {
    planned: HashMap<Digest, Result<HashMap<usize, watch::Receiver<Outcome>>, String>>,
}

impl Batch {
    /// Start fetching, for each blob, the union of the chunks the batch
    /// needs (so adjacent chunks merge into one request).
    pub fn plan<'a>(
        plans: impl IntoIterator<Item = (&'a Arc<BlobState>, &'a Arc<dyn CacheObject>, &'a [usize])>,
        merge_bound: u64,
    ) -> Batch {
        let mut b = Batch::default();
        for (blob, object, want) in plans {
            let r = blob
                .start(want, object, merge_bound)
                .map(|waits| waits.into_iter().collect::<HashMap<_, _>>());
            if let Err(e) = &r {
                tracing::error!(blob = %blob.digest, "planning fetch: {e}");
            }
            b.planned.insert(blob.digest, r);
        }
        b
    }

    /// The receivers one request of the batch waits on.
    pub fn waits(&self, blob: &Digest, want: &[usize]) -> Result<Waits, String> {
        match self.planned.get(blob) {
            Some(Ok(by_chunk)) => want
                .iter()
                .map(|&i| {
                    by_chunk
                        .get(&i)
                        .map(|rx| (i, rx.clone()))
                        .ok_or_else(|| format!("blob {blob}: chunk {i} missing from the plan"))
                })
                .collect(),
            Some(Err(e)) => Err(e.clone()),
            None => Err(format!("blob {blob}: request not planned")),
        }
    }
}

/// Run `f` with this thread's chunk decoder (one zstd context per
/// blocking-pool thread instead of one per chunk).
fn with_decoder<T>(
    f: impl FnOnce(&mut ChunkDecoder) -> Result<T, (bool, String)>,
) -> Result<T, (bool, String)> {
    thread_local! {
        static DECODER: std::cell::RefCell<Option<ChunkDecoder>> = const { std::cell::RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(ChunkDecoder::new().map_err(|e| (false, e.to_string()))?);
        }
        match slot.as_mut() {
            Some(dec) => f(dec),
            None => Err((false, "no chunk decoder".into())),
        }
    })
}

/// Small-file misses this close in time and in chunk index form a burst.
const BURST_WINDOW: Duration = Duration::from_millis(500);
const BURST_DISTANCE: usize = 256;
/// What a burst miss fetches along: following small chunks, up to these.
const BURST_MAX_CHUNKS: usize = 64;
const BURST_MAX_BYTES: u64 = 512 << 10;

/// Prefetch (profile) fetches: windows of the queue of at most this many
/// stored bytes are sorted, gaps of at most this many stored bytes between
/// profile chunks are fetched too, and at most this many range requests
/// are in flight.
const PREFETCH_WINDOW_BYTES: u64 = 4 << 20;
const PREFETCH_GAP_BYTES: u64 = 32 << 10;
const PREFETCH_REQUESTS: usize = 8;

/// Orders first accesses across blobs (a profile interleaves blobs).
static ACCESS_SEQ: AtomicU64 = AtomicU64::new(0);

/// Why chunks are being fetched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    /// A reader waits for them: speculation may add more, and a remote
    /// failure is remembered for [`FAILURE_TTL`].
    Demand,
    /// Readahead or prefetch: nothing else is added, and a failure is
    /// forgotten (a later read must not fail because of it).
    Speculative,
}

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

/// Most chunks one readahead window spans (small files).
const WINDOW_MAX_CHUNKS: usize = 256;

/// How far the readahead window of a long sequential scan may grow, as a
/// multiple of the configured readahead.
const READAHEAD_GROWTH: usize = 8;

pub struct BlobState {
    pub digest: Digest,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    pub chunks: Vec<ChunkRecord>,
    pub backend: Arc<dyn Backend>,
    /// Fetches in flight, by (chunk, target cache file).
    inflight: Mutex<HashMap<(usize, u64), watch::Receiver<Outcome>>>,
    /// Recent remote failures of requested chunks: not fetched again for
    /// [`FAILURE_TTL`], so the kernel's immediate retries of a failed range
    /// fail at once instead of each waiting out the fetch timeout again.
    failed: Mutex<HashMap<usize, (std::time::Instant, String)>>,
    /// Chunks written to the cache by this daemon (or found so at start).
    fetched: Mutex<Vec<bool>>,
    pub fetched_bytes: AtomicU64,
    pub fetched_chunks: AtomicU64,
    /// Chunks refused because their content did not match the digest.
    pub corrupt_chunks: AtomicU64,
    pub timeout: Duration,
    /// Chunks to fetch ahead when a miss follows a fetched chunk (0 = off).
    pub readahead: usize,
    /// Chunks some registered image's files reference (None: all). A layer
    /// blob also holds chunks of files a later layer deleted or replaced;
    /// nobody reads those, so they must not keep the blob "incomplete".
    needed: Mutex<Option<Vec<bool>>>,
    /// Needed chunks not yet fetched (usize::MAX while `needed` is None,
    /// i.e. every chunk counts), kept so the completeness check on every
    /// fanotify event is a load, not a scan.
    needed_missing: AtomicUsize,
    /// The largest chunk: the image's chunk size, in practice.
    full_chunk: u32,
    /// When and where the last non-sequential small-file miss was.
    last_small_miss: Mutex<Option<(std::time::Instant, usize)>>,
    access: Mutex<AccessLog>,
    prefetch: Mutex<Prefetch>,
    /// Profile chunks the prefetcher found missing and fetched.
    pub prefetched_chunks: AtomicU64,
    /// Unix seconds of the last kernel request for this blob's data (0:
    /// none). Cache hits never reach the daemon, so this is the last
    /// miss, not the last read.
    pub last_miss: AtomicU64,
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
        let chunks_max = chunks
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
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            fetched: Mutex::new(vec![false; n]),
            fetched_bytes: AtomicU64::new(0),
            fetched_chunks: AtomicU64::new(0),
            corrupt_chunks: AtomicU64::new(0),
            timeout,
            readahead: 0,
            needed: Mutex::new(None),
            needed_missing: AtomicUsize::new(usize::MAX),
            full_chunk: chunks_max,
            last_small_miss: Mutex::new(None),
            access: Mutex::new(AccessLog::default()),
            prefetch: Mutex::new(Prefetch::default()),
            prefetched_chunks: AtomicU64::new(0),
            last_miss: AtomicU64::new(0),
        }
    }

    /// Record that the kernel read chunks `chunks` (hits included where
    /// the path sees them): the first read of each is kept, in order, for
    /// [`BlobState::access_order`].
    pub fn record_access(&self, chunks: impl IntoIterator<Item = usize>) {
        self.last_miss.store(crate::unix_now(), Ordering::Relaxed);
        let Ok(mut log) = self.access.lock() else {
            return;
        };
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
        self.access
            .lock()
            .map(|l| l.order.clone())
            .unwrap_or_default()
    }

    /// Queue profile chunks (in profile order) for prefetching, each chunk
    /// once; they are fetched as soon as a cache object for this blob is
    /// available ([`BlobState::object_available`]). Returns how many were
    /// new.
    pub fn queue_prefetch(self: &Arc<Self>, chunks: &[usize]) -> usize {
        let added = {
            let Ok(mut p) = self.prefetch.lock() else {
                return 0;
            };
            if p.profiled.is_empty() {
                p.profiled = vec![false; self.chunks.len()];
            }
            let mut added = 0;
            for &i in chunks {
                if let Some(b @ false) = p.profiled.get_mut(i) {
                    *b = true;
                    p.queue.push(i);
                    added += 1;
                }
            }
            added
        };
        self.kick_prefetch();
        added
    }

    /// Queue every needed chunk not on disk for the prefetcher (`kite
    /// pull`), again if an earlier attempt failed: it starts once the
    /// blob's cache object is available. Returns the first such chunk (the
    /// caller may read it to make the object available) and how many were
    /// queued.
    pub fn queue_missing(self: &Arc<Self>) -> (Option<usize>, usize) {
        let needed = self.needed.lock().ok().and_then(|n| n.clone());
        let missing: Vec<usize> = (0..self.chunks.len())
            .filter(|&i| needed.as_ref().is_none_or(|n| n[i]) && !self.is_fetched(i))
            .collect();
        if let Ok(mut p) = self.prefetch.lock() {
            if !p.profiled.is_empty() {
                for &i in &missing {
                    p.profiled[i] = false;
                }
            }
        }
        (missing.first().copied(), self.queue_prefetch(&missing))
    }

    /// Whether the prefetcher can write into this blob's cache object now.
    pub fn has_object(&self) -> bool {
        self.prefetch
            .lock()
            .map(|p| p.object.is_some())
            .unwrap_or(false)
    }

    /// Where chunk `i` starts in the uncompressed layout.
    pub fn chunk_offset(&self, i: usize) -> u64 {
        self.chunks[i].uncompressed_offset
    }

    /// Whether reads of chunk `i` should add no speculation: a profile
    /// lists it, so the prefetcher brings (or brought) what the workload
    /// reads next. Other chunks of the blob keep readahead.
    fn is_profiled(&self, i: usize) -> bool {
        self.prefetch
            .lock()
            .map(|p| p.profiled.get(i).copied().unwrap_or(false))
            .unwrap_or(false)
    }

    /// A cache object for this blob can be written now (the kernel opened
    /// it, or an event handed the daemon a file to fill): remember it (it
    /// is built only if none is held) and start the prefetcher if profile
    /// chunks are queued.
    pub fn object_available(
        self: &Arc<Self>,
        object: impl FnOnce() -> Arc<dyn CacheObject>,
        merge_bound: u64,
    ) {
        if let Ok(mut p) = self.prefetch.lock() {
            if p.object.is_none() {
                p.object = Some(object());
                p.merge_bound = merge_bound;
            }
        }
        self.kick_prefetch();
    }

    /// The kernel closed cache object `target` (or the blob is being
    /// forgotten, `None`): stop writing into it; a running prefetcher
    /// stops and puts what it had not asked for back in the queue.
    pub fn object_gone(&self, target: Option<u64>) {
        if let Ok(mut p) = self.prefetch.lock() {
            let ours = match (&p.object, target) {
                (Some(o), Some(t)) => o.target() == t,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if ours {
                p.object = None;
                p.generation += 1;
            }
        }
    }

    /// Start the prefetcher if there is work, an object and none running.
    fn kick_prefetch(self: &Arc<Self>) {
        let (queue, object, merge_bound, generation) = {
            let Ok(mut p) = self.prefetch.lock() else {
                return;
            };
            let Some(object) = p.object.clone() else {
                return;
            };
            if p.running || p.queue.is_empty() {
                return;
            }
            p.running = true;
            (
                std::mem::take(&mut p.queue),
                object,
                p.merge_bound,
                p.generation,
            )
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.run_prefetch(queue, object, merge_bound, generation)
                .await
        });
    }

    /// Fetch `queue` roughly in order: a window of the next missing chunks
    /// (up to [`PREFETCH_WINDOW_BYTES`] stored bytes) is sorted by position
    /// and the small gaps between its chunks are filled, so neighbouring
    /// small files become one range request; at most
    /// [`PREFETCH_REQUESTS`] requests are in flight, so the prefetcher
    /// never floods the backend. Stops early if the object goes away.
    async fn run_prefetch(
        self: Arc<Self>,
        queue: Vec<usize>,
        object: Arc<dyn CacheObject>,
        merge_bound: u64,
        generation: u64,
    ) {
        let started = std::time::Instant::now();
        let slots = Arc::new(tokio::sync::Semaphore::new(PREFETCH_REQUESTS));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut asked = 0usize;
        let mut k = 0;
        let current = |me: &Self| {
            me.prefetch
                .lock()
                .map(|p| p.generation == generation)
                .unwrap_or(false)
        };
        'windows: while k < queue.len() {
            let mut window: Vec<usize> = Vec::new();
            let mut bytes = 0u64;
            while k < queue.len() && bytes < PREFETCH_WINDOW_BYTES {
                let i = queue[k];
                if !self.is_fetched(i) {
                    window.push(i);
                    bytes += u64::from(self.chunks[i].compressed_size);
                }
                k += 1;
            }
            for run in self.runs(&self.fill_small_gaps(window), merge_bound) {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break 'windows;
                };
                if !current(&self) {
                    // Not asked for yet: back in the queue for the next object.
                    break 'windows;
                }
                asked += run.len();
                match self.start_inner(&run, &object, merge_bound, Why::Speculative) {
                    Ok(waits) => {
                        let me = Arc::clone(&self);
                        let failed = Arc::clone(&failed);
                        tokio::spawn(async move {
                            failed.fetch_add(me.wait_count_failed(waits).await, Ordering::Relaxed);
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(blob = %self.digest, "prefetch stopped: {e}");
                        break 'windows;
                    }
                }
            }
        }
        // Wait for the last requests.
        let _ = slots.acquire_many(PREFETCH_REQUESTS as u32).await;
        let stopped = !current(&self);
        if let Ok(mut p) = self.prefetch.lock() {
            if stopped {
                // Whatever was not fetched is queued again, in order.
                let mut rest: Vec<usize> =
                    queue.into_iter().filter(|&i| !self.is_fetched(i)).collect();
                rest.append(&mut p.queue);
                p.queue = rest;
            }
            p.running = false;
        }
        tracing::info!(
            blob = %self.digest,
            chunks = asked,
            failed = failed.load(Ordering::Relaxed),
            stopped,
            secs = started.elapsed().as_secs_f64(),
            "prefetch done"
        );
        // Chunks queued meanwhile (another image's profile).
        if !stopped {
            self.kick_prefetch();
        }
    }

    /// Split sorted chunk indexes into runs of adjacent chunks that one
    /// request can fetch (contiguous stored bytes, at most `merge_bound`).
    fn runs(&self, sorted: &[usize], merge_bound: u64) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for &i in sorted {
            let c = &self.chunks[i];
            let joins = out.last().is_some_and(|run| {
                let (first, last) = (&self.chunks[run[0]], &self.chunks[run[run.len() - 1]]);
                run[run.len() - 1] + 1 == i
                    && last.compressed_offset + u64::from(last.compressed_size)
                        == c.compressed_offset
                    && c.compressed_offset + u64::from(c.compressed_size) - first.compressed_offset
                        <= merge_bound
            });
            match out.last_mut() {
                Some(run) if joins => run.push(i),
                _ => out.push(vec![i]),
            }
        }
        out
    }

    /// Sort `window` and add the missing chunks lying in gaps of at most
    /// [`PREFETCH_GAP_BYTES`] stored bytes between two of its chunks: a few
    /// bytes more on the wire instead of one more request.
    fn fill_small_gaps(&self, mut window: Vec<usize>) -> Vec<usize> {
        window.sort_unstable();
        window.dedup();
        let Ok(fetched) = self.fetched.lock() else {
            return window;
        };
        let mut out: Vec<usize> = Vec::with_capacity(window.len());
        for &i in &window {
            if let Some(&prev) = out.last() {
                let (p, c) = (&self.chunks[prev], &self.chunks[i]);
                let gap = c
                    .compressed_offset
                    .saturating_sub(p.compressed_offset + u64::from(p.compressed_size));
                if i > prev + 1 && gap <= PREFETCH_GAP_BYTES {
                    out.extend((prev + 1..i).filter(|&j| !fetched[j]));
                }
            }
            out.push(i);
        }
        out
    }

    /// Wait for `waits`; how many failed (prefetch failures are only
    /// counted: a reader that needs the chunk fetches it again).
    async fn wait_count_failed(&self, waits: Waits) -> usize {
        let mut failed = 0;
        for (i, mut rx) in waits {
            let ok = matches!(
                rx.wait_for(|o| o.is_some()).await.map(|v| v.clone()),
                Ok(Some(Ok(())))
            );
            if ok {
                self.prefetched_chunks.fetch_add(1, Ordering::Relaxed);
            } else {
                failed += 1;
                tracing::debug!(blob = %self.digest, chunk = i, "prefetch of a chunk failed");
            }
        }
        failed
    }

    /// Record a non-sequential miss on a small file's chunk `at`; true if
    /// it continues a burst (another such miss nearby, moments ago).
    fn small_burst(&self, at: usize) -> bool {
        let Ok(mut last) = self.last_small_miss.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        let burst = last.is_some_and(|(t, c)| {
            now.duration_since(t) < BURST_WINDOW && at.abs_diff(c) <= BURST_DISTANCE
        });
        *last = Some((now, at));
        burst
    }

    /// Whether chunk `i` is a full-size chunk (so most likely not the last
    /// chunk of its file). Small files' chunks never are.
    fn is_full(&self, i: usize) -> bool {
        self.full_chunk >= 64 << 10
            && self.chunks.get(i).map(|c| c.uncompressed_size) == Some(self.full_chunk)
    }

    /// Add the chunks an image references to the needed set (the union
    /// over the images using this blob).
    pub fn add_needed(&self, chunks: &[usize]) {
        // Lock order: fetched, then needed (as in mark_fetched).
        let Ok(fetched) = self.fetched.lock() else {
            return;
        };
        if let Ok(mut n) = self.needed.lock() {
            let set = n.get_or_insert_with(|| vec![false; self.chunks.len()]);
            for &i in chunks {
                if let Some(b) = set.get_mut(i) {
                    *b = true;
                }
            }
            self.recount_needed_missing(set, &fetched);
        }
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
        self.fetched
            .lock()
            .map(|f| f.get(i).copied().unwrap_or(false))
            .unwrap_or(false)
    }

    /// Whether every chunk is on disk.
    pub fn is_complete(&self) -> bool {
        self.fetched_chunks.load(Ordering::Relaxed) as usize == self.chunks.len()
    }

    /// The fetched bitmap (for persistence and status).
    pub fn fetched_map(&self) -> Vec<bool> {
        self.fetched.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Restore a persisted bitmap (lengths must match).
    pub fn restore_fetched(&self, map: &[bool]) {
        if let Ok(mut f) = self.fetched.lock() {
            if map.len() == f.len() {
                f.copy_from_slice(map);
                // Counters follow the map exactly.
                let n = map.iter().filter(|&&b| b).count() as u64;
                let bytes: u64 = map
                    .iter()
                    .zip(&self.chunks)
                    .filter(|(b, _)| **b)
                    .map(|(_, c)| c.uncompressed_size as u64)
                    .sum();
                self.fetched_chunks.store(n, Ordering::Relaxed);
                self.fetched_bytes.store(bytes, Ordering::Relaxed);
                if let Ok(needed) = self.needed.lock() {
                    if let Some(set) = needed.as_ref() {
                        self.recount_needed_missing(set, &f);
                    }
                }
            }
        }
    }

    /// Make chunks `want` present in `object`'s cache file. Returns the
    /// first failure (naming blob and chunk) if any chunk could not be.
    pub async fn ensure(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) -> Result<(), String> {
        let waits = self.start(want, object, merge_bound)?;
        self.wait(waits).await
    }

    /// Wait for the outcome of every chunk in `waits`; the first failure.
    pub async fn wait(&self, waits: Waits) -> Result<(), String> {
        let mut first_err = None;
        for (i, mut rx) in waits {
            let r = match rx.wait_for(|o| o.is_some()).await {
                Ok(v) => v.clone().unwrap_or_else(|| Err("no outcome".into())),
                Err(_) => Err(format!(
                    "blob {} chunk {i}: fetch task ended without an outcome",
                    self.digest
                )),
            };
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Readahead window for a reader at chunk `at`: the configured
    /// readahead, growing with the run of fetched chunks just behind `at`
    /// (a long sequential scan gets a deeper pipeline, so decoding runs on
    /// every core) up to 8 times the configured value. Random readers never
    /// build a run and keep the small window.
    fn window(&self, fetched: &[bool], at: usize) -> usize {
        let cap = self.readahead * READAHEAD_GROWTH;
        let run = (0..cap.min(at))
            .take_while(|k| fetched.get(at - 1 - k) == Some(&true))
            .count();
        self.readahead.max(run)
    }

    /// The (exclusive) end of the readahead window after chunk `last` for
    /// a reader whose run ends at `run_at`: `window` chunks, and at least
    /// as many bytes as that many full-size chunks, so a sequential pass
    /// over small files fetches as far ahead as one over a large file (at
    /// most [`WINDOW_MAX_CHUNKS`] chunks).
    fn window_end(&self, fetched: &[bool], last: usize, run_at: usize) -> usize {
        let n = self.window(fetched, run_at);
        let want_bytes = n as u64 * u64::from(self.full_chunk);
        let (mut i, mut count, mut bytes) = (last + 1, 0usize, 0u64);
        while i < self.chunks.len()
            && count < WINDOW_MAX_CHUNKS
            && (count < n || bytes < want_bytes)
        {
            bytes += u64::from(self.chunks[i].uncompressed_size);
            count += 1;
            i += 1;
        }
        i
    }

    /// Keep a sequential reader's window full: the reader is at `at` (data
    /// present), so start fetching the chunks after it that are neither
    /// present nor in flight, up to `readahead` ahead. Nothing waits on
    /// these fetches.
    pub fn read_ahead_from(
        self: &Arc<Self>,
        at: usize,
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) {
        if self.readahead == 0 || self.is_profiled(at) {
            return;
        }
        let next: Vec<usize> = {
            // Lock order everywhere: failed, inflight, fetched.
            let Ok(inflight) = self.inflight.lock() else {
                return;
            };
            let Ok(fetched) = self.fetched.lock() else {
                return;
            };
            let end = self.window_end(&fetched, at, at);
            (at + 1..end)
                .filter(|&i| !fetched[i] && !inflight.contains_key(&(i, object.target())))
                .collect()
        };
        if !next.is_empty() {
            if let Err(e) = self.start_inner(&next, object, merge_bound, Why::Speculative) {
                tracing::debug!(blob = %self.digest, "readahead: {e}");
            }
        }
    }

    /// Start fetches for the chunks of `want` that are not in flight (and
    /// did not just fail), merging adjacent ones and adding sequential
    /// readahead; returns one receiver per chunk of `want` (readahead
    /// chunks are not waited on). Does not wait, so a batch of READs can be
    /// planned together and each READ then waits only for its own chunks.
    pub fn start(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) -> Result<Waits, String> {
        self.start_inner(want, object, merge_bound, Why::Demand)
    }

    fn start_inner(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
        why: Why,
    ) -> Result<Waits, String> {
        let target = object.target();
        let mut waits: Waits = Vec::new();
        let mut to_fetch: Vec<usize> = Vec::new();
        let mut wanted: Vec<usize> = want.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        {
            let poisoned = || format!("blob {}: state lock poisoned", self.digest);
            let failed = self.failed.lock().map_err(|_| poisoned())?;
            let mut inflight = self.inflight.lock().map_err(|_| poisoned())?;
            for &i in &wanted {
                if i >= self.chunks.len() {
                    return Err(format!("blob {}: chunk {i} does not exist", self.digest));
                }
                if let Some(rx) = inflight.get(&(i, target)) {
                    waits.push((i, rx.clone()));
                } else if let Some((_, why)) = failed
                    .get(&i)
                    .filter(|(t, _)| t.elapsed() < FAILURE_TTL.min(self.timeout))
                {
                    let (_tx, rx) = watch::channel(Some(Err(format!(
                        "{why} (failed recently, not retried yet)"
                    ))));
                    waits.push((i, rx));
                } else {
                    to_fetch.push(i);
                }
            }
            drop(failed);
            to_fetch.sort_unstable();
            to_fetch.dedup();
            // Sequential readahead: a miss right after a fetched chunk.
            // A profiled chunk: the prefetcher knows what comes next.
            let profiled = want.iter().max().is_some_and(|&l| self.is_profiled(l));
            if why == Why::Demand && self.readahead > 0 && !profiled {
                if let (Some(&first), Some(&last)) = (want.iter().min(), want.iter().max()) {
                    // Lock order: failed, inflight, fetched (no copy of the map).
                    let fetched = self.fetched.lock().map_err(|_| poisoned())?;
                    let sequential = first > 0
                        && (fetched.get(first - 1) == Some(&true)
                            || inflight.contains_key(&(first - 1, target)));
                    if sequential {
                        let end = self.window_end(&fetched, last, first);
                        for (i, done) in fetched.iter().enumerate().take(end).skip(last + 1) {
                            if !done
                                && !inflight.contains_key(&(i, target))
                                && !to_fetch.contains(&i)
                            {
                                to_fetch.push(i);
                            }
                        }
                    } else if !self.is_full(last) && self.small_burst(last) {
                        // A burst of misses on small files near each other
                        // (an interpreter importing a package): fetch the
                        // small files that follow in the same request, so
                        // the next imports are hits. One isolated small
                        // read still fetches just its chunk.
                        let mut bytes = 0u64;
                        let mut i = last + 1;
                        while i < self.chunks.len()
                            && i <= last + BURST_MAX_CHUNKS
                            && bytes < BURST_MAX_BYTES
                            && !self.is_full(i)
                        {
                            if !fetched[i]
                                && !inflight.contains_key(&(i, target))
                                && !to_fetch.contains(&i)
                            {
                                to_fetch.push(i);
                                bytes += u64::from(self.chunks[i].compressed_size);
                            }
                            i += 1;
                        }
                    } else if self.is_full(last) {
                        // A miss inside a large file (a full-size chunk),
                        // e.g. a page fault in a mapped library: fetch the
                        // next chunks of that file too, up to the readahead
                        // and up to its tail (the first short chunk), so a
                        // run of faults costs one round trip, not one each.
                        let mut i = last + 1;
                        let mut added = 0;
                        while i < self.chunks.len() && added < self.readahead {
                            if !fetched[i]
                                && !inflight.contains_key(&(i, target))
                                && !to_fetch.contains(&i)
                            {
                                to_fetch.push(i);
                                added += 1;
                            }
                            if !self.is_full(i) {
                                break;
                            }
                            i += 1;
                        }
                    }
                }
            }
            // Group into runs of adjacent chunks within the merge bound.
            let mut start = 0;
            while start < to_fetch.len() {
                let mut end = start + 1;
                let first = &self.chunks[to_fetch[start]];
                while end < to_fetch.len() {
                    let prev = &self.chunks[to_fetch[end - 1]];
                    let next = &self.chunks[to_fetch[end]];
                    let adjacent = to_fetch[end] == to_fetch[end - 1] + 1
                        && next.compressed_offset
                            == prev.compressed_offset + prev.compressed_size as u64;
                    let span = next.compressed_offset + next.compressed_size as u64
                        - first.compressed_offset;
                    if !adjacent || span > merge_bound {
                        break;
                    }
                    end += 1;
                }
                let run: Vec<usize> = to_fetch[start..end].to_vec();
                let mut senders = Vec::new();
                let mut requested = Vec::new();
                for &i in &run {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert((i, target), rx.clone());
                    let asked = wanted.binary_search(&i).is_ok();
                    if asked {
                        waits.push((i, rx));
                    }
                    requested.push(asked && why == Why::Demand);
                    senders.push(tx);
                }
                let me = Arc::clone(self);
                let obj = Arc::clone(object);
                tokio::spawn(async move { me.fetch_run(run, requested, senders, obj).await });
                start = end;
            }
        }
        Ok(waits)
    }

    /// Fetch chunks `run` (adjacent in the stored blob) in one request,
    /// verify each, write each into the cache, publish each outcome.
    async fn fetch_run(
        self: Arc<Self>,
        run: Vec<usize>,
        requested: Vec<bool>,
        senders: Vec<watch::Sender<Outcome>>,
        object: Arc<dyn CacheObject>,
    ) {
        let first = self.chunks[run[0]];
        let last = self.chunks[*run.last().expect("non-empty run")];
        let start = first.compressed_offset;
        let end = last.compressed_offset + last.compressed_size as u64;
        let t0 = std::time::Instant::now();
        let fetched =
            match tokio::time::timeout(self.timeout, self.backend.fetch(self.digest, start..end))
                .await
            {
                Ok(Ok(b)) if b.len() as u64 != end - start => Err(FetchError::Failed {
                    blob: self.digest,
                    start,
                    end,
                    why: format!("backend returned {} bytes", b.len()),
                }),
                Ok(r) => r,
                Err(_) => Err(FetchError::Timeout {
                    blob: self.digest,
                    start,
                    end,
                    secs: self.timeout.as_secs(),
                }),
            };
        crate::metrics::record_fetch(
            self.backend.kind(),
            t0.elapsed().as_secs_f64(),
            match &fetched {
                Ok(b) => crate::metrics::FetchOutcome::Ok(b.len() as u64),
                Err(FetchError::Timeout { .. }) => crate::metrics::FetchOutcome::Timeout,
                Err(_) => crate::metrics::FetchOutcome::Error,
            },
        );
        let target = object.target();
        // Decode every chunk of the run on the blocking pool, and write
        // each into the cache as soon as it is decoded: decodes and writes
        // of the run overlap; outcomes are published in the run's order.
        let jobs: Vec<_> = run
            .iter()
            .map(|&i| {
                let rec = self.chunks[i];
                let digest = self.digest;
                let part = fetched.as_ref().ok().map(|bytes| {
                    let off = (rec.compressed_offset - start) as usize;
                    bytes.slice(off..off + rec.compressed_size as usize)
                });
                let decode =
                    tokio::task::spawn_blocking(move || -> Result<AlignedBuf, (bool, String)> {
                        let stored = part.ok_or((false, String::new()))?;
                        // Decode straight into the page-aligned buffer whose
                        // padded extent is written to the cache: the decoder
                        // fills the head, the padding is zero.
                        let n = rec.uncompressed_size as usize;
                        let mut buf = AlignedBuf::with_zero_tail(align4k(n as u64) as usize, n);
                        with_decoder(|dec| {
                            dec.decode_into(digest, i, &rec, &stored, buf.as_mut_slice())
                                .map_err(|e| (true, e.to_string()))
                        })?;
                        Ok(buf)
                    });
                let object = Arc::clone(&object);
                tokio::spawn(async move {
                    match decode.await {
                        Err(e) => ChunkStep::Task(e.to_string()),
                        Ok(Err((corrupt, why))) => ChunkStep::Decode { corrupt, why },
                        Ok(Ok(buf)) => match object.write_at(rec.uncompressed_offset, buf).await {
                            Ok(()) => ChunkStep::Written,
                            Err(e) => ChunkStep::Write(e.to_string()),
                        },
                    }
                })
            })
            .collect();
        let mut guard = RunGuard {
            blob: Arc::clone(&self),
            target,
            pending: run.iter().copied().zip(senders).rev().collect(),
        };
        for ((&i, job), asked) in run.iter().zip(jobs).zip(requested) {
            // `remote`: the backend or its bytes were at fault (worth
            // remembering); otherwise the fault is local.
            let step = job.await.unwrap_or_else(|e| ChunkStep::Task(e.to_string()));
            let (outcome, remote) = match (&fetched, step) {
                (Err(e), _) => (Err(e.to_string()), true),
                (Ok(_), ChunkStep::Task(e)) => (
                    Err(format!(
                        "blob {} chunk {i}: decode or write task: {e}",
                        self.digest
                    )),
                    false,
                ),
                (Ok(_), ChunkStep::Decode { corrupt, why }) => {
                    if corrupt {
                        self.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::record_corrupt();
                        tracing::warn!(blob = %self.digest, chunk = i, "refusing corrupt chunk: {why}");
                    }
                    (Err(why), corrupt)
                }
                (Ok(_), ChunkStep::Written) => {
                    self.mark_fetched(i);
                    (Ok(()), false)
                }
                (Ok(_), ChunkStep::Write(e)) => (
                    Err(format!(
                        "blob {} chunk {i}: writing the cache: {e}",
                        self.digest
                    )),
                    false,
                ),
            };
            if let Ok(mut failed) = self.failed.lock() {
                match &outcome {
                    Ok(()) => {
                        failed.remove(&i);
                    }
                    // Only requested chunks: a readahead failure must not
                    // fail a later read that would have succeeded.
                    Err(why) if remote && asked => {
                        failed.insert(i, (std::time::Instant::now(), why.clone()));
                    }
                    Err(_) => {}
                }
            }
            if let Ok(mut inflight) = self.inflight.lock() {
                inflight.remove(&(i, target));
            }
            if let Some((j, tx)) = guard.pending.pop() {
                debug_assert_eq!(j, i, "answers follow the run's order");
                let _ = tx.send(Some(outcome));
            }
        }
    }

    fn mark_fetched(&self, i: usize) {
        if let Ok(mut f) = self.fetched.lock() {
            if !f[i] {
                f[i] = true;
                self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes
                    .fetch_add(self.chunks[i].uncompressed_size as u64, Ordering::Relaxed);
                if let Ok(needed) = self.needed.lock() {
                    if needed.as_ref().and_then(|n| n.get(i)) == Some(&true) {
                        self.needed_missing.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}
