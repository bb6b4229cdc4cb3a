//! Starting fetches and carrying them out: a plan's runs become one task
//! each, which fetches the run's stored bytes in one range request,
//! decodes and verifies each chunk on the blocking pool, writes it into
//! the cache object, and publishes its outcome to every waiter.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use kite_format::{align4k, ChunkDecoder, Digest};
use kite_kernel::cachefiles::CacheObject;
use kite_kernel::uring::AlignedBuf;
use tokio::sync::watch;

use super::plan::{self, Reason};
use super::{BlobState, Outcome};
use crate::backend::FetchError;

/// How long a failed chunk is answered from the negative cache.
pub const FAILURE_TTL: Duration = Duration::from_secs(2);

/// Fetch runs in flight that a reader waits for (demand), across the
/// process: the prefetcher starts no new run while there are any, so
/// readers get the bandwidth first and the background uses what is left.
static DEMAND_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// When a demand run last started or ended (ms on a process clock).
static LAST_DEMAND_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Demand runs in flight now.
pub fn demand_runs() -> usize {
    DEMAND_RUNS.load(Ordering::Relaxed)
}

/// How long no demand run has been in flight (zero while one is).
pub fn demand_idle() -> Duration {
    if demand_runs() > 0 {
        return Duration::ZERO;
    }
    let last = LAST_DEMAND_MS.load(Ordering::Relaxed);
    if last == 0 {
        return Duration::MAX;
    }
    Duration::from_millis(clock_ms().saturating_sub(last))
}

/// Counts one demand run for as long as it lives.
struct DemandRun;

impl DemandRun {
    fn start() -> Self {
        DEMAND_RUNS.fetch_add(1, Ordering::Relaxed);
        LAST_DEMAND_MS.store(clock_ms(), Ordering::Relaxed);
        DemandRun
    }
}

impl Drop for DemandRun {
    fn drop(&mut self) {
        LAST_DEMAND_MS.store(clock_ms(), Ordering::Relaxed);
        DEMAND_RUNS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a READ waits on: one receiver per chunk it needs.
pub type Waits = Vec<(usize, watch::Receiver<Outcome>)>;

/// Why a chunk is not in the cache. Cloneable: one outcome goes to every
/// request waiting for the chunk.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChunkError {
    /// The backend failed or timed out (names blob and byte range).
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The stored bytes did not decode to the chunk's sha256 (the decoder's
    /// message names blob and chunk).
    #[error("{why}")]
    Corrupt { why: String },
    /// Decoding could not run (no decoder, a task died).
    #[error("blob {blob} chunk {chunk}: {why}")]
    Local {
        blob: Digest,
        chunk: usize,
        why: String,
    },
    /// Writing the decoded chunk into the cache failed.
    #[error("blob {blob} chunk {chunk}: writing the cache: {why}")]
    Write {
        blob: Digest,
        chunk: usize,
        why: String,
    },
    /// The fetch task ended before answering (it panicked or was dropped).
    #[error("blob {blob} chunk {chunk}: fetch task ended without an outcome")]
    Lost { blob: Digest, chunk: usize },
    /// The request named a chunk the blob does not have.
    #[error("blob {blob}: chunk {chunk} does not exist")]
    NoSuchChunk { blob: Digest, chunk: usize },
    /// A batch was asked for a chunk it did not plan.
    #[error("blob {blob}: chunk {chunk} missing from the plan")]
    NotPlanned { blob: Digest, chunk: usize },
    /// The chunk failed remotely moments ago and is not tried again yet.
    #[error("{0} (failed recently, not retried yet)")]
    Recent(Box<ChunkError>),
}

impl ChunkError {
    /// Whether the remote side was at fault (the backend or its bytes):
    /// such failures of requested chunks are remembered for
    /// [`FAILURE_TTL`]; local ones are not.
    pub fn is_remote(&self) -> bool {
        matches!(self, ChunkError::Fetch(_) | ChunkError::Corrupt { .. })
    }
}

/// How one chunk of a fetch run ended on the blocking pool and the writer.
enum ChunkStep {
    Written,
    Failed(ChunkError),
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
        if self.pending.is_empty() {
            return;
        }
        let mut st = self.blob.lock();
        for (i, tx) in self.pending.drain(..) {
            st.inflight.remove(&(i, self.target));
            let _ = tx.send(Some(Err(ChunkError::Lost {
                blob: self.blob.digest,
                chunk: i,
            })));
        }
    }
}

