//! The kite on-demand daemon: everything above the kernel interface.
//!
//! - [`registry`]: registered images (by fsid = bootstrap digest) and the
//!   blobs they share.
//! - [`blob`]: per-blob state: chunk table, fetches in flight, what was
//!   fetched; fetch, verify, decompress, write into the cache.
//! - [`backend`]: where stored bytes come from (local directory, HTTP).
//! - [`daemon`]: the worker's shared state (registry, counters).
//! - [`dispatch`]: the one dispatcher of cache misses: cachefiles READs
//!   and fanotify events are planned, fetched and answered alike.
//! - [`serve`]: the cachefiles request loop with its always-complete READ
//!   guard.
//! - [`fanotify`]: the fanotify path: sparse blob files, pre-content
//!   events, unmarking complete blobs.
//! - [`api`]: the control API on a unix socket, and its client.
//! - [`gc`]: collecting cache data no registered image references.
//! - [`metrics`]: Prometheus metrics at `/metrics` (`--metrics-addr`).
//! - [`peer`]: the site's nodes serve each other verified chunks
//!   (`--peer-listen`, `--peers`), so a site fetches each chunk once.
//! - [`mounting`]: the client side of a mount (`kite mount`, the
//!   snapshotter): mount a registered image, set its readahead.
//! - [`state`]: fetch state persisted across restarts.
//! - [`adopt`]: registrations persisted for the next worker, and adopting
//!   them at start.
//!
//! Process model: this crate is the *worker*. The kernel interface is
//! opened and kept by the holder (`kite-holder`), which hands it to each
//! worker ([`Handoff`]); a worker that dies is replaced, and the new one
//! adopts every registered image before it reads a request.
//!
//! Concurrency model: one tokio runtime, created by the `kite` binary and
//! passed in by running [`run`] on it. The device fd is polled with
//! `AsyncFd`; READs run as tasks; cache writes go through the io_uring
//! writer thread of `kite-kernel`; local backend reads use blocking tasks.

#![forbid(unsafe_code)]

pub mod adopt;
pub mod api;
pub mod backend;
pub mod blob;
pub mod daemon;
pub mod dispatch;
pub mod fanotify;
pub mod gc;
pub mod idle;
pub mod metrics;
pub mod mounting;
pub mod peer;
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

