//! The holder: the process `kite daemon` runs as, which keeps the kernel
//! interface open while the workers that serve it come and go.
//!
//! The fanotify group and the `/dev/cachefiles` fd must outlive the process
//! that fetches, parses and decompresses: when the last copy of a fanotify
//! group's fd closes, the kernel allows every pending read and drops the
//! marks, so reads of data never fetched return the sparse blob files'
//! zeros. The holder owns those fds and nothing else: it has no network
//! code, parses no image bytes, and links neither the registry client nor
//! the image format. It
//!
//! - opens the kernel interface (or takes it over: from a predecessor
//!   holder over its socket, or from systemd's fd store), and stores a
//!   copy in systemd's fd store when run as a unit;
//! - spawns the worker (`kite daemon --worker`, the same binary through
//!   `/proc/self/exe`), which inherits copies of the kernel fd and of the
//!   control API's listening socket, so clients queue instead of failing
//!   while a worker restarts;
//! - when the worker dies unexpectedly, settles what it left: on the
//!   fanotify path it denies (EIO) every permission event the dead worker
//!   had read but not answered ([`kite_kernel::fanotify::deny_pending`]);
//!   on the cachefiles path the next worker writes `restore`. Then it
//!   spawns a new worker, which adopts every registered image from the
//!   persisted state before it reads a request;
//! - restarts the worker gracefully on SIGHUP;
//! - hands everything to a successor holder (`kite daemon --takeover`, an
//!   upgrade to a new binary) after its worker has answered every request
//!   it held;
//! - on SIGTERM stops its worker gracefully, and if mounted images still
//!   have data missing, leaves a *keeper* ([`run_keeper`]) holding the
//!   kernel interface until they are unmounted or a new daemon takes over,
//!   so a stop never turns missing data into zeros.
//!
//! Concurrency: one current-thread tokio runtime; the worker's exit, its
//! report lines, the holder socket, and signals are awaited in one loop.
//! Blocking work (the deny scan, handing fds over) runs inline: the holder
//! has nothing else to do meanwhile.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kite_kernel::fdpass;
use kite_kernel::features::{Features, KernelPath};
use kite_kernel::mount::private_dir;

/// The worker's RLIMIT_NOFILE (soft and hard). It bounds the fd numbers a
/// dead worker's pending fanotify events can have, which the deny scan
/// walks (about 0.1 s for this many on the dev VM).
pub const WORKER_FD_LIMIT: u64 = 65536;

/// Environment a holder gives its worker (fd numbers and facts).
pub mod env {
    /// The worker's end of its channel to the holder.
    pub const HOLDER_FD: &str = "KITE_HOLDER_FD";
    /// The kernel interface: the fanotify group or `/dev/cachefiles`.
    pub const KERNEL_FD: &str = "KITE_KERNEL_FD";
    /// The control API's listening socket.
    pub const API_FD: &str = "KITE_API_FD";
    /// `fanotify` or `cachefiles`.
    pub const KERNEL_PATH: &str = "KITE_KERNEL_PATH";
    /// Why this path (for the worker's start line).
    pub const KERNEL_WHY: &str = "KITE_KERNEL_WHY";
    /// `1` when the kernel interface was used by an earlier worker (a
    /// cachefiles worker then writes `restore`).
    pub const RESTORE: &str = "KITE_KERNEL_RESTORE";
    pub const HOLDER_PID: &str = "KITE_HOLDER_PID";
    /// Unix seconds when this daemon (the first holder of the interface
    /// in this line of succession) started.
    pub const STARTED: &str = "KITE_DAEMON_STARTED";
    /// 1 for the first worker, counting every restart.
    pub const GENERATION: &str = "KITE_WORKER_GENERATION";
    /// Vault: its end of the channel to the holder.
    pub const VAULT_FD: &str = "KITE_VAULT_FD";
}

/// The holder's errors.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] kite_kernel::KernelError),
    #[error("{0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HolderError {
    let what = what.into();
    move |source| HolderError::Io { what, source }
}

