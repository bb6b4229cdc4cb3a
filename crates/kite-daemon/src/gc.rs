//! Collecting cache data that no registered image references, and keeping
//! the cache under `--cache-size` ([`enforce_bound`]).
//!
//! Collection: `kite gc`
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
//! rename into `.trash` (unlinked after the lock is released), so a
//! registration cannot slip in between: it inserts the image (under the
//! lock) before it creates any of these files. The one exception, a
//! registry image's manifest (kept before the image is inserted), is left
//! alone for its first minute. A file that a
//! stale mount still has open stays readable through that open file; its
//! data is gone once the mount goes.
//!
//! On the cachefiles path the kernel's cache files
//! (`cache/I<volume>/@<fan-out>/D<key>`, key = blob digest hex or image
//! fsid) of blobs and bootstraps no registered image references are culled
//! through the device's `cull` command, the only sanctioned removal while
//! the cache is bound: the kernel refuses (EBUSY) a file an object still
//! uses, so a mounted image's data is never culled; such a file is tried
//! again at the next collection.

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
    /// cachefiles: the kernel's cache files culled.
    #[serde(default)]
    pub cache_objects: usize,
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
    // What an earlier collection parked and did not get to unlink.
    if let Ok(rd) = std::fs::read_dir(cache_dir.join(".trash")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let registry = lock(&daemon.registry);
    let mut blobs = HashSet::new();
    let mut fsids = HashSet::new();
    let mut manifests = HashSet::new();
    // A registration keeps its bootstrap just before it inserts the
    // image: it is announced first, and counts as referenced.
    fsids.extend(registry.registering.iter().cloned());
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
    // Under the lock, doomed files are only renamed into `.trash` (one
    // directory entry each); they are unlinked after the lock is released,
    // since freeing a large file's blocks can take a while and the
    // cachefiles request loop takes the registry lock on OPEN.
    let trash = cache_dir.join(".trash");
    let _ = std::fs::create_dir_all(&trash);
    let mut doomed: Vec<std::path::PathBuf> = Vec::new();
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
            let parked = trash.join(format!("{}-{name}", doomed.len()));
            match std::fs::rename(&path, &parked) {
                Ok(()) => {
                    count += 1;
                    freed_bytes += freed;
                    doomed.push(parked);
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
    // A manifest is kept before its image is registered: a young one may
    // belong to a registration in progress.
    let young = |name: &str| {
        std::fs::metadata(cache_dir.join("manifests").join(name))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(60))
    };
    let n_manifests = sweep(&cache_dir.join("manifests"), &|name| {
        is_hex(name).then(|| manifests.contains(name) || young(name))
    });
    // cachefiles: the kernel's cache files of blobs and bootstraps no
    // image references, culled through the device (the kernel refuses a
    // file an object still uses: Busy, tried again next time).
    let mut cull_list: Vec<(std::path::PathBuf, String, u64)> = Vec::new();
    if daemon.culler.get().is_some() {
        for (dir, name) in cache_object_files(cache_dir) {
            let Some(key) = name.strip_prefix('D').filter(|k| is_hex(k)) else {
                continue;
            };
            if blobs.contains(key) || fsids.contains(key) {
                continue;
            }
            let path = dir.join(&name);
            let since = *seen.entry(path.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                waiting += 1;
                still.insert(path);
                continue;
            }
            let freed = std::fs::symlink_metadata(&path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            // Kept in `seen` until culled (a busy file is tried again).
            still.insert(path);
            cull_list.push((dir, name, freed));
        }
    }
    // Forget files that went away or became referenced again.
    seen.retain(|p, _| still.contains(p));
    drop(seen);
    drop(registry);
    // Culls run after the registry lock is released: the kernel frees the
    // file's blocks inside the command, and OPENs take that lock. A file
    // an image started using meanwhile is refused by the kernel (busy); an
    // image registered meanwhile and not yet mounted fetches again.
    let mut n_objects = 0;
    if let Some(culler) = daemon.culler.get() {
        for (dir, name, freed) in cull_list {
            let path = dir.join(&name);
            match culler.cull(&dir, &name) {
                Ok(kite_kernel::cachefiles::Culled::Removed) => {
                    n_objects += 1;
                    freed_bytes += freed;
                    tracing::debug!(path = %path.display(), "culled");
                }
                Ok(kite_kernel::cachefiles::Culled::Busy) => {
                    tracing::debug!(path = %path.display(), "cache file in use: culled later");
                }
                Ok(kite_kernel::cachefiles::Culled::Missing) => {}
                Err(e) => tracing::warn!(path = %path.display(), "culling: {e}"),
            }
        }
    }
    let report = GcReport {
        blobs: n_blobs,
        bootstraps: n_boot,
        state_files: n_state,
        manifests: n_manifests,
        cache_objects: n_objects,
        freed_bytes,
        waiting,
    };
    for p in doomed {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), "unlinking a collected file: {e}");
        }
    }
    if report.blobs + report.bootstraps + report.state_files + report.manifests + n_objects > 0 {
        tracing::info!(
            blobs = report.blobs,
            cache_objects = n_objects,
            bootstraps = report.bootstraps,
            state_files = report.state_files,
            manifests = report.manifests,
            freed_bytes = report.freed_bytes,
            "collected cache data no registered image references"
        );
    }
    report
}