/// Worker settings (the holder owns the kernel path and the cachefiles tag).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The cachefiles cache directory (on a filesystem with xattrs,
    /// tmpfile and sync_fs, e.g. ext4; not tmpfs).
    pub cache_dir: PathBuf,
    /// Control API socket.
    pub socket: PathBuf,
    /// EROFS domain shared by kite's mounts, so images share blob caches.
    pub domain_id: String,
    /// Bound on one backend request's stored bytes when merging chunks.
    pub merge_bound: u64,
    /// Per-fetch timeout.
    pub fetch_timeout: Duration,
    /// Chunks fetched ahead of a sequential reader (0 = off).
    pub readahead: usize,
    /// Registry client settings for images mounted by reference.
    pub registry: kite_registry::ClientConfig,
    /// fanotify path: bytes of bootstraps to lock in memory (0: none).
    pub pin_metadata: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`); none if unset.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Cache data unreferenced this long is collected by a sweep every
    /// minute (zero: only `kite gc` collects).
    pub gc_grace: Duration,
    /// Keep the cache's files under this many bytes by evicting
    /// unmounted images (none: unbounded).
    pub cache_size: Option<u64>,
    /// Peer serving and asking (off unless set).
    pub peer: peer::PeerConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("/var/cache/kite/cachefiles"),
            socket: PathBuf::from("/run/kite/kite.sock"),
            domain_id: "kite".into(),
            merge_bound: 4 << 20,
            fetch_timeout: Duration::from_secs(30),
            readahead: 4,
            registry: kite_registry::ClientConfig::default(),
            pin_metadata: 256 << 20,
            metrics_addr: None,
            gc_grace: Duration::from_secs(600),
            cache_size: None,
            peer: peer::PeerConfig::default(),
        }
    }
}

/// Unix seconds now (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a worker gets from the holder that keeps the kernel interface.
pub struct Handoff {
    /// The fanotify group or the bound `/dev/cachefiles` fd.
    pub kernel: std::os::fd::OwnedFd,
    pub path: kite_kernel::features::KernelPath,
    pub why: String,
    /// An earlier worker used this interface (cachefiles: `restore`).
    pub restore: bool,
    /// The control API's listening socket.
    pub api: std::os::unix::net::UnixListener,
    /// The channel to the holder (READY and NEEDS reports).
    pub holder: std::os::unix::net::UnixStream,
    pub holder_pid: u32,
    pub daemon_started: u64,
    pub generation: u64,
}

/// Run a worker until SIGTERM/SIGINT: adopt every registered image, then
/// serve the kernel interface `h` hands over. On SIGTERM it stops reading
/// requests, answers every request it holds, saves state, tells the
/// holder which images' mounts still need the kernel interface, and
/// returns.
pub async fn run(cfg: DaemonConfig, h: Handoff) -> Result<(), DaemonError> {
    use kite_kernel::features::KernelPath;
    // The holder's death must take the worker with it: a holder restarted
    // by systemd must never find an old worker still answering events.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!("PR_SET_PDEATHSIG: {e}");
    }
    if nix::unistd::getppid().as_raw() as u32 != h.holder_pid {
        return Err(DaemonError::Config(
            "the holder that started this worker is gone".into(),
        ));
    }
    kite_kernel::mount::private_dir(&cfg.cache_dir).map_err(|e| DaemonError::Io {
        what: format!("creating cache dir {}", cfg.cache_dir.display()),
        source: e,
    })?;
    raise_fd_limit();
    let writer = Writer::start();
    let state_dir = cfg.cache_dir.join("kite-state");
    let run_dir = cfg
        .socket
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/run/kite"));
    let mut registry = registry::Registry::new(Some(state_dir.clone()));
    registry.readahead = cfg.readahead;
    // Peers: the listener is bound before images are adopted, so the
    // asking side knows its own address (a node is the home of some
    // blobs). A port that cannot be bound is an error in the log; the
    // node then only asks.
    let peer_listener = cfg.peer.listen.and_then(|addr| {
        match std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(%addr, "peer listener: {e}; not serving peers");
                None
            }
        }
    });
    let peer_tls = match (&cfg.peer.tls.cert, &cfg.peer.tls.key) {
        (Some(c), Some(k)) => Some(peer::server_tls(c, k).map_err(DaemonError::Config)?),
        _ => None,
    };
    let peers = if cfg.peer.listen.is_some() || !cfg.peer.peers.is_empty() {
        let bound = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
        let p = peer::Peers::new(&cfg.peer, bound).map_err(DaemonError::Config)?;
        p.refresh().await;
        Some(p)
    } else {
        None
    };
    if !cfg.peer.peers.is_empty() {
        registry.peers = peers.clone();
    }
    let daemon = daemon::Daemon::new(registry, cfg.merge_bound);
    let (device, fan) = match h.path {
        KernelPath::Cachefiles => {
            let dev = Device::from_fd(h.kernel, Arc::clone(&writer))?;
            if h.restore {
                match dev.restore() {
                    Ok(()) => tracing::info!("cachefiles: restore written: requests the previous worker held are delivered again"),
                    Err(e) => tracing::warn!("cachefiles: this kernel has no restore ({e}): requests the previous worker read but did not answer stay unanswered, and its closed objects fail with EIO until remounted"),
                }
            }
            match dev.culler() {
                Ok(c) => {
                    let _ = daemon.culler.set(c);
                }
                Err(e) => {
                    tracing::warn!("cachefiles: collected blobs' cache files cannot be culled: {e}")
                }
            }
            (Some(dev), None)
        }
        KernelPath::Fanotify => {
            let group = kite_kernel::fanotify::Group::from_fd(h.kernel)?;
            let fan = fanotify::FanotifyPath::new(
                Arc::clone(&daemon),
                group,
                Arc::clone(&writer),
                &cfg.cache_dir,
                cfg.pin_metadata,
            )?;
            (None, Some(fan))
        }
    };
    let worker_started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ctx = Arc::new(api::ApiContext {
        daemon: Arc::clone(&daemon),
        fanotify: fan.clone(),
        kernel_path: h.path.name().into(),
        cache_dir: cfg.cache_dir.clone(),
        domain_id: cfg.domain_id.clone(),
        fetch_timeout: cfg.fetch_timeout,
        writer: writer.mode.into(),
        registry: cfg.registry.clone(),
        run_dir,
        process: api::ProcessInfo {
            pid: std::process::id(),
            holder_pid: h.holder_pid,
            daemon_started: h.daemon_started,
            worker_started,
            worker_generation: h.generation,
        },
        adopted: Default::default(),
        gc_seen: Default::default(),
        cache_bound: cfg.cache_size.unwrap_or(0),
        peers: peers.clone(),
    });
    // Adopt before the first kernel request is read: every blob file and
    // cache object the kernel may ask about must be known (an unknown
    // one is denied). Parsing and hashing bootstraps: the blocking pool.
    let adopted = {
        let ctx = Arc::clone(&ctx);
        tokio::task::spawn_blocking(move || adopt::adopt_all(&ctx))
            .await
            .unwrap_or(0)
    };
    ctx.adopted.store(adopted, Ordering::Relaxed);
    tracing::info!(
        path = h.path.name(),
        why = %h.why,
        cache_dir = %cfg.cache_dir.display(),
        socket = %cfg.socket.display(),
        writer = writer.mode,
        pid = std::process::id(),
        generation = h.generation,
        adopted,
        "kite worker serving"
    );
    let mut serve: tokio::task::JoinHandle<Result<(), DaemonError>> = match (device, &fan) {
        (Some(dev), _) => {
            let dev: Arc<dyn CacheDevice> = Arc::new(dev);
            tokio::spawn(serve::serve(Arc::clone(&daemon), dev))
        }
        (None, Some(fan)) => tokio::spawn(Arc::clone(fan).serve()),
        (None, None) => unreachable!("one kernel path is always set up"),
    };
    let mut api = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        api::serve_on(ctx, h.api)
    });
    // Background prefetches the previous worker had not finished.
    tokio::spawn(adopt::resume_prefetch(Arc::clone(&ctx)));
    // The automatic collection: what stayed unreferenced for the grace
    // period goes.
    let sweeper = (!cfg.gc_grace.is_zero()).then(|| {
        let ctx = Arc::clone(&ctx);
        let grace = cfg.gc_grace;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60).min(grace));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ctx = Arc::clone(&ctx);
                let _ = tokio::task::spawn_blocking(move || {
                    gc::collect(&ctx.daemon, &ctx.cache_dir, &ctx.gc_seen, grace)
                })
                .await;
            }
        })
    });
    // The size bound: checked every 2 s (a scan of the cache's few
    // directories); over it, unreferenced data goes, then unmounted images,
    // least recently used first. Over it with only mounted images left:
    // a warning a minute.
    let bounder = cfg.cache_size.map(|bound| {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned: Option<std::time::Instant> = None;
            loop {
                tick.tick().await;
                let c = Arc::clone(&ctx);
                let Ok(done) =
                    tokio::task::spawn_blocking(move || gc::enforce_bound(&c, bound)).await
                else {
                    continue;
                };
                if done.usage_after > bound
                    && warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        usage = done.usage_after,
                        bound,
                        "the cache is over its bound (--cache-size) with only mounted or pulled images left: their data stays; raise the bound or unmount images"
                    );
                }
            }
        })
    });
    let peer_tasks = peers.as_ref().map(|p| {
        let refresher = (!cfg.peer.peers.is_empty()).then(|| p.spawn_refresher());
        let server = peer_listener.map(|l| {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, token = cfg.peer.token.is_some(), tls = peer_tls.is_some(), "serving peers");
            }
            tokio::spawn(peer::serve(
                l,
                peer_tls.clone(),
                Arc::clone(&daemon),
                cfg.peer.token.clone(),
                Arc::clone(p),
            ))
        });
        (refresher, server)
    });
    // Metrics never stop the worker: a port that cannot be bound is an
    // error in the log, and serving goes on.
    let metrics = cfg.metrics_addr.map(|addr| {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, ctx).await {
                tracing::error!(%addr, "metrics endpoint: {e}");
            }
        })
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
    let mut holder = h.holder;
    if let Err(e) = kite_holder_report(&mut holder, "READY") {
        tracing::warn!("telling the holder we serve: {e}");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Io {
            what: "installing SIGTERM handler".into(),
            source: e,
        })?;
    // Whatever ends the worker (signal, a failed or panicked task), the
    // clean-up below always runs.
    let result = tokio::select! {
        r = &mut serve => r.unwrap_or_else(|e| Err(DaemonError::Config(format!("request loop task ended: {e}")))),
        r = &mut api => r.unwrap_or_else(|e| Err(DaemonError::Config(format!("control API task ended: {e}")))),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    // Stop reading requests and taking registrations. The request loop
    // is cancelled only while it waits for the kernel (a batch it read is
    // dispatched before its next await), so no request read is lost;
    // requests not read yet wait in the kernel for the next worker, and
    // API clients in the socket's backlog for the next worker too.
    serve.abort();
    api.abort();
    for t in [&metrics, &sweeper, &bounder].into_iter().flatten() {
        t.abort();
    }
    if let Some((refresher, server)) = &peer_tasks {
        for t in [refresher, server].into_iter().flatten() {
            t.abort();
        }
    }
    let _ = (&mut serve).await;
    let _ = (&mut api).await;
    flusher.abort();
    switcher.abort();
    drain_inflight(&daemon, cfg.fetch_timeout + Duration::from_secs(10)).await;
    persist(&daemon, fan.as_deref(), &state_dir, None);
    let needs = needing_interface(&daemon, fan.is_some());
    if let Err(e) = kite_holder_report(&mut holder, &format!("NEEDS {}", needs.join(" "))) {
        tracing::warn!("telling the holder which mounts need the kernel interface: {e}");
    }
    tracing::info!(
        reads = daemon.stats.reads.load(Ordering::Relaxed),
        still_needed = needs.len(),
        "kite worker stopped: every request it read is answered"
    );
    result
}

/// One report line to the holder: `READY`, or `NEEDS <fsid>...` (the
/// lines `kite_holder::report` names).
fn kite_holder_report(ch: &mut std::os::unix::net::UnixStream, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(ch, "{line}")
}

/// Wait until every kernel request this worker read is answered (or
/// `limit` passes: fetches are bounded by the fetch timeout, so this only
/// guards against a bug).
async fn drain_inflight(daemon: &daemon::Daemon, limit: Duration) {
    let t = std::time::Instant::now();
    loop {
        let n = daemon.stats.reads_inflight.load(Ordering::Relaxed);
        if n == 0 {
            return;
        }
        if t.elapsed() > limit {
            tracing::error!(
                inflight = n,
                "requests still unanswered at exit: they are denied (EIO)"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The images whose mounts still need the kernel interface once this
/// worker is gone: on the fanotify path those with data missing on disk;
/// on the cachefiles path every registered one (the kernel's cache goes
/// away with the device fd).
fn needing_interface(daemon: &daemon::Daemon, fanotify: bool) -> Vec<String> {
    let images = daemon
        .registry
        .lock()
        .map(|r| r.images())
        .unwrap_or_default();
    images
        .iter()
        .filter(|img| !fanotify || !img.blobs.iter().all(|b| b.is_complete_for_mounts()))
        .map(|img| img.fsid.clone())
        .collect()
}

/// Write `bytes` to `path` unless it already holds exactly them
/// (temporary name, fsync, rename).
pub(crate) fn write_intact(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if std::fs::read(path).map(|d| d == bytes).unwrap_or(false) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        kite_kernel::mount::private_dir(dir)?;
    }
    let tmp = path.with_extension(format!(
        "tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Save the fetch state of `blobs` (default: every registered blob). The
/// bitmap is snapshotted *before* the blob files are synced, so what is
/// saved never claims a chunk that is not on disk.
pub(crate) fn persist(
    daemon: &daemon::Daemon,
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
