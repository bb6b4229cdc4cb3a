//! The control API: HTTP/1.1 + JSON on a unix socket (mode 0600, so root
//! only), used by `kite mount`, `kite status` and monitoring.
//!
//! ```text
//! GET    /v1/health                  {"ok":true,"kernel_path":...}
//! GET    /v1/images                  [ImageStatus...]
//! POST   /v1/images                  RegisterRequest -> RegisterResponse
//! GET    /v1/images/<fsid>/profile   AccessProfile
//! POST   /v1/images/<fsid>/prefetch  {"queued":N} (background, whole image)
//! POST   /v1/images/<fsid>/pull      {"queued":N} (whole image, kept)
//! POST   /v1/images/<fsid>/mounts    MountNotice
//! POST   /v1/gc                      GcRequest (optional) -> report
//! DELETE /v1/images/<fsid>[?force=1] {"removed":fsid}, or 404
//! ```
//!
//! Requests are parsed by [`parse_request`], a pure function (fuzzed in
//! `fuzz/`), before anything is done.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kite_format::prefetch::Profile;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::backend::{Backend, Http, LocalDir, Registry as RegistryBackend};
use crate::daemon::Daemon;
use crate::DaemonError;

/// Where an image's blobs come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendSpec {
    /// A directory holding `<hex>` or `blobs/sha256/<hex>`.
    Local { dir: PathBuf },
    /// A base URL serving `<url>/blobs/sha256/<hex>` with Range support.
    Http { url: String },
}

/// Register either a local bootstrap with a backend, or an image in a
/// registry (`image`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The bootstrap file (read by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    /// A kite image in an OCI registry: the daemon pins the reference to a
    /// digest, fetches the bootstrap and verifies it against its
    /// descriptor, and fetches chunks from the registry with Range GETs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// With `bootstrap`: a prefetch profile file to fetch ahead of readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PathBuf>,
    /// With `bootstrap` (required): the `sha256:<hex>` its image's manifest
    /// names. The daemon refuses a bootstrap whose bytes hash to anything
    /// else, as it does for registry images: a file changed after
    /// conversion never reaches the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_digest: Option<String>,
}

/// A registry image to register.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ImageRef {
    /// `host[:port]/repo[:tag][@sha256:...]`.
    pub reference: String,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[serde(default)]
    pub plain_http: bool,
    /// os/arch[/variant] to pick from an index (default linux/amd64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Credentials for this registry (else the daemon's docker config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Ignore the image's prefetch profile, if it has one.
    #[serde(default)]
    pub no_prefetch: bool,
}

impl std::fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageRef")
            .field("reference", &self.reference)
            .field("plain_http", &self.plain_http)
            .field("platform", &self.platform)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("no_prefetch", &self.no_prefetch)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub fsid: String,
    pub domain_id: String,
    /// "cachefiles" (mount with fsid=) or "fanotify" (mount the files).
    pub kernel_path: String,
    /// fanotify path: the local bootstrap to mount ...
    #[serde(default)]
    pub bootstrap_path: Option<PathBuf>,
    /// ... and one `device=` file per blob, in device-table order.
    #[serde(default)]
    pub devices: Vec<PathBuf>,
    /// Registry images: the reference pinned to the manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Chunks queued for prefetching from the image's profile (0: none).
    #[serde(default)]
    pub prefetch_chunks: usize,
    /// Readahead for the mount, in KiB: the image's chunk size. The
    /// kernel's default (128 KiB) makes a sequential reader miss eight
    /// times per 1 MiB chunk; much larger makes page faults pull in chunks
    /// nobody reads.
    #[serde(default)]
    pub read_ahead_kb: u32,
}

/// `POST /v1/gc`: collect what has been unreferenced this long.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcRequest {
    #[serde(default)]
    pub grace_secs: u64,
}

/// A mount of a registered image (`POST /v1/images/<fsid>/mounts`). On the
/// fanotify path the daemon remounts it with direct I/O once the image is
/// complete on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountNotice {
    pub mountpoint: PathBuf,
}

/// What the kernel has read of an image so far (`GET
/// /v1/images/<fsid>/profile`): (blob index, chunk) in first-read order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessProfile {
    pub fsid: String,
    pub entries: Vec<(u32, u32)>,
    /// Whether reads of chunks already fetched reach the daemon (fanotify
    /// path). On the cachefiles path cache hits never leave the kernel, so
    /// chunks the daemon fetched ahead and the kernel then read are
    /// missing from the log unless the daemon ran with `--readahead 0`.
    #[serde(default)]
    pub sees_hits: bool,
    /// Blobs of this image that other registered images use too: their
    /// reads are in the log as well.
    #[serde(default)]
    pub shared_blobs: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobStatus {
    pub digest: String,
    pub chunks: usize,
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    pub corrupt_chunks: u64,
    pub backend: String,
    pub backend_requests: u64,
    pub backend_bytes: u64,
    /// Chunks fetched ahead of readers from a prefetch profile.
    #[serde(default)]
    pub prefetched_chunks: u64,
    /// fanotify path: pre-content events raised for this blob's file.
    #[serde(default)]
    pub events: u64,
    /// Chunks a registered image can read that are not on disk yet (a
    /// layer blob may hold chunks no file references: never fetched).
    #[serde(default)]
    pub missing_chunks: u64,
    /// Chunks (and their uncompressed bytes) copied from another blob's
    /// data on this node instead of fetched (the chunk index).
    #[serde(default)]
    pub copied_chunks: u64,
    #[serde(default)]
    pub copied_bytes: u64,
    /// Of `backend_bytes`, those a registry mirror served.
    #[serde(default)]
    pub mirror_bytes: u64,
    /// Chunks (and their uncompressed bytes) peers served, verified.
    #[serde(default)]
    pub peer_chunks: u64,
    #[serde(default)]
    pub peer_bytes: u64,
    /// The peer this node asks first for this blob (`self`: this node
    /// fetches it from the registry for the site); none without peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageStatus {
    pub fsid: String,
    pub source: String,
    pub bootstrap_size: u64,
    pub blobs: Vec<BlobStatus>,
    /// fanotify path: mountpoints, and whether each was switched to direct
    /// I/O (done once the image is complete on disk).
    #[serde(default)]
    pub direct_io_mounts: Vec<(PathBuf, bool)>,
    /// Unix seconds: registered (or adopted) by the serving worker.
    #[serde(default)]
    pub registered_at: u64,
    /// Unix seconds of the last kernel request for the image's data (0:
    /// none yet). Cache hits never reach the daemon.
    #[serde(default)]
    pub last_miss: u64,
    /// Pulled for keeping (`kite pull`): only `kite rm` forgets it.
    #[serde(default)]
    pub kept: bool,
    /// Every chunk is being fetched in the background (`kite mount
    /// --prefetch all`); progress is the blobs' `missing_chunks`.
    #[serde(default)]
    pub prefetch_all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub kernel_path: String,
    pub cache_dir: PathBuf,
    pub domain_id: String,
    pub open_objects: usize,
    pub reads: u64,
    pub reads_failed: u64,
    pub reads_inflight: u64,
    pub opens_refused: u64,
    pub writer: String,
    /// fanotify path: bytes of bootstraps locked in memory.
    #[serde(default)]
    pub pinned_bytes: u64,
    /// The serving process (the worker).
    #[serde(default)]
    pub pid: u32,
    /// The holder keeping the kernel interface.
    #[serde(default)]
    pub holder_pid: u32,
    /// Unix seconds: when the daemon (its first holder) started, and when
    /// this worker started.
    #[serde(default)]
    pub daemon_started: u64,
    #[serde(default)]
    pub worker_started: u64,
    /// 1 for the daemon's first worker, counting every restart.
    #[serde(default)]
    pub worker_generation: u64,
    /// Images this worker adopted from its predecessor at start.
    #[serde(default)]
    pub adopted_images: usize,
    /// Chunks the node-wide chunk index knows on disk (sources for local
    /// copies; fanotify path).
    #[serde(default)]
    pub indexed_chunks: u64,
    /// Peer serving and asking, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<crate::peer::PeerStatus>,
    /// Bytes received since this worker started, by source: `registry`,
    /// `mirror`, `http`, `local` (stored bytes), `peer` and `chunk_copy`
    /// (verified uncompressed chunk bytes from a peer or another blob on
    /// this node).
    #[serde(default)]
    pub fetched_by_source: std::collections::BTreeMap<String, u64>,
}

