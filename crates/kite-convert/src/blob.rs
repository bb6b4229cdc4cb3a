//! Building one data blob: parallel hashing and compression, then dedup,
//! placement and an ordered write.
//!
//! The reading thread only cuts file data into chunks and hands each to
//! [`BlobBuilder::add_chunk`], which returns a *pending* chunk reference (a
//! sequence number across the whole image) at once. Worker threads hash,
//! detect all-zero chunks and compress. A writer thread takes results in
//! submission order and decides, deterministically, what each chunk is: a
//! hole, a duplicate of a chunk already stored in this image (any layer), or
//! a new chunk placed at the next 4 KiB-aligned offset of this blob's
//! uncompressed layout and appended to the blob file. Pending references
//! are resolved with [`ChunkStore::resolve`] when all layers are done.
//!
//! A semaphore bounds chunks in flight, so memory stays flat whatever the
//! image size. Duplicates cost a wasted compression, never a wrong result.
//!
//! Concurrency model: std threads and channels (the converter is CPU-bound
//! and never links tokio). If the builder is dropped without `finish`, the
//! channels close and the threads exit; the temporary blob file is removed
//! with the caller's staging directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kite_erofs::{ChunkIndex, FileData, NodeKind, Tree};
use kite_format::{align4k, BlobEntry, BlobRecord, ChunkEncoder, ChunkRecord, Digest};
use sha2::{Digest as _, Sha256};

use crate::ConvertError;

/// Device id marking a pending reference; `blkaddr` holds the sequence.
const PENDING: u16 = u16::MAX;

/// Image-wide chunk table: dedup map, resolution of pending references,
/// and statistics. Moves into each blob's writer thread and back.
#[derive(Default)]
pub struct ChunkStore {
    map: HashMap<Digest, ChunkIndex>,
    /// Final address of every pending reference, by sequence number.
    resolved: Vec<ChunkIndex>,
    /// Next sequence number to hand out.
    next_seq: u64,
    /// Non-hole chunk references.
    pub referenced: u64,
    /// References that were duplicates of an already stored chunk.
    pub deduplicated: u64,
    /// Bytes saved by dedup (uncompressed).
    pub dedup_bytes: u64,
}

impl ChunkStore {
    /// Replace every pending chunk reference in `tree` by its final address.
    pub fn resolve(&self, tree: &mut Tree) -> Result<(), ConvertError> {
        for node in &mut tree.nodes {
            if let NodeKind::File(FileData::Chunked { chunks, .. }) = &mut node.kind {
                for c in chunks.iter_mut() {
                    if c.device_id == PENDING {
                        *c = *self
                            .resolved
                            .get(c.blkaddr as usize)
                            .ok_or(ConvertError::Internal("unresolved chunk reference"))?;
                    }
                }
            }
        }
        Ok(())
    }
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

enum Outcome {
    Hole,
    Data {
        digest: Digest,
        len: u32,
        stored: Vec<u8>,
        flags: u32,
    },
}

struct Done {
    seq: u64,
    outcome: Outcome,
}

/// What the writer thread hands back.
struct Written {
    store: ChunkStore,
    digest: Digest,
    size: u64,
    uncompressed: u64,
    chunks: Vec<ChunkRecord>,
}

pub struct BlobBuilder {
    first_seq: u64,
    next_seq: u64,
    jobs: Option<SyncSender<Job>>,
    tokens: Receiver<()>,
    workers: Vec<JoinHandle<Result<(), ConvertError>>>,
    writer: Option<JoinHandle<Result<Written, ConvertError>>>,
    path: PathBuf,
}

impl BlobBuilder {
    /// Start a blob that will be device `device_id`, written to `path`.
    /// The store moves into the pipeline and comes back from `finish`.
    pub fn new(
        path: &Path,
        device_id: u16,
        chunk_size: u32,
        level: i32,
        threads: usize,
        store: ChunkStore,
    ) -> Result<Self, ConvertError> {
        let file = File::create(path).map_err(|e| ConvertError::io(path, e))?;
        let threads = threads.max(1);
        // Bound chunks in flight to ~32 MiB of input (at least 2 per worker).
        let in_flight = ((32usize << 20) / chunk_size as usize).max(2 * threads) + threads;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Result<Done, ConvertError>>();
        let (token_tx, token_rx) = mpsc::sync_channel::<()>(in_flight);
        for _ in 0..in_flight {
            token_tx.send(()).expect("receiver alive");
        }
        let mut workers = Vec::new();
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            let mut enc = ChunkEncoder::new(level)?;
            let zero = vec![0u8; chunk_size as usize];
            workers.push(std::thread::spawn(move || -> Result<(), ConvertError> {
                loop {
                    let job = {
                        let guard = rx
                            .lock()
                            .map_err(|_| ConvertError::Internal("job queue poisoned"))?;
                        guard.recv()
                    };
                    let Ok(job) = job else { return Ok(()) };
                    let r = if job.data[..] == zero[..job.data.len()] {
                        Ok(Done {
                            seq: job.seq,
                            outcome: Outcome::Hole,
                        })
                    } else {
                        let digest = Digest::of(&job.data);
                        enc.encode(&job.data)
                            .map(|(stored, flags)| Done {
                                seq: job.seq,
                                outcome: Outcome::Data {
                                    digest,
                                    len: job.data.len() as u32,
                                    stored,
                                    flags,
                                },
                            })
                            .map_err(ConvertError::Format)
                    };
                    if tx.send(r).is_err() {
                        return Ok(());
                    }
                }
            }));
        }
        drop(done_tx);
        let wpath = path.to_path_buf();
        let first_seq = store.next_seq;
        let writer = std::thread::spawn(move || {
            write_ordered(file, &wpath, device_id, first_seq, store, done_rx, token_tx)
        });
        Ok(Self {
            first_seq,
            next_seq: first_seq,
            jobs: Some(job_tx),
            tokens: token_rx,
            workers,
            writer: Some(writer),
            path: path.to_path_buf(),
        })
    }

