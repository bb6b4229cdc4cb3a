//! OCI image structures: descriptors, manifests, indexes, media types,
//! platform selection, and reading/writing an OCI image layout directory.
//!
//! Docker v2 schema 2 manifests and manifest lists are accepted wherever
//! their OCI counterparts are. Everything read from a layout is untrusted:
//! blobs are addressed by validated digests only (no path games), and
//! manifests/indexes are verified against the digest they were reached by.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_LAYER_ND_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_LAYER_ND_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_LAYER_ND_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

    /// kite's own media types. A kite manifest's `artifactType`.
    pub const KITE_ARTIFACT: &str = "application/vnd.kite.image.v1";

    // What `kite convert` writes: layer types under the OCI layer prefix
    // (containerd hands only those to a snapshotter, with their
    // annotations as labels), but not `...layer.v1.tar*`, so a runtime
    // without kite refuses them ("no processor") instead of untarring
    // kite bytes. The config is the source image's OCI config.
    /// The bootstrap as one zstd frame; the descriptor's annotations name
    /// the uncompressed digest and size ([`super::BootstrapLayer`]).
    pub const KITE_LAYER_BOOTSTRAP_ZSTD: &str =
        "application/vnd.oci.image.layer.kite.bootstrap.v1.erofs+zstd";
    /// A chunked data blob.
    pub const KITE_LAYER_BLOB: &str = "application/vnd.oci.image.layer.kite.blob.v1.chunked-zstd";
    /// A prefetch profile (`kite_format::prefetch`); at most one per image.
    pub const KITE_LAYER_PREFETCH: &str = "application/vnd.oci.image.layer.kite.prefetch.v1";

    // Images published before the containerd form: a kite config and kite
    // media types outside the OCI layer prefix. Still mounted by the
    // daemon; containerd cannot pull them (republish with `kite push`
    // after converting again).
    /// Config of the first form (kite's own JSON, no runtime config).
    pub const KITE_CONFIG: &str = "application/vnd.kite.image.config.v1+json";
    /// The bootstrap as is (images converted before bootstraps were
    /// compressed).
    pub const KITE_BOOTSTRAP: &str = "application/vnd.kite.bootstrap.v1.erofs";
    /// The bootstrap as one zstd frame, first form.
    pub const KITE_BOOTSTRAP_ZSTD: &str = "application/vnd.kite.bootstrap.v1.erofs+zstd";
    /// A data blob, first form.
    pub const KITE_BLOB: &str = "application/vnd.kite.blob.v1.chunked-zstd";
    /// A prefetch profile, first form.
    pub const KITE_PREFETCH: &str = "application/vnd.kite.prefetch.v1";

    /// Whether `media_type` is a prefetch profile layer (either form).
    pub fn is_kite_prefetch(media_type: &str) -> bool {
        media_type == KITE_LAYER_PREFETCH || media_type == KITE_PREFETCH
    }
}

/// Layer annotations of the containerd form: every kite layer carries
/// them, and containerd passes every `containerd.io/snapshot/` annotation
/// of a layer to the snapshotter as a label of that layer's snapshot.
pub mod snapshot_labels {
    /// `bootstrap`, `blob` or `prefetch`: this is a kite layer.
    pub const LAYER: &str = "containerd.io/snapshot/kite.layer";
    /// `sha256:<hex>` of the image's (uncompressed) bootstrap: its fsid.
    pub const IMAGE: &str = "containerd.io/snapshot/kite.image";
    /// How many kite layers the manifest has: the last is the image's top.
    pub const LAYERS: &str = "containerd.io/snapshot/kite.layers";
}

