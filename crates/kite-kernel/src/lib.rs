//! kite's kernel interfaces, and the only crate with unsafe code.
//!
//! - [`cachefiles`]: the cachefiles on-demand protocol. A sans-IO core
//!   (`proto`) parses messages and encodes replies; [`cachefiles::Device`]
//!   is the real `/dev/cachefiles` behind the [`cachefiles::CacheDevice`]
//!   trait, so the daemon runs against a simulated kernel in tests.
//! - [`fanotify`]: pre-content events on sparse blob files (Linux >= 6.14),
//!   the successor path for file-backed EROFS.
//! - [`uring`]: page-aligned buffers and the io_uring writer thread that
//!   writes fetched data into cache files.
//! - [`mount`]: EROFS mounts (fscache and file-backed) and unmounts.
//! - [`features`]: which kernel paths the running kernel offers.
//! - [`fdpass`]: handing the kernel-interface fds from the holder to its
//!   workers (inheritance) and to a successor holder (`SCM_RIGHTS`).
//! - [`sched`]: `SCHED_IDLE` threads for background work.
//!
//! Every unsafe block carries a `// SAFETY:` comment (enforced by clippy's
//! `undocumented_unsafe_blocks`).

pub mod cachefiles;
pub mod fanotify;
pub mod fdpass;
pub mod features;
pub mod mount;
pub mod pin;
pub mod sched;
pub mod uring;

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {what}: {source}")]
    Mount {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("malformed cachefiles message: {0}")]
    Proto(#[from] cachefiles::ProtoError),
    #[error("internal lock poisoned")]
    Poisoned,
}