/// Facts about the serving process, for status.
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub holder_pid: u32,
    pub daemon_started: u64,
    pub worker_started: u64,
    pub worker_generation: u64,
}

/// What the API handlers need besides the daemon.
pub struct ApiContext {
    pub daemon: Arc<Daemon>,
    /// Set when serving on the fanotify path.
    pub fanotify: Option<Arc<crate::fanotify::FanotifyPath>>,
    pub kernel_path: String,
    pub cache_dir: PathBuf,
    pub domain_id: String,
    pub fetch_timeout: Duration,
    pub writer: String,
    /// Settings for registry images (credentials per request are added).
    pub registry: kite_registry::ClientConfig,
    /// Where image records live (beside the control socket, on tmpfs).
    pub run_dir: PathBuf,
    pub process: ProcessInfo,
    /// Set once adoption is done.
    pub adopted: std::sync::atomic::AtomicUsize,
    /// Files the collector found unreferenced, and since when.
    pub gc_seen: crate::gc::Unreferenced,
    /// `--cache-size` in bytes (0: no bound).
    pub cache_bound: u64,
    /// The peer set (status), if peers are configured.
    pub peers: Option<Arc<crate::peer::Peers>>,
}

/// `/v1/images/<fsid>/<sub>` -> `fsid` (for that `sub` only).
fn image_route<'a>(path: &'a str, sub: &str) -> Option<&'a str> {
    path.strip_prefix("/v1/images/")?
        .strip_suffix(sub)?
        .strip_suffix('/')
        .filter(|fsid| !fsid.is_empty() && !fsid.contains('/'))
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg }))
}

/// Status of every registered image.
pub fn images_status(
    daemon: &Daemon,
    fan: Option<&crate::fanotify::FanotifyPath>,
) -> Vec<ImageStatus> {
    let Ok(reg) = daemon.registry.lock() else {
        return Vec::new();
    };
    reg.images()
        .iter()
        .map(|img| ImageStatus {
            fsid: img.fsid.clone(),
            source: img.source.clone(),
            bootstrap_size: img.bootstrap.len(),
            registered_at: img.registered_at,
            kept: img.kept.load(Ordering::Relaxed),
            prefetch_all: img.prefetch_all.load(Ordering::Relaxed),
            last_miss: img
                .blobs
                .iter()
                .map(|b| b.last_miss.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0)
                / 1000,
            direct_io_mounts: img
                .direct_io_mounts
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            blobs: img
                .blobs
                .iter()
                .map(|b| BlobStatus {
                    digest: b.digest.oci(),
                    chunks: b.chunks.len(),
                    fetched_chunks: b.fetched_chunks.load(Ordering::Relaxed),
                    fetched_bytes: b.fetched_bytes.load(Ordering::Relaxed),
                    uncompressed_size: b.uncompressed_size,
                    compressed_size: b.compressed_size,
                    corrupt_chunks: b.corrupt_chunks.load(Ordering::Relaxed),
                    backend: b.backend.describe(),
                    backend_requests: b.backend.counters().requests.load(Ordering::Relaxed),
                    backend_bytes: b.backend.counters().bytes.load(Ordering::Relaxed),
                    prefetched_chunks: b.prefetched_chunks.load(Ordering::Relaxed),
                    events: fan.map(|f| f.blob_events(&b.digest)).unwrap_or(0),
                    missing_chunks: b.missing_needed(),
                    copied_chunks: b.copied_chunks.load(Ordering::Relaxed),
                    copied_bytes: b.copied_bytes.load(Ordering::Relaxed),
                    mirror_bytes: b.backend.counters().mirror_bytes.load(Ordering::Relaxed),
                    peer_chunks: b.peer_chunks.load(Ordering::Relaxed),
                    peer_bytes: b.peer_bytes.load(Ordering::Relaxed),
                    home: b
                        .peers
                        .as_ref()
                        .and_then(|p| p.home(&b.digest))
                        .map(|h| match h {
                            crate::peer::Home::Local => "self".to_string(),
                            crate::peer::Home::Peer(a) => a.to_string(),
                        }),
                })
                .collect(),
        })
        .collect()
}