/// Label the kite layers of `manifest` for containerd
/// ([`snapshot_labels`]): kind, image (`bootstrap`: the uncompressed
/// bootstrap digest) and layer count. Run again whenever layers change.
pub fn label_kite_layers(manifest: &mut Manifest, bootstrap: &str) {
    let n = manifest.layers.len().to_string();
    for l in &mut manifest.layers {
        let kind = match l.media_type.as_str() {
            media::KITE_LAYER_BOOTSTRAP_ZSTD => "bootstrap",
            media::KITE_LAYER_BLOB => "blob",
            media::KITE_LAYER_PREFETCH => "prefetch",
            _ => continue,
        };
        l.annotations
            .insert(snapshot_labels::LAYER.into(), kind.into());
        l.annotations
            .insert(snapshot_labels::IMAGE.into(), bootstrap.into());
        l.annotations
            .insert(snapshot_labels::LAYERS.into(), n.clone());
    }
}

/// The OCI image config of a kite image: the source image's config
/// (`source`: its JSON; `None` gives an empty one for `platform`) with
/// `rootfs.diff_ids` naming each layer of `manifest` by its descriptor's
/// digest, since containerd needs one diff_id per layer and checks them
/// only for layers it unpacks itself, never kite's, and without the
/// source's `history` (it describes the source's layers).
pub fn kite_image_config(
    source: Option<&[u8]>,
    manifest: &Manifest,
    platform: &Platform,
) -> Result<Vec<u8>, OciError> {
    let mut cfg = match source {
        Some(bytes) => {
            let v: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|source| OciError::Json {
                    what: "the source image config".into(),
                    source,
                })?;
            match v {
                serde_json::Value::Object(m) => m,
                _ => {
                    return Err(OciError::Invalid(
                        "the source image config is not a JSON object".into(),
                    ))
                }
            }
        }
        None => {
            let mut m = serde_json::Map::new();
            m.insert("architecture".into(), platform.architecture.clone().into());
            m.insert("os".into(), platform.os.clone().into());
            if let Some(v) = &platform.variant {
                m.insert("variant".into(), v.clone().into());
            }
            m.insert("config".into(), serde_json::json!({}));
            m
        }
    };
    cfg.remove("history");
    let diff_ids: Vec<&str> = manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    cfg.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": diff_ids }),
    );
    serde_json::to_vec(&cfg).map_err(|source| OciError::Json {
        what: "the kite image config".into(),
        source,
    })
}

/// Annotation on a kite manifest naming the source image's manifest digest.
pub const ANNOTATION_SOURCE_DIGEST: &str = "dev.kite.source.manifest.digest";
/// Annotation on a kite manifest naming the source reference, if any.
pub const ANNOTATION_SOURCE_REF: &str = "dev.kite.source.reference";
/// Annotation on a blob descriptor naming the layer it came from.
pub const ANNOTATION_SOURCE_LAYER: &str = "dev.kite.source.layer.digest";
/// Annotation on a kite manifest: the bootstrap index version.
pub const ANNOTATION_KITE_FORMAT: &str = "dev.kite.format";
/// Annotation on a kite manifest: the chunk size in bytes.
pub const ANNOTATION_CHUNK_SIZE: &str = "dev.kite.chunk-size";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation on a compressed bootstrap layer: sha256 of the bootstrap
/// itself (the image's fsid).
pub const ANNOTATION_BOOTSTRAP_DIGEST: &str = "dev.kite.bootstrap.digest";
/// Annotation on a compressed bootstrap layer: the bootstrap's size.
pub const ANNOTATION_BOOTSTRAP_SIZE: &str = "dev.kite.bootstrap.size";

/// A manifest layer that carries the bootstrap, either as is or
/// zstd-compressed, and what the bootstrap inside it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapLayer {
    /// `sha256:<hex>` of the (uncompressed) bootstrap.
    pub digest: String,
    /// Size of the (uncompressed) bootstrap.
    pub size: u64,
    /// The layer's bytes are one zstd frame.
    pub compressed: bool,
}