/// The holder's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub tag: String,
    /// Force a kernel path instead of choosing automatically.
    pub kernel_path: Option<KernelPath>,
    /// The control API socket (its listener is the holder's).
    pub api_socket: PathBuf,
    /// Arguments of the worker after the program (`daemon --worker ...`).
    pub worker_args: Vec<OsString>,
    /// Replace a running daemon (hand-over without dropping a request).
    pub takeover: bool,
}

/// The holder's own socket, beside the control API's: successors ask for
/// the kernel interface there.
pub fn holder_socket(api_socket: &Path) -> PathBuf {
    api_socket.with_extension("holder")
}

/// What the worker says to its holder, one line each (written by
/// `kite-daemon`, which does not link this crate: keep both in step).
pub mod report {
    /// Adopted every image and serving requests.
    pub const READY: &str = "READY";
    /// Stopping: `NEEDS <fsid> ...`, the images whose mounts still need
    /// the kernel interface.
    pub const NEEDS: &str = "NEEDS";
}

/// Take the fd a parent passed under `var`; `who` says who sets it.
fn env_fd(var: &str, who: &str) -> Result<OwnedFd, HolderError> {
    fdpass::take_env_fd(var)
        .map_err(io_err(format!("taking {var}")))?
        .ok_or_else(|| HolderError::Refused(format!("{var} is not set: {who}")))
}

/// A tokio listener over a copy of the holder socket.
fn async_listener(l: &UnixListener) -> Result<tokio::net::UnixListener, HolderError> {
    l.set_nonblocking(true).map_err(io_err("holder socket"))?;
    tokio::net::UnixListener::from_std(l.try_clone().map_err(io_err("holder socket"))?)
        .map_err(io_err("registering the holder socket"))
}

/// What a worker received from its holder.
pub struct WorkerEnv {
    pub kernel: OwnedFd,
    pub path: KernelPath,
    pub why: String,
    pub restore: bool,
    pub api: UnixListener,
    pub holder: UnixStream,
    pub holder_pid: u32,
    pub started: u64,
    pub generation: u64,
}

impl WorkerEnv {
    /// Take what the holder passed (the fds are owned from here on).
    pub fn take() -> Result<Self, HolderError> {
        let fd = |var: &str| {
            env_fd(
                var,
                "`kite daemon --worker` is started by `kite daemon`, not by hand",
            )
        };
        let var = |v: &str| std::env::var(v).unwrap_or_default();
        let path = KernelPath::parse(&var(env::KERNEL_PATH)).ok_or_else(|| {
            HolderError::Refused(format!("{}: not a kernel path", env::KERNEL_PATH))
        })?;
        Ok(Self {
            kernel: fd(env::KERNEL_FD)?,
            api: UnixListener::from(fd(env::API_FD)?),
            holder: UnixStream::from(fd(env::HOLDER_FD)?),
            path,
            why: var(env::KERNEL_WHY),
            restore: var(env::RESTORE) == "1",
            holder_pid: var(env::HOLDER_PID).parse().unwrap_or(0),
            started: var(env::STARTED).parse().unwrap_or(0),
            generation: var(env::GENERATION).parse().unwrap_or(1),
        })
    }
}

