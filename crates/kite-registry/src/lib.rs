//! An OCI distribution (v2) client for kite: what `kite convert --from
//! docker://`, `kite push` and the daemon's registry backend use.
//!
//! - [`reference`]: parsing `host[:port]/repo[:tag][@digest]`.
//! - [`auth`]: credentials (explicit or docker config), challenges, secrets.
//! - [`client`]: the shared HTTP engine (auth, retries, redirects, mirrors).
//! - [`repo`]: repository operations (resolve, pull, ranged pull, push).
//! - [`push_layout`] and [`BlobReader`]: whole-image push and a blocking
//!   reader for the (synchronous) converter.
//!
//! Trust: everything fetched by digest is hashed and compared before it is
//! returned; a manifest fetched by tag is returned with the digest of the
//! bytes actually received, which callers pin to.

pub mod auth;
pub mod client;
pub mod reference;
pub mod repo;

use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;
use kite_oci::{Descriptor, ImageIndex};

pub use auth::{Credentials, Secret};
pub use client::{Client, ClientConfig};
pub use reference::Reference;
pub use repo::{Pushed, Repository, Resolved};

/// What can go wrong talking to a registry. Every variant names what was
/// being done (`what`); none carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad image reference {reference:?}: {why}")]
    BadReference { reference: String, why: String },
    #[error("registry {registry}: authentication failed: {why}")]
    Auth { registry: String, why: String },
    #[error("{what}: the registry answered status {status}{detail}")]
    Status {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{what}: {why}")]
    Transport { what: String, why: String },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: size mismatch: the descriptor says {expected} bytes, the content is {actual} bytes (its digest matches: the descriptor's size is wrong)")]
    Size {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The result of pushing an image.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The target pinned to the manifest digest.
    pub pinned: Reference,
    pub digest: String,
    /// (digest, size, what happened) per blob, config first.
    pub blobs: Vec<(String, u64, Pushed)>,
}

/// Push the single image of the OCI layout at `dir` (a `kite convert`
/// output, or any one-image layout) to `target`. Blobs already in the
/// repository are skipped; `mount_from` names repositories of the same
/// registry to mount blobs from before uploading.
pub async fn push_layout(
    client: &Client,
    dir: &Path,
    target: &Reference,
    plain_http: bool,
    mount_from: &[String],
    progress: &(dyn Fn(&str, u64, Pushed) + Sync),
) -> Result<PushReport, RegistryError> {
    let io_err = |what: &Path| {
        let what = what.display().to_string();
        move |source| RegistryError::Io { what, source }
    };
    let index_path = dir.join("index.json");
    let index: ImageIndex = serde_json::from_slice(
        &std::fs::read(&index_path).map_err(io_err(&index_path))?,
    )
    .map_err(|e| RegistryError::Invalid {
        what: index_path.display().to_string(),
        why: format!("not an OCI image index: {e}"),
    })?;
    let mdesc = match index.manifests.as_slice() {
        [one] => one.clone(),
        other => {
            return Err(RegistryError::Invalid {
                what: index_path.display().to_string(),
                why: format!("holds {} manifests; push needs exactly one", other.len()),
            })
        }
    };
    let blob_file = |d: &Descriptor| -> Result<std::path::PathBuf, RegistryError> {
        let hex = kite_oci::digest_hex(&d.digest).map_err(|e| RegistryError::Invalid {
            what: format!("descriptor {}", d.digest),
            why: e.to_string(),
        })?;
        let p = dir.join("blobs").join("sha256").join(hex);
        let len = std::fs::metadata(&p).map_err(io_err(&p))?.len();
        if len != d.size {
            return Err(RegistryError::Invalid {
                what: p.display().to_string(),
                why: format!("{len} bytes, the descriptor says {}", d.size),
            });
        }
        Ok(p)
    };
    let mpath = blob_file(&mdesc)?;
    let mbytes = Bytes::from(std::fs::read(&mpath).map_err(io_err(&mpath))?);
    let actual = kite_oci::sha256_digest(&mbytes);
    if actual != mdesc.digest {
        return Err(RegistryError::Digest {
            what: format!("manifest {}", mpath.display()),
            expected: mdesc.digest,
            actual,
        });
    }
    let manifest: kite_oci::Manifest =
        serde_json::from_slice(&mbytes).map_err(|e| RegistryError::Invalid {
            what: format!("manifest {}", mdesc.digest),
            why: format!("not an image manifest: {e}"),
        })?;
    let repo = client.repository(target, plain_http)?;
    let mut blobs = Vec::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let path = blob_file(d)?;
        let how = repo.push_blob(d, &path, mount_from).await?;
        progress(&d.digest, d.size, how);
        blobs.push((d.digest.clone(), d.size, how));
    }
    let tag = target.tag.as_deref().unwrap_or(&mdesc.digest);
    let digest = repo.put_manifest(tag, &mdesc.media_type, mbytes).await?;
    if let Some(want) = &target.digest {
        if want != &digest {
            return Err(RegistryError::Digest {
                what: format!("push to {target}"),
                expected: want.clone(),
                actual: digest,
            });
        }
    }
    Ok(PushReport {
        pinned: target.pinned(&digest),
        digest,
        blobs,
    })
}

/// A blocking `Read` over a blob being downloaded (with resume and digest
/// check) by a task on a tokio runtime. Backpressure: at most a few
/// chunks are buffered. A digest mismatch or a failed download surfaces as
/// a read error, after all bytes that arrived have been read.
pub struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    done: bool,
}

impl BlobReader {
    pub fn spawn(rt: &tokio::runtime::Handle, repo: Repository, desc: Descriptor) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(8);
        rt.spawn(async move {
            let res = repo
                .download(&desc, |c| {
                    let tx = tx.clone();
                    async move { tx.send(Ok(c)).await.is_ok() }
                })
                .await;
            if let Err(e) = res {
                let _ = tx.send(Err(e.to_string())).await;
            }
        });
        Self {
            rx,
            cur: Bytes::new(),
            done: false,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(c)) => self.cur = c,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(io::Error::other(e));
                }
                None => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}