/// The kernel's cachefiles cache files under `cache_dir` (bound there):
/// `cache/I<volume>/@<fan-out>/<name>`, as (directory, name). A mounted
/// image's objects are unnamed temporary files until their unmount, so
/// they do not appear here.
fn cache_object_files(cache_dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let subdirs = |dir: &Path, prefix: char| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for vol in subdirs(&cache_dir.join("cache"), 'I') {
        for fan in subdirs(&vol, '@') {
            let Ok(rd) = std::fs::read_dir(&fan) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    out.push((fan.clone(), e.file_name().to_string_lossy().into_owned()));
                }
            }
        }
    }
    out
}

/// cachefiles: reads a blob's data back from the kernel's cache file, for
/// the chunk index ([`crate::blob::index`]). The file has a name only while
/// no object uses it (an image that was mounted and is not now), so this
/// finds it when it can and says `NotFound` otherwise; the kernel writes
/// the file at the blob's uncompressed-layout offsets, as the daemon wrote
/// them. The caller verifies every byte.
pub struct KernelCacheFile {
    cache_dir: std::path::PathBuf,
    key: String,
    found: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// When a search last found nothing: not searched again for a while
    /// (a blob's chunks are looked up one by one).
    missed: std::sync::Mutex<Option<Instant>>,
}

impl KernelCacheFile {
    pub fn new(cache_dir: &Path, key: String) -> Self {
        Self {
            cache_dir: cache_dir.to_path_buf(),
            key,
            found: std::sync::Mutex::new(None),
            missed: std::sync::Mutex::new(None),
        }
    }

    fn locate(&self) -> Option<std::path::PathBuf> {
        let name = format!("D{}", self.key);
        let vols = std::fs::read_dir(self.cache_dir.join("cache")).ok()?;
        for vol in vols.flatten() {
            if !vol.file_name().to_string_lossy().starts_with('I') {
                continue;
            }
            let Ok(fans) = std::fs::read_dir(vol.path()) else {
                continue;
            };
            for fan in fans.flatten() {
                let p = fan.path().join(&name);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }
}

impl crate::blob::LocalRead for KernelCacheFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let known = self.found.lock().ok().and_then(|f| f.clone());
        let open = |p: &Path| std::fs::File::open(p);
        let file = match known.as_deref().map(open) {
            Some(Ok(f)) => f,
            _ => {
                let not_found = || {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no unused kernel cache file for {}", self.key),
                    )
                };
                let recently_missed = self
                    .missed
                    .lock()
                    .ok()
                    .and_then(|m| *m)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(2));
                if recently_missed {
                    return Err(not_found());
                }
                let Some(p) = self.locate() else {
                    if let Ok(mut m) = self.missed.lock() {
                        *m = Some(Instant::now());
                    }
                    return Err(not_found());
                };
                let f = open(&p)?;
                if let Ok(mut slot) = self.found.lock() {
                    *slot = Some(p);
                }
                f
            }
        };
        std::os::unix::fs::FileExt::read_exact_at(&file, buf, off)
    }
}