/// The kernel interface and the sockets the holder owns.
struct Held {
    path: KernelPath,
    why: String,
    kernel: OwnedFd,
    /// The holder socket (successors connect here).
    listener: UnixListener,
    /// The control API's socket (None in a keeper).
    api: Option<UnixListener>,
    /// The interface was used before (by a predecessor or a dead worker).
    used: bool,
    started: u64,
    /// Workers this line of holders has started so far.
    generation: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bind a unix socket at `path` (mode 0600, directory 0700), replacing a
/// stale file.
fn bind_socket(path: &Path) -> Result<UnixListener, HolderError> {
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing stale {}", path.display()))(e)),
    }
    let l = UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Ask whoever listens on the holder socket for the kernel interface.
/// Ok(None): nobody listens (no daemon, or a stale socket).
fn take_over(cfg: &Config) -> Result<Option<Held>, HolderError> {
    let hs = holder_socket(&cfg.api_socket);
    let mut s = match UnixStream::connect(&hs) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    // The predecessor first lets its worker answer every request it holds
    // (bounded by its fetch timeout).
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(io_err("setting a timeout"))?;
    writeln!(s, "TAKEOVER force={}", u8::from(cfg.takeover))
        .map_err(io_err(format!("asking {} for a hand-over", hs.display())))?;
    let mut buf = [0u8; 512];
    let (n, fds) = fdpass::recv(&s, &mut buf).map_err(io_err(format!(
        "waiting for the hand-over on {}",
        hs.display()
    )))?;
    let line = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    if let Some(rest) = line.strip_prefix("BUSY") {
        return Err(HolderError::Refused(format!(
            "a kite daemon is already running ({}, socket {}); `kite daemon --takeover` replaces it without dropping a request",
            rest.trim(),
            cfg.api_socket.display()
        )));
    }
    let Some(rest) = line.strip_prefix("HANDOVER ") else {
        return Err(HolderError::Refused(format!(
            "unexpected answer from {}: {line:?}",
            hs.display()
        )));
    };
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_string()
    };
    let path = KernelPath::parse(&field("path")).ok_or_else(|| {
        HolderError::Refused(format!(
            "hand-over from {} names no kernel path",
            hs.display()
        ))
    })?;
    let mut fds = fds.into_iter();
    let (Some(kernel), Some(listener)) = (fds.next(), fds.next()) else {
        return Err(HolderError::Refused(format!(
            "hand-over from {} came without its fds",
            hs.display()
        )));
    };
    let api = fds.next().map(UnixListener::from);
    let from = field("pid");
    Ok(Some(Held {
        path,
        why: format!("taken over from the daemon that held it (pid {from})"),
        kernel,
        listener: UnixListener::from(listener),
        api,
        used: true,
        started: field("started").parse().unwrap_or_else(|_| now_unix()),
        generation: field("generation").parse().unwrap_or(0),
    }))
}

/// The kernel interface from systemd's fd store, if it gave one back.
fn from_fd_store(cfg: &Config) -> Result<Option<Held>, HolderError> {
    let mut found = None;
    for (name, fd) in fdpass::take_listen_fds() {
        let path = name
            .strip_prefix("kite-kernel-")
            .and_then(KernelPath::parse);
        match path {
            Some(p) if found.is_none() => found = Some((p, fd)),
            _ => tracing::warn!(name, "ignoring an fd passed by the service manager"),
        }
    }
    let Some((path, kernel)) = found else {
        return Ok(None);
    };
    Ok(Some(Held {
        path,
        why: "kept in systemd's file descriptor store across a restart".into(),
        kernel,
        listener: bind_socket(&holder_socket(&cfg.api_socket))?,
        api: None,
        used: true,
        started: now_unix(),
        generation: 0,
    }))
}