/// A control API request, parsed from its method, path, query and body
/// without any I/O (see [`parse_request`]), so what a caller can send is
/// tested and fuzzed apart from what the daemon then does.
pub enum ApiRequest {
    Health,
    Images,
    Register(Box<RegisterRequest>),
    /// `GET /v1/images/<fsid>/profile`.
    Profile(String),
    /// `POST /v1/images/<fsid>/prefetch`: fetch the whole image in the
    /// background.
    Prefetch(String),
    /// `POST /v1/images/<fsid>/pull`: fetch the whole image and keep it.
    Pull(String),
    /// `POST /v1/images/<fsid>/mounts`.
    Mounted {
        fsid: String,
        notice: MountNotice,
    },
    Gc {
        grace_secs: u64,
    },
    /// `DELETE /v1/images/<fsid>[?force=1]`.
    Forget {
        fsid: String,
        force: bool,
    },
}

/// Why a request was refused before anything was done: the status and a
/// message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReject {
    pub status: StatusCode,
    pub message: String,
}

/// The largest control API request body read (the documents are a few
/// hundred bytes).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// An fsid is the hex sha256 of a bootstrap: 64 lowercase hex digits.
fn is_fsid(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Parse one control API request. Pure: the body is whatever the caller
/// sent (empty for GET), and nothing here touches the daemon.
pub fn parse_request(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<ApiRequest, ApiReject> {
    let reject = |status: StatusCode, message: String| ApiReject { status, message };
    let bad_body =
        |e: serde_json::Error| reject(StatusCode::BAD_REQUEST, format!("bad request body: {e}"));
    // A malformed image id names no image: the same answer as an unknown one.
    let fsid = |f: &str| -> Result<String, ApiReject> {
        if is_fsid(f) {
            Ok(f.to_string())
        } else {
            Err(reject(StatusCode::NOT_FOUND, format!("no image {f:?}")))
        }
    };
    match (method, path) {
        (&Method::GET, "/v1/health") => Ok(ApiRequest::Health),
        (&Method::GET, "/v1/images") => Ok(ApiRequest::Images),
        (&Method::POST, "/v1/images") => serde_json::from_slice::<RegisterRequest>(body)
            .map(|r| ApiRequest::Register(Box::new(r)))
            .map_err(bad_body),
        (&Method::GET, p) if image_route(p, "profile").is_some() => Ok(ApiRequest::Profile(fsid(
            image_route(p, "profile").unwrap_or_default(),
        )?)),
        (&Method::POST, p) if image_route(p, "prefetch").is_some() => Ok(ApiRequest::Prefetch(
            fsid(image_route(p, "prefetch").unwrap_or_default())?,
        )),
        (&Method::POST, p) if image_route(p, "pull").is_some() => Ok(ApiRequest::Pull(fsid(
            image_route(p, "pull").unwrap_or_default(),
        )?)),
        (&Method::POST, p) if image_route(p, "mounts").is_some() => {
            let fsid = fsid(image_route(p, "mounts").unwrap_or_default())?;
            let notice = serde_json::from_slice::<MountNotice>(body).map_err(bad_body)?;
            if !notice.mountpoint.is_absolute() {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    format!("{} is not an absolute path", notice.mountpoint.display()),
                ));
            }
            Ok(ApiRequest::Mounted { fsid, notice })
        }
        (&Method::POST, "/v1/gc") => {
            let grace_secs = if body.is_empty() {
                0
            } else {
                serde_json::from_slice::<GcRequest>(body)
                    .map_err(bad_body)?
                    .grace_secs
            };
            Ok(ApiRequest::Gc { grace_secs })
        }
        (&Method::DELETE, p) if p.starts_with("/v1/images/") => Ok(ApiRequest::Forget {
            fsid: fsid(&p["/v1/images/".len()..])?,
            force: query == Some("force=1"),
        }),
        _ => Err(reject(StatusCode::NOT_FOUND, "no such endpoint".into())),
    }
}

