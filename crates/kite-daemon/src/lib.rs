//! The kite on-demand daemon: everything above the kernel interface.
//!
//! - [`registry`]: registered images (by fsid = bootstrap digest) and the
//!   blobs they share.
//! - [`blob`]: per-blob state: chunk table, fetches in flight, what was
//!   fetched; fetch, verify, decompress, write into the cache.
//! - [`backend`]: where stored bytes come from (local directory, HTTP).
//! - [`serve`]: the kernel request loop with its always-complete READ guard.
//! - [`fanotify`]: the fanotify path: sparse blob files, pre-content
//!   events, unmarking complete blobs.
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
pub mod fanotify;
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
    #[error(transparent)]
    Registry(#[from] kite_registry::RegistryError),
    #[error("image {reference}: {why}")]
    BadImage { reference: String, why: String },
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
    /// Force a kernel path instead of choosing automatically.
    pub kernel_path: Option<kite_kernel::features::KernelPath>,
    /// Chunks fetched ahead of a sequential reader (0 = off).
    pub readahead: usize,
    /// Registry client settings for images mounted by reference.
    pub registry: kite_registry::ClientConfig,
    /// fanotify path: bytes of bootstraps to lock in memory (0: none).
    pub pin_metadata: u64,
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
            kernel_path: None,
            readahead: 4,
            registry: kite_registry::ClientConfig::default(),
            pin_metadata: 256 << 20,
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT, on the kernel path chosen from
/// what the running kernel offers (or the one forced in `cfg`).
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    use kite_kernel::features::{Features, KernelPath};
    std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| DaemonError::Io {
        what: format!("creating cache dir {}", cfg.cache_dir.display()),
        source: e,
    })?;
    raise_fd_limit();
    let features = Features::probe();
    let (mut path, mut why) = features
        .choose(cfg.kernel_path)
        .map_err(DaemonError::Config)?;
    let writer = Writer::start();
    let state_dir = cfg.cache_dir.join("kite-state");
    let mut registry = registry::Registry::new(Some(state_dir.clone()));
    registry.readahead = cfg.readahead;
    let daemon = serve::Daemon::new(registry, cfg.merge_bound);
    let mut device = None;
    if path == KernelPath::Cachefiles {
        match Device::bind(&cfg.cache_dir, &cfg.tag, Arc::clone(&writer)) {
            Ok(d) => device = Some(d),
            // /dev/cachefiles without on-demand support fails `bind
            // ondemand`: in auto mode, use fanotify if the kernel has it.
            Err(e) if cfg.kernel_path.is_none() && features.fanotify_missing().is_empty() => {
                why = format!("cachefiles bind failed ({e}; CONFIG_CACHEFILES_ONDEMAND missing?), fanotify available");
                path = KernelPath::Fanotify;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(
        path = path.name(),
        why = %why,
        cache_dir = %cfg.cache_dir.display(),
        socket = %cfg.socket.display(),
        writer = writer.mode,
        "kite daemon starting"
    );
    let (serve, fan): (
        tokio::task::JoinHandle<Result<(), DaemonError>>,
        Option<Arc<fanotify::FanotifyPath>>,
    ) = match device {
        Some(dev) => {
            let dev: Arc<dyn CacheDevice> = Arc::new(dev);
            (tokio::spawn(serve::serve(Arc::clone(&daemon), dev)), None)
        }
        None => {
            let fan = fanotify::FanotifyPath::new(
                Arc::clone(&daemon),
                Arc::clone(&writer),
                &cfg.cache_dir,
                cfg.pin_metadata,
            )?;
            (tokio::spawn(Arc::clone(&fan).serve()), Some(fan))
        }
    };
    let ctx = Arc::new(api::ApiContext {
        daemon: Arc::clone(&daemon),
        fanotify: fan.clone(),
        kernel_path: path.name().into(),
        cache_dir: cfg.cache_dir.clone(),
        domain_id: cfg.domain_id.clone(),
        fetch_timeout: cfg.fetch_timeout,
        writer: writer.mode.into(),
        registry: cfg.registry.clone(),
    });
    let api = tokio::spawn({
        let socket = cfg.socket.clone();
        async move { api::serve_api(ctx, &socket).await }
    });
    let flusher = tokio::spawn({
        let d = Arc::clone(&daemon);
        let dir = state_dir.clone();
        let fan = fan.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let (d, dir, fan) = (Arc::clone(&d), dir.clone(), fan.clone());
                let _ =
                    tokio::task::spawn_blocking(move || persist(&d, fan.as_deref(), &dir, None))
                        .await;
            }
        }
    });
    // fanotify path: mounts of an image that completes are switched to
    // direct I/O soon after (a check of counters per image each tick).
    let switcher = tokio::spawn({
        let d = Arc::clone(&daemon);
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let images = d.registry.lock().map(|r| r.images()).unwrap_or_default();
                for img in images {
                    img.switch_to_direct_io();
                }
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Io {
            what: "installing SIGTERM handler".into(),
            source: e,
        })?;
    // Whatever ends the daemon (signal, a failed or panicked task), the
    // clean-up below always runs.
    let result = tokio::select! {
        r = serve => r.unwrap_or_else(|e| Err(DaemonError::Config(format!("request loop task ended: {e}")))),
        r = api => r.unwrap_or_else(|e| Err(DaemonError::Config(format!("control API task ended: {e}")))),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    flusher.abort();
    switcher.abort();
    if let Some(f) = &fan {
        f.detach_incomplete_mounts();
    }
    persist(&daemon, fan.as_deref(), &state_dir, None);
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!(
        reads = daemon.stats.reads.load(Ordering::Relaxed),
        "kite daemon stopping; mounts served by it fail until it is restarted and they are remounted"
    );
    result
}

/// Save the fetch state of `blobs` (default: every registered blob). The
/// bitmap is snapshotted *before* the blob files are synced, so what is
/// saved never claims a chunk that is not on disk.
pub(crate) fn persist(
    daemon: &serve::Daemon,
    fan: Option<&fanotify::FanotifyPath>,
    dir: &std::path::Path,
    blobs: Option<Vec<Arc<blob::BlobState>>>,
) {
    let blobs = blobs.unwrap_or_else(|| {
        daemon
            .registry
            .lock()
            .map(|r| r.blobs())
            .unwrap_or_default()
    });
    let snapshots: Vec<(kite_format::Digest, Vec<bool>)> =
        blobs.iter().map(|b| (b.digest, b.fetched_map())).collect();
    if let Some(f) = fan {
        f.sync_blobs(&blobs);
    }
    for (digest, map) in snapshots {
        if let Err(e) = state::save(dir, &digest, &map) {
            tracing::warn!(blob = %digest, "saving fetch state: {e}");
        }
    }
}

/// Open cache objects and event fds count against RLIMIT_NOFILE: raise the
/// soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising RLIMIT_NOFILE: {e}");
            }
        }
    }
}