/// Open the kernel interface this kernel offers (or the one forced).
fn open_fresh(cfg: &Config) -> Result<Held, HolderError> {
    private_dir(&cfg.cache_dir).map_err(io_err(format!(
        "creating cache dir {}",
        cfg.cache_dir.display()
    )))?;
    let features = Features::probe();
    let (mut path, mut why) = features
        .choose(cfg.kernel_path)
        .map_err(HolderError::Refused)?;
    let kernel = loop {
        match path {
            KernelPath::Cachefiles => {
                match kite_kernel::cachefiles::Device::open_bound(&cfg.cache_dir, &cfg.tag) {
                    Ok(fd) => break fd,
                    // /dev/cachefiles without on-demand support fails `bind
                    // ondemand`: in auto mode, use fanotify if there.
                    Err(e)
                        if cfg.kernel_path.is_none() && features.fanotify_missing().is_empty() =>
                    {
                        why = format!("cachefiles bind failed ({e}; CONFIG_CACHEFILES_ONDEMAND missing?), fanotify available");
                        path = KernelPath::Fanotify;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            KernelPath::Fanotify => break kite_kernel::fanotify::Group::create_fd()?,
        }
    };
    Ok(Held {
        path,
        why,
        kernel,
        listener: bind_socket(&holder_socket(&cfg.api_socket))?,
        api: None,
        used: false,
        started: now_unix(),
        generation: 0,
    })
}

/// Tell systemd (when run as a unit) to keep a copy of the kernel fd, so
/// even the holder's death does not close it.
fn store_in_systemd(held: &Held) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let name = format!("kite-kernel-{}", held.path.name());
    let r = sd_notify::notify_with_fds(
        &[
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&name),
        ],
        &[held.kernel.as_fd()],
    );
    match r {
        Ok(()) => tracing::info!(name, "kernel interface stored in systemd's fd store"),
        Err(e) => tracing::warn!("storing the kernel fd in systemd's fd store: {e}"),
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

/// Deny what a dead reader of the group left pending (fanotify), before
/// any new worker reads from it.
fn settle(held: &Held) {
    if held.path != KernelPath::Fanotify {
        return;
    }
    let t = Instant::now();
    let n = kite_kernel::fanotify::deny_pending(held.kernel.as_fd(), WORKER_FD_LIMIT as i32);
    tracing::info!(
        denied = n,
        ms = t.elapsed().as_millis() as u64,
        "settled the permission events a previous worker left unanswered (denied with EIO)"
    );
}

/// Cap RLIMIT_NOFILE at [`WORKER_FD_LIMIT`]: workers inherit it, and the
/// deny scan relies on it.
fn cap_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let hard = hard.min(WORKER_FD_LIMIT);
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard) {
            tracing::warn!("capping RLIMIT_NOFILE at {hard}: {e}");
        }
    }
}

/// A running worker.
struct Worker {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>,
    pid: u32,
    started: Instant,
}

fn spawn_worker(cfg: &Config, held: &Held, generation: u64) -> Result<Worker, HolderError> {
    let api = held
        .api
        .as_ref()
        .ok_or_else(|| HolderError::Refused("no control API socket".into()))?;
    let (mine, theirs) = UnixStream::pair().map_err(io_err("creating the worker channel"))?;
    let k = fdpass::inheritable(held.kernel.as_fd()).map_err(io_err("passing the kernel fd"))?;
    let a = fdpass::inheritable(api.as_fd()).map_err(io_err("passing the API socket"))?;
    let h = fdpass::inheritable(theirs.as_fd()).map_err(io_err("passing the worker channel"))?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.args(&cfg.worker_args)
        .env(env::KERNEL_FD, k.as_raw_fd().to_string())
        .env(env::API_FD, a.as_raw_fd().to_string())
        .env(env::HOLDER_FD, h.as_raw_fd().to_string())
        .env(env::KERNEL_PATH, held.path.name())
        .env(env::KERNEL_WHY, &held.why)
        .env(env::RESTORE, if held.used { "1" } else { "0" })
        .env(env::HOLDER_PID, std::process::id().to_string())
        .env(env::STARTED, held.started.to_string())
        .env(env::GENERATION, generation.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    let child = cmd.spawn().map_err(io_err("starting the worker"))?;
    // The child has its copies now.
    drop((k, a, h, theirs));
    mine.set_nonblocking(true)
        .map_err(io_err("worker channel"))?;
    let stream =
        tokio::net::UnixStream::from_std(mine).map_err(io_err("registering the worker channel"))?;
    use tokio::io::AsyncBufReadExt;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, generation, "worker started");
    Ok(Worker {
        child,
        lines: tokio::io::BufReader::new(stream).lines(),
        pid,
        started: Instant::now(),
    })
}

fn signal_worker(w: &Worker, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(w.pid as i32);
    if let Err(e) = nix::sys::signal::kill(pid, sig) {
        tracing::warn!(pid = w.pid, "signalling the worker: {e}");
    }
}

/// Why the holder's serving loop ended.
enum Outcome {
    /// SIGTERM/SIGINT: the worker stopped; these images' mounts (None:
    /// unknown, so every kite mount) still need the interface.
    Stop(Option<Vec<String>>),
    /// A successor asked: hand everything over on this connection.
    Handover(UnixStream),
}

/// What the holder is waiting for its worker to do.
enum Intent {
    Serve,
    Restart,
    Stop,
    Handover(UnixStream),
}

