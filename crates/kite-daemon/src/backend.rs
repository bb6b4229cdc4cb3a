//! Where blob bytes come from: one trait, several backends.
//!
//! A backend returns the stored (compressed) bytes of a byte range of a
//! blob. It does not verify anything: the fetcher checks every chunk's
//! sha256 after decompression. Every backend counts its requests and bytes,
//! which is what `kite status` and the tests read.

use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kite_format::Digest;

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("blob {blob} bytes {start}..{end}: {why}")]
    Failed {
        blob: Digest,
        start: u64,
        end: u64,
        why: String,
    },
    #[error("blob {blob} bytes {start}..{end}: no answer within {secs} s")]
    Timeout {
        blob: Digest,
        start: u64,
        end: u64,
        secs: u64,
    },
}

/// Stored bytes a backend returned, and which source gave them (for
/// accounting: `registry`, `mirror`, `http`, `local`).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    pub source: &'static str,
}

pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>>;

/// Request and byte counters of a backend.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Of `bytes`, those a registry mirror served.
    pub mirror_bytes: AtomicU64,
}

/// A source of blob bytes.
pub trait Backend: Send + Sync {
    /// The stored bytes `range` of `blob`, exactly.
    fn fetch(&self, blob: Digest, range: Range<u64>) -> FetchFuture<'_>;
    fn counters(&self) -> &Counters;
    /// A short description for status output.
    fn describe(&self) -> String;
    /// The kind of source, for status: `registry`, `http`, `local` (a
    /// registry backend's fetches may come from a mirror: see
    /// [`Fetched::source`]).
    fn kind(&self) -> &'static str {
        "other"
    }
}

/// Blobs in a local directory, as `<hex>` or `blobs/sha256/<hex>`.
pub struct LocalDir {
    dir: PathBuf,
    counters: Counters,
}

impl LocalDir {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            counters: Counters::default(),
        }
    }
}

impl Backend for LocalDir {
    fn fetch(&self, blob: Digest, range: Range<u64>) -> FetchFuture<'_> {
        let candidates = [
            self.dir.join(blob.hex()),
            self.dir.join("blobs").join("sha256").join(blob.hex()),
        ];
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let (start, end) = (range.start, range.end);
            let fail = |why: String| FetchError::Failed {
                blob,
                start,
                end,
                why,
            };
            let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
                let path = candidates
                    .iter()
                    .find(|p| p.is_file())
                    .ok_or_else(|| "blob file not found in the local backend".to_string())?;
                let f =
                    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut buf = vec![0u8; (end - start) as usize];
                f.read_exact_at(&mut buf, start)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(buf)
            })
            .await
            .map_err(|e| fail(format!("reader task: {e}")))?
            .map_err(|why| {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                fail(why)
            })?;
            self.counters
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(Fetched {
                bytes: Bytes::from(data),
                source: "local",
            })
        })
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}

/// Blobs under a plain HTTP(S) base URL, as `<base>/blobs/sha256/<hex>`,
/// fetched with Range requests.
pub struct Http {
    base: String,
    client: reqwest::Client,
    timeout: Duration,
    counters: Counters,
}

impl Http {
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client,
            timeout,
            counters: Counters::default(),
        })
    }
}

impl Backend for Http {
    fn fetch(&self, blob: Digest, range: Range<u64>) -> FetchFuture<'_> {
        let url = format!("{}/blobs/sha256/{}", self.base, blob.hex());
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let (start, end) = (range.start, range.end);
            let fail = |why: String| {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                FetchError::Failed {
                    blob,
                    start,
                    end,
                    why,
                }
            };
            let resp = self
                .client
                .get(&url)
                .header("Range", format!("bytes={}-{}", start, end - 1))
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        FetchError::Timeout {
                            blob,
                            start,
                            end,
                            secs: self.timeout.as_secs(),
                        }
                    } else {
                        fail(format!("GET {url}: {e}"))
                    }
                })?;
            let status = resp.status();
            if status.as_u16() != 206 {
                return Err(fail(format!(
                    "GET {url} with Range: status {status}, expected 206"
                )));
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| fail(format!("GET {url}: body: {e}")))?;
            if body.len() as u64 != end - start {
                return Err(fail(format!(
                    "GET {url}: {} bytes, asked for {}",
                    body.len(),
                    end - start
                )));
            }
            self.counters
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            Ok(Fetched {
                bytes: body,
                source: "http",
            })
        })
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
    fn describe(&self) -> String {
        self.base.clone()
    }
    fn kind(&self) -> &'static str {
        "http"
    }
}

/// Blobs in an OCI registry repository, fetched with Range GETs (auth,
/// retries, redirects and mirrors are the registry client's).
pub struct Registry {
    repo: kite_registry::Repository,
    timeout: Duration,
    counters: Counters,
}

impl Registry {
    pub fn new(repo: kite_registry::Repository, timeout: Duration) -> Self {
        Self {
            repo,
            timeout,
            counters: Counters::default(),
        }
    }
}

impl Backend for Registry {
    fn fetch(&self, blob: Digest, range: Range<u64>) -> FetchFuture<'_> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let (start, end) = (range.start, range.end);
            let digest = format!("sha256:{}", blob.hex());
            let res =
                tokio::time::timeout(self.timeout, self.repo.fetch_range_from(&digest, range))
                    .await;
            match res {
                Ok(Ok((body, mirror))) => {
                    let n = body.len() as u64;
                    self.counters.bytes.fetch_add(n, Ordering::Relaxed);
                    if mirror {
                        self.counters.mirror_bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok(Fetched {
                        bytes: body,
                        source: if mirror { "mirror" } else { "registry" },
                    })
                }
                Ok(Err(e)) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    Err(FetchError::Failed {
                        blob,
                        start,
                        end,
                        why: e.to_string(),
                    })
                }
                Err(_) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    Err(FetchError::Timeout {
                        blob,
                        start,
                        end,
                        secs: self.timeout.as_secs(),
                    })
                }
            }
        })
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
    fn describe(&self) -> String {
        format!("registry:{}", self.repo.display())
    }
    fn kind(&self) -> &'static str {
        "registry"
    }
}