/// Allocated bytes of the cache's files (blob files count what is on
/// disk, not their sparse size; on the cachefiles path the kernel's cache
/// files of images no longer mounted count too).
pub fn cache_usage(cache_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let ours: u64 = ["blobs", "bootstraps", "kite-state", "manifests"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(cache_dir.join(sub)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum();
    let kernel: u64 = cache_object_files(cache_dir)
        .iter()
        .filter_map(|(d, n)| std::fs::symlink_metadata(d.join(n)).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    ours + kernel
}

/// An image registered or read this recently is not evicted.
pub const MIN_IDLE_SECS: u64 = 5;

/// What one pass of [`enforce_bound`] did.
#[derive(Debug, Clone, Default)]
pub struct Enforced {
    pub usage_before: u64,
    pub usage_after: u64,
    /// Images forgotten to make room (fsids), least recently used first.
    pub evicted: Vec<String>,
}

/// Keep the cache under `bound` bytes: first collect what no registered
/// image references (ignoring the grace period), then forget registered
/// images that nothing mounts and that were not pulled for keeping, least
/// recently used first (last miss, else registration; not within
/// [`MIN_IDLE_SECS`]), collecting after each. Mounted images are never touched: if their data alone exceeds the
/// bound, the cache stays over it (the caller warns). Whole images go at
/// a time; their blob files are deleted, never punched while watched.
///
/// A mount racing with the eviction of its image (registered, not yet
/// mounted) fails to find the image's files: an error, never wrong bytes.
pub fn enforce_bound(ctx: &crate::api::ApiContext, bound: u64) -> Enforced {
    let usage_before = cache_usage(&ctx.cache_dir);
    let mut done = Enforced {
        usage_before,
        usage_after: usage_before,
        evicted: Vec::new(),
    };
    if usage_before <= bound {
        return done;
    }
    collect(&ctx.daemon, &ctx.cache_dir, &ctx.gc_seen, Duration::ZERO);
    done.usage_after = cache_usage(&ctx.cache_dir);
    if done.usage_after <= bound {
        return done;
    }
    let mounted: HashSet<String> = kite_kernel::mount::erofs_mounts()
        .into_iter()
        .map(|m| m.fsid)
        .collect();
    let mut candidates: Vec<(u64, String)> = lock(&ctx.daemon.registry)
        .images()
        .iter()
        .filter(|i| !i.kept.load(std::sync::atomic::Ordering::Relaxed))
        .filter(|i| !mounted.contains(&i.fsid))
        .map(|i| {
            let last_miss = i
                .blobs
                .iter()
                .map(|b| b.last_miss.load(std::sync::atomic::Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            (last_miss.max(i.registered_at * 1000), i.fsid.clone())
        })
        .collect();
    // Just registered or just used: about to be mounted (a mount
    // registers first), or in use by a reader between mounts. Left alone.
    let now = crate::unix_now_ms();
    candidates.retain(|(last, _)| now.saturating_sub(*last) >= MIN_IDLE_SECS * 1000);
    candidates.sort();
    for (_, fsid) in candidates {
        if done.usage_after <= bound {
            break;
        }
        // Mounted meanwhile: leave it.
        if kite_kernel::mount::erofs_mounts()
            .iter()
            .any(|m| m.fsid == fsid)
        {
            continue;
        }
        if crate::api::forget_image(ctx, &fsid) {
            crate::metrics::record_eviction();
            collect(&ctx.daemon, &ctx.cache_dir, &ctx.gc_seen, Duration::ZERO);
            let usage = cache_usage(&ctx.cache_dir);
            tracing::info!(%fsid, freed = done.usage_after.saturating_sub(usage), usage, bound, "evicted an unmounted image to keep the cache under its bound");
            done.usage_after = usage;
            done.evicted.push(fsid);
        }
    }
    done
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