/// Run the holder until it stops or hands over. `kite daemon` runs this.
pub fn run(cfg: Config) -> Result<(), HolderError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the holder's runtime"))?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: Config) -> Result<(), HolderError> {
    cap_fd_limit();
    // Lower our OOM score: the holder is tiny, and its death is the one
    // case nothing can repair (it needs CAP_SYS_RESOURCE; best effort).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let (mut held, from_store) = match take_over(&cfg)? {
        Some(h) => {
            // systemd may also pass the same interface back: ours wins.
            drop(fdpass::take_listen_fds());
            (h, false)
        }
        None => match from_fd_store(&cfg)? {
            Some(h) => (h, true),
            None => (open_fresh(&cfg)?, false),
        },
    };
    if held.api.is_none() {
        held.api = Some(bind_socket(&cfg.api_socket)?);
    }
    if !from_store {
        store_in_systemd(&held);
    }
    tracing::info!(
        path = held.path.name(),
        why = %held.why,
        pid = std::process::id(),
        holder_socket = %holder_socket(&cfg.api_socket).display(),
        "kite holder: keeping the kernel interface"
    );
    if held.used {
        settle(&held);
    }
    // A second copy of the kernel fd in a process of its own, so even the
    // holder's death does not release the interface.
    let vault = match spawn_vault(&cfg, &held) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!("starting the vault: {e}; the holder's death would now release the kernel interface");
            None
        }
    };
    let release = |vault: &Option<UnixStream>| {
        if let Some(v) = vault {
            let _ = fdpass::send(v, b"RELEASE\n", &[]);
        }
    };
    match serve(&cfg, &mut held).await? {
        Outcome::Handover(conn) => {
            hand_over(&held, conn, true)?;
            release(&vault);
            Ok(())
        }
        Outcome::Stop(needs) => {
            let _ = std::fs::remove_file(&cfg.api_socket);
            held.api = None;
            let keep = mounts_needing(&needs, &cfg.cache_dir);
            if keep.is_empty() {
                let _ = std::fs::remove_file(holder_socket(&cfg.api_socket));
                release(&vault);
                tracing::info!("no mount needs the kernel interface: released");
                notify(&[sd_notify::NotifyState::Stopping]);
                return Ok(());
            }
            let Some(vault) = vault else {
                // No vault to hand it to: this process keeps it itself.
                tracing::warn!("mounted images still have data missing and there is no vault: the holder stays as their keeper");
                return keeper_async(held, needs, &cfg.api_socket, &cfg.cache_dir).await;
            };
            let fsids = match &needs {
                Some(f) => f.join(" "),
                None => "*".into(),
            };
            fdpass::send(
                &vault,
                format!("KEEP {fsids}\n").as_bytes(),
                &[held.listener.as_fd()],
            )
            .map_err(io_err("handing the holder socket to the vault"))?;
            let mounts: Vec<String> = keep
                .iter()
                .map(|m| m.mountpoint.display().to_string())
                .collect();
            tracing::warn!(
                mounts = %mounts.join(" "),
                "mounted images still have data missing: the keeper holds the kernel interface until they are unmounted or a new kite daemon takes over; their reads of missing data wait until then"
            );
            Ok(())
        }
    }
}

/// The mounts that still need the kernel interface: those of the images
/// named, or with None every kite mount of this cache (file-backed from
/// its bootstraps, or fscache mode).
fn mounts_needing(
    needs: &Option<Vec<String>>,
    cache_dir: &Path,
) -> Vec<kite_kernel::mount::ErofsMount> {
    let boots = cache_dir.join("bootstraps");
    kite_kernel::mount::erofs_mounts()
        .into_iter()
        .filter(|m| match needs {
            Some(fsids) => fsids.contains(&m.fsid),
            None => m.source == "none" || Path::new(&m.source).starts_with(&boots),
        })
        .collect()
}

