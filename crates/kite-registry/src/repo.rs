//! Operations on one repository: resolve, pull (whole, ranged, resumable),
//! push (skip, cross-repository mount, monolithic or chunked upload) and
//! manifest upload. Everything fetched by digest is verified against it.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kite_oci::{media, Descriptor, ImageIndex, Manifest, Platform};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::client::{header, Client, Op};
use crate::{Reference, RegistryError};

/// Accept header for manifests: OCI and Docker, images and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or index accepted.
const MANIFEST_MAX: usize = 4 << 20;

/// A repository on a registry.
#[derive(Clone)]
pub struct Repository {
    client: Client,
    /// `host[:port]` as in the reference (mirror lookups use it).
    registry: String,
    name: String,
    origin: Url,
    /// Bytes received from blob GETs (counted as they arrive).
    pub(crate) received: std::sync::Arc<AtomicU64>,
}

/// A manifest resolved from a reference.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `sha256:...` of `bytes`, checked against any digest asked for.
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
    pub manifest: Manifest,
    /// The digest of the index it was selected from, if any.
    pub index_digest: Option<String>,
}

/// What happened to one blob on push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Already in the repository (HEAD said so).
    Skipped,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded, in this many requests carrying data.
    Uploaded { requests: u32 },
}

fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl Client {
    /// The repository a reference names. `plain_http` allows HTTP for this
    /// registry even if it is not on loopback.
    pub fn repository(
        &self,
        reference: &Reference,
        plain_http: bool,
    ) -> Result<Repository, RegistryError> {
        Ok(Repository {
            client: self.clone(),
            registry: reference.registry.clone(),
            name: reference.repository.clone(),
            origin: self.origin(reference.api_host(), plain_http)?,
            received: Default::default(),
        })
    }
}