/// A batch of requests planned together: per blob, the receivers of every
/// chunk the batch needs (or why planning failed).
#[derive(Default)]
pub struct Batch {
    planned: std::collections::HashMap<
        Digest,
        Result<std::collections::HashMap<usize, watch::Receiver<Outcome>>, ChunkError>,
    >,
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
                .map(|waits| waits.into_iter().collect());
            if let Err(e) = &r {
                tracing::error!(blob = %blob.digest, "planning fetch: {e}");
            }
            b.planned.insert(blob.digest, r);
        }
        b
    }

    /// The receivers one request of the batch waits on.
    pub fn waits(&self, blob: &Digest, want: &[usize]) -> Result<Waits, ChunkError> {
        match self.planned.get(blob) {
            Some(Ok(by_chunk)) => want
                .iter()
                .map(|&i| {
                    by_chunk
                        .get(&i)
                        .map(|rx| (i, rx.clone()))
                        .ok_or(ChunkError::NotPlanned {
                            blob: *blob,
                            chunk: i,
                        })
                })
                .collect(),
            Some(Err(e)) => Err(e.clone()),
            None => Err(ChunkError::NotPlanned {
                blob: *blob,
                chunk: want.first().copied().unwrap_or(0),
            }),
        }
    }
}

/// Run `f` with this thread's chunk decoder (one zstd context per
/// blocking-pool thread instead of one per chunk).
fn with_decoder<T>(
    f: impl FnOnce(&mut ChunkDecoder) -> Result<T, ChunkStepError>,
) -> Result<T, ChunkStepError> {
    thread_local! {
        static DECODER: std::cell::RefCell<Option<ChunkDecoder>> = const { std::cell::RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(ChunkDecoder::new().map_err(|e| ChunkStepError::Local(e.to_string()))?);
        }
        match slot.as_mut() {
            Some(dec) => f(dec),
            None => Err(ChunkStepError::Local("no chunk decoder".into())),
        }
    })
}

/// Why decoding one chunk failed.
enum ChunkStepError {
    Chunk(ChunkError),
    /// No decoder (the blob and chunk are attached by the caller).
    Local(String),
}

impl From<ChunkError> for ChunkStepError {
    fn from(e: ChunkError) -> Self {
        ChunkStepError::Chunk(e)
    }
}

impl BlobState {
    /// Make chunks `want` present in `object`'s cache file. Returns the
    /// first failure (naming blob and chunk) if any chunk could not be.
    pub async fn ensure(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) -> Result<(), ChunkError> {
        let waits = self.start(want, object, merge_bound)?;
        self.wait(waits).await
    }