async fn serve(cfg: &Config, held: &mut Held) -> Result<Outcome, HolderError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k: SignalKind| signal(k).map_err(io_err("installing a signal handler"));
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    let listener = async_listener(&held.listener)?;
    let mut quick_crashes = 0u32;
    let mut announced = false;
    loop {
        held.generation += 1;
        let generation = held.generation;
        let mut w = spawn_worker(cfg, held, generation)?;
        let mut intent = Intent::Serve;
        let mut needs: Option<Vec<String>> = None;
        let mut ready = false;
        let status = loop {
            tokio::select! {
                s = w.child.wait() => break s,
                line = w.lines.next_line() => match line {
                    Ok(Some(l)) if l == report::READY => {
                        ready = true;
                        tracing::info!(pid = w.pid, generation, "worker serving");
                        if !announced {
                            announced = true;
                            notify(&[sd_notify::NotifyState::Ready]);
                        }
                        let status = format!("serving (worker pid {}, generation {generation})", w.pid);
                        notify(&[sd_notify::NotifyState::Status(&status)]);
                    }
                    Ok(Some(l)) if l.starts_with(report::NEEDS) => {
                        needs = Some(l[report::NEEDS.len()..].split_whitespace().map(String::from).collect());
                    }
                    Ok(Some(l)) => tracing::warn!(line = %l, "unexpected line from the worker"),
                    // EOF: the worker is exiting; its exit comes next.
                    Ok(None) | Err(_) => break w.child.wait().await,
                },
                conn = listener.accept() => {
                    let Ok((conn, _)) = conn else { continue };
                    let busy = (!matches!(intent, Intent::Serve)).then_some("stopping");
                    let Some(conn) = takeover_request(conn, true, busy, w.pid).await else { continue };
                    tracing::info!(pid = w.pid, "a successor asked for the kernel interface: stopping the worker gracefully");
                    signal_worker(&w, nix::sys::signal::Signal::SIGTERM);
                    intent = Intent::Handover(conn);
                }
                _ = term.recv() => { intent = stop_for(&w, intent, "SIGTERM"); }
                _ = int.recv() => { intent = stop_for(&w, intent, "SIGINT"); }
                _ = hup.recv() => {
                    if matches!(intent, Intent::Serve) {
                        tracing::info!(pid = w.pid, "SIGHUP: restarting the worker gracefully");
                        signal_worker(&w, nix::sys::signal::Signal::SIGTERM);
                        intent = Intent::Restart;
                    }
                }
            }
        };
        let status = status.map_err(io_err("waiting for the worker"))?;
        let lived = w.started.elapsed();
        match intent {
            Intent::Handover(conn) => return Ok(Outcome::Handover(conn)),
            Intent::Stop => {
                if !status.success() {
                    tracing::warn!(pid = w.pid, %status, "the worker did not stop cleanly");
                    settle(held);
                }
                return Ok(Outcome::Stop(if status.success() { needs } else { None }));
            }
            Intent::Restart => {
                held.used = true;
                if !status.success() {
                    settle(held);
                }
                quick_crashes = 0;
            }
            Intent::Serve => {
                held.used = true;
                tracing::error!(pid = w.pid, %status, lived_ms = lived.as_millis() as u64, "worker died; settling what it left and starting another");
                settle(held);
                // A worker that dies before it serves (e.g. it cannot
                // start) must not spin: back off, readers wait. One that
                // served is replaced at once.
                quick_crashes = if ready { 0 } else { quick_crashes + 1 };
                if quick_crashes > 1 {
                    let delay = Duration::from_millis(100 << quick_crashes.min(6));
                    tracing::warn!(
                        ms = delay.as_millis() as u64,
                        "worker keeps dying early: waiting before the next start"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn stop_for(w: &Worker, intent: Intent, why: &str) -> Intent {
    match intent {
        Intent::Serve | Intent::Restart => {
            tracing::info!(
                pid = w.pid,
                "{why}: stopping the worker gracefully (it answers what it holds)"
            );
            notify(&[sd_notify::NotifyState::Stopping]);
            signal_worker(w, nix::sys::signal::Signal::SIGTERM);
            Intent::Stop
        }
        other => other,
    }
}

/// Read a successor's request; None if it is not one we act on (it was
/// answered BUSY, or was malformed). A serving holder hands over only when
/// forced (`--takeover`); a keeper always does. `busy`: why no hand-over
/// is possible now.
async fn takeover_request(
    conn: tokio::net::UnixStream,
    require_force: bool,
    busy: Option<&str>,
    worker_pid: u32,
) -> Option<UnixStream> {
    use tokio::io::AsyncBufReadExt;
    let mut r = tokio::io::BufReader::new(conn);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return None;
    }
    let conn = r.into_inner().into_std().ok()?;
    let _ = conn.set_nonblocking(false);
    let line = line.trim();
    let force = line == "TAKEOVER force=1";
    if line.starts_with("TAKEOVER") && busy.is_none() && (force || !require_force) {
        return Some(conn);
    }
    let _ = fdpass::send(
        &conn,
        format!(
            "BUSY holder pid {}, worker pid {worker_pid}{}\n",
            std::process::id(),
            busy.map(|b| format!(", {b}")).unwrap_or_default()
        )
        .as_bytes(),
        &[],
    );
    None
}

/// Send the kernel interface and our sockets to a successor, then return
/// (the caller exits).
fn hand_over(held: &Held, conn: UnixStream, announce: bool) -> Result<(), HolderError> {
    let mut fds = vec![held.kernel.as_fd(), held.listener.as_fd()];
    if let Some(api) = &held.api {
        fds.push(api.as_fd());
    }
    let msg = format!(
        "HANDOVER path={} pid={} started={} generation={}\n",
        held.path.name(),
        std::process::id(),
        held.started,
        held.generation
    );
    fdpass::send(&conn, msg.as_bytes(), &fds)
        .map_err(io_err("handing the kernel interface over"))?;
    tracing::info!("kernel interface handed over to the successor; exiting");
    if announce {
        notify(&[sd_notify::NotifyState::Stopping]);
    }
    Ok(())
}

/// Start the vault: `kite daemon --keeper` in its own process group,
/// holding a copy of the kernel fd. It waits on a channel to the holder:
/// `RELEASE` (the holder handed over, or nothing needs the interface) makes
/// it exit; `KEEP <fsids>` with the holder socket attached (a stop while
/// mounts need the interface), or the holder's death (the channel closes
/// with no word), makes it the keeper.
fn spawn_vault(cfg: &Config, held: &Held) -> Result<UnixStream, HolderError> {
    let (mine, theirs) = UnixStream::pair().map_err(io_err("creating the vault channel"))?;
    let k = fdpass::inheritable(held.kernel.as_fd()).map_err(io_err("passing the kernel fd"))?;
    let v = fdpass::inheritable(theirs.as_fd()).map_err(io_err("passing the vault channel"))?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(["daemon", "--keeper", "--cache-dir"])
        .arg(&cfg.cache_dir)
        .arg("--socket")
        .arg(&cfg.api_socket)
        .env(env::KERNEL_FD, k.as_raw_fd().to_string())
        .env(env::VAULT_FD, v.as_raw_fd().to_string())
        .env(env::KERNEL_PATH, held.path.name())
        .env(env::STARTED, held.started.to_string())
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C or a signal meant for the
        // holder's group does not reach it.
        .process_group(0);
    let child = cmd.spawn().map_err(io_err("starting the vault"))?;
    drop((k, v, theirs));
    tracing::info!(
        pid = child.id(),
        "vault started (keeps the kernel interface if this holder dies)"
    );
    Ok(mine)
}

/// `kite daemon --keeper`: hold the kernel interface, answering nothing,
/// until the mounts that need it are gone (then release it) or a new
/// daemon takes it over. Readers of missing data wait meanwhile (the
/// kernel's wait is killable). SIGTERM and SIGINT are refused: releasing
/// the interface while such mounts exist would turn missing data into
/// zeros; SIGKILL does exactly that (the one unprotected case).
pub fn run_keeper(api_socket: &Path, cache_dir: &Path) -> Result<(), HolderError> {
    use nix::sys::signal::{SigSet, Signal};
    let fd = |var: &str| env_fd(var, "the keeper is started by the holder");
    let var = |v: &str| std::env::var(v).unwrap_or_default();
    let path = KernelPath::parse(&var(env::KERNEL_PATH))
        .ok_or_else(|| HolderError::Refused("keeper: no kernel path".into()))?;
    let kernel = fd(env::KERNEL_FD)?;
    let vault = UnixStream::from(fd(env::VAULT_FD)?);
    let started = var(env::STARTED).parse().unwrap_or_else(|_| now_unix());
    // While waiting, stray SIGTERM/SIGINT stay pending instead of killing
    // the vault (they are reported once it keeps).
    let mut quiet = SigSet::empty();
    quiet.add(Signal::SIGTERM);
    quiet.add(Signal::SIGINT);
    let _ = quiet.thread_block();
    let mut buf = [0u8; 64 * 1024];
    let (n, fds) = loop {
        match fdpass::recv(&vault, &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.map_err(io_err("waiting on the holder"))?,
        }
    };
    let msg = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let (needs, listener) = if msg == "RELEASE" {
        return Ok(());
    } else if let Some(fsids) = msg.strip_prefix("KEEP") {
        let needs =
            (fsids.trim() != "*").then(|| fsids.split_whitespace().map(String::from).collect());
        let listener = fds
            .into_iter()
            .next()
            .map(UnixListener::from)
            .ok_or_else(|| HolderError::Refused("KEEP came without the holder socket".into()))?;
        (needs, listener)
    } else {
        // The channel closed with no word: the holder died (its worker
        // dies with it, PR_SET_PDEATHSIG). Unless a new holder already
        // serves (systemd restarted one from its fd store), deny what the
        // worker left pending and keep the interface for the next daemon.
        let hs = holder_socket(api_socket);
        if UnixStream::connect(&hs).is_ok() {
            tracing::info!("vault: the holder died, and a new one already serves: exiting");
            return Ok(());
        }
        tracing::error!("vault: the holder died; keeping the kernel interface until a new kite daemon takes it over or no mount needs it");
        if path == KernelPath::Fanotify {
            let n = kite_kernel::fanotify::deny_pending(kernel.as_fd(), WORKER_FD_LIMIT as i32);
            tracing::info!(
                denied = n,
                "vault: denied the events the dead worker had read (EIO)"
            );
        }
        (None, bind_socket(&hs)?)
    };
    let _ = quiet.thread_unblock();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the keeper's runtime"))?;
    let held = Held {
        path,
        why: "keeper".into(),
        kernel,
        listener,
        api: None,
        used: true,
        started,
        generation: 0,
    };
    rt.block_on(keeper_async(held, needs, api_socket, cache_dir))
}

async fn keeper_async(
    held: Held,
    needs: Option<Vec<String>>,
    api_socket: &Path,
    cache_dir: &Path,
) -> Result<(), HolderError> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = async_listener(&held.listener)?;
    let sig = |k: SignalKind| signal(k).map_err(io_err("installing a signal handler"));
    let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
    tracing::info!(
        pid = std::process::id(),
        "keeper holding the kernel interface"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if mounts_needing(&needs, cache_dir).is_empty() {
                    let _ = std::fs::remove_file(holder_socket(api_socket));
                    tracing::info!("keeper: no mount needs the kernel interface any more: released");
                    return Ok(());
                }
            }
            conn = listener.accept() => {
                let Ok((conn, _)) = conn else { continue };
                let Some(conn) = takeover_request(conn, false, None, 0).await else { continue };
                return hand_over(&held, conn, false);
            }
            _ = term.recv() => keeper_refuses("SIGTERM", &needs, cache_dir),
            _ = int.recv() => keeper_refuses("SIGINT", &needs, cache_dir),
        }
    }
}

fn keeper_refuses(sig: &str, needs: &Option<Vec<String>>, cache_dir: &Path) {
    let mounts: Vec<String> = mounts_needing(needs, cache_dir)
        .iter()
        .map(|m| m.mountpoint.display().to_string())
        .collect();
    tracing::warn!(
        mounts = %mounts.join(" "),
        "keeper: {sig} ignored: these mounts still have data missing; unmount them (or start kite daemon) and the keeper exits by itself. SIGKILL would release the kernel interface and let their missing data read as zeros"
    );
}
