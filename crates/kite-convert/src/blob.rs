//! Building one data blob: chunk dedup, parallel compression, ordered write.
//!
//! The reading thread hands each chunk to [`BlobBuilder::add_chunk`], which
//! decides everything that must be known at once (hole? duplicate of a chunk
//! already stored in this image? where it goes in the uncompressed layout)
//! and returns the chunk's EROFS address. Compression runs on a pool of
//! worker threads; a writer thread puts results into the blob file in
//! submission order and hashes them. A semaphore bounds the chunks in
//! flight, so memory stays flat whatever the image size.
//!
//! Concurrency model: std threads and channels (the converter is CPU-bound
//! and never links tokio). If the builder is dropped without `finish`, the
//! channels close, the threads exit, and the temporary file is left for the
//! caller's temporary output directory to remove.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kite_erofs::ChunkIndex;
use kite_format::{align4k, BlobEntry, BlobRecord, ChunkEncoder, ChunkRecord, Digest};
use sha2::{Digest as _, Sha256};

use crate::ConvertError;

/// Image-wide dedup table: chunk digest -> where it is stored.
#[derive(Default)]
pub struct ChunkStore {
    map: HashMap<Digest, ChunkIndex>,
    /// Chunks referenced (including duplicates and holes excluded).
    pub referenced: u64,
    /// Chunks that were duplicates of an already stored chunk.
    pub deduplicated: u64,
    /// Bytes saved by dedup (uncompressed).
    pub dedup_bytes: u64,
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    stored: Vec<u8>,
    flags: u32,
}

/// Outcome of the writer thread.
struct Written {
    digest: Digest,
    size: u64,
    placed: Vec<(u64, u32, u32)>, // per seq: compressed offset, size, flags
}

pub struct BlobBuilder {
    device_id: u16,
    next_uoff: u64,
    pending: Vec<(Digest, u64, u32)>, // per seq: digest, uncompressed offset, size
    jobs: Option<SyncSender<Job>>,
    tokens: Receiver<()>,
    workers: Vec<JoinHandle<Result<(), ConvertError>>>,
    writer: Option<JoinHandle<Result<Written, ConvertError>>>,
    path: PathBuf,
    zero: Vec<u8>,
}

impl BlobBuilder {
    /// Start a blob that will be device `device_id`, written to `path`.
    pub fn new(
        path: &Path,
        device_id: u16,
        chunk_size: u32,
        level: i32,
        threads: usize,
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
            workers.push(std::thread::spawn(move || -> Result<(), ConvertError> {
                loop {
                    let job = {
                        let guard = rx
                            .lock()
                            .map_err(|_| ConvertError::Internal("job queue poisoned"))?;
                        guard.recv()
                    };
                    let Ok(job) = job else { return Ok(()) };
                    let r = enc
                        .encode(&job.data)
                        .map(|(stored, flags)| Done {
                            seq: job.seq,
                            stored,
                            flags,
                        })
                        .map_err(ConvertError::Format);
                    if tx.send(r).is_err() {
                        return Ok(());
                    }
                }
            }));
        }
        drop(done_tx);
        let wpath = path.to_path_buf();
        let writer = std::thread::spawn(move || write_ordered(file, &wpath, done_rx, token_tx));
        Ok(Self {
            device_id,
            next_uoff: 0,
            pending: Vec::new(),
            jobs: Some(job_tx),
            tokens: token_rx,
            workers,
            writer: Some(writer),
            path: path.to_path_buf(),
            zero: vec![0u8; chunk_size as usize],
        })
    }

    /// Place one chunk (at most one chunk size long) and return its address.
    pub fn add_chunk(
        &mut self,
        data: Vec<u8>,
        store: &mut ChunkStore,
    ) -> Result<ChunkIndex, ConvertError> {
        if data[..] == self.zero[..data.len()] {
            return Ok(ChunkIndex::HOLE);
        }
        store.referenced += 1;
        let digest = Digest::of(&data);
        if let Some(ci) = store.map.get(&digest) {
            store.deduplicated += 1;
            store.dedup_bytes += data.len() as u64;
            return Ok(*ci);
        }
        let uoff = self.next_uoff;
        let blkaddr = u32::try_from(uoff / 4096)
            .map_err(|_| ConvertError::Internal("blob larger than 16 TiB"))?;
        self.next_uoff += align4k(data.len() as u64);
        let ci = ChunkIndex {
            device_id: self.device_id,
            blkaddr,
        };
        store.map.insert(digest, ci);
        let seq = self.pending.len() as u64;
        self.pending.push((digest, uoff, data.len() as u32));
        // Wait for room; if the pipeline died, report its error.
        if self.tokens.recv().is_err() {
            return Err(self.fail());
        }
        let sent = self.jobs.as_ref().map(|j| j.send(Job { seq, data }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.fail());
        }
        Ok(ci)
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

    /// True if no chunk was stored in this blob.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Drain the pipeline; returns the blob's table entry and file path.
    pub fn finish(mut self, source_layer: Digest) -> Result<(BlobEntry, PathBuf), ConvertError> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| ConvertError::Internal("compression worker panicked"))??;
        }
        let written = self
            .writer
            .take()
            .expect("finish runs once")
            .join()
            .map_err(|_| ConvertError::Internal("blob writer panicked"))??;
        let chunks = self
            .pending
            .iter()
            .zip(&written.placed)
            .map(
                |(&(digest, uoff, usize_), &(coff, csize, flags))| ChunkRecord {
                    digest,
                    uncompressed_offset: uoff,
                    compressed_offset: coff,
                    uncompressed_size: usize_,
                    compressed_size: csize,
                    flags,
                },
            )
            .collect();
        Ok((
            BlobEntry {
                record: BlobRecord {
                    digest: written.digest,
                    compressed_size: written.size,
                    uncompressed_size: self.next_uoff,
                    source_layer,
                },
                chunks,
            },
            self.path.clone(),
        ))
    }
}

fn write_ordered(
    file: File,
    path: &Path,
    done: Receiver<Result<Done, ConvertError>>,
    tokens: SyncSender<()>,
) -> Result<Written, ConvertError> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut placed = Vec::new();
    for r in done {
        let d = r?;
        waiting.insert(d.seq, d);
        while let Some(d) = waiting.remove(&next) {
            out.write_all(&d.stored)
                .map_err(|e| ConvertError::io(path, e))?;
            hasher.update(&d.stored);
            placed.push((offset, d.stored.len() as u32, d.flags));
            offset += d.stored.len() as u64;
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
        digest: Digest(hasher.finalize().into()),
        size: offset,
        placed,
    })
}
