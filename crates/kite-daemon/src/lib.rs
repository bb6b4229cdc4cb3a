//! The kite on-demand daemon: everything above the kernel interface.
//!
//! - [`registry`]: registered images (by fsid = bootstrap digest) and the
//!   blobs they share.
//! - [`blob`]: per-blob state: chunk table, fetches in flight, what was
//!   fetched; fetch, verify, decompress, write into the cache.
//! - [`backend`]: where stored bytes come from (local directory, HTTP).
//! - [`serve`]: the kernel request loop with its always-complete READ guard.
//! - [`api`]: the control API on a unix socket, and its client.
//! - [`state`]: fetch state persisted across restarts.
//!
//! Concurrency model: one tokio runtime, created by the `kite` binary and
//! passed in by running [`run`] on it. The device fd is polled with
//! `AsyncFd`; READs run as tasks; cache writes go through the io_uring
//! writer thread of `kite-kernel`; local backend reads use blocking tasks.

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod blob;
pub mod registry;
pub mod serve;
pub mod state;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kite_kernel::cachefiles::{CacheDevice, Device};
use kite_kernel::uring::Writer;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] kite_kernel::KernelError),
    #[error("bootstrap {source_name} refused: {why}")]
    BadBootstrap { source_name: String, why: String },
    #[error("{0}")]
    Config(String),
    #[error("control API: {0}")]
    Api(String),
    #[error("internal lock poisoned")]
    Poisoned,
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The cachefiles cache directory (on a filesystem with xattrs,
    /// tmpfile and sync_fs, e.g. ext4; not tmpfs).
    pub cache_dir: PathBuf,
    /// Control API socket.
    pub socket: PathBuf,
    /// cachefiles tag, distinguishing this cache from others.
    pub tag: String,
    /// EROFS domain shared by kite's mounts, so images share blob caches.
    pub domain_id: String,
    /// Bound on one backend request's stored bytes when merging chunks.
    pub merge_bound: u64,
    /// Per-fetch timeout.
    pub fetch_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("/var/cache/kite/cachefiles"),
            socket: PathBuf::from("/run/kite/kite.sock"),
            tag: "kite".into(),
            domain_id: "kite".into(),
            merge_bound: 4 << 20,
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// Run the daemon on the cachefiles path until SIGTERM/SIGINT.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| DaemonError::Io {
        what: format!("creating cache dir {}", cfg.cache_dir.display()),
        source: e,
    })?;
    let features = kite_kernel::features::Features::probe();
    let missing = features.cachefiles_missing();
    if !missing.is_empty() {
        return Err(DaemonError::Config(format!(
            "kernel {} cannot serve kite images through cachefiles; missing: {}",
            features.release,
            missing.join(", ")
        )));
    }
    let writer = Writer::start();
    let dev: Arc<dyn CacheDevice> =
        Arc::new(Device::bind(&cfg.cache_dir, &cfg.tag, Arc::clone(&writer))?);
    let state_dir = cfg.cache_dir.join("kite-state");
    let daemon = serve::Daemon::new(
        registry::Registry::new(Some(state_dir.clone())),
        cfg.merge_bound,
    );
    tracing::info!(
        cache_dir = %cfg.cache_dir.display(),
        socket = %cfg.socket.display(),
        kernel = %features.release,
        writer = writer.mode,
        "kite daemon serving on the cachefiles on-demand path (kernel has /dev/cachefiles and EROFS)"
    );
    let ctx = Arc::new(api::ApiContext {
        daemon: Arc::clone(&daemon),
        kernel_path: "cachefiles".into(),
        cache_dir: cfg.cache_dir.clone(),
        domain_id: cfg.domain_id.clone(),
        fetch_timeout: cfg.fetch_timeout,
        writer: writer.mode.into(),
    });
    let api = tokio::spawn({
        let socket = cfg.socket.clone();
        async move { api::serve_api(ctx, &socket).await }
    });
    let flusher = tokio::spawn({
        let d = Arc::clone(&daemon);
        let dir = state_dir.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                flush_state(&d, &dir);
            }
        }
    });
    let serve = tokio::spawn(serve::serve(Arc::clone(&daemon), dev));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Io {
            what: "installing SIGTERM handler".into(),
            source: e,
        })?;
    let result = tokio::select! {
        r = serve => r.map_err(|e| DaemonError::Config(format!("request loop: {e}")))?,
        r = api => r.map_err(|e| DaemonError::Config(format!("control API: {e}")))?,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    flusher.abort();
    flush_state(&daemon, &state_dir);
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!(
        reads = daemon.stats.reads.load(Ordering::Relaxed),
        "kite daemon stopping; mounts served by it fail until it is restarted and they are remounted"
    );
    result
}

fn flush_state(daemon: &serve::Daemon, dir: &std::path::Path) {
    let blobs = match daemon.registry.lock() {
        Ok(r) => r.blobs(),
        Err(_) => return,
    };
    for b in blobs {
        if let Err(e) = state::save(dir, &b.digest, &b.fetched_map()) {
            tracing::warn!(blob = %b.digest, "saving fetch state: {e}");
        }
    }
}