async fn handle(
    ctx: Arc<ApiContext>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let method = req.method().clone();
    // Requests are small JSON documents; a body past the bound is refused
    // before it is held in memory.
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body: {e} (at most {MAX_REQUEST_BODY} bytes)"),
            ))
        }
    };
    let request = match parse_request(&method, &path, query.as_deref(), &body) {
        Ok(r) => r,
        Err(r) => return Ok(error(r.status, &r.message)),
    };
    let resp = match request {
        ApiRequest::Health => {
            let s = &ctx.daemon.stats;
            json(
                StatusCode::OK,
                &Health {
                    ok: true,
                    kernel_path: ctx.kernel_path.clone(),
                    cache_dir: ctx.cache_dir.clone(),
                    domain_id: ctx.domain_id.clone(),
                    open_objects: ctx.daemon.open_objects(),
                    reads: s.reads.load(Ordering::Relaxed),
                    reads_failed: s.reads_failed.load(Ordering::Relaxed),
                    reads_inflight: s.reads_inflight.load(Ordering::Relaxed),
                    opens_refused: s.open_refused.load(Ordering::Relaxed),
                    writer: ctx.writer.clone(),
                    pinned_bytes: ctx.fanotify.as_ref().map_or(0, |f| f.pinned_bytes()),
                    pid: ctx.process.pid,
                    holder_pid: ctx.process.holder_pid,
                    daemon_started: ctx.process.daemon_started,
                    worker_started: ctx.process.worker_started,
                    worker_generation: ctx.process.worker_generation,
                    adopted_images: ctx.adopted.load(Ordering::Relaxed),
                    indexed_chunks: ctx
                        .daemon
                        .registry
                        .lock()
                        .map(|r| Arc::clone(&r.chunk_index))
                        .map_or(0, |i| i.len() as u64),
                    peers: ctx.peers.as_ref().map(|p| p.status()),
                    fetched_by_source: crate::metrics::fetched_by_source(),
                },
            )
        }
        ApiRequest::Images => json(
            StatusCode::OK,
            &images_status(&ctx.daemon, ctx.fanotify.as_deref()),
        ),
        ApiRequest::Register(r) => match register(Arc::clone(&ctx), *r).await {
            Ok(resp) => json(StatusCode::OK, &resp),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        },
        ApiRequest::Profile(fsid) => {
            let (img, others) = match ctx.daemon.registry.lock() {
                Ok(r) => (r.image(&fsid), r.images()),
                Err(_) => (None, Vec::new()),
            };
            match img {
                Some(img) => {
                    let p = img.access_profile();
                    let shared_blobs = img
                        .blobs
                        .iter()
                        .filter(|b| {
                            others.iter().any(|o| {
                                o.fsid != img.fsid && o.blobs.iter().any(|x| x.digest == b.digest)
                            })
                        })
                        .count();
                    json(
                        StatusCode::OK,
                        &AccessProfile {
                            fsid: img.fsid.clone(),
                            entries: p.entries.iter().map(|e| (e.blob, e.chunk)).collect(),
                            sees_hits: ctx.fanotify.is_some(),
                            shared_blobs,
                        },
                    )
                }
                None => error(StatusCode::NOT_FOUND, &format!("no image {fsid}")),
            }
        }
        ApiRequest::Prefetch(fsid) => {
            let img = ctx.daemon.registry.lock().ok().and_then(|r| r.image(&fsid));
            match img {
                None => error(StatusCode::NOT_FOUND, &format!("no image {fsid}")),
                Some(img) => match queue_all(&ctx, &img).await {
                    Ok(queued) => {
                        img.prefetch_all.store(true, Ordering::Relaxed);
                        // A new worker queues it again (resumable).
                        if let Some(mut rec) = crate::adopt::load(&ctx.run_dir, &fsid) {
                            rec.prefetch_all = true;
                            if let Err(e) = crate::adopt::save(&ctx.run_dir, &rec) {
                                tracing::warn!(fsid = %fsid, "recording a background prefetch: {e}");
                            }
                        }
                        json(StatusCode::OK, &serde_json::json!({ "queued": queued }))
                    }
                    Err(e) => error(StatusCode::CONFLICT, &e),
                },
            }
        }
        ApiRequest::Pull(fsid) => {
            let img = ctx.daemon.registry.lock().ok().and_then(|r| r.image(&fsid));
            match img {
                None => error(StatusCode::NOT_FOUND, &format!("no image {fsid}")),
                Some(img) => match queue_all(&ctx, &img).await {
                    Ok(queued) => {
                        img.kept.store(true, Ordering::Relaxed);
                        if let Some(mut rec) = crate::adopt::load(&ctx.run_dir, &fsid) {
                            rec.kept = true;
                            let saved = crate::adopt::save(&ctx.run_dir, &rec)
                                .and_then(|()| crate::adopt::save_kept(&ctx.cache_dir, &rec));
                            if let Err(e) = saved {
                                tracing::warn!(fsid = %fsid, "recording a pull: {e}");
                            }
                        }
                        json(StatusCode::OK, &serde_json::json!({ "queued": queued }))
                    }
                    Err(e) => error(StatusCode::CONFLICT, &e),
                },
            }
        }
        ApiRequest::Mounted { fsid, notice: n } => {
            let img = ctx.daemon.registry.lock().ok().and_then(|r| r.image(&fsid));
            match img {
                None => error(StatusCode::NOT_FOUND, &format!("no image {fsid}")),
                Some(img) => {
                    // A new worker adopting the image knows its mounts.
                    if let Some(mut rec) = crate::adopt::load(&ctx.run_dir, &fsid) {
                        if !rec.mountpoints.contains(&n.mountpoint) {
                            rec.mountpoints.push(n.mountpoint.clone());
                            if let Err(e) = crate::adopt::save(&ctx.run_dir, &rec) {
                                tracing::warn!(fsid = %fsid, "recording a mount: {e}");
                            }
                        }
                    }
                    // Direct I/O is a file-backed mount's option.
                    if let Some(fan) = &ctx.fanotify {
                        if let Ok(mut m) = img.direct_io_mounts.lock() {
                            m.push((n.mountpoint, false));
                        }
                        fan.pin(&fsid);
                    }
                    json(StatusCode::OK, &serde_json::json!({ "fsid": fsid }))
                }
            }
        }
        ApiRequest::Gc { grace_secs: grace } => {
            let c = Arc::clone(&ctx);
            match tokio::task::spawn_blocking(move || {
                crate::gc::collect(
                    &c.daemon,
                    &c.cache_dir,
                    &c.gc_seen,
                    Duration::from_secs(grace),
                )
            })
            .await
            {
                Ok(report) => json(StatusCode::OK, &report),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("gc: {e}")),
            }
        }
        ApiRequest::Forget { fsid, force } => {
            let fsid = fsid.as_str();
            let kept = ctx
                .daemon
                .registry
                .lock()
                .ok()
                .and_then(|r| r.image(fsid))
                .is_some_and(|i| i.kept.load(Ordering::Relaxed));
            if kept && !force {
                // Pulled for keeping: a last unmount or a containerd
                // removal leaves it; `kite rm` forces.
                return Ok(json(StatusCode::OK, &serde_json::json!({ "kept": fsid })));
            }
            let removed = forget_image(&ctx, fsid);
            if removed {
                json(StatusCode::OK, &serde_json::json!({ "removed": fsid }))
            } else {
                error(StatusCode::NOT_FOUND, &format!("no image {fsid}"))
            }
        }
    };
    Ok(resp)
}

/// Forget a registered image: save what was fetched, unregister it, let
/// the fanotify path forget blobs no other image uses, drop its record.
/// Its cache data stays until collected. False if it was not registered.
pub(crate) fn forget_image(ctx: &ApiContext, fsid: &str) -> bool {
    // Save what was fetched before the blobs are forgotten.
    let (img, state_dir) = match ctx.daemon.registry.lock() {
        Ok(r) => (r.image(fsid), r.state_dir().map(Path::to_path_buf)),
        Err(_) => (None, None),
    };
    if let (Some(img), Some(dir)) = (&img, &state_dir) {
        crate::persist(
            &ctx.daemon,
            ctx.fanotify.as_deref(),
            dir,
            Some(img.blobs.clone()),
        );
    }
    let removed = ctx
        .daemon
        .registry
        .lock()
        .map(|mut r| r.unregister(fsid))
        .unwrap_or(false);
    if let (Some(img), Some(fan)) = (&img, &ctx.fanotify) {
        let unused: Vec<_> = match ctx.daemon.registry.lock() {
            Ok(r) => img
                .blobs
                .iter()
                .filter(|b| r.blob(&b.digest).is_none())
                .map(|b| b.digest)
                .collect(),
            Err(_) => Vec::new(),
        };
        fan.forget(&unused);
    }
    if removed {
        crate::adopt::remove(&ctx.run_dir, fsid);
        crate::adopt::remove_kept(&ctx.cache_dir, fsid);
    }
    if let (true, Some(fan)) = (removed, &ctx.fanotify) {
        fan.unpin(fsid);
    }
    removed
}