    /// Submit one chunk (at most one chunk size long); returns a pending
    /// reference resolved by [`ChunkStore::resolve`].
    pub fn add_chunk(&mut self, data: Vec<u8>) -> Result<ChunkIndex, ConvertError> {
        let seq = self.next_seq;
        let blkaddr =
            u32::try_from(seq).map_err(|_| ConvertError::Internal("more than 2^32 chunks"))?;
        self.next_seq += 1;
        // Wait for room; if the pipeline died, report its error.
        if self.tokens.recv().is_err() {
            return Err(self.fail());
        }
        let sent = self.jobs.as_ref().map(|j| j.send(Job { seq, data }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.fail());
        }
        Ok(ChunkIndex {
            device_id: PENDING,
            blkaddr,
        })
    }

    /// Collect the first error of a pipeline that stopped early.
    fn fail(&mut self) -> ConvertError {
        self.jobs = None;
        for w in self.workers.drain(..) {
            if let Ok(Err(e)) = w.join() {
                return e;
            }
        }
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            _ => ConvertError::Internal("compression pipeline stopped"),
        }
    }

    /// Drain the pipeline. Returns the store, and the blob's table entry and
    /// file path unless no chunk was stored in it.
    pub fn finish(
        mut self,
        source_layer: Digest,
    ) -> Result<(ChunkStore, Option<(BlobEntry, PathBuf)>), ConvertError> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| ConvertError::Internal("compression worker panicked"))??;
        }
        let mut w = self
            .writer
            .take()
            .expect("finish runs once")
            .join()
            .map_err(|_| ConvertError::Internal("blob writer panicked"))??;
        debug_assert_eq!(w.store.resolved.len() as u64, self.next_seq);
        debug_assert!(self.first_seq <= self.next_seq);
        w.store.next_seq = self.next_seq;
        if w.chunks.is_empty() {
            return Ok((w.store, None));
        }
        Ok((
            w.store,
            Some((
                BlobEntry {
                    record: BlobRecord {
                        digest: w.digest,
                        compressed_size: w.size,
                        uncompressed_size: w.uncompressed,
                        source_layer,
                    },
                    chunks: w.chunks,
                },
                self.path.clone(),
            )),
        ))
    }
}

fn write_ordered(
    file: File,
    path: &Path,
    device_id: u16,
    first_seq: u64,
    mut store: ChunkStore,
    done: Receiver<Result<Done, ConvertError>>,
    tokens: SyncSender<()>,
) -> Result<Written, ConvertError> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = first_seq;
    let mut offset = 0u64;
    let mut uoff = 0u64;
    let mut chunks = Vec::new();
    for r in done {
        let d = r?;
        waiting.insert(d.seq, d);
        while let Some(d) = waiting.remove(&next) {
            let addr = match d.outcome {
                Outcome::Hole => ChunkIndex::HOLE,
                Outcome::Data {
                    digest,
                    len,
                    stored,
                    flags,
                } => {
                    store.referenced += 1;
                    if let Some(existing) = store.map.get(&digest) {
                        store.deduplicated += 1;
                        store.dedup_bytes += len as u64;
                        *existing
                    } else {
                        let blkaddr = u32::try_from(uoff / 4096)
                            .map_err(|_| ConvertError::Internal("blob larger than 16 TiB"))?;
                        out.write_all(&stored)
                            .map_err(|e| ConvertError::io(path, e))?;
                        hasher.update(&stored);
                        chunks.push(ChunkRecord {
                            digest,
                            uncompressed_offset: uoff,
                            compressed_offset: offset,
                            uncompressed_size: len,
                            compressed_size: stored.len() as u32,
                            flags,
                        });
                        offset += stored.len() as u64;
                        uoff += align4k(len as u64);
                        let ci = ChunkIndex { device_id, blkaddr };
                        store.map.insert(digest, ci);
                        ci
                    }
                }
            };
            debug_assert_eq!(store.resolved.len() as u64, next);
            store.resolved.push(addr);
            next += 1;
            // Free a slot; the reader may have finished already.
            let _ = tokens.try_send(());
        }
    }
    if !waiting.is_empty() {
        return Err(ConvertError::Internal("compression results missing"));
    }
    let file = out
        .into_inner()
        .map_err(|e| ConvertError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| ConvertError::io(path, e))?;
    Ok(Written {
        store,
        digest: Digest(hasher.finalize().into()),
        size: offset,
        uncompressed: uoff,
        chunks,
    })
}