    /// Wait for the outcome of every chunk in `waits`; the first failure.
    pub async fn wait(&self, waits: Waits) -> Result<(), ChunkError> {
        let mut first_err = None;
        for (i, mut rx) in waits {
            let r = match rx.wait_for(|o| o.is_some()).await {
                Ok(v) => v.clone().unwrap_or(Err(ChunkError::Lost {
                    blob: self.digest,
                    chunk: i,
                })),
                Err(_) => Err(ChunkError::Lost {
                    blob: self.digest,
                    chunk: i,
                }),
            };
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Keep a sequential reader's window full: the reader is at `at` (data
    /// present), so start fetching the chunks after it that are neither
    /// present nor in flight. Nothing waits on these fetches.
    pub fn read_ahead_from(
        self: &Arc<Self>,
        at: usize,
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) {
        if self.readahead == 0 || self.is_profiled(at) {
            return;
        }
        if let Err(e) = self.start_reason(&[at], object, merge_bound, Reason::Readahead, false) {
            tracing::debug!(blob = %self.digest, "readahead: {e}");
        }
    }

    /// Start fetches for the chunks of `want` that are not in flight (and
    /// did not just fail), with the speculation the planner adds; returns
    /// one receiver per chunk of `want` (speculative chunks are not waited
    /// on). Does not wait, so a batch of READs can be planned together and
    /// each READ then waits only for its own chunks.
    pub fn start(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
    ) -> Result<Waits, ChunkError> {
        // A profiled chunk: the prefetcher knows what comes next.
        let speculate = !want.iter().max().is_some_and(|&l| self.is_profiled(l));
        self.start_reason(
            want,
            object,
            merge_bound,
            Reason::Demand { speculate },
            false,
        )
    }

    /// Plan under the lock, register the runs as in flight, and spawn one
    /// task per run after the lock is released. `idle`: decode on the
    /// SCHED_IDLE pool ([`crate::idle`]; the background prefetch).
    pub(super) fn start_reason(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
        reason: Reason,
        idle: bool,
    ) -> Result<Waits, ChunkError> {
        if let Some(&i) = want.iter().find(|&&i| i >= self.chunks.len()) {
            return Err(ChunkError::NoSuchChunk {
                blob: self.digest,
                chunk: i,
            });
        }
        let target = object.target();
        let mut wanted = want.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let ttl = FAILURE_TTL.min(self.timeout);
        let mut waits: Waits = Vec::new();
        let mut runs = Vec::new();
        {
            let mut st = self.lock();
            let recent_failure = |st: &super::Chunks, i: usize| {
                st.failed
                    .get(&i)
                    .filter(|(t, _)| t.elapsed() < ttl)
                    .map(|(_, e)| e.clone())
            };
            if reason != Reason::Readahead {
                for &i in &wanted {
                    if let Some(rx) = st.inflight.get(&(i, target)) {
                        waits.push((i, rx.clone()));
                    } else if let Some(e) = recent_failure(&st, i) {
                        let (_tx, rx) = watch::channel(Some(Err(ChunkError::Recent(Box::new(e)))));
                        waits.push((i, rx));
                    }
                }
            }
            let p = plan::plan(
                &self.chunks,
                &st.fetched,
                |i| st.inflight.contains_key(&(i, target)) || recent_failure(&st, i).is_some(),
                &Self::history(&st),
                &wanted,
                reason,
                &self.plan_config(merge_bound),
            );
            if let Some(c) = p.small_miss {
                st.last_small_miss = Some((Instant::now(), c));
            }
            let demand = matches!(reason, Reason::Demand { .. });
            for run in p.runs {
                let mut senders = Vec::with_capacity(run.len());
                let mut requested = Vec::with_capacity(run.len());
                for &i in &run {
                    let (tx, rx) = watch::channel(None);
                    st.inflight.insert((i, target), rx.clone());
                    let asked = wanted.binary_search(&i).is_ok();
                    if asked && reason != Reason::Readahead {
                        waits.push((i, rx));
                    }
                    requested.push(asked && demand);
                    senders.push(tx);
                }
                runs.push((run, requested, senders));
            }
        }
        for (run, requested, senders) in runs {
            let me = Arc::clone(self);
            let obj = Arc::clone(object);
            let demand = requested.iter().any(|&r| r).then(DemandRun::start);
            tokio::spawn(async move {
                me.fetch_run(run, requested, senders, obj, idle).await;
                drop(demand);
            });
        }
        Ok(waits)
    }

    /// Make chunks `run` (adjacent in the stored blob) present: those
    /// another blob on this node holds are copied from it (verified), the
    /// rest fetched with one request per contiguous part; each chunk is
    /// verified and written into the cache, and each outcome published.
    async fn fetch_run(
        self: Arc<Self>,
        run: Vec<usize>,
        requested: Vec<bool>,
        senders: Vec<watch::Sender<Outcome>>,
        object: Arc<dyn CacheObject>,
        idle: bool,
    ) {
        let target = object.target();
        // Armed first: whatever happens below, every chunk gets an answer.
        let mut guard = RunGuard {
            blob: Arc::clone(&self),
            target,
            pending: run.iter().copied().zip(senders).rev().collect(),
        };
        // 1. Local copies, written as soon as they are verified.
        let mut jobs: Vec<Option<tokio::task::JoinHandle<ChunkStep>>> = self
            .copy_local(&run)
            .await
            .into_iter()
            .zip(&run)
            .map(|(copy, &i)| copy.map(|buf| self.spawn_write(&object, i, Ok(buf))))
            .collect();
        // 2. From the blob's home peer, if the site has peers and another
        // node is the home: each stretch not copied is asked for at once,
        // and used only if every chunk of it verifies.
        if self.peers.is_some() {
            let parts = open_stretches(&jobs);
            let got = futures::future::join_all(
                parts
                    .iter()
                    .map(|p| self.fetch_from_peer(&run[p.clone()], idle)),
            )
            .await;
            for (p, bufs) in parts.into_iter().zip(got) {
                let Some(bufs) = bufs else { continue };
                for ((slot, &i), buf) in jobs[p.clone()].iter_mut().zip(&run[p]).zip(bufs) {
                    *slot = Some(self.spawn_write(&object, i, Ok(buf)));
                }
            }
        }
        // 3. The rest from the backend: consecutive chunks of the run are
        // contiguous in the stored blob, so each stretch is one request.
        // The requests run concurrently (a shared future each, driven by
        // its chunks' tasks), and each chunk is decoded and written as
        // soon as its stretch is in.
        for std::ops::Range { start: k, end: e } in open_stretches(&jobs) {
            let part = run[k..e].to_vec();
            let part_fetch = {
                let me = Arc::clone(&self);
                let part = part.clone();
                async move { me.fetch_stored(&part).await }.boxed().shared()
            };
            for (slot, &i) in jobs[k..e].iter_mut().zip(&part) {
                let rec = self.chunks[i];
                let digest = self.digest;
                let part_fetch = part_fetch.clone();
                let me = Arc::clone(&self);
                let object = Arc::clone(&object);
                *slot = Some(tokio::spawn(async move {
                    let (start, fetched) = part_fetch.await;
                    let stored = fetched.map(|bytes| {
                        let off = (rec.compressed_offset - start) as usize;
                        bytes.slice(off..off + rec.compressed_size as usize)
                    });
                    let decode = move || {
                        let stored = stored.map_err(ChunkError::Fetch)?;
                        // Decode straight into the page-aligned buffer
                        // whose padded extent is written to the cache: the
                        // decoder fills the head, the padding is zero.
                        let n = rec.uncompressed_size as usize;
                        let mut buf = AlignedBuf::with_zero_tail(align4k(n as u64) as usize, n);
                        with_decoder(|dec| {
                            dec.decode_into(digest, i, &rec, &stored, buf.as_mut_slice())
                                .map_err(|e| {
                                    ChunkStepError::Chunk(ChunkError::Corrupt {
                                        why: e.to_string(),
                                    })
                                })
                        })
                        .map_err(|e| match e {
                            ChunkStepError::Chunk(e) => e,
                            ChunkStepError::Local(why) => ChunkError::Local {
                                blob: digest,
                                chunk: i,
                                why,
                            },
                        })?;
                        Ok(buf)
                    };
                    let lost = |why: String| ChunkError::Local {
                        blob: digest,
                        chunk: i,
                        why: format!("decode task: {why}"),
                    };
                    let decoded = if idle {
                        crate::idle::run(decode)
                            .await
                            .unwrap_or_else(|e| Err(lost(e)))
                    } else {
                        tokio::task::spawn_blocking(decode)
                            .await
                            .unwrap_or_else(|e| Err(lost(e.to_string())))
                    };
                    me.write_step(&object, i, decoded).await
                }));
            }
        }
        // 4. Outcomes, in the run's order.
        let mut written = Vec::new();
        for ((&i, job), asked) in run.iter().zip(jobs).zip(requested) {
            let step = match job {
                Some(job) => job.await.unwrap_or_else(|e| {
                    ChunkStep::Failed(ChunkError::Local {
                        blob: self.digest,
                        chunk: i,
                        why: format!("write task: {e}"),
                    })
                }),
                None => ChunkStep::Failed(ChunkError::Lost {
                    blob: self.digest,
                    chunk: i,
                }),
            };
            let outcome = match step {
                ChunkStep::Written => Ok(()),
                ChunkStep::Failed(e) => {
                    if let ChunkError::Corrupt { why } = &e {
                        self.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::record_corrupt();
                        tracing::warn!(blob = %self.digest, chunk = i, "refusing corrupt chunk: {why}");
                    }
                    Err(e)
                }
            };
            {
                let mut st = self.lock();
                match &outcome {
                    Ok(()) => {
                        self.mark_fetched(&mut st, i);
                        st.failed.remove(&i);
                        written.push(i);
                    }
                    // Only requested chunks: a readahead failure must not
                    // fail a later read that would have succeeded.
                    Err(e) if e.is_remote() && asked => {
                        st.failed.insert(i, (Instant::now(), e.clone()));
                    }
                    Err(_) => {}
                }
                st.inflight.remove(&(i, target));
            }
            if let Some((j, tx)) = guard.pending.pop() {
                debug_assert_eq!(j, i, "answers follow the run's order");
                let _ = tx.send(Some(outcome));
            }
        }
        self.index_add(&written);
    }

    /// The stored bytes of `part` (adjacent chunks) from the backend, with
    /// the fetch deadline, and where they start in the stored blob.
    async fn fetch_stored(&self, part: &[usize]) -> (u64, Result<bytes::Bytes, FetchError>) {
        let (Some(&first), Some(&last)) = (part.first(), part.last()) else {
            return (0, Ok(bytes::Bytes::new()));
        };
        let (first, last) = (self.chunks[first], self.chunks[last]);
        let start = first.compressed_offset;
        let end = last.compressed_offset + u64::from(last.compressed_size);
        let t0 = Instant::now();
        let fetched =
            match tokio::time::timeout(self.timeout, self.backend.fetch(self.digest, start..end))
                .await
            {
                Ok(Ok(f)) if f.bytes.len() as u64 != end - start => Err(FetchError::Failed {
                    blob: self.digest,
                    start,
                    end,
                    why: format!("backend returned {} bytes", f.bytes.len()),
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
            match &fetched {
                Ok(f) => f.source,
                Err(_) => self.backend.kind(),
            },
            t0.elapsed().as_secs_f64(),
            match &fetched {
                Ok(f) => crate::metrics::FetchOutcome::Ok(f.bytes.len() as u64),
                Err(FetchError::Timeout { .. }) => crate::metrics::FetchOutcome::Timeout,
                Err(_) => crate::metrics::FetchOutcome::Error,
            },
        );
        (start, fetched.map(|f| f.bytes))
    }

    /// The content of chunks `part` (adjacent) from the blob's home peer,
    /// each verified against its sha256; `None` if there is no other home,
    /// the peer does not hold them, fails (it is then skipped for a
    /// while) or serves anything else (counted as corrupt, nothing kept).
    async fn fetch_from_peer(&self, part: &[usize], idle: bool) -> Option<Vec<AlignedBuf>> {
        use crate::peer::{Home, PeerMiss};
        let peers = self.peers.as_ref()?;
        let Home::Peer(addr) = peers.home(&self.digest)? else {
            return None;
        };
        let (first, last) = (self.chunks[*part.first()?], self.chunks[*part.last()?]);
        let start = first.uncompressed_offset;
        let end = last.uncompressed_offset + u64::from(last.uncompressed_size);
        let t0 = Instant::now();
        let body = match peers.fetch(addr, &self.digest, start..end).await {
            Ok(b) => b,
            Err(PeerMiss::NotThere(status)) => {
                tracing::debug!(blob = %self.digest, peer = %addr, %status, "peer miss; fetching from the backend");
                return None;
            }
            Err(PeerMiss::Failed(_)) => {
                crate::metrics::record_fetch(
                    "peer",
                    t0.elapsed().as_secs_f64(),
                    crate::metrics::FetchOutcome::Error,
                );
                return None;
            }
        };
        let recs: Vec<kite_format::ChunkRecord> = part.iter().map(|&i| self.chunks[i]).collect();
        let check = move || -> Result<Vec<AlignedBuf>, String> {
            recs.iter()
                .map(|rec| {
                    let off = rec
                        .uncompressed_offset
                        .checked_sub(start)
                        .map(|o| o as usize)
                        .filter(|&o| o + rec.uncompressed_size as usize <= body.len())
                        .ok_or_else(|| "chunk outside the answer".to_string())?;
                    let n = rec.uncompressed_size as usize;
                    let data = &body[off..off + n];
                    let got = Digest::of(data);
                    if got != rec.digest {
                        return Err(format!("chunk {} came as {}", rec.digest.oci(), got.oci()));
                    }
                    let mut buf = AlignedBuf::with_zero_tail(align4k(n as u64) as usize, n);
                    buf.as_mut_slice()[..n].copy_from_slice(data);
                    Ok(buf)
                })
                .collect()
        };
        let checked = if idle {
            crate::idle::run(check).await.unwrap_or_else(Err)
        } else {
            tokio::task::spawn_blocking(check)
                .await
                .unwrap_or_else(|e| Err(format!("verify task: {e}")))
        };
        match checked {
            Ok(bufs) => {
                let bytes = end - start;
                peers
                    .stats
                    .received_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                self.peer_chunks
                    .fetch_add(part.len() as u64, Ordering::Relaxed);
                self.peer_bytes.fetch_add(bytes, Ordering::Relaxed);
                crate::metrics::record_fetch(
                    "peer",
                    t0.elapsed().as_secs_f64(),
                    crate::metrics::FetchOutcome::Ok(bytes),
                );
                Some(bufs)
            }
            Err(why) => {
                tracing::warn!(blob = %self.digest, peer = %addr, "refusing a peer's answer: {why}");
                crate::metrics::record_corrupt();
                peers.corrupt(addr, &why);
                None
            }
        }
    }

    /// For each chunk of `run`, a verified copy of its content from
    /// another blob on this node, where the chunk index knows one. Reads
    /// run on the blocking pool; a copy whose sha256 is not the chunk's is
    /// dropped (and its index entry with it), so the chunk is fetched.
    async fn copy_local(&self, run: &[usize]) -> Vec<Option<AlignedBuf>> {
        let Some((index, slot)) = self.index.get() else {
            return run.iter().map(|_| None).collect();
        };
        let sources: Vec<_> = run
            .iter()
            .map(|&i| index.lookup(&self.chunks[i].digest, *slot))
            .collect();
        if sources.iter().all(Option::is_none) {
            return run.iter().map(|_| None).collect();
        }
        let recs: Vec<_> = run.iter().map(|&i| self.chunks[i]).collect();
        let me = self.digest;
        let index = Arc::clone(index);
        let copies = tokio::task::spawn_blocking(move || {
            recs.iter()
                .zip(sources)
                .map(|(rec, src)| {
                    let (src, j) = src?;
                    let reader = src.local.get()?;
                    let srec = src.chunks[j];
                    let n = rec.uncompressed_size as usize;
                    let mut buf = AlignedBuf::with_zero_tail(align4k(n as u64) as usize, n);
                    let res = if srec.uncompressed_size != rec.uncompressed_size {
                        Err("sizes differ".to_string())
                    } else {
                        match reader.read_at(srec.uncompressed_offset, &mut buf.as_mut_slice()[..n]) {
                            // The source cannot be read now (a cachefiles
                            // file in use has no name): fetch, keep the
                            // entry for later.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                tracing::debug!(blob = %me, source = %src.digest, "local copy unavailable: {e}");
                                return None;
                            }
                            r => r,
                        }
                        .map_err(|e| e.to_string())
                        .and_then(|()| {
                                let got = Digest::of(&buf.as_slice()[..n]);
                                if got == rec.digest {
                                    Ok(())
                                } else {
                                    Err(format!("content is {}", got.oci()))
                                }
                            })
                    };
                    match res {
                        Ok(()) => Some(buf),
                        Err(why) => {
                            tracing::warn!(
                                blob = %me,
                                source = %src.digest,
                                chunk = j,
                                "local copy of chunk {} not used, fetching it instead: {why}",
                                rec.digest
                            );
                            if let Some((_, src_slot)) = src.index.get() {
                                index.forget(&rec.digest, *src_slot);
                            }
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if copies.len() != run.len() {
            return run.iter().map(|_| None).collect();
        }
        let (n, bytes) = copies
            .iter()
            .zip(&recs_sizes(&self.chunks, run))
            .filter(|(c, _)| c.is_some())
            .fold((0u64, 0u64), |(n, b), (_, s)| (n + 1, b + s));
        if n > 0 {
            self.copied_chunks.fetch_add(n, Ordering::Relaxed);
            self.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
            crate::metrics::record_local_copy(bytes);
        }
        copies
    }

    /// Write chunk `i`'s verified content into the cache (a task).
    fn spawn_write(
        self: &Arc<Self>,
        object: &Arc<dyn CacheObject>,
        i: usize,
        buf: Result<AlignedBuf, ChunkError>,
    ) -> tokio::task::JoinHandle<ChunkStep> {
        let me = Arc::clone(self);
        let object = Arc::clone(object);
        tokio::spawn(async move { me.write_step(&object, i, buf).await })
    }

    async fn write_step(
        &self,
        object: &Arc<dyn CacheObject>,
        i: usize,
        buf: Result<AlignedBuf, ChunkError>,
    ) -> ChunkStep {
        match buf {
            Err(e) => ChunkStep::Failed(e),
            Ok(buf) => match object
                .write_at(self.chunks[i].uncompressed_offset, buf)
                .await
            {
                Ok(()) => ChunkStep::Written,
                Err(e) => ChunkStep::Failed(ChunkError::Write {
                    blob: self.digest,
                    chunk: i,
                    why: e.to_string(),
                }),
            },
        }
    }
}

/// The maximal stretches of `jobs` with no job yet (chunks of a run that
/// still need a source), as index ranges.
fn open_stretches<T>(jobs: &[Option<T>]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < jobs.len() {
        let start = k;
        while k < jobs.len() && jobs[k].is_none() {
            k += 1;
        }
        if k > start {
            out.push(start..k);
        }
        k += 1;
    }
    out
}

/// The uncompressed sizes of chunks `run`.
fn recs_sizes(table: &[kite_format::ChunkRecord], run: &[usize]) -> Vec<u64> {
    run.iter()
        .map(|&i| u64::from(table[i].uncompressed_size))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_stretches_are_the_maximal_runs_without_a_job() {
        let j = |v: &[u8]| {
            v.iter()
                .map(|&x| (x == 1).then_some(()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            super::open_stretches(&j(&[0, 0, 1, 0, 1, 1, 0])),
            vec![0..2, 3..4, 6..7]
        );
        assert_eq!(super::open_stretches(&j(&[1, 1])), vec![]);
        assert_eq!(super::open_stretches(&j(&[])), vec![]);
        assert_eq!(super::open_stretches(&j(&[0, 0, 0])), vec![0..3]);
    }
}