impl BootstrapLayer {
    /// `Ok(None)` if `desc` is not a bootstrap layer; an error naming the
    /// layer if it is one whose annotations are missing or malformed.
    pub fn of(desc: &Descriptor) -> Result<Option<Self>, String> {
        if desc.media_type == media::KITE_BOOTSTRAP {
            return Ok(Some(Self {
                digest: desc.digest.clone(),
                size: desc.size,
                compressed: false,
            }));
        }
        if desc.media_type != media::KITE_LAYER_BOOTSTRAP_ZSTD
            && desc.media_type != media::KITE_BOOTSTRAP_ZSTD
        {
            return Ok(None);
        }
        let digest = desc
            .annotations
            .get(ANNOTATION_BOOTSTRAP_DIGEST)
            .filter(|d| digest_hex(d).is_ok())
            .ok_or_else(|| {
                format!(
                    "compressed bootstrap layer {} has no valid {ANNOTATION_BOOTSTRAP_DIGEST} annotation",
                    desc.digest
                )
            })?;
        let size = desc
            .annotations
            .get(ANNOTATION_BOOTSTRAP_SIZE)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "compressed bootstrap layer {} has no valid {ANNOTATION_BOOTSTRAP_SIZE} annotation",
                    desc.digest
                )
            })?;
        Ok(Some(Self {
            digest: digest.clone(),
            size,
            compressed: true,
        }))
    }
}

