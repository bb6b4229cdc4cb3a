//! Registrations that outlive the worker: what a new worker needs to
//! serve the mounts a dead or stopped one served, without a remount.
//!
//! Every registered image has a record, `<run dir>/images/<fsid>.json`
//! (mode 0600 in a 0700 directory: it may hold registry credentials, and
//! /run is a tmpfs, so nothing outlives a reboot, and neither do mounts).
//! Pulled images (`kite pull`) also have a record in
//! `<cache>/kept-images/<fsid>.json` (without mounts or per-request
//! credentials), so they are registered again after a reboot.
//! It holds the registration request, the pinned reference of a registry
//! image, and the mountpoints `kite mount` reported. The bootstrap itself
//! is kept in `<cache>/bootstraps/<fsid>` and checked against the fsid
//! (its sha256) when adopted. A record is written before the registration
//! is answered and removed when the image is unregistered.
//!
//! Adoption ([`adopt_all`]) runs before the worker reads its first kernel
//! request: a new worker knows every blob file and cache object the kernel
//! may ask about. It needs no network: a registry image's backend is
//! built from its pinned reference, and its bootstrap is the local copy.
//! A prefetch profile is not queued again (chunks it named that are still
//! missing are fetched when read).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::api::{ApiContext, BackendSpec, RegisterRequest};
use crate::backend::{Backend, Http, LocalDir, Registry as RegistryBackend};
use crate::DaemonError;

/// One registered image, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub fsid: String,
    pub request: RegisterRequest,
    /// Registry images: the reference pinned to its manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Where `kite mount` mounted it.
    #[serde(default)]
    pub mountpoints: Vec<PathBuf>,
    /// Pulled for keeping (`kite pull`): only `kite rm` forgets it.
    #[serde(default)]
    pub kept: bool,
    /// Fetched whole in the background (`kite mount --prefetch all`): a
    /// new worker queues what is still missing again.
    #[serde(default)]
    pub prefetch_all: bool,
}

fn records_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("images")
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// Where the records of pulled images are kept across reboots.
fn kept_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("kept-images")
}

/// Write `rec` (temporary name, fsync, rename).
pub fn save(run_dir: &Path, rec: &ImageRecord) -> Result<(), DaemonError> {
    save_in(&records_dir(run_dir), rec)
}

/// Keep a pulled image's record in the cache dir too, so the image is
/// registered again after a reboot (adopted without mounts). Per-request
/// registry credentials are not written to the disk: a pulled image needs
/// none to run, and a fetch it still needs uses the daemon's own.
pub fn save_kept(cache_dir: &Path, rec: &ImageRecord) -> Result<(), DaemonError> {
    let mut rec = rec.clone();
    if let Some(i) = rec.request.image.as_mut() {
        i.username = None;
        i.password = None;
    }
    rec.mountpoints.clear();
    save_in(&kept_dir(cache_dir), &rec)
}

/// Forget the kept record of `fsid` (if any).
pub fn remove_kept(cache_dir: &Path, fsid: &str) {
    remove_in(&kept_dir(cache_dir), fsid);
}

fn save_in(dir: &Path, rec: &ImageRecord) -> Result<(), DaemonError> {
    use std::io::Write;
    let dir = dir.to_path_buf();
    kite_kernel::mount::private_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let path = dir.join(format!("{}.json", rec.fsid));
    let tmp = dir.join(format!(".{}.json.tmp", rec.fsid));
    let body = serde_json::to_vec(rec).map_err(|e| DaemonError::Config(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(io_err(format!("writing {}", path.display())))
}

/// Forget the record of `fsid` (if any).
pub fn remove(run_dir: &Path, fsid: &str) {
    remove_in(&records_dir(run_dir), fsid);
}

fn remove_in(dir: &Path, fsid: &str) {
    let path = dir.join(format!("{fsid}.json"));
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "removing an image record: {e}");
        }
    }
}

/// The record of `fsid`, if there is one.
pub fn load(run_dir: &Path, fsid: &str) -> Option<ImageRecord> {
    let path = records_dir(run_dir).join(format!("{fsid}.json"));
    let data = std::fs::read(path).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Every record, sorted by fsid. Unreadable ones are reported and skipped.
pub fn load_all(run_dir: &Path) -> Vec<ImageRecord> {
    load_all_in(&records_dir(run_dir))
}

fn load_all_in(dir: &Path) -> Vec<ImageRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match std::fs::read(e.path())
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::from_slice::<ImageRecord>(&d).map_err(|e| e.to_string()))
        {
            Ok(r) => out.push(r),
            Err(why) => {
                tracing::error!(path = %e.path().display(), "image record unreadable, not adopted: {why}")
            }
        }
    }
    out.sort_by(|a, b| a.fsid.cmp(&b.fsid));
    out
}

/// Where the local copy of an image's bootstrap lives.
pub fn bootstrap_path(cache_dir: &Path, fsid: &str) -> PathBuf {
    cache_dir.join("bootstraps").join(fsid)
}

