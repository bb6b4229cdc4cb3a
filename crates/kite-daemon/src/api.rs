//! The control API: HTTP/1.1 + JSON on a unix socket (mode 0600, so root
//! only), used by `kite mount`, `kite status` and monitoring.
//!
//! ```text
//! GET    /v1/health             {"ok":true,"kernel_path":...}
//! GET    /v1/images             [ImageStatus...]
//! POST   /v1/images             RegisterRequest -> RegisterResponse
//! DELETE /v1/images/<fsid>      204, or 404
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::backend::{Backend, Http, LocalDir};
use crate::serve::Daemon;
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The bootstrap file (read by the daemon).
    pub bootstrap: PathBuf,
    pub backend: BackendSpec,
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
    /// fanotify path: pre-content events raised for this blob's file.
    #[serde(default)]
    pub events: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageStatus {
    pub fsid: String,
    pub source: String,
    pub bootstrap_size: u64,
    pub blobs: Vec<BlobStatus>,
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
            bootstrap_size: img.bootstrap.len() as u64,
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
                    events: fan.map(|f| f.blob_events(&b.digest)).unwrap_or(0),
                })
                .collect(),
        })
        .collect()
}

async fn handle(
    ctx: Arc<ApiContext>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match (method, path.as_str()) {
        (Method::GET, "/v1/health") => {
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
                },
            )
        }
        (Method::GET, "/v1/images") => json(
            StatusCode::OK,
            &images_status(&ctx.daemon, ctx.fanotify.as_deref()),
        ),
        (Method::POST, "/v1/images") => {
            let body = req.into_body().collect().await?.to_bytes();
            match serde_json::from_slice::<RegisterRequest>(&body) {
                Err(e) => error(StatusCode::BAD_REQUEST, &format!("bad request body: {e}")),
                Ok(r) => match register(&ctx, r) {
                    Ok(resp) => json(StatusCode::OK, &resp),
                    Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
                },
            }
        }
        (Method::DELETE, p) if p.starts_with("/v1/images/") => {
            let fsid = &p["/v1/images/".len()..];
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
                json(StatusCode::OK, &serde_json::json!({ "removed": fsid }))
            } else {
                error(StatusCode::NOT_FOUND, &format!("no image {fsid}"))
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    Ok(resp)
}

fn register(ctx: &ApiContext, r: RegisterRequest) -> Result<RegisterResponse, DaemonError> {
    let bytes = std::fs::read(&r.bootstrap).map_err(|e| DaemonError::Io {
        what: format!("reading bootstrap {}", r.bootstrap.display()),
        source: e,
    })?;
    // Validate (and hash) before taking the registry lock: a bad or huge
    // bootstrap must not stall or poison the request loop's lookups.
    kite_format::Bootstrap::parse(&bytes).map_err(|e| DaemonError::BadBootstrap {
        source_name: r.bootstrap.display().to_string(),
        why: e.to_string(),
    })?;
    let backend: Arc<dyn Backend> = match &r.backend {
        BackendSpec::Local { dir } => Arc::new(LocalDir::new(dir.clone())),
        BackendSpec::Http { url } => {
            Arc::new(Http::new(url, ctx.fetch_timeout).map_err(DaemonError::Config)?)
        }
    };
    let img = ctx
        .daemon
        .registry
        .lock()
        .map_err(|_| DaemonError::Poisoned)?
        .register(
            bytes,
            backend,
            ctx.fetch_timeout,
            r.bootstrap.display().to_string(),
        )?;
    tracing::info!(fsid = %img.fsid, source = %img.source, blobs = img.blobs.len(), "registered image");
    let mut resp = RegisterResponse {
        fsid: img.fsid.clone(),
        domain_id: ctx.domain_id.clone(),
        kernel_path: ctx.kernel_path.clone(),
        bootstrap_path: None,
        devices: Vec::new(),
    };
    if let Some(fan) = &ctx.fanotify {
        let files = fan.prepare(&img)?;
        resp.bootstrap_path = Some(files.bootstrap);
        resp.devices = files.devices;
    }
    Ok(resp)
}

/// Serve the API on `socket` until the listener fails.
pub async fn serve_api(ctx: Arc<ApiContext>, socket: &Path) -> Result<(), DaemonError> {
    let io = |what: &str, e: std::io::Error| DaemonError::Io {
        what: format!("{what} {}", socket.display()),
        source: e,
    };
    if socket.exists() {
        // A live daemon answers; a stale socket from a crash is replaced.
        if UnixStream::connect(socket).await.is_ok() {
            return Err(DaemonError::Config(format!(
                "another daemon is listening on {}",
                socket.display()
            )));
        }
        std::fs::remove_file(socket).map_err(|e| io("removing stale socket", e))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    let listener = UnixListener::bind(socket).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod", e))?;
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

    pub async fn unregister(&self, fsid: &str) -> Result<(), DaemonError> {
        let (s, b) = self
            .call(Method::DELETE, &format!("/v1/images/{fsid}"), None)
            .await?;
        Self::decode::<serde_json::Value>(s, &b).map(|_| ())
    }
}