/// Errors reading or writing OCI structures.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not valid JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid digest {0:?} (expected sha256:<64 hex>)")]
    BadDigest(String),
    #[error("{what}: digest mismatch: descriptor says {expected}, content is {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} {digest}: size mismatch: descriptor says {expected} bytes, content is {actual} bytes (its digest matches: the descriptor's size is wrong)")]
    SizeMismatch {
        what: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("no manifest for platform {wanted} (available: {available})")]
    NoPlatform { wanted: String, available: String },
    #[error("no manifest tagged {0:?} in the layout's index.json")]
    NoTag(String),
    #[error("unsupported media type {media_type:?} for {what}")]
    MediaType { what: String, media_type: String },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(OciError::Invalid(format!(
                "platform {s:?} is not os/arch[/variant]"
            ))),
        }
    }
    fn matches(&self, want: &Platform) -> bool {
        self.os == want.os
            && self.architecture == want.architecture
            && (want.variant.is_none() || self.variant == want.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Layer compression as told by the media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer media type, or `None` if it is not a layer.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    use media::*;
    match media_type {
        OCI_LAYER_TAR | OCI_LAYER_ND_TAR | DOCKER_LAYER_TAR => Some(Compression::None),
        OCI_LAYER_GZIP | OCI_LAYER_ND_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN_GZIP => {
            Some(Compression::Gzip)
        }
        OCI_LAYER_ZSTD | OCI_LAYER_ND_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// Validate `sha256:<64 lowercase hex>` and return the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, OciError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| OciError::BadDigest(digest.to_string()))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(OciError::BadDigest(digest.to_string()));
    }
    Ok(hex)
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
pub struct Layout {
    root: PathBuf,
}

/// A manifest chosen from a layout, with its digest.
pub struct Resolved {
    pub digest: String,
    pub manifest: Manifest,
    pub platform: Option<Platform>,
}

impl Layout {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, OciError> {
        let root = root.into();
        let marker = root.join("oci-layout");
        fs::metadata(&marker).map_err(io_err(&marker))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = digest_hex(digest)?;
        Ok(self.root.join("blobs").join("sha256").join(hex))
    }

    /// Read a small blob (manifest, index, config) whole and verify it.
    pub fn read_verified(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
        let path = self.blob_path(&desc.digest)?;
        let mut f = fs::File::open(&path).map_err(io_err(&path))?;
        let mut data = Vec::new();
        // Manifests and configs are small; refuse absurd sizes before reading.
        if desc.size > 64 << 20 {
            return Err(OciError::Invalid(format!(
                "{what} {} claims {} bytes",
                desc.digest, desc.size
            )));
        }
        f.by_ref()
            .take(desc.size + 1)
            .read_to_end(&mut data)
            .map_err(io_err(&path))?;
        let actual = sha256_digest(&data);
        if actual == desc.digest && data.len() as u64 != desc.size {
            return Err(OciError::SizeMismatch {
                what: what.to_string(),
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: data.len() as u64,
            });
        }
        if actual != desc.digest || data.len() as u64 != desc.size {
            return Err(OciError::DigestMismatch {
                what: format!(
                    "{what} ({} bytes, descriptor says {})",
                    data.len(),
                    desc.size
                ),
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(data)
    }

    pub fn index(&self) -> Result<ImageIndex, OciError> {
        let path = self.root.join("index.json");
        let data = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&data).map_err(|source| OciError::Json {
            what: path.display().to_string(),
            source,
        })
    }

    /// The bootstrap a kite image directory's manifest names (a converted
    /// image holds one manifest with exactly one bootstrap layer): what
    /// the `bootstrap` file beside it must hash to.
    pub fn kite_bootstrap(&self) -> Result<BootstrapLayer, OciError> {
        let index = self.index()?;
        let [desc] = index.manifests.as_slice() else {
            return Err(OciError::Invalid(format!(
                "{} holds {} manifests; a kite image directory holds one",
                self.root.display(),
                index.manifests.len()
            )));
        };
        let bytes = self.read_verified(desc, "kite manifest")?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
                what: format!("manifest {}", desc.digest),
                source,
            })?;
        let mut found = Vec::new();
        for l in &manifest.layers {
            if let Some(b) = BootstrapLayer::of(l).map_err(OciError::Invalid)? {
                found.push(b);
            }
        }
        match <[BootstrapLayer; 1]>::try_from(found) {
            Ok([b]) => Ok(b),
            Err(found) => Err(OciError::Invalid(format!(
                "manifest {} of {} has {} bootstrap layers; a kite image has exactly one",
                desc.digest,
                self.root.display(),
                found.len()
            ))),
        }
    }

    /// Choose a manifest: by tag (the `org.opencontainers.image.ref.name`
    /// annotation) if given, then by platform through nested indexes.
    pub fn resolve(&self, tag: Option<&str>, platform: &Platform) -> Result<Resolved, OciError> {
        let top = self.index()?;
        let candidates: Vec<Descriptor> = match tag {
            Some(t) => {
                let hits: Vec<Descriptor> = top
                    .manifests
                    .iter()
                    .filter(|d| {
                        d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(t)
                    })
                    .cloned()
                    .collect();
                if hits.is_empty() {
                    return Err(OciError::NoTag(t.to_string()));
                }
                hits
            }
            None => top.manifests.clone(),
        };
        self.pick(&candidates, platform, 0)
    }

    fn pick(
        &self,
        descs: &[Descriptor],
        want: &Platform,
        depth: usize,
    ) -> Result<Resolved, OciError> {
        if depth > 4 {
            return Err(OciError::Invalid("image indexes nested too deeply".into()));
        }
        let mut available = Vec::new();
        for d in descs {
            if let Some(p) = &d.platform {
                available.push(p.to_string());
                if !p.matches(want) {
                    continue;
                }
            }
            if is_index(&d.media_type) {
                let data = self.read_verified(d, "image index")?;
                let idx: ImageIndex =
                    serde_json::from_slice(&data).map_err(|source| OciError::Json {
                        what: format!("image index {}", d.digest),
                        source,
                    })?;
                match self.pick(&idx.manifests, want, depth + 1) {
                    Ok(r) => return Ok(r),
                    Err(OciError::NoPlatform { available: a, .. }) => {
                        available.push(a);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut r = self.load_manifest(d)?;
            r.platform = d.platform.clone();
            if r.platform.is_none() {
                // No platform on the descriptor: the config says what it is.
                let cfg = self.read_verified(&r.manifest.config, "image config")?;
                if let Some(p) = config_platform(&cfg) {
                    available.push(p.to_string());
                    if !p.matches(want) {
                        continue;
                    }
                    r.platform = Some(p);
                }
            }
            return Ok(r);
        }
        Err(OciError::NoPlatform {
            wanted: want.to_string(),
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        })
    }

    fn load_manifest(&self, d: &Descriptor) -> Result<Resolved, OciError> {
        if !is_manifest(&d.media_type) {
            return Err(OciError::MediaType {
                what: format!("manifest {}", d.digest),
                media_type: d.media_type.clone(),
            });
        }
        let data = self.read_verified(d, "manifest")?;
        let manifest: Manifest =
            serde_json::from_slice(&data).map_err(|source| OciError::Json {
                what: format!("manifest {}", d.digest),
                source,
            })?;
        Ok(Resolved {
            digest: d.digest.clone(),
            manifest,
            platform: None,
        })
    }
}

fn is_index(mt: &str) -> bool {
    mt == media::OCI_INDEX || mt == media::DOCKER_LIST
}

fn is_manifest(mt: &str) -> bool {
    mt == media::OCI_MANIFEST || mt == media::DOCKER_MANIFEST
}

fn config_platform(cfg: &[u8]) -> Option<Platform> {
    #[derive(Deserialize)]
    struct Cfg {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    let c: Cfg = serde_json::from_slice(cfg).ok()?;
    Some(Platform {
        os: c.os?,
        architecture: c.architecture?,
        variant: c.variant,
    })
}

/// The `rootfs.diff_ids` of an image config: the sha256 of each layer's
/// uncompressed tar stream, in layer order. A config without them, with a
/// `rootfs.type` other than `layers`, or with a diff_id that is not a
/// sha256 digest is refused (`what` names the config in the error).
pub fn config_diff_ids(config: &[u8], what: &str) -> Result<Vec<String>, OciError> {
    #[derive(Deserialize)]
    struct Cfg {
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(rename = "type")]
        kind: Option<String>,
        diff_ids: Option<Vec<String>>,
    }
    let c: Cfg = serde_json::from_slice(config).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })?;
    let rootfs = c
        .rootfs
        .ok_or_else(|| OciError::Invalid(format!("{what} has no rootfs")))?;
    if let Some(kind) = rootfs.kind.filter(|k| k != "layers") {
        return Err(OciError::Invalid(format!(
            "{what}: rootfs.type is {kind:?}, not \"layers\""
        )));
    }
    let ids = rootfs
        .diff_ids
        .ok_or_else(|| OciError::Invalid(format!("{what} has no rootfs.diff_ids")))?;
    for (i, d) in ids.iter().enumerate() {
        digest_hex(d).map_err(|_| {
            OciError::Invalid(format!(
                "{what}: rootfs.diff_ids[{i}] {d:?} is not a sha256 digest"
            ))
        })?;
    }
    Ok(ids)
}

/// Write `data` as a blob of the layout at `root`, returning its descriptor
/// digest. Writes to a temporary name and renames.
pub fn write_blob(root: &Path, data: &[u8]) -> Result<String, OciError> {
    let digest = sha256_digest(data);
    let dir = root.join("blobs").join("sha256");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(digest_hex(&digest)?);
    let tmp = dir.join(format!(".tmp-{}", digest_hex(&digest)?));
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(digest)
}

/// Write `oci-layout` and an `index.json` with a single manifest.
pub fn write_layout_index(root: &Path, manifest: Descriptor) -> Result<(), OciError> {
    let marker = root.join("oci-layout");
    fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.into()),
        manifests: vec![manifest],
        annotations: BTreeMap::new(),
    };
    let path = root.join("index.json");
    let data = serde_json::to_vec_pretty(&index).map_err(|source| OciError::Json {
        what: "index.json".into(),
        source,
    })?;
    // Readers of the layout never see a half-written index.
    let tmp = root.join(".index.json.tmp");
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_diff_ids_are_read_and_checked() {
        let z = format!("sha256:{}", "0".repeat(64));
        let ok = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{z}","{z}"]}}}}"#);
        assert_eq!(
            config_diff_ids(ok.as_bytes(), "cfg").unwrap(),
            [z.clone(), z.clone()]
        );
        let empty = r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(config_diff_ids(empty.as_bytes(), "cfg").unwrap().is_empty());
        for (bad, says) in [
            (r#"{"os":"linux"}"#.to_string(), "no rootfs"),
            (
                r#"{"rootfs":{"type":"layers"}}"#.into(),
                "no rootfs.diff_ids",
            ),
            (
                format!(r#"{{"rootfs":{{"type":"squash","diff_ids":["{z}"]}}}}"#),
                "\"squash\"",
            ),
            (
                r#"{"rootfs":{"diff_ids":["sha512:00"]}}"#.into(),
                "diff_ids[0] \"sha512:00\"",
            ),
            ("[1]".into(), "not valid JSON"),
        ] {
            let e = config_diff_ids(bad.as_bytes(), "cfg")
                .unwrap_err()
                .to_string();
            assert!(e.contains(says) && e.contains("cfg"), "{bad}: {e}");
        }
    }

    #[test]
    fn platform_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        let want = Platform::parse("linux/amd64").unwrap();
        assert!(Platform::parse("linux/amd64").unwrap().matches(&want));
        assert!(!p.matches(&want));
    }

    #[test]
    fn bootstrap_layers_plain_and_compressed() {
        let d = |media: &str, ann: &[(&str, &str)]| Descriptor {
            media_type: media.into(),
            digest: format!("sha256:{}", "c".repeat(64)),
            size: 10,
            platform: None,
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            artifact_type: None,
        };
        assert_eq!(BootstrapLayer::of(&d(media::KITE_BLOB, &[])), Ok(None));
        let plain = BootstrapLayer::of(&d(media::KITE_BOOTSTRAP, &[])).unwrap();
        assert_eq!(
            plain,
            Some(BootstrapLayer {
                digest: format!("sha256:{}", "c".repeat(64)),
                size: 10,
                compressed: false
            })
        );
        let inner = format!("sha256:{}", "b".repeat(64));
        let z = BootstrapLayer::of(&d(
            media::KITE_BOOTSTRAP_ZSTD,
            &[
                (ANNOTATION_BOOTSTRAP_DIGEST, &inner),
                (ANNOTATION_BOOTSTRAP_SIZE, "4096"),
            ],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (z.digest.as_str(), z.size, z.compressed),
            (inner.as_str(), 4096, true)
        );
        // Missing or malformed annotations name the layer and the annotation.
        for ann in [
            vec![(ANNOTATION_BOOTSTRAP_SIZE, "4096")],
            vec![
                (ANNOTATION_BOOTSTRAP_DIGEST, "sha256:../x"),
                (ANNOTATION_BOOTSTRAP_SIZE, "1"),
            ],
            vec![
                (ANNOTATION_BOOTSTRAP_DIGEST, inner.as_str()),
                (ANNOTATION_BOOTSTRAP_SIZE, "-1"),
            ],
        ] {
            let e = BootstrapLayer::of(&d(media::KITE_BOOTSTRAP_ZSTD, &ann)).unwrap_err();
            assert!(
                e.contains(&"c".repeat(64)) && e.contains("dev.kite.bootstrap."),
                "{e}"
            );
        }
    }

    #[test]
    fn digests_are_validated_before_use_as_paths() {
        assert!(digest_hex("sha256:../../etc/passwd").is_err());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert_eq!(
            digest_hex(&format!("sha256:{}", "a".repeat(64)))
                .unwrap()
                .len(),
            64
        );
    }

    #[test]
    fn media_types_map_to_compression() {
        assert_eq!(
            layer_compression(media::DOCKER_LAYER_GZIP),
            Some(Compression::Gzip)
        );
        assert_eq!(
            layer_compression(media::OCI_LAYER_ZSTD),
            Some(Compression::Zstd)
        );
        assert_eq!(
            layer_compression(media::OCI_LAYER_TAR),
            Some(Compression::None)
        );
        assert_eq!(layer_compression("application/json"), None);
    }
}
