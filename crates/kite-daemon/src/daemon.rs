//! The worker's shared state: the registry of images and blobs, request
//! counters, and the cachefiles path's table of open cache objects. Both
//! kernel paths ([`crate::serve`] for cachefiles, [`crate::fanotify`]) and
//! the control API hold an `Arc<Daemon>`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::registry::Registry;

/// Daemon-wide request counters (for status and tests). READs and
/// fanotify events both count as `reads`.
#[derive(Debug, Default)]
pub struct RequestStats {
    pub opens: AtomicU64,
    pub open_refused: AtomicU64,
    pub closes: AtomicU64,
    pub reads: AtomicU64,
    pub reads_failed: AtomicU64,
    /// Kernel requests handed to tasks and not answered yet.
    pub reads_inflight: AtomicU64,
    pub malformed: AtomicU64,
}

/// Shared state of a running worker.
pub struct Daemon {
    pub registry: Mutex<Registry>,
    /// cachefiles: the cache objects the kernel opened (by object_id).
    pub(crate) objects: crate::serve::Objects,
    pub stats: RequestStats,
    /// Largest stored-byte span of one merged fetch.
    pub merge_bound: u64,
    /// cachefiles: culls the kernel's cache files of collected blobs and
    /// images (set when serving that path).
    pub culler: std::sync::OnceLock<kite_kernel::cachefiles::Culler>,
}

impl Daemon {
    pub fn new(registry: Registry, merge_bound: u64) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(registry),
            objects: crate::serve::Objects::default(),
            stats: RequestStats::default(),
            merge_bound,
            culler: std::sync::OnceLock::new(),
        })
    }

    /// Number of cache objects currently open (for tests and status).
    pub fn open_objects(&self) -> usize {
        self.objects.len()
    }
}

/// Counts a kernel request as in flight until dropped (a graceful stop
/// waits for the count to reach zero before the worker exits).
pub(crate) struct Inflight(Arc<Daemon>);

impl Inflight {
    pub(crate) fn new(d: &Arc<Daemon>) -> Self {
        d.stats.reads_inflight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(d))
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.stats.reads_inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lock a daemon mutex, recovering it if a panicking holder poisoned it:
/// the request loops must keep serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