/// The readahead a mount of `img` gets unless told otherwise: the chunk
/// size (a miss fetches a chunk anyway; 128 KiB..16 MiB), or the kernel's
/// 128 KiB when the image cut its ELF files finer. A page fault reads
/// around itself by the readahead, so a large one on a mapped library
/// asks for (and fetches) pages nobody reads; measured on the PyTorch
/// image (benches/realistic/torch), 1 MiB instead of 128 KiB fetched
/// 14-40% more bytes before the first result.
pub fn default_read_ahead_kb(img: &crate::registry::Image) -> u32 {
    if img.fine_chunk != 0 {
        128
    } else {
        (img.chunk_size / 1024).clamp(128, 16 << 10)
    }
}

/// `kite pull` and `kite mount --prefetch all`: queue every chunk of `img`
/// not on disk for the prefetcher (after what is queued already, so a
/// profile goes first). On the fanotify path a one-byte read of each blob
/// file (which the daemon answers like any miss) hands the prefetcher the
/// event's fd, so no mount is needed; on cachefiles the kernel hands over
/// a blob's object only while the image is mounted.
pub(crate) async fn queue_all(
    ctx: &Arc<ApiContext>,
    img: &crate::registry::Image,
) -> Result<usize, String> {
    let mut queued = 0;
    for b in &img.blobs {
        let (first, n) = b.queue_missing();
        queued += n;
        let Some(first) = first else { continue };
        if b.has_object() {
            continue;
        }
        if ctx.fanotify.is_none() {
            return Err(format!(
                "image {} is not mounted: on the cachefiles path the kernel hands kite a blob only while its image is mounted; mount it, then pull",
                img.fsid
            ));
        }
        b.request_object(first, ctx.fetch_timeout * 2)
            .await
            .map_err(|e| format!("reading blob {} to start its pull: {e}", b.digest))?;
    }
    tracing::info!(fsid = %img.fsid, queued, "every missing chunk queued for the prefetcher");
    Ok(queued)
}

/// Where a registry image's manifest is kept, by its digest, for
/// registering it again while its registry is unreachable.
fn kept_manifest_path(cache_dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = kite_oci::digest_hex(digest).ok()?;
    Some(cache_dir.join("manifests").join(hex))
}

/// The manifest kept for `reference` (pinned by digest), checked against
/// that digest.
fn kept_manifest(
    cache_dir: &Path,
    reference: &kite_registry::Reference,
) -> Option<kite_registry::repo::Resolved> {
    let digest = reference.digest.as_deref()?;
    let bytes = std::fs::read(kept_manifest_path(cache_dir, digest)?).ok()?;
    if kite_oci::sha256_digest(&bytes) != digest {
        tracing::warn!(%digest, "the kept manifest does not match its digest: ignored");
        return None;
    }
    let manifest: kite_oci::Manifest = serde_json::from_slice(&bytes).ok()?;
    Some(kite_registry::repo::Resolved {
        digest: digest.to_string(),
        media_type: manifest
            .media_type
            .clone()
            .unwrap_or_else(|| kite_oci::media::OCI_MANIFEST.into()),
        bytes: bytes.into(),
        manifest,
        index_digest: None,
    })
}

