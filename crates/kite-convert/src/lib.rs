//! The converter: an OCI image (or a directory) in, a kite image out.
//!
//! Pipeline: resolve the source to an ordered list of layers; stream each
//! layer (decompress, verify its digest, walk its tar entries) into the
//! merged tree while file data is chunked into that layer's blob (deduped
//! against every chunk already stored in the image); then write the
//! bootstrap (EROFS image of the merged tree + index section) and an OCI
//! image layout naming bootstrap and blobs.
//!
//! Output safety: everything is written under a temporary sibling of the
//! output directory, which is renamed into place only when complete. On any
//! error the temporary directory is removed; nothing partial is left under
//! `--to`. Conversion is byte-reproducible for a given input and options.
//!
//! Cancellation: a raised [`Interrupt`] stops a conversion at its next tar
//! entry or chunk with [`ConvertError::Interrupted`], the staging directory
//! removed; its owner can also remove the staging directory itself (a
//! conversion blocked on a read never reaches the next check).

#![forbid(unsafe_code)]

mod blob;
mod dirsrc;
pub mod inspect;
mod layer;
pub mod manifest;
mod output;
pub mod profile;
pub mod tarstream;
pub mod tree;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kite_format::{ChunkSize, Digest, FormatError};
use kite_oci::{Layout, OciError, Platform};

pub use output::BOOTSTRAP_NAME;