impl Repository {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host/repo`, for messages.
    pub fn display(&self) -> String {
        format!("{}/{}", self.registry, self.name)
    }

    /// Blob bytes received so far through this handle and its clones.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn pull_scope(&self) -> Vec<String> {
        vec![format!("repository:{}:pull", self.name)]
    }

    fn push_scope(&self) -> Vec<String> {
        vec![format!("repository:{}:pull,push", self.name)]
    }

    async fn run(&self, op: Op<'_>) -> Result<reqwest::Response, RegistryError> {
        self.client.execute(&self.registry, &self.origin, &op).await
    }

    /// A status error for `what`, with the registry's error code if it sent
    /// one (never the body otherwise).
    async fn status_error(what: &str, resp: reqwest::Response) -> RegistryError {
        let status = resp.status().as_u16();
        let body = read_limited(resp, 64 << 10, what).await.unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("errors")?.get(0)?;
                Some(format!(
                    " ({}: {})",
                    e.get("code")?.as_str()?,
                    e.get("message").and_then(|m| m.as_str()).unwrap_or("")
                ))
            })
            .unwrap_or_default();
        RegistryError::Status {
            what: what.to_string(),
            status,
            detail,
        }
    }

    /// GET a manifest or index by tag or digest, verified against the
    /// digest when one is asked for. Returns (media type, bytes, digest).
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(String, Bytes, String), RegistryError> {
        let what = format!("manifest {}:{reference}", self.display());
        let mut headers = HeaderMap::new();
        header(&mut headers, "accept", MANIFEST_ACCEPT);
        let resp = self
            .run(Op {
                method: Method::GET,
                path: format!("/v2/{}/manifests/{reference}", self.name),
                headers,
                body: None,
                scopes: self.pull_scope(),
                what: &what,
                pull: true,
                idempotent: true,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(Self::status_error(&what, resp).await);
        }
        let mt = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
            .unwrap_or_default();
        let served_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_limited(resp, MANIFEST_MAX, &what).await?;
        let actual = sha256_hex(&bytes);
        if reference.starts_with("sha256:") && actual != reference {
            return Err(RegistryError::Digest {
                what,
                expected: reference.to_string(),
                actual,
            });
        }
        if let Some(d) = served_digest {
            if d.starts_with("sha256:") && d != actual {
                return Err(RegistryError::Digest {
                    what: format!("{what} (Docker-Content-Digest header)"),
                    expected: d,
                    actual,
                });
            }
        }
        // Some registries send a generic type; the document says what it is.
        let mt = if mt.is_empty() || mt == "application/json" || mt == "text/plain" {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                .unwrap_or(mt)
        } else {
            mt
        };
        Ok((mt, bytes, actual))
    }

    /// Resolve a reference to an image manifest, choosing `platform` from
    /// an index.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Resolved, RegistryError> {
        let mut want = reference.manifest_ref().to_string();
        let mut want_size: Option<u64> = None;
        let mut index_digest = None;
        for _depth in 0..4 {
            let (mt, bytes, digest) = self.get_manifest(&want).await?;
            let what = format!("manifest {}@{digest}", self.display());
            if let Some(size) = want_size {
                if bytes.len() as u64 != size {
                    return Err(RegistryError::Invalid {
                        what,
                        why: format!("{} bytes, the index says {size}", bytes.len()),
                    });
                }
            }
            if mt == media::OCI_INDEX || mt == media::DOCKER_LIST {
                let idx: ImageIndex =
                    serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid {
                        what: what.clone(),
                        why: format!("not an image index: {e}"),
                    })?;
                let pick = choose_platform(&idx, platform).ok_or_else(|| {
                    let avail: Vec<String> = idx
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect();
                    RegistryError::Invalid {
                        what: format!("image index {}@{digest}", self.display()),
                        why: format!(
                            "no manifest for platform {platform}; available: {}",
                            if avail.is_empty() {
                                "none".into()
                            } else {
                                avail.join(", ")
                            }
                        ),
                    }
                })?;
                let ok = pick.digest.strip_prefix("sha256:").is_some_and(|h| {
                    h.len() == 64
                        && h.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
                if !ok {
                    return Err(RegistryError::Invalid {
                        what: format!("image index {}@{digest}", self.display()),
                        why: format!("entry {:?} is not a sha256 digest", pick.digest),
                    });
                }
                index_digest.get_or_insert(digest);
                want = pick.digest.clone();
                want_size = Some(pick.size);
                continue;
            }
            if mt != media::OCI_MANIFEST && mt != media::DOCKER_MANIFEST {
                return Err(RegistryError::Invalid {
                    what,
                    why: format!("unsupported manifest media type {mt:?}"),
                });
            }
            let manifest: Manifest =
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid {
                    what: what.clone(),
                    why: format!("not an image manifest: {e}"),
                })?;
            return Ok(Resolved {
                digest,
                media_type: mt,
                bytes,
                manifest,
                index_digest,
            });
        }
        Err(RegistryError::Invalid {
            what: format!("manifest {}", reference),
            why: "image indexes nested too deeply".into(),
        })
    }

    fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.name)
    }

    /// GET a blob (mirrors first), with an optional `Range` header value.
    async fn get_blob(
        &self,
        digest: &str,
        range: Option<String>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut headers = HeaderMap::new();
        if let Some(r) = range {
            header(&mut headers, "range", &r);
        }
        self.run(Op {
            method: Method::GET,
            path: self.blob_path(digest),
            headers,
            body: None,
            scopes: self.pull_scope(),
            what,
            pull: true,
            idempotent: true,
        })
        .await
    }

    /// Is the blob in this repository? (HEAD)
    pub async fn blob_exists(&self, digest: &str) -> Result<bool, RegistryError> {
        let what = format!("blob {digest} in {}", self.display());
        let resp = self
            .run(Op {
                method: Method::HEAD,
                path: self.blob_path(digest),
                headers: HeaderMap::new(),
                body: None,
                scopes: self.push_scope(),
                what: &what,
                pull: false,
                idempotent: true,
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Self::status_error(&what, resp).await),
        }
    }

    /// Exactly the stored bytes `range` of a blob (Range GET, with retries).
    pub async fn fetch_range(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        self.fetch_range_from(digest, range).await.map(|(b, _)| b)
    }

    /// [`Repository::fetch_range`], and whether a mirror served the bytes
    /// (true) or the registry itself (false).
    pub async fn fetch_range_from(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<(Bytes, bool), RegistryError> {
        let what = format!(
            "blob {digest} of {} bytes {}..{}",
            self.display(),
            range.start,
            range.end
        );
        if range.is_empty() {
            return Ok((Bytes::new(), false));
        }
        let mut attempt = 0;
        loop {
            let resp = self
                .get_blob(
                    digest,
                    Some(format!("bytes={}-{}", range.start, range.end - 1)),
                    &what,
                )
                .await?;
            let mirror = resp
                .extensions()
                .get::<crate::client::ServedByMirror>()
                .is_some();
            let status = resp.status();
            if status != StatusCode::PARTIAL_CONTENT {
                if status.is_success() {
                    return Err(RegistryError::Invalid {
                        what,
                        why: format!(
                            "status {status} to a Range request; the registry must answer 206"
                        ),
                    });
                }
                return Err(Self::status_error(&what, resp).await);
            }
            match read_limited(resp, (range.end - range.start) as usize, &what).await {
                Ok(b) if b.len() as u64 == range.end - range.start => {
                    self.received.fetch_add(b.len() as u64, Ordering::Relaxed);
                    return Ok((b, mirror));
                }
                Ok(b) => {
                    return Err(RegistryError::Invalid {
                        what,
                        why: format!("{} bytes, asked for {}", b.len(), range.end - range.start),
                    })
                }
                Err(e) if attempt < self.client.config().retries => {
                    tracing::debug!("{e}; retrying");
                    tokio::time::sleep(self.client.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stream a whole blob into `sink`, resuming after interruptions from
    /// the last byte received (Range), and verify its size and digest at
    /// the end. `sink` returns false to stop early (error).
    pub async fn download<F, Fut>(
        &self,
        desc: &Descriptor,
        mut sink: F,
    ) -> Result<u64, RegistryError>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let digest = &desc.digest;
        let what = format!("blob {digest} of {}", self.display());
        let mut got = 0u64;
        let mut hasher = Sha256::new();
        let mut failures = 0u32;
        'outer: loop {
            let range = (got > 0).then(|| format!("bytes={got}-"));
            let mut resp = self.get_blob(digest, range, &what).await?;
            let status = resp.status();
            // Bytes of this response to drop before the new ones.
            let mut skip = 0u64;
            match status {
                StatusCode::OK => skip = got,
                StatusCode::PARTIAL_CONTENT if got > 0 => {
                    let start = content_range_start(resp.headers());
                    if start != Some(got) {
                        return Err(RegistryError::Invalid {
                            what,
                            why: format!(
                                "resuming at byte {got}: the registry sent Content-Range starting at {start:?}"
                            ),
                        });
                    }
                }
                _ => return Err(Self::status_error(&what, resp).await),
            }
            if got > 0 {
                tracing::info!(blob = %digest, from = got, "resuming blob download");
            }
            loop {
                match resp.chunk().await {
                    Ok(Some(mut c)) => {
                        if skip > 0 {
                            let n = skip.min(c.len() as u64) as usize;
                            skip -= n as u64;
                            c = c.slice(n..);
                            if c.is_empty() {
                                continue;
                            }
                        }
                        got += c.len() as u64;
                        self.received.fetch_add(c.len() as u64, Ordering::Relaxed);
                        if got > desc.size {
                            return Err(RegistryError::Invalid {
                                what,
                                why: format!("more than the descriptor's {} bytes", desc.size),
                            });
                        }
                        failures = 0;
                        hasher.update(&c);
                        if !sink(c).await {
                            return Err(RegistryError::Transport {
                                what,
                                why: "the reader went away".into(),
                            });
                        }
                    }
                    Ok(None) if got < desc.size => {
                        // A clean end short of the size: resume.
                        failures += 1;
                        if failures > self.client.config().retries {
                            break 'outer;
                        }
                        tokio::time::sleep(self.client.backoff(failures - 1)).await;
                        continue 'outer;
                    }
                    Ok(None) => break 'outer,
                    Err(e) => {
                        failures += 1;
                        if failures > self.client.config().retries {
                            return Err(RegistryError::Transport {
                                what,
                                why: format!(
                                    "{e} after {got} bytes; gave up after {failures} attempts"
                                ),
                            });
                        }
                        let e = crate::client::describe_reqwest(e);
                        tracing::info!(blob = %digest, at = got, "blob download interrupted ({e}); resuming");
                        tokio::time::sleep(self.client.backoff(failures - 1)).await;
                        continue 'outer;
                    }
                }
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if &actual == digest && got != desc.size {
            return Err(RegistryError::Size {
                what,
                expected: desc.size,
                actual: got,
            });
        }
        if got != desc.size || &actual != digest {
            return Err(RegistryError::Digest {
                what,
                expected: format!("{digest} ({} bytes)", desc.size),
                actual: format!("{actual} ({got} bytes)"),
            });
        }
        Ok(got)
    }

    /// A whole (small) blob in memory, verified.
    pub async fn fetch_blob(&self, desc: &Descriptor, max: u64) -> Result<Bytes, RegistryError> {
        if desc.size > max {
            return Err(RegistryError::Invalid {
                what: format!("blob {} of {}", desc.digest, self.display()),
                why: format!("{} bytes is more than the {max} allowed", desc.size),
            });
        }
        let mut buf = Vec::with_capacity(desc.size.min(64 << 20) as usize);
        self.download(desc, |c| {
            buf.extend_from_slice(&c);
            std::future::ready(true)
        })
        .await?;
        Ok(Bytes::from(buf))
    }

    /// Put a blob stored in `file` into this repository: skipped if
    /// present, mounted from one of `mount_from` if possible, else uploaded
    /// (monolithic up to the client's chunk size, chunked above).
    pub async fn push_blob(
        &self,
        desc: &Descriptor,
        file: &Path,
        mount_from: &[String],
    ) -> Result<Pushed, RegistryError> {
        if self.blob_exists(&desc.digest).await? {
            return Ok(Pushed::Skipped);
        }
        let mut attempt = 0;
        loop {
            let err = match self.push_blob_once(desc, file, mount_from).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            // Transport errors, and a session the registry lost or that is
            // out of step after a partial send (404, 416): the blob may
            // even be complete (a lost answer to the final PUT).
            let restartable = match &err {
                RegistryError::Transport { .. } => true,
                RegistryError::Status { status, .. } => {
                    matches!(status, 404 | 416 | 500 | 502 | 503 | 504)
                }
                _ => false,
            };
            if !restartable || attempt >= self.client.config().retries {
                return Err(err);
            }
            if let Ok(true) = self.blob_exists(&desc.digest).await {
                return Ok(Pushed::Uploaded { requests: 0 });
            }
            tracing::info!(blob = %desc.digest, "upload failed ({err}); starting it again");
            tokio::time::sleep(self.client.backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn push_blob_once(
        &self,
        desc: &Descriptor,
        file: &Path,
        mount_from: &[String],
    ) -> Result<Pushed, RegistryError> {
        let digest = &desc.digest;
        let what = format!("upload of blob {digest} to {}", self.display());
        let mut location = None;
        for from in mount_from.iter().filter(|f| *f != &self.name) {
            let valid = !from.is_empty()
                && from.split('/').all(|c| {
                    !c.is_empty()
                        && c.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                        })
                });
            if !valid {
                return Err(RegistryError::BadReference {
                    reference: from.clone(),
                    why: "not a repository name to mount from".into(),
                });
            }
            let mut scopes = self.push_scope();
            scopes.push(format!("repository:{from}:pull"));
            let resp = self
                .run(Op {
                    method: Method::POST,
                    path: format!(
                        "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
                        self.name
                    ),
                    headers: HeaderMap::new(),
                    body: None,
                    scopes,
                    what: &what,
                    pull: false,
                    idempotent: true,
                })
                .await?;
            match resp.status() {
                StatusCode::CREATED => return Ok(Pushed::Mounted),
                StatusCode::ACCEPTED => {
                    // Not mountable from there; the registry opened an
                    // upload session instead. Keep the last one, cancel
                    // the others.
                    if let Some(old) = location.replace(self.location(&resp, &what)?) {
                        let _ = self
                            .run_at(&old, Method::DELETE, HeaderMap::new(), None, &what)
                            .await;
                    }
                }
                _ => return Err(Self::status_error(&what, resp).await),
            }
        }
        let mut location = match location {
            Some(l) => l,
            None => {
                let resp = self
                    .run(Op {
                        method: Method::POST,
                        path: format!("/v2/{}/blobs/uploads/", self.name),
                        headers: HeaderMap::new(),
                        body: None,
                        scopes: self.push_scope(),
                        what: &what,
                        pull: false,
                        idempotent: true,
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(Self::status_error(&what, resp).await);
                }
                self.location(&resp, &what)?
            }
        };
        let chunk = self.client.config().upload_chunk.max(1);
        let read = |start: u64, len: u64| {
            let path = file.to_path_buf();
            async move {
                tokio::task::spawn_blocking(move || -> Result<Bytes, RegistryError> {
                    use std::os::unix::fs::FileExt;
                    let io = |e| RegistryError::Io {
                        what: path.display().to_string(),
                        source: e,
                    };
                    let f = std::fs::File::open(&path).map_err(io)?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, start).map_err(io)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| RegistryError::Transport {
                    what: "reading a blob to upload".into(),
                    why: e.to_string(),
                })?
            }
        };
        let mut requests = 0;
        let final_body = if desc.size <= chunk {
            Some(read(0, desc.size).await?)
        } else {
            let mut off = 0;
            while off < desc.size {
                let len = chunk.min(desc.size - off);
                let mut headers = HeaderMap::new();
                header(&mut headers, "content-type", "application/octet-stream");
                header(
                    &mut headers,
                    "content-range",
                    &format!("{off}-{}", off + len - 1),
                );
                let resp = self
                    .run_at(
                        &location,
                        Method::PATCH,
                        headers,
                        Some(read(off, len).await?),
                        &what,
                    )
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(Self::status_error(&what, resp).await);
                }
                location = self.location(&resp, &what)?;
                requests += 1;
                off += len;
            }
            None
        };
        let mut put = location.clone();
        put.query_pairs_mut().append_pair("digest", digest);
        let mut headers = HeaderMap::new();
        header(&mut headers, "content-type", "application/octet-stream");
        if final_body.is_some() {
            requests += 1;
        }
        let resp = self
            .run_at(&put, Method::PUT, headers, final_body, &what)
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(Self::status_error(&what, resp).await);
        }
        Ok(Pushed::Uploaded { requests })
    }

    /// A request to an absolute upload URL (the registry's Location).
    async fn run_at(
        &self,
        url: &Url,
        method: Method,
        headers: HeaderMap,
        body: Option<Bytes>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let origin = Url::parse(&url.origin().ascii_serialization()).map_err(|e| {
            RegistryError::Invalid {
                what: what.to_string(),
                why: format!("upload location {url}: {e}"),
            }
        })?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        self.client
            .execute(
                &self.registry,
                &origin,
                &Op {
                    method,
                    path,
                    headers,
                    body,
                    scopes: self.push_scope(),
                    what,
                    pull: false,
                    idempotent: false,
                },
            )
            .await
    }

    fn location(&self, resp: &reqwest::Response, what: &str) -> Result<Url, RegistryError> {
        resp.headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| self.origin.join(l).ok())
            .ok_or_else(|| RegistryError::Invalid {
                what: what.to_string(),
                why: "the registry sent no upload Location".into(),
            })
    }

    /// PUT a manifest under `reference` (tag or digest). Returns its digest,
    /// checked against what the registry says it stored.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        let digest = sha256_hex(&bytes);
        let what = format!("manifest upload {}:{reference}", self.display());
        let mut headers = HeaderMap::new();
        header(&mut headers, "content-type", media_type);
        let resp = self
            .run(Op {
                method: Method::PUT,
                path: format!("/v2/{}/manifests/{reference}", self.name),
                headers,
                body: Some(bytes),
                scopes: self.push_scope(),
                what: &what,
                pull: false,
                idempotent: true,
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(Self::status_error(&what, resp).await);
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                return Err(RegistryError::Digest {
                    what,
                    expected: digest,
                    actual: d.to_string(),
                });
            }
        }
        Ok(digest)
    }
}

/// The first manifest of an index matching `want` (descriptors without a
/// platform match anything).
pub fn choose_platform<'a>(idx: &'a ImageIndex, want: &Platform) -> Option<&'a Descriptor> {
    let exact = idx.manifests.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_none() || p.variant == want.variant)
        })
    });
    exact.or_else(|| idx.manifests.iter().find(|d| d.platform.is_none()))
}

fn content_range_start(h: &HeaderMap) -> Option<u64> {
    parse_content_range_start(h.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?)
}

/// The first byte of a `Content-Range: bytes A-B/N` value; `None` for
/// anything else (`bytes */N`, other units, garbage).
pub fn parse_content_range_start(v: &str) -> Option<u64> {
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

/// Read a response body, refusing more than `max` bytes.
async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Bytes, RegistryError> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() + c.len() > max {
                    return Err(RegistryError::Invalid {
                        what: what.to_string(),
                        why: format!("larger than {max} bytes"),
                    });
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Err(e) => {
                return Err(RegistryError::Transport {
                    what: what.to_string(),
                    why: format!("reading the body: {}", crate::client::describe_reqwest(e)),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(digest: &str, platform: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media::OCI_MANIFEST.into(),
            digest: digest.into(),
            size: 1,
            platform: platform.map(|p| Platform::parse(p).unwrap()),
            annotations: Default::default(),
            artifact_type: None,
        }
    }

    #[test]
    fn platform_choice_prefers_an_exact_match() {
        let idx = ImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: vec![
                desc("sha256:none", None),
                desc("sha256:arm", Some("linux/arm64")),
                desc("sha256:amd", Some("linux/amd64")),
            ],
            annotations: Default::default(),
        };
        let amd = Platform::parse("linux/amd64").unwrap();
        let riscv = Platform::parse("linux/riscv64").unwrap();
        assert_eq!(choose_platform(&idx, &amd).unwrap().digest, "sha256:amd");
        assert_eq!(choose_platform(&idx, &riscv).unwrap().digest, "sha256:none");
        let only = ImageIndex {
            manifests: vec![desc("sha256:arm", Some("linux/arm64"))],
            ..idx
        };
        assert!(choose_platform(&only, &amd).is_none());
    }

    /// A registry that serves `body` for any request, whole, every time.
    async fn serve_always(body: &'static [u8]) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = c.write_all(head.as_bytes()).await;
                    let _ = c.write_all(body).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_descriptor_with_the_right_digest_and_a_wrong_size_is_a_size_mismatch() {
        let body: &'static [u8] = b"the whole blob";
        let addr = serve_always(body).await;
        let client = Client::new(crate::ClientConfig {
            retries: 1,
            backoff: std::time::Duration::from_millis(1),
            ..Default::default()
        })
        .unwrap();
        let reference = Reference::parse(&format!("{addr}/test/blob:v1")).unwrap();
        let repo = client.repository(&reference, true).unwrap();
        let digest = sha256_hex(body);
        let d = Descriptor {
            media_type: media::OCI_LAYER_GZIP.into(),
            digest: digest.clone(),
            size: body.len() as u64 + 1,
            platform: None,
            annotations: Default::default(),
            artifact_type: None,
        };
        let e = repo.download(&d, |_| async { true }).await.unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::Size { expected, actual, .. }
                    if expected == body.len() as u64 + 1 && actual == body.len() as u64
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&digest)
                && msg.contains("size mismatch")
                && !msg.contains("digest mismatch"),
            "{msg}"
        );
    }

    #[test]
    fn content_range_parsing() {
        let mut h = HeaderMap::new();
        header(&mut h, "content-range", "bytes 100-199/1000");
        assert_eq!(content_range_start(&h), Some(100));
        header(&mut h, "content-range", "bytes */1000");
        assert_eq!(content_range_start(&h), None);
    }
}