/// The backend of an adopted image, built without network access.
fn backend_for(ctx: &ApiContext, rec: &ImageRecord) -> Result<Arc<dyn Backend>, DaemonError> {
    if let Some(image) = &rec.request.image {
        let pinned = rec.pinned.as_deref().unwrap_or(&image.reference);
        let reference = kite_registry::Reference::parse(pinned)?;
        let mut cfg = ctx.registry.clone();
        if let (Some(u), Some(p)) = (&image.username, &image.password) {
            cfg.credentials.insert(
                reference.api_host().to_string(),
                kite_registry::Credentials::new(u.clone(), p.clone()),
            );
        }
        let client = kite_registry::Client::new(cfg)?;
        let repo = client.repository(&reference, image.plain_http)?;
        return Ok(Arc::new(RegistryBackend::new(repo, ctx.fetch_timeout)));
    }
    match &rec.request.backend {
        Some(BackendSpec::Local { dir }) => Ok(Arc::new(LocalDir::new(dir.clone()))),
        Some(BackendSpec::Http { url }) => Ok(Arc::new(
            Http::new(url, ctx.fetch_timeout).map_err(DaemonError::Config)?,
        )),
        None => Err(DaemonError::Config(format!(
            "image record {} names no backend",
            rec.fsid
        ))),
    }
}

/// Register one recorded image again, as its first registration did
/// (without its prefetch profile).
fn adopt_one(ctx: &ApiContext, rec: &ImageRecord) -> Result<(), DaemonError> {
    let path = bootstrap_path(&ctx.cache_dir, &rec.fsid);
    let bytes = std::fs::read(&path).map_err(io_err(format!(
        "reading the kept bootstrap {}",
        path.display()
    )))?;
    if kite_format::Digest::of(&bytes).hex() != rec.fsid {
        return Err(DaemonError::BadBootstrap {
            source_name: path.display().to_string(),
            why: format!("its sha256 is not the fsid {}", rec.fsid),
        });
    }
    let backend = backend_for(ctx, rec)?;
    let source = rec.pinned.clone().unwrap_or_else(|| {
        rec.request
            .bootstrap
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| rec.fsid.clone())
    });
    let img = crate::api::install(ctx, bytes, backend, source)?;
    img.kept
        .store(rec.kept, std::sync::atomic::Ordering::Relaxed);
    // Queued again once the worker serves (`resume_prefetch`).
    img.prefetch_all
        .store(rec.prefetch_all, std::sync::atomic::Ordering::Relaxed);
    if let Some(fan) = &ctx.fanotify {
        fan.prepare(&img)?;
        if let Ok(mut m) = img.direct_io_mounts.lock() {
            for mp in &rec.mountpoints {
                m.push((mp.clone(), false));
            }
        }
        if !rec.mountpoints.is_empty() {
            fan.pin(&rec.fsid);
        }
    }
    Ok(())
}

/// Queue again what images fetched whole in the background still miss
/// (after a worker restart). Runs once the worker serves: on the fanotify
/// path starting a blob's prefetch reads it, which the worker answers.
pub async fn resume_prefetch(ctx: Arc<ApiContext>) {
    let images: Vec<_> = match ctx.daemon.registry.lock() {
        Ok(r) => r.images(),
        Err(_) => return,
    };
    for img in images {
        if !img.prefetch_all.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        match crate::api::queue_all(&ctx, &img).await {
            Ok(n) => tracing::info!(fsid = %img.fsid, queued = n, "background prefetch resumed"),
            // cachefiles: it starts when the kernel opens the blob again.
            Err(e) => {
                tracing::info!(fsid = %img.fsid, "background prefetch queued, not started yet: {e}")
            }
        }
    }
}

/// Adopt every recorded image; returns how many were adopted. An image
/// that cannot be adopted is logged; its reads then fail (EIO), never
/// return wrong bytes.
pub fn adopt_all(ctx: &ApiContext) -> usize {
    let mut n = 0;
    let mut records = load_all(&ctx.run_dir);
    // Pulled images the run dir forgot (a reboot): registered again,
    // unmounted, with a fresh run record.
    for rec in load_all_in(&kept_dir(&ctx.cache_dir)) {
        if records.iter().any(|r| r.fsid == rec.fsid) {
            continue;
        }
        if let Err(e) = save(&ctx.run_dir, &rec) {
            tracing::warn!(fsid = %rec.fsid, "recording a kept image: {e}");
        }
        tracing::info!(fsid = %rec.fsid, "registering a pulled image again (kept across a reboot)");
        records.push(rec);
    }
    for rec in records {
        match adopt_one(ctx, &rec) {
            Ok(()) => {
                n += 1;
                tracing::info!(fsid = %rec.fsid, mounts = rec.mountpoints.len(), "adopted a registered image");
            }
            Err(e) => {
                tracing::error!(fsid = %rec.fsid, "could not adopt a registered image (its reads of missing data fail with EIO): {e}")
            }
        }
    }
    n
}