/// Errors of a conversion. Each names its culprit.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("source image: {0}")]
    Oci(#[from] OciError),
    #[error("layer {layer}: tar entry {entry:?}: {why}")]
    Entry {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("layer {layer}: reading the stream{at}: {source}")]
    Stream {
        layer: String,
        /// Where in the stream, e.g. ` at tar entry "x"` (may be empty).
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: digest mismatch: descriptor says {expected}, content is {actual}")]
    LayerDigest {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer}: size mismatch: descriptor says {expected} bytes, content is {actual} bytes (its digest matches: the descriptor's size is wrong)")]
    LayerSize {
        layer: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer {layer}: unsupported media type {media_type:?}")]
    LayerMediaType { layer: String, media_type: String },
    #[error("layer {layer}: diff_id mismatch: the image config says {expected}, the uncompressed layer is {actual}")]
    DiffId {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("source image config {config}: {diff_ids} rootfs.diff_ids for {layers} layers")]
    DiffIdCount {
        config: String,
        diff_ids: usize,
        layers: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("output {0} already exists and is not empty")]
    OutputExists(PathBuf),
    #[error("building the EROFS bootstrap: {0}")]
    Erofs(#[from] kite_erofs::ErofsError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("source {0:?} is not oci:PATH[:TAG] or dir:PATH")]
    BadSource(String),
    #[error("prefetch profile: {0}")]
    Profile(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("interrupted")]
    Interrupted,
}

impl ConvertError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Stops a running conversion from another thread (a signal handler's).
/// Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Debug, Default)]
struct InterruptState {
    raised: AtomicBool,
    /// The staging directory of the conversion running with this
    /// interrupt, while it exists.
    staging: Mutex<Option<PathBuf>>,
}

impl Interrupt {
    /// Ask the conversion to stop at its next tar entry or chunk.
    pub fn raise(&self) {
        self.0.raised.store(true, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.raised.load(Ordering::SeqCst)
    }

    /// Remove the running conversion's staging directory now, for a
    /// conversion that did not stop (blocked on a read); the caller exits
    /// right after. Returns the directory removed, if there was one. A
    /// conversion committing at the same time either has renamed its
    /// directory into place already (nothing is removed) or fails to.
    pub fn remove_staging(&self) -> Option<PathBuf> {
        let mut staging = self.staging();
        let dir = staging.take()?;
        // Best effort: the process is about to exit.
        let _ = std::fs::remove_dir_all(&dir);
        Some(dir)
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Option<PathBuf>> {
        // A panic while holding the lock leaves a valid Option.
        self.0
            .staging
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), ConvertError> {
        if self.is_raised() {
            Err(ConvertError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI image layout, optionally a tag inside it.
    Oci { path: PathBuf, tag: Option<String> },
    /// A plain directory as a one-layer image.
    Dir(PathBuf),
    /// An image resolved elsewhere (a registry): its manifest, and a way to
    /// stream each layer. The converter reads each layer once, in order.
    Remote(Box<RemoteImage>),
}

/// Opens the stored bytes of a layer of a [`RemoteImage`] as a stream.
/// The converter checks the bytes against the descriptor's digest and size.
pub trait LayerOpener: Send + Sync {
    fn open(&self, layer: &kite_oci::Descriptor) -> std::io::Result<Box<dyn std::io::Read + Send>>;
}

/// A manifest already resolved (and verified) by the caller.
#[derive(Clone)]
pub struct RemoteImage {
    /// The reference as the user gave it (recorded in the output).
    pub reference: String,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    pub manifest: kite_oci::Manifest,
    /// The image config the manifest names, verified against its
    /// descriptor: the kite image carries it (Env, Cmd, User...).
    pub config: Vec<u8>,
    pub opener: std::sync::Arc<dyn LayerOpener>,
}

impl std::fmt::Debug for RemoteImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteImage({}@{})",
            self.reference, self.manifest_digest
        )
    }
}

impl PartialEq for RemoteImage {
    fn eq(&self, other: &Self) -> bool {
        self.manifest_digest == other.manifest_digest && self.reference == other.reference
    }
}
impl Eq for RemoteImage {}

impl Source {
    /// Parse `oci:PATH[:TAG]` or `dir:PATH`.
    pub fn parse(s: &str) -> Result<Self, ConvertError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // A tag is whatever follows the last ':' if the path part exists.
            if let Some((p, t)) = rest.rsplit_once(':') {
                if !t.is_empty() && !t.contains('/') && Path::new(p).join("oci-layout").exists() {
                    return Ok(Source::Oci {
                        path: p.into(),
                        tag: Some(t.into()),
                    });
                }
            }
            if rest.is_empty() {
                return Err(ConvertError::BadSource(s.into()));
            }
            return Ok(Source::Oci {
                path: rest.into(),
                tag: None,
            });
        }
        if let Some(rest) = s.strip_prefix("dir:") {
            if !rest.is_empty() {
                return Ok(Source::Dir(rest.into()));
            }
        }
        Err(ConvertError::BadSource(s.into()))
    }
}

/// Receives progress; implemented by the CLI's progress bar.
pub trait Progress: Sync {
    /// A layer starts: index (0-based), count, label, stored size if known.
    fn layer(&self, _index: usize, _count: usize, _label: &str, _size: Option<u64>) {}
    /// Stored bytes read from the current layer.
    fn bytes(&self, _n: u64) {}
    /// Everything is read; the bootstrap is being written.
    fn finishing(&self) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub chunk_size: ChunkSize,
    /// ELF files (executables, shared libraries) longer than this are cut
    /// into chunks of this size instead of `chunk_size` (None: never).
    /// A program touches scattered pages of the libraries it maps, so a
    /// lazy fetch of a library costs its chunks, not its pages: finer
    /// chunks fetch fewer bytes nobody reads. Must be below `chunk_size`.
    pub elf_chunk_size: Option<ChunkSize>,
    pub level: i32,
    pub platform: Platform,
    /// Files up to this many bytes are stored inside the bootstrap.
    pub inline_max: u64,
    /// Compression threads.
    pub threads: usize,
    /// Raised to stop the conversion (SIGTERM, SIGINT).
    pub interrupt: Interrupt,
}

impl ConvertOptions {
    /// The ELF chunk size in bytes when it applies (below the chunk
    /// size), else 0: what the index records as its fine chunk size.
    pub fn fine_chunk_size(&self) -> u32 {
        match self.elf_chunk_size {
            Some(e) if e.bytes() < self.chunk_size.bytes() => e.bytes(),
            _ => 0,
        }
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            chunk_size: ChunkSize::default(),
            elf_chunk_size: Some(ChunkSize::DEFAULT_ELF),
            level: kite_format::DEFAULT_LEVEL,
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
            inline_max: 0,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            interrupt: Interrupt::default(),
        }
    }
}

/// Per-blob summary.
#[derive(Debug, Clone)]
pub struct BlobSummary {
    pub digest: Digest,
    pub source_layer: Option<String>,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub chunks: usize,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub out_dir: PathBuf,
    pub bootstrap_digest: Digest,
    pub bootstrap_size: u64,
    pub manifest_digest: String,
    pub source_manifest_digest: Option<String>,
    pub blobs: Vec<BlobSummary>,
    /// Layers whose data was entirely deduplicated (no blob written).
    pub empty_layers: Vec<String>,
    /// Uncompressed input: tar stream bytes (OCI) or file bytes (dir).
    pub input_bytes: u64,
    pub file_bytes: u64,
    pub files: u64,
    pub chunks_referenced: u64,
    pub chunks_deduplicated: u64,
    pub dedup_bytes: u64,
}

/// Convert `source` into a kite image at `out`.
pub fn convert(
    source: &Source,
    out: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let staging = output::Staging::create(out, &opts.interrupt)?;
    let report = run(source, &staging, opts, progress)?;
    opts.interrupt.check()?;
    staging.commit()?;
    Ok(report)
}

fn run(
    source: &Source,
    staging: &output::Staging,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let mut tree = tree::MergedTree::new();
    let mut store = blob::ChunkStore::default();
    let mut blobs: Vec<(kite_format::BlobEntry, PathBuf, Option<String>)> = Vec::new();
    let mut empty_layers = Vec::new();
    let mut input_bytes = 0u64;
    let mut file_bytes = 0u64;
    let mut files = 0u64;
    let mut fine_files = 0u64;
    let mut source_manifest = None;
    let mut source_ref = None;
    let mut source_config: Option<Vec<u8>> = None;
    // The source's image config, which the kite image carries over.
    let check_config = |d: &kite_oci::Descriptor| -> Result<(), ConvertError> {
        match d.media_type.as_str() {
            kite_oci::media::OCI_CONFIG | kite_oci::media::DOCKER_CONFIG => Ok(()),
            other => Err(ConvertError::Oci(kite_oci::OciError::MediaType {
                what: format!("source image config {}", d.digest),
                media_type: other.to_string(),
            })),
        }
    };

    // Each layer: (label, how to read it).
    enum Input {
        File(PathBuf),
        Remote(Arc<dyn LayerOpener>, Box<kite_oci::Descriptor>),
    }
    enum L {
        Tar {
            input: Input,
            digest: String,
            size: u64,
            compression: kite_oci::Compression,
            diff_id: String,
        },
        Dir(PathBuf),
    }
    // The config's diff_ids, one per layer of `manifest`.
    let diff_ids = |manifest: &kite_oci::Manifest, config: &[u8]| {
        let what = format!("source image config {}", manifest.config.digest);
        let ids = kite_oci::config_diff_ids(config, &what)?;
        if ids.len() != manifest.layers.len() {
            return Err(ConvertError::DiffIdCount {
                config: manifest.config.digest.clone(),
                diff_ids: ids.len(),
                layers: manifest.layers.len(),
            });
        }
        Ok(ids)
    };
    // A tar layer of a manifest, read from `input`.
    let tar_layer =
        |d: &kite_oci::Descriptor, diff_id: String, input: Input| -> Result<L, ConvertError> {
            let compression = kite_oci::layer_compression(&d.media_type).ok_or_else(|| {
                ConvertError::LayerMediaType {
                    layer: d.digest.clone(),
                    media_type: d.media_type.clone(),
                }
            })?;
            Ok(L::Tar {
                input,
                digest: d.digest.clone(),
                size: d.size,
                compression,
                diff_id,
            })
        };
    let layers: Vec<L> = match source {
        Source::Oci { path, tag } => {
            let layout = Layout::open(path)?;
            let resolved = layout.resolve(tag.as_deref(), &opts.platform)?;
            source_manifest = Some(resolved.digest.clone());
            source_ref = tag.clone();
            check_config(&resolved.manifest.config)?;
            let config = layout.read_verified(&resolved.manifest.config, "source image config")?;
            let ids = diff_ids(&resolved.manifest, &config)?;
            source_config = Some(config);
            let mut v = Vec::new();
            for (d, id) in resolved.manifest.layers.iter().zip(ids) {
                v.push(tar_layer(d, id, Input::File(layout.blob_path(&d.digest)?))?);
            }
            v
        }
        Source::Dir(p) => vec![L::Dir(p.clone())],
        Source::Remote(r) => {
            source_manifest = Some(r.manifest_digest.clone());
            source_ref = Some(r.reference.clone());
            check_config(&r.manifest.config)?;
            let ids = diff_ids(&r.manifest, &r.config)?;
            source_config = Some(r.config.clone());
            let mut v = Vec::new();
            for (d, id) in r.manifest.layers.iter().zip(ids) {
                let input = Input::Remote(Arc::clone(&r.opener), Box::new(d.clone()));
                v.push(tar_layer(d, id, input)?);
            }
            v
        }
    };

    let count = layers.len();
    for (i, l) in layers.iter().enumerate() {
        opts.interrupt.check()?;
        let device_id = u16::try_from(blobs.len() + 1)
            .map_err(|_| ConvertError::Internal("more than 65534 layers"))?;
        let tmp = staging.temp_blob_path(i);
        let mut builder = blob::BlobBuilder::new(
            &tmp,
            device_id,
            opts.chunk_size.bytes(),
            opts.level,
            opts.threads,
            std::mem::take(&mut store),
        )?;
        let mut app = layer::Applier {
            tree: &mut tree,
            blob: &mut builder,
            layer: i as u32,
            chunk_size: opts.chunk_size.bytes(),
            elf_chunk_size: opts.fine_chunk_size(),
            fine_files: 0,
            inline_max: opts.inline_max,
            files: 0,
            file_bytes: 0,
            interrupt: &opts.interrupt,
            deferred: Default::default(),
        };
        let (label, source_layer) = match l {
            L::Tar {
                input,
                digest,
                size,
                compression,
                diff_id,
            } => {
                progress.layer(i, count, digest, Some(*size));
                let input: Box<dyn std::io::Read> = match input {
                    Input::File(path) => {
                        Box::new(std::fs::File::open(path).map_err(|e| ConvertError::io(path, e))?)
                    }
                    Input::Remote(opener, desc) => {
                        opener.open(desc).map_err(|source| ConvertError::Stream {
                            layer: digest.clone(),
                            at: " (opening it)".into(),
                            source,
                        })?
                    }
                };
                let lf = layer::LayerFile {
                    input,
                    digest,
                    size: *size,
                    compression: *compression,
                    diff_id,
                };
                input_bytes += layer::apply_tar_layer(lf, &mut app, progress)?;
                (digest.clone(), Some(digest.clone()))
            }
            L::Dir(p) => {
                let label = format!("dir:{}", p.display());
                progress.layer(i, count, &label, None);
                input_bytes += dirsrc::apply_dir(p, &mut app, progress)?;
                (label, None)
            }
        };
        files += app.files;
        file_bytes += app.file_bytes;
        fine_files += app.fine_files;
        let src_digest = source_layer
            .as_deref()
            .and_then(Digest::parse)
            .unwrap_or(Digest::ZERO);
        let (back, built) = builder.finish(src_digest)?;
        store = back;
        match built {
            Some((entry, path)) => blobs.push((entry, path, source_layer)),
            None => {
                std::fs::remove_file(&tmp).map_err(|e| ConvertError::io(&tmp, e))?;
                empty_layers.push(label);
            }
        }
    }
    opts.interrupt.check()?;
    progress.finishing();
    let mut erofs_tree = tree.into_erofs_tree();
    store.resolve(&mut erofs_tree)?;
    // The index names a fine chunk size only if some file has it.
    let mut out_opts = opts.clone();
    if fine_files == 0 {
        out_opts.elf_chunk_size = None;
    }
    let built = output::write(
        staging,
        erofs_tree,
        &blobs,
        &out_opts,
        source_manifest.as_deref(),
        source_ref.as_deref(),
        source_config.as_deref(),
    )?;
    Ok(ConvertReport {
        out_dir: staging.final_path().to_path_buf(),
        bootstrap_digest: built.bootstrap_digest,
        bootstrap_size: built.bootstrap_size,
        manifest_digest: built.manifest_digest,
        source_manifest_digest: source_manifest,
        blobs: blobs
            .iter()
            .map(|(e, _, src)| BlobSummary {
                digest: e.record.digest,
                source_layer: src.clone(),
                compressed_size: e.record.compressed_size,
                uncompressed_size: e.record.uncompressed_size,
                chunks: e.chunks.len(),
            })
            .collect(),
        empty_layers,
        input_bytes,
        file_bytes,
        files,
        chunks_referenced: store.referenced,
        chunks_deduplicated: store.deduplicated,
        dedup_bytes: store.dedup_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raises the interrupt when the first layer starts.
    struct RaiseAtLayer(Interrupt);
    impl Progress for RaiseAtLayer {
        fn layer(&self, _: usize, _: usize, _: &str, _: Option<u64>) {
            self.0.raise();
        }
    }

    #[test]
    fn an_interrupted_conversion_stops_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"data").unwrap();
        let out = dir.path().join("out");
        let opts = ConvertOptions {
            threads: 1,
            ..Default::default()
        };
        let progress = RaiseAtLayer(opts.interrupt.clone());
        let e = convert(&Source::Dir(src), &out, &opts, &progress).unwrap_err();
        assert!(matches!(e, ConvertError::Interrupted), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["src"]);
        // The staging directory is gone and forgotten.
        assert_eq!(opts.interrupt.remove_staging(), None);
    }

    #[test]
    fn removing_the_staging_directory_under_a_conversion_makes_its_commit_fail() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let interrupt = Interrupt::default();
        let staging = output::Staging::create(&out, &interrupt).unwrap();
        let removed = interrupt.remove_staging().unwrap();
        assert!(!removed.exists());
        assert!(matches!(staging.commit(), Err(ConvertError::Interrupted)));
        assert!(!out.exists());
    }
}