/// The bootstrap bytes, backend, source label and pinned reference of a
/// registry image, fetched and verified. While the registry is
/// unreachable, an image pinned by digest that this node registered
/// before comes from its kept manifest and bootstrap (both checked
/// against their digests); its misses then fail until the registry is
/// back.
async fn fetch_registry_image(
    ctx: &ApiContext,
    r: &ImageRef,
) -> Result<(Vec<u8>, Arc<dyn Backend>, String, Option<Profile>), DaemonError> {
    use kite_oci::media;
    let reference = kite_registry::Reference::parse(&r.reference)?;
    let mut cfg = ctx.registry.clone();
    match (&r.username, &r.password) {
        (Some(u), Some(p)) => {
            cfg.credentials.insert(
                reference.api_host().to_string(),
                kite_registry::Credentials::new(u.clone(), p.clone()),
            );
        }
        (None, None) => {}
        _ => {
            return Err(DaemonError::Config(
                "registry credentials need both a user name and a password".into(),
            ))
        }
    }
    let platform = kite_oci::Platform::parse(r.platform.as_deref().unwrap_or("linux/amd64"))
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let client = kite_registry::Client::new(cfg)?;
    let repo = client.repository(&reference, r.plain_http)?;
    let (resolved, offline) = match repo.resolve(&reference, &platform).await {
        Ok(r) => {
            if let Some(path) = kept_manifest_path(&ctx.cache_dir, &r.digest) {
                let _ = std::fs::create_dir_all(ctx.cache_dir.join("manifests"));
                if let Err(e) = crate::write_intact(&path, &r.bytes) {
                    tracing::warn!(digest = %r.digest, "keeping the manifest: {e}");
                }
            }
            (r, false)
        }
        Err(e @ kite_registry::RegistryError::Transport { .. }) => {
            match kept_manifest(&ctx.cache_dir, &reference) {
                Some(r) => {
                    tracing::warn!(reference = %reference, "registry unreachable ({e}); registering from the manifest and bootstrap kept on this node");
                    (r, true)
                }
                None => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let pinned = reference.pinned(&resolved.digest).to_string();
    let bad = |why: String| DaemonError::BadImage {
        reference: pinned.clone(),
        why,
    };
    let m = &resolved.manifest;
    let mut boots = Vec::new();
    for d in &m.layers {
        if let Some(b) = kite_oci::BootstrapLayer::of(d).map_err(bad)? {
            boots.push((d, b));
        }
    }
    // Both forms: the first (kite config) and the containerd form (the
    // source's OCI config, kite layers under the OCI layer prefix).
    let kite_form = m.config.media_type == media::KITE_CONFIG
        || (m.config.media_type == media::OCI_CONFIG && !boots.is_empty());
    if !kite_form {
        return Err(bad(format!(
            "not a kite image (config media type {:?}, no kite bootstrap layer); convert it with `kite convert --from docker://...` and publish it with `kite push`",
            m.config.media_type
        )));
    }
    let [(boot, inner)] = boots.as_slice() else {
        return Err(bad(format!(
            "{} bootstrap layers; a kite image has exactly one",
            boots.len()
        )));
    };
    const MAX_BOOTSTRAP: u64 = 1 << 30;
    if inner.size > MAX_BOOTSTRAP {
        return Err(bad(format!(
            "bootstrap layer {} says the bootstrap is {} bytes, more than kite accepts ({MAX_BOOTSTRAP})",
            boot.digest, inner.size
        )));
    }
    // Verified against the descriptor's digest and size by the client; a
    // compressed one then against the digest and size its annotations
    // give, which the (verified) manifest carries.
    let bytes: Vec<u8> = if offline {
        kite_oci::digest_hex(&inner.digest)
            .ok()
            .and_then(|hex| std::fs::read(crate::adopt::bootstrap_path(&ctx.cache_dir, hex)).ok())
            .filter(|b| kite_oci::sha256_digest(b) == inner.digest)
            .ok_or_else(|| {
                bad(format!(
                    "the registry is unreachable and this node keeps no intact bootstrap {}",
                    inner.digest
                ))
            })?
    } else if inner.compressed {
        let fetched = repo.fetch_blob(boot, MAX_BOOTSTRAP).await?;
        let want = kite_format::Digest::parse(&inner.digest)
            .ok_or_else(|| bad(format!("bootstrap digest {}", inner.digest)))?;
        let size = inner.size;
        // Decompressing and hashing up to MAX_BOOTSTRAP: not on a worker.
        tokio::task::spawn_blocking(move || {
            kite_format::decompress_bootstrap(&fetched, size, &want)
        })
        .await
        .map_err(|e| bad(format!("decompressing the bootstrap: {e}")))?
        .map_err(|e| DaemonError::BadBootstrap {
            source_name: format!("{} of {pinned}", boot.digest),
            why: e.to_string(),
        })?
    } else {
        repo.fetch_blob(boot, MAX_BOOTSTRAP).await?.to_vec()
    };
    let parsed = kite_format::Bootstrap::parse(&bytes).map_err(|e| DaemonError::BadBootstrap {
        source_name: format!("{} of {pinned}", boot.digest),
        why: e.to_string(),
    })?;
    // Every blob the bootstrap uses must be a layer of the manifest.
    for view in parsed.index.blobs() {
        let want = format!("sha256:{}", view.record.digest.hex());
        let layer = m.layers.iter().find(|d| d.digest == want);
        match layer {
            Some(d) if d.size == view.record.compressed_size => {}
            Some(d) => {
                return Err(bad(format!(
                    "blob {want}: the manifest says {} bytes, the bootstrap {}",
                    d.size, view.record.compressed_size
                )))
            }
            None => {
                return Err(bad(format!(
                    "the bootstrap uses blob {want}, which is not a layer of the manifest"
                )))
            }
        }
    }
    tracing::info!(reference = %r.reference, pinned = %pinned, bootstrap = %boot.digest, "fetched and verified the bootstrap");
    // The prefetch profile, if the image has one: small, verified against
    // its descriptor by the client and against the bootstrap here.
    let profiles: Vec<_> = m
        .layers
        .iter()
        .filter(|d| media::is_kite_prefetch(&d.media_type))
        .collect();
    let profile = match profiles.as_slice() {
        // Offline: the profile is not kept; the image runs without it.
        _ if r.no_prefetch || offline => None,
        [] => None,
        [desc] => {
            let data = repo.fetch_blob(desc, 64 << 20).await?;
            let p = Profile::parse_for(&data, &kite_format::Digest::of(&bytes), &parsed).map_err(
                |e| {
                    bad(format!(
                        "prefetch profile {}: {e} (`kite mount --no-prefetch` ignores it)",
                        desc.digest
                    ))
                },
            )?;
            Some(p)
        }
        more => {
            return Err(bad(format!(
                "{} prefetch profile layers; a kite image has at most one",
                more.len()
            )))
        }
    };
    let backend: Arc<dyn Backend> = Arc::new(RegistryBackend::new(repo, ctx.fetch_timeout));
    Ok((bytes, backend, pinned, profile))
}

/// A profile file named by a registration, checked against its bootstrap.
fn read_profile(
    path: &Path,
    bootstrap: &[u8],
    parsed: &kite_format::Bootstrap<'_>,
) -> Result<Profile, DaemonError> {
    let data = std::fs::read(path).map_err(|e| DaemonError::Io {
        what: format!("reading prefetch profile {}", path.display()),
        source: e,
    })?;
    Profile::parse_for(&data, &kite_format::Digest::of(bootstrap), parsed).map_err(|e| {
        DaemonError::Config(format!(
            "prefetch profile {}: {e} (`kite mount --no-prefetch` ignores it)",
            path.display()
        ))
    })
}

/// Run blocking registration work (file reads, parsing, hashing, fsync)
/// on the blocking pool: an async worker answering kernel requests must
/// never wait for a large registration.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DaemonError::Config(format!("registration task: {e}")))?
}

async fn register(
    ctx: Arc<ApiContext>,
    r: RegisterRequest,
) -> Result<RegisterResponse, DaemonError> {
    let ctx = &ctx;
    let (bytes, backend, source, pinned, profile) = match (&r.image, &r.bootstrap, &r.backend) {
        (Some(image), None, None) => {
            if r.prefetch.is_some() {
                return Err(DaemonError::Config(
                    "a registry image brings its own prefetch profile; `prefetch` is for bootstrap files".into(),
                ));
            }
            let (bytes, backend, pinned, profile) = fetch_registry_image(ctx, image).await?;
            (bytes, backend, pinned.clone(), Some(pinned), profile)
        }
        (None, Some(bootstrap), Some(spec)) => {
            let Some(expected) = r.bootstrap_digest.clone() else {
                return Err(DaemonError::Config(
                    "a bootstrap registration names the digest its image's manifest gives (bootstrap_digest)".into(),
                ));
            };
            let (path, prefetch) = (bootstrap.clone(), r.prefetch.clone());
            let (bytes, profile) = blocking(move || {
                let bytes = std::fs::read(&path).map_err(|e| DaemonError::Io {
                    what: format!("reading bootstrap {}", path.display()),
                    source: e,
                })?;
                // Checked on the bytes read, which are the bytes used.
                let actual = kite_format::Digest::of(&bytes).oci();
                if actual != expected {
                    return Err(DaemonError::BadBootstrap {
                        source_name: path.display().to_string(),
                        why: format!(
                            "its sha256 is {actual}, but the image's manifest names {expected} (changed after conversion?)"
                        ),
                    });
                }
                let parsed = kite_format::Bootstrap::parse(&bytes).map_err(|e| {
                    DaemonError::BadBootstrap {
                        source_name: path.display().to_string(),
                        why: e.to_string(),
                    }
                })?;
                let profile = match &prefetch {
                    Some(p) => Some(read_profile(p, &bytes, &parsed)?),
                    None => None,
                };
                Ok((bytes, profile))
            })
            .await?;
            let backend: Arc<dyn Backend> = match spec {
                BackendSpec::Local { dir } => Arc::new(LocalDir::new(dir.clone())),
                BackendSpec::Http { url } => {
                    Arc::new(Http::new(url, ctx.fetch_timeout).map_err(DaemonError::Config)?)
                }
            };
            (
                bytes,
                backend,
                bootstrap.display().to_string(),
                None,
                profile,
            )
        }
        _ => {
            return Err(DaemonError::Config(
                "a registration names either an image reference, or a bootstrap and a backend"
                    .into(),
            ))
        }
    };
    // Parse, index, keep the bootstrap and write the record off the
    // async workers; the registry lock is held only to insert.
    let img = {
        let ctx = Arc::clone(ctx);
        let request = r.clone();
        let pinned = pinned.clone();
        blocking(move || {
            // Install keeps the bootstrap on disk; the record is kept too.
            let img = install(&ctx, bytes, backend, source)?;
            // Registered again (an idempotent registration): keep what
            // the record knew, its mounts and whether it was pulled.
            let old = crate::adopt::load(&ctx.run_dir, &img.fsid);
            let record = crate::adopt::ImageRecord {
                fsid: img.fsid.clone(),
                request,
                pinned,
                mountpoints: old
                    .as_ref()
                    .map(|o| o.mountpoints.clone())
                    .unwrap_or_default(),
                kept: old.as_ref().is_some_and(|o| o.kept) || img.kept.load(Ordering::Relaxed),
                prefetch_all: old.is_some_and(|o| o.prefetch_all),
            };
            crate::adopt::save(&ctx.run_dir, &record)?;
            if record.kept {
                crate::adopt::save_kept(&ctx.cache_dir, &record)?;
            }
            Ok(img)
        })
        .await?
    };
    let mut resp = RegisterResponse {
        fsid: img.fsid.clone(),
        domain_id: ctx.domain_id.clone(),
        kernel_path: ctx.kernel_path.clone(),
        bootstrap_path: None,
        devices: Vec::new(),
        pinned,
        prefetch_chunks: 0,
        read_ahead_kb: default_read_ahead_kb(&img),
    };
    if let Some(fan) = &ctx.fanotify {
        let files = {
            let (fan, img) = (Arc::clone(fan), Arc::clone(&img));
            blocking(move || fan.prepare(&img)).await?
        };
        resp.bootstrap_path = Some(files.bootstrap);
        resp.devices = files.devices;
    }
    // Queued now, started when the kernel path hands over a cache object
    // for each blob (cachefiles OPEN; fanotify: the blob's first event).
    if let Some(p) = &profile {
        resp.prefetch_chunks = img.queue_prefetch(p);
        tracing::info!(fsid = %img.fsid, chunks = p.entries.len(), queued = resp.prefetch_chunks, "prefetch profile queued");
    }
    Ok(resp)
}

/// Register an image's verified bootstrap bytes with the daemon.
pub(crate) fn install(
    ctx: &ApiContext,
    bytes: Vec<u8>,
    backend: Arc<dyn Backend>,
    source: String,
) -> Result<Arc<crate::registry::Image>, DaemonError> {
    let state_dir = ctx
        .daemon
        .registry
        .lock()
        .map_err(|_| DaemonError::Poisoned)?
        .state_dir()
        .map(Path::to_path_buf);
    let mut prepared = crate::registry::prepare(bytes, source, state_dir.as_deref())?;
    // Keep the bootstrap, so a new worker can adopt the image without the
    // network and without a remount; the image reads it from there.
    // Announced first, so a collection running meanwhile leaves the file.
    let boot = crate::adopt::bootstrap_path(&ctx.cache_dir, &prepared.fsid);
    ctx.daemon
        .registry
        .lock()
        .map_err(|_| DaemonError::Poisoned)?
        .registering
        .insert(prepared.fsid.clone());
    if let Err(e) = prepared.keep_on_disk(&boot) {
        if let Ok(mut r) = ctx.daemon.registry.lock() {
            r.registering.remove(&prepared.fsid);
        }
        return Err(DaemonError::Io {
            what: format!("keeping the bootstrap in {}", boot.display()),
            source: e,
        });
    }
    let img = ctx
        .daemon
        .registry
        .lock()
        .map_err(|_| DaemonError::Poisoned)?
        .insert(prepared, backend, ctx.fetch_timeout);
    // cachefiles: other blobs may copy chunks from this one's kernel cache
    // file while it is not in use (the fanotify path sets its own reader
    // when it prepares the blob files).
    if ctx.fanotify.is_none() {
        for b in &img.blobs {
            b.set_local_reader(Arc::new(crate::gc::KernelCacheFile::new(
                &ctx.cache_dir,
                b.digest.hex(),
            )));
        }
    }
    tracing::info!(fsid = %img.fsid, source = %img.source, blobs = img.blobs.len(), "registered image");
    Ok(img)
}

/// Serve the API on `listener` (the holder's socket, inherited) until it
/// fails. Connections that arrive while no worker serves wait in its
/// backlog.
pub async fn serve_on(
    ctx: Arc<ApiContext>,
    listener: std::os::unix::net::UnixListener,
) -> Result<(), DaemonError> {
    let io = |what: &str, e: std::io::Error| DaemonError::Io {
        what: format!("{what} the control API socket"),
        source: e,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| io("configuring", e))?;
    let listener = UnixListener::from_std(listener).map_err(|e| io("registering", e))?;
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| io("accepting on", e))?;
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&ctx), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

/// A client of the control API.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), DaemonError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| DaemonError::Io {
                what: format!(
                    "connecting to the kite daemon at {} (is `kite daemon` running?)",
                    self.socket.display()
                ),
                source: e,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DaemonError::Api(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kite")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| DaemonError::Api(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| DaemonError::Api(format!("request: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| DaemonError::Api(format!("response: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        status: StatusCode,
        bytes: &Bytes,
    ) -> Result<T, DaemonError> {
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
            return Err(DaemonError::Api(msg));
        }
        serde_json::from_slice(bytes).map_err(|e| DaemonError::Api(format!("bad response: {e}")))
    }

    pub async fn health(&self) -> Result<Health, DaemonError> {
        let (s, b) = self.call(Method::GET, "/v1/health", None).await?;
        Self::decode(s, &b)
    }

    pub async fn images(&self) -> Result<Vec<ImageStatus>, DaemonError> {
        let (s, b) = self.call(Method::GET, "/v1/images", None).await?;
        Self::decode(s, &b)
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, DaemonError> {
        let body = serde_json::to_vec(req).map_err(|e| DaemonError::Api(e.to_string()))?;
        let (s, b) = self.call(Method::POST, "/v1/images", Some(body)).await?;
        Self::decode(s, &b)
    }

    /// What the kernel has read of image `fsid` so far.
    pub async fn profile(&self, fsid: &str) -> Result<AccessProfile, DaemonError> {
        let (s, b) = self
            .call(Method::GET, &format!("/v1/images/{fsid}/profile"), None)
            .await?;
        Self::decode(s, &b)
    }

    /// Tell the daemon about a mount of image `fsid` (see [`MountNotice`]).
    pub async fn mounted(&self, fsid: &str, notice: &MountNotice) -> Result<(), DaemonError> {
        let body = serde_json::to_vec(notice).map_err(|e| DaemonError::Api(e.to_string()))?;
        let (s, b) = self
            .call(
                Method::POST,
                &format!("/v1/images/{fsid}/mounts"),
                Some(body),
            )
            .await?;
        Self::decode::<serde_json::Value>(s, &b).map(|_| ())
    }

    /// Fetch every chunk of image `fsid` in the background, after its
    /// profile, while readers go first (`kite mount --prefetch all`); how
    /// many were queued.
    pub async fn prefetch_all(&self, fsid: &str) -> Result<u64, DaemonError> {
        let (s, b) = self
            .call(Method::POST, &format!("/v1/images/{fsid}/prefetch"), None)
            .await?;
        let v: serde_json::Value = Self::decode(s, &b)?;
        Ok(v["queued"].as_u64().unwrap_or(0))
    }

    /// Queue every missing chunk of image `fsid` for fetching (`kite
    /// pull`); how many were queued.
    pub async fn pull(&self, fsid: &str) -> Result<u64, DaemonError> {
        let (s, b) = self
            .call(Method::POST, &format!("/v1/images/{fsid}/pull"), None)
            .await?;
        let v: serde_json::Value = Self::decode(s, &b)?;
        Ok(v["queued"].as_u64().unwrap_or(0))
    }

    /// Collect cache data no registered image references and that has
    /// been unreferenced for `grace_secs` (0: all of it).
    pub async fn gc(&self, grace_secs: u64) -> Result<crate::gc::GcReport, DaemonError> {
        let body = serde_json::to_vec(&GcRequest { grace_secs })
            .map_err(|e| DaemonError::Api(e.to_string()))?;
        let (s, b) = self.call(Method::POST, "/v1/gc", Some(body)).await?;
        Self::decode(s, &b)
    }

    /// The image is no longer used (last unmount, containerd removal):
    /// forgotten, unless it was pulled for keeping.
    pub async fn unregister(&self, fsid: &str) -> Result<(), DaemonError> {
        let (s, b) = self
            .call(Method::DELETE, &format!("/v1/images/{fsid}"), None)
            .await?;
        Self::decode::<serde_json::Value>(s, &b).map(|_| ())
    }

    /// Forget image `fsid`, pulled for keeping or not (`kite rm`).
    pub async fn remove(&self, fsid: &str) -> Result<(), DaemonError> {
        let (s, b) = self
            .call(Method::DELETE, &format!("/v1/images/{fsid}?force=1"), None)
            .await?;
        Self::decode::<serde_json::Value>(s, &b).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FSID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(m: Method, path: &str, body: &[u8]) -> Result<ApiRequest, ApiReject> {
        parse_request(&m, path, None, body)
    }

    #[test]
    fn routes_parse_to_requests() {
        assert!(matches!(
            parse(Method::GET, "/v1/health", b""),
            Ok(ApiRequest::Health)
        ));
        let p = format!("/v1/images/{FSID}/profile");
        assert!(matches!(parse(Method::GET, &p, b""), Ok(ApiRequest::Profile(f)) if f == FSID));
        let p = format!("/v1/images/{FSID}/mounts");
        let r = parse(Method::POST, &p, br#"{"mountpoint":"/mnt/x"}"#);
        assert!(
            matches!(r, Ok(ApiRequest::Mounted { fsid, notice }) if fsid == FSID && notice.mountpoint == Path::new("/mnt/x"))
        );
        let r = parse_request(
            &Method::DELETE,
            &format!("/v1/images/{FSID}"),
            Some("force=1"),
            b"",
        );
        assert!(matches!(r, Ok(ApiRequest::Forget { force: true, .. })));
        assert!(matches!(
            parse(Method::POST, "/v1/gc", b""),
            Ok(ApiRequest::Gc { grace_secs: 0 })
        ));
        assert!(matches!(
            parse(Method::POST, "/v1/gc", br#"{"grace_secs":5}"#),
            Ok(ApiRequest::Gc { grace_secs: 5 })
        ));
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let status = |r: Result<ApiRequest, ApiReject>| r.err().map(|e| e.status);
        // Not an fsid: no such image, whatever the route.
        for p in [
            "/v1/images/../../etc/profile",
            "/v1/images/ABC/pull",
            "/v1/images//mounts",
        ] {
            assert!(
                matches!(
                    status(parse(Method::POST, p, b"")),
                    Some(StatusCode::NOT_FOUND)
                ),
                "{p}"
            );
        }
        assert_eq!(
            status(parse(Method::DELETE, "/v1/images/x/../y", b"")),
            Some(StatusCode::NOT_FOUND)
        );
        let p = format!("/v1/images/{FSID}/mounts");
        let e = parse(Method::POST, &p, br#"{"mountpoint":"rel/dir"}"#)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("rel/dir is not an absolute path"),
            "{}",
            e.message
        );
        let e = parse(Method::POST, "/v1/images", b"{not json")
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("bad request body"), "{}", e.message);
        assert_eq!(
            status(parse(Method::PUT, "/v1/health", b"")),
            Some(StatusCode::NOT_FOUND)
        );
    }
}
