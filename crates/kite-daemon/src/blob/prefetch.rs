//! The prefetcher: profile chunks (and, for `kite pull` and `kite mount
//! --prefetch all`, every missing chunk after them) queued per blob,
//! fetched in the background into the last cache object the kernel path
//! handed over, a bounded number of range requests at a time, and none
//! started while a fetch a reader waits for is in flight (readers first).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kite_kernel::cachefiles::CacheObject;

use super::fetch::Waits;
use super::plan::{self, Reason};
use super::BlobState;

/// Prefetch fetches: windows of the queue of at most this many stored
/// bytes are sorted, gaps of at most this many stored bytes between
/// profile chunks are fetched too, and the requests in flight span at
/// most PREFETCH_INFLIGHT_BYTES, each counted as at least
/// PREFETCH_MIN_COST: 4 requests of 4 MiB, or up to 32 small ones (a
/// profile of scattered 64 KiB ELF chunks is many small runs, and one
/// round trip each would leave the link idle).
const PREFETCH_WINDOW_BYTES: u64 = 4 << 20;
const PREFETCH_GAP_BYTES: u64 = 32 << 10;
const PREFETCH_INFLIGHT_BYTES: u64 = 16 << 20;
const PREFETCH_MIN_COST: u64 = 512 << 10;

/// The background queue (every other chunk): one request at a time of at
/// most this span, and how long readers must have fetched nothing before
/// one starts, so a reader's fetch waits behind at most one small request.
const BACKGROUND_MAX_BYTES: u64 = 1 << 20;
const BACKGROUND_IDLE: std::time::Duration = std::time::Duration::from_millis(300);

/// Profile prefetchers running on this node (any blob): the background
/// waits for them too, since a profile is what the readers read next.
static PROFILE_PREFETCHERS: AtomicUsize = AtomicUsize::new(0);

/// Counts a running profile prefetcher while it lives.
struct ProfilePrefetcher;

impl ProfilePrefetcher {
    fn start() -> Self {
        PROFILE_PREFETCHERS.fetch_add(1, Ordering::Relaxed);
        ProfilePrefetcher
    }
}

