//! kite's containerd snapshotter: the Snapshots v1 gRPC service on a unix
//! socket, for containerd's `proxy_plugins`.
//!
//! - [`service`]: the RPCs. A kite image's layers are committed without a
//!   download; the image is registered with the kite daemon (which
//!   fetches and verifies its bootstrap) and mounted once, at the first
//!   container, as the lower layer of every container's overlay. Other
//!   images get ordinary overlayfs snapshots.
//! - [`store`]: snapshot metadata in redb, one transaction per RPC.
//! - [`labels`]: what containerd's labels say about a layer.
//! - [`filter`]: List filters.
//!
//! State that outlives the process: the store, the snapshot directories
//! and the mounts (EROFS and overlay mounts belong to the kernel). A
//! restarted snapshotter reads the store and carries on; running
//! containers never notice it was gone. A daemon restart is the daemon's
//! business (it adopts its images); after a reboot the first container of
//! an image registers it again from the reference stored with its layers.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

pub mod filter;
pub mod labels;
pub mod service;
pub mod store;

/// The gRPC stack of the Snapshots service (clients in tests use it too).
pub use containerd_snapshots::tonic;

/// Default socket containerd's `proxy_plugins.kite.address` names.
pub const DEFAULT_ADDRESS: &str = "/run/kite/snapshotter.sock";
/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/kite/snapshotter";

/// Errors, each mapped to the gRPC code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// `kite snapshotter`'s settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// State: `metadata.redb`, `snapshots/<id>/{fs,work}`,
    /// `images/<fsid>` (the EROFS mounts).
    pub root: PathBuf,
    /// The gRPC socket containerd connects to.
    pub address: PathBuf,
    /// The kite daemon's control socket.
    pub daemon_socket: PathBuf,
}

/// Serve until SIGTERM or SIGINT. The socket is bound (and systemd told
/// READY=1) only once the store is open, so containerd, ordered after this
/// service, never meets a snapshotter that cannot answer.
pub async fn serve(cfg: Config) -> Result<(), Error> {
    let rt = tokio::runtime::Handle::current();
    let core = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || service::Core::open(&cfg, rt))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
    };
    if let Some(dir) = cfg.address.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
    }
    match std::fs::remove_file(&cfg.address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Internal(format!("{}: {e}", cfg.address.display()))),
    }
    let listener = tokio::net::UnixListener::bind(&cfg.address)
        .map_err(|e| Error::Internal(format!("binding {}: {e}", cfg.address.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // containerd runs as root; nobody else talks to a snapshotter.
        let _ = std::fs::set_permissions(&cfg.address, std::fs::Permissions::from_mode(0o600));
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        address = %cfg.address.display(),
        root = %cfg.root.display(),
        daemon = %cfg.daemon_socket.display(),
        "kite snapshotter serving"
    );
    let svc = containerd_snapshots::server(Arc::new(service::Snapshotter::new(core)));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("kite snapshotter stopping; mounts stay");
    };
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))?;
    let _ = std::fs::remove_file(&cfg.address);
    Ok(())
}
