//! Collecting cache data that no registered image references: `kite gc`
//! (`POST /v1/gc`), the containerd snapshotter after it removes an image,
//! and a sweep every minute that collects what has been unreferenced for
//! the grace period (`kite daemon --gc-grace`).
//!
//! What is collected, under `--cache-dir`:
//! - `blobs/<hex>`: fanotify path blob files;
//! - `kite-state/<hex>.fetched`: fetch bitmaps (both paths);
//! - `bootstraps/<fsid>`: kept bootstraps (both paths);
//! - `manifests/<hex>`: kept manifests of registry images (offline
//!   registration), referenced by a registered image pinned to that digest.
//!
//! The registry lock is held from deciding what is referenced to the last
//! unlink, so a registration cannot slip in between: it inserts the image
//! (under the lock) before it creates any of these files. A file that a
//! stale mount still has open stays readable through that open file; its
//! data is gone once the mount goes. On the cachefiles path the kernel's
//! cache objects of forgotten blobs stay until cachefiles culls them
//! (its `brun`/`bcull`/`bstop` space thresholds): only the kernel may
//! remove them while the cache is bound.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::daemon::{lock, Daemon};

/// What one collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub blobs: usize,
    pub bootstraps: usize,
    pub state_files: usize,
    #[serde(default)]
    pub manifests: usize,
    /// Disk space freed (allocated blocks of the removed files).
    pub freed_bytes: u64,
    /// Unreferenced files left because their grace period has not passed.
    pub waiting: usize,
}

/// When each unreferenced file was first seen unreferenced (per worker:
/// a new worker starts the grace period again, which only delays).
#[derive(Debug, Default)]
pub struct Unreferenced(std::sync::Mutex<HashMap<std::path::PathBuf, Instant>>);

/// Remove what no registered image references and has been unreferenced
/// for at least `grace` (zero: now).
pub fn collect(
    daemon: &Daemon,
    cache_dir: &Path,
    seen: &Unreferenced,
    grace: Duration,
) -> GcReport {
    let registry = lock(&daemon.registry);
    let mut blobs = HashSet::new();
    let mut fsids = HashSet::new();
    let mut manifests = HashSet::new();
    for img in registry.images() {
        fsids.insert(img.fsid.clone());
        if let Some((_, d)) = img.source.rsplit_once("@sha256:") {
            manifests.insert(d.to_string());
        }
        for b in &img.blobs {
            blobs.insert(b.digest.hex());
        }
    }
    let mut seen = lock(&seen.0);
    let now = Instant::now();
    let mut still = HashSet::new();
    let (mut freed_bytes, mut waiting) = (0u64, 0usize);
    // Removes the unreferenced files of `dir` that are past their grace;
    // `key` says whether a name is referenced (None: not a file of ours).
    let mut sweep = |dir: &Path, key: &dyn Fn(&str) -> Option<bool>| -> usize {
        let mut count = 0;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // None: not a file of ours (temporary names, other files).
            let Some(referenced) = key(&name) else {
                continue;
            };
            if referenced {
                continue;
            }
            let path = e.path();
            let since = *seen.entry(path.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                waiting += 1;
                still.insert(path);
                continue;
            }
            let freed = std::fs::symlink_metadata(&path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    count += 1;
                    freed_bytes += freed;
                    tracing::debug!(path = %path.display(), "collected");
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), "collecting: {err}");
                    still.insert(path);
                }
            }
        }
        count
    };
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit());
    let n_blobs = sweep(&cache_dir.join("blobs"), &|name| {
        is_hex(name).then(|| blobs.contains(name))
    });
    let n_state = sweep(&cache_dir.join("kite-state"), &|name| {
        let hex = name.strip_suffix(".fetched")?;
        is_hex(hex).then(|| blobs.contains(hex))
    });
    let n_boot = sweep(&cache_dir.join("bootstraps"), &|name| {
        is_hex(name).then(|| fsids.contains(name))
    });
    let n_manifests = sweep(&cache_dir.join("manifests"), &|name| {
        is_hex(name).then(|| manifests.contains(name))
    });
    let report = GcReport {
        blobs: n_blobs,
        bootstraps: n_boot,
        state_files: n_state,
        manifests: n_manifests,
        freed_bytes,
        waiting,
    };
    // Forget files that went away or became referenced again.
    seen.retain(|p, _| still.contains(p));
    drop(registry);
    if report.blobs + report.bootstraps + report.state_files + report.manifests > 0 {
        tracing::info!(
            blobs = report.blobs,
            bootstraps = report.bootstraps,
            state_files = report.state_files,
            manifests = report.manifests,
            freed_bytes = report.freed_bytes,
            "collected cache data no registered image references"
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreferenced_files_wait_out_the_grace_period_then_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        for sub in ["blobs", "kite-state", "bootstraps"] {
            std::fs::create_dir_all(cache.join(sub)).unwrap();
        }
        let hex = "ab".repeat(32);
        std::fs::write(cache.join("blobs").join(&hex), vec![1u8; 8192]).unwrap();
        std::fs::write(cache.join("kite-state").join(format!("{hex}.fetched")), [1]).unwrap();
        std::fs::write(cache.join("bootstraps").join(&hex), b"boot").unwrap();
        // Not ours: left alone.
        std::fs::write(cache.join("blobs").join(".tmp-x"), b"x").unwrap();
        let daemon = Daemon::new(crate::registry::Registry::new(None), 1 << 20);
        let seen = Unreferenced::default();
        let r = collect(&daemon, cache, &seen, Duration::from_secs(3600));
        assert_eq!(r.waiting, 3);
        assert_eq!(r.blobs + r.bootstraps + r.state_files, 0);
        assert!(cache.join("blobs").join(&hex).exists());
        let r = collect(&daemon, cache, &seen, Duration::ZERO);
        assert_eq!(
            (r.blobs, r.state_files, r.bootstraps, r.waiting),
            (1, 1, 1, 0)
        );
        assert!(r.freed_bytes >= 8192);
        assert!(!cache.join("blobs").join(&hex).exists());
        assert!(cache.join("blobs").join(".tmp-x").exists());
    }
}