impl Drop for ProfilePrefetcher {
    fn drop(&mut self) {
        PROFILE_PREFETCHERS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BlobState {
    /// Queue profile chunks (in profile order) for prefetching, each chunk
    /// once; they are fetched as soon as a cache object for this blob is
    /// available ([`BlobState::object_available`]). Returns how many were
    /// new.
    pub fn queue_prefetch(self: &Arc<Self>, chunks: &[usize]) -> usize {
        let added = {
            let mut st = self.lock();
            let p = &mut st.prefetch;
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
        let missing: Vec<usize> = {
            let mut st = self.lock();
            let missing: Vec<usize> = (0..self.chunks.len())
                .filter(|&i| st.needed.as_ref().is_none_or(|n| n[i]) && !st.fetched[i])
                .collect();
            st.prefetch.background = missing.clone();
            missing
        };
        self.kick_prefetch();
        (missing.first().copied(), missing.len())
    }

    /// The cache object the kernel path last handed over, while usable
    /// (a peer's request for missing chunks is fetched into it).
    pub fn held_object(&self) -> Option<Arc<dyn CacheObject>> {
        self.lock().prefetch.object.clone()
    }

    /// Make the kernel path hand this blob a cache object without a
    /// mount, by poking its local data at chunk `chunk` (fanotify: a
    /// one-byte read through a fresh descriptor, which raises an event this
    /// daemon answers). The read waits for that answer, so it runs on a
    /// plain thread, not the blocking pool: a worker told to stop must not
    /// wait for it (the next worker answers the event; the thread dies
    /// with us). Waits at most `limit`.
    pub async fn request_object(
        &self,
        chunk: usize,
        limit: std::time::Duration,
    ) -> Result<(), String> {
        let Some(local) = self.local_reader() else {
            return Err("this node cannot read the blob's cache directly".into());
        };
        let at = self.chunk_offset(chunk);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(local.poke(at));
        });
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) | Err(_) => Err("no answer in time".into()),
        }
    }

    /// Whether the prefetcher can write into this blob's cache object now.
    pub fn has_object(&self) -> bool {
        self.lock().prefetch.object.is_some()
    }

    /// Whether reads of chunk `i` should add no speculation: a profile
    /// lists it, so the prefetcher brings (or brought) what the workload
    /// reads next. Other chunks of the blob keep readahead.
    pub(super) fn is_profiled(&self, i: usize) -> bool {
        self.lock()
            .prefetch
            .profiled
            .get(i)
            .copied()
            .unwrap_or(false)
    }

    /// A cache object for this blob can be written now (the kernel opened
    /// it, or an event handed the daemon a file to fill): remember it (it
    /// is built only if none is held, outside the lock) and start the
    /// prefetcher if profile chunks are queued.
    pub fn object_available(
        self: &Arc<Self>,
        object: impl FnOnce() -> Arc<dyn CacheObject>,
        merge_bound: u64,
    ) {
        if !self.has_object() {
            let built = object();
            let mut st = self.lock();
            if st.prefetch.object.is_none() {
                st.prefetch.object = Some(built);
                st.prefetch.merge_bound = merge_bound;
            }
        }
        self.kick_prefetch();
    }

    /// The kernel closed cache object `target` (or the blob is being
    /// forgotten, `None`): stop writing into it; a running prefetcher
    /// stops and puts what it had not asked for back in the queue.
    pub fn object_gone(&self, target: Option<u64>) {
        let mut st = self.lock();
        let p = &mut st.prefetch;
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

    /// Start the prefetcher if there is work, an object and none running.
    fn kick_prefetch(self: &Arc<Self>) {
        let (queue, object, merge_bound, generation, background) = {
            let mut st = self.lock();
            let p = &mut st.prefetch;
            let Some(object) = p.object.clone() else {
                return;
            };
            if p.running || (p.queue.is_empty() && p.background.is_empty()) {
                return;
            }
            p.running = true;
            // The profile first; the background only once it is done.
            let background = p.queue.is_empty();
            let queue = if background {
                std::mem::take(&mut p.background)
            } else {
                std::mem::take(&mut p.queue)
            };
            (queue, object, p.merge_bound, p.generation, background)
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.run_prefetch(queue, object, merge_bound, generation, background)
                .await
        });
    }

    /// Fetch `queue` roughly in order: a window of the next missing chunks
    /// (up to [`PREFETCH_WINDOW_BYTES`] stored bytes) is sorted by position
    /// and the small gaps between its chunks are filled, so neighbouring
    /// small files become one range request; the requests in flight are
    /// bounded (see [`PREFETCH_INFLIGHT_BYTES`]), so the prefetcher never
    /// floods the backend. Stops early if the object goes away.
    async fn run_prefetch(
        self: Arc<Self>,
        queue: Vec<usize>,
        object: Arc<dyn CacheObject>,
        merge_bound: u64,
        generation: u64,
        background: bool,
    ) {
        let started = std::time::Instant::now();
        let _profile = (!background).then(ProfilePrefetcher::start);
        // In-flight budget in KiB; a run costs its stored span, at least
        // the minimum cost and at most the budget.
        let (budget, min_cost, merge_bound) = if background {
            let b = merge_bound.min(BACKGROUND_MAX_BYTES);
            (b, b, b)
        } else {
            (PREFETCH_INFLIGHT_BYTES, PREFETCH_MIN_COST, merge_bound)
        };
        let kib = |b: u64| u32::try_from(b.div_ceil(1024)).unwrap_or(u32::MAX);
        let slots = Arc::new(tokio::sync::Semaphore::new(kib(budget) as usize));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut asked = 0usize;
        let mut k = 0;
        let current = |me: &Self| me.lock().prefetch.generation == generation;
        'windows: while k < queue.len() {
            let runs = {
                let st = self.lock();
                let mut window: Vec<usize> = Vec::new();
                let mut bytes = 0u64;
                while k < queue.len() && bytes < PREFETCH_WINDOW_BYTES {
                    let i = queue[k];
                    if !st.fetched[i] {
                        window.push(i);
                        bytes += u64::from(self.chunks[i].compressed_size);
                    }
                    k += 1;
                }
                let filled =
                    plan::fill_small_gaps(&self.chunks, &st.fetched, window, PREFETCH_GAP_BYTES);
                plan::split_runs(&self.chunks, &filled, merge_bound)
            };
            for run in runs {
                let span = match (run.first(), run.last()) {
                    (Some(&a), Some(&b)) => {
                        let (a, b) = (&self.chunks[a], &self.chunks[b]);
                        b.compressed_offset + u64::from(b.compressed_size) - a.compressed_offset
                    }
                    _ => 0,
                };
                let cost = kib(span.clamp(min_cost, budget));
                let Ok(permit) = Arc::clone(&slots).acquire_many_owned(cost).await else {
                    break 'windows;
                };
                // Readers first: no new prefetch run while a fetch a
                // reader waits for is in flight; the background also waits
                // until readers have fetched nothing for a moment and no
                // profile is being prefetched.
                let idle = if background {
                    BACKGROUND_IDLE
                } else {
                    std::time::Duration::ZERO
                };
                let profiles = || background && PROFILE_PREFETCHERS.load(Ordering::Relaxed) > 0;
                while (super::fetch::demand_runs() > 0
                    || super::fetch::demand_idle() < idle
                    || profiles())
                    && current(&self)
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                if !current(&self) {
                    // Not asked for yet: back in the queue for the next object.
                    break 'windows;
                }
                asked += run.len();
                match self.start_reason(&run, &object, merge_bound, Reason::Prefetch, background) {
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
        let _ = slots.acquire_many(kib(budget)).await;
        let stopped = !current(&self);
        {
            let mut st = self.lock();
            if stopped {
                // Whatever was not fetched is queued again, in order.
                let mut rest: Vec<usize> = queue.into_iter().filter(|&i| !st.fetched[i]).collect();
                let q = if background {
                    &mut st.prefetch.background
                } else {
                    &mut st.prefetch.queue
                };
                rest.append(q);
                *q = rest;
            }
            st.prefetch.running = false;
        }
        tracing::info!(
            blob = %self.digest,
            chunks = asked,
            background,
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
}
