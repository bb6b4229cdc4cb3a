//! Starting fetches and carrying them out: a plan's runs become one task
//! each, which fetches the run's stored bytes in one range request,
//! decodes and verifies each chunk on the blocking pool, writes it into
//! the cache object, and publishes its outcome to every waiter.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_format::{align4k, ChunkDecoder, Digest};
use kite_kernel::cachefiles::CacheObject;
use kite_kernel::uring::AlignedBuf;
use tokio::sync::watch;

use super::plan::{self, Reason};
use super::{BlobState, Outcome};
use crate::backend::FetchError;

/// How long a failed chunk is answered from the negative cache.
pub const FAILURE_TTL: Duration = Duration::from_secs(2);

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

/// Why decoding one chunk failed, before the blob and chunk are attached.
enum ChunkStepError {
    /// The fetch failed: nothing to decode.
    NoBytes,
    /// The stored bytes were bad (the message names blob and chunk).
    Corrupt(String),
    Local(String),
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
        if let Err(e) = self.start_reason(&[at], object, merge_bound, Reason::Readahead) {
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
        self.start_reason(want, object, merge_bound, Reason::Demand { speculate })
    }

    /// Plan under the lock, register the runs as in flight, and spawn one
    /// task per run after the lock is released.
    pub(super) fn start_reason(
        self: &Arc<Self>,
        want: &[usize],
        object: &Arc<dyn CacheObject>,
        merge_bound: u64,
        reason: Reason,
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
            tokio::spawn(async move { me.fetch_run(run, requested, senders, obj).await });
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
        let target = object.target();
        // Armed first: whatever happens below, every chunk gets an answer.
        let mut guard = RunGuard {
            blob: Arc::clone(&self),
            target,
            pending: run.iter().copied().zip(senders).rev().collect(),
        };
        let (Some(&first), Some(&last)) = (run.first(), run.last()) else {
            return;
        };
        let (first, last) = (self.chunks[first], self.chunks[last]);
        let start = first.compressed_offset;
        let end = last.compressed_offset + u64::from(last.compressed_size);
        let t0 = Instant::now();
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
                let decode = tokio::task::spawn_blocking(move || {
                    let stored = part.ok_or(ChunkStepError::NoBytes)?;
                    // Decode straight into the page-aligned buffer whose
                    // padded extent is written to the cache: the decoder
                    // fills the head, the padding is zero.
                    let n = rec.uncompressed_size as usize;
                    let mut buf = AlignedBuf::with_zero_tail(align4k(n as u64) as usize, n);
                    with_decoder(|dec| {
                        dec.decode_into(digest, i, &rec, &stored, buf.as_mut_slice())
                            .map_err(|e| ChunkStepError::Corrupt(e.to_string()))
                    })?;
                    Ok(buf)
                });
                let object = Arc::clone(&object);
                let fetch_err = fetched.as_ref().err().cloned();
                tokio::spawn(async move {
                    let fail = |why: String| ChunkError::Local {
                        blob: digest,
                        chunk: i,
                        why,
                    };
                    match decode.await {
                        Err(e) => ChunkStep::Failed(fail(format!("decode task: {e}"))),
                        Ok(Err(ChunkStepError::NoBytes)) => ChunkStep::Failed(match fetch_err {
                            Some(e) => ChunkError::Fetch(e),
                            None => fail("no bytes to decode".into()),
                        }),
                        Ok(Err(ChunkStepError::Corrupt(why))) => {
                            ChunkStep::Failed(ChunkError::Corrupt { why })
                        }
                        Ok(Err(ChunkStepError::Local(why))) => ChunkStep::Failed(fail(why)),
                        Ok(Ok(buf)) => match object.write_at(rec.uncompressed_offset, buf).await {
                            Ok(()) => ChunkStep::Written,
                            Err(e) => ChunkStep::Failed(ChunkError::Write {
                                blob: digest,
                                chunk: i,
                                why: e.to_string(),
                            }),
                        },
                    }
                })
            })
            .collect();
        for ((&i, job), asked) in run.iter().zip(jobs).zip(requested) {
            let step = job.await.unwrap_or_else(|e| {
                ChunkStep::Failed(ChunkError::Local {
                    blob: self.digest,
                    chunk: i,
                    why: format!("write task: {e}"),
                })
            });
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
    }
}
