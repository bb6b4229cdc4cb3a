//! The one dispatcher of cache misses, for both kernel paths.
//!
//! A cachefiles READ and a fanotify pre-content event are the same thing
//! to the daemon: a range of one blob whose chunks must be on disk before
//! the kernel is answered. Each path turns its requests into [`Miss`]es
//! (the chunks, a cache object to write them through, and how to answer);
//! [`dispatch`] plans a batch per blob, so adjacent missing chunks are
//! fetched in one request (`blob::Batch`), and answers each miss as soon
//! as its own chunks are in: a READ is completed (without data on failure,
//! which the kernel turns into EIO), an event is allowed, or denied with
//! EIO. Every miss is answered exactly once: its [`Answer`] answers on drop
//! too (a READ completes, an event is denied), so a task that panics or is
//! cancelled leaves no reader waiting.
//!
//! Cancellation: dropping a miss's task (runtime shutdown) drops its
//! answer, which fails the request; the fetch it waited on goes on in its
//! own task for any other waiter.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kite_format::Digest;
use kite_kernel::cachefiles::CacheObject;
use kite_kernel::fanotify::PreContentEvent;

use crate::blob::{Batch, BlobState};
use crate::daemon::{Daemon, Inflight};

const EIO: i32 = nix::errno::Errno::EIO as i32;

/// How a miss is answered.
pub enum Answer {
    /// cachefiles: complete the READ. Completing without data written for
    /// the range fails the reader with EIO.
    Read(crate::serve::Completion),
    /// fanotify: allow the access, or deny it with EIO.
    Event(Box<dyn PreContentEvent>),
}

impl Answer {
    fn give(self, ok: bool) {
        match self {
            Answer::Read(done) => drop(done),
            Answer::Event(ev) => ev.answer(if ok { Ok(()) } else { Err(EIO) }),
        }
    }
}

/// One kernel request for chunks of one blob.
pub struct Miss {
    pub blob: Arc<BlobState>,
    /// Where the chunks are written (the READ's cache object, or the
    /// event's file).
    pub object: Arc<dyn CacheObject>,
    /// The chunk indexes the request needs.
    pub want: Vec<usize>,
    pub answer: Answer,
    /// The range asked for (for logs).
    pub off: u64,
    pub len: u64,
}

/// Run after a miss was answered with its data (the fanotify path
/// finishes a blob that became complete).
pub type AfterAnswer = Arc<dyn Fn(&Arc<BlobState>) + Send + Sync>;

/// Plan `misses` together and answer each when its chunks are in (or
/// failed). Never awaits: the work runs in one task per miss.
pub fn dispatch(daemon: &Arc<Daemon>, misses: Vec<Miss>, after: Option<AfterAnswer>) {
    if misses.is_empty() {
        return;
    }
    // One plan per blob for the batch; each miss then waits only on the
    // receivers of its own chunks.
    let mut plans: HashMap<Digest, (Arc<BlobState>, Arc<dyn CacheObject>, Vec<usize>)> =
        HashMap::new();
    for m in &misses {
        plans
            .entry(m.blob.digest)
            .or_insert_with(|| (Arc::clone(&m.blob), Arc::clone(&m.object), Vec::new()))
            .2
            .extend_from_slice(&m.want);
    }
    let batch = Batch::plan(
        plans.values().map(|(b, o, w)| (b, o, w.as_slice())),
        daemon.merge_bound,
    );
    drop(plans);
    for m in misses {
        let waits = batch.waits(&m.blob.digest, &m.want);
        let inflight = Inflight::new(daemon);
        let d = Arc::clone(daemon);
        let after = after.clone();
        tokio::spawn(async move {
            let _inflight = inflight;
            let Miss {
                blob,
                object,
                want,
                answer,
                off,
                len,
            } = m;
            if want.is_empty() {
                tracing::warn!(blob = %blob.digest, off, len, "request outside every chunk");
            }
            let r = match waits {
                Ok(w) => blob.wait(w).await,
                Err(e) => Err(e),
            };
            // The object (an event's fd) is not needed to answer.
            drop(object);
            match r {
                Ok(()) => {
                    answer.give(true);
                    if let Some(f) = after {
                        f(&blob);
                    }
                }
                Err(e) => {
                    d.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %blob.digest, off, len, "request failed, answering EIO: {e}");
                    answer.give(false);
                }
            }
        });
    }
}
