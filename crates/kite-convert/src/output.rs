//! Writing a converted image: the bootstrap, blob files named by digest, and
//! an OCI image layout holding them as a kite image manifest.
//!
//! Output directory:
//!
//! ```text
//! DIR/oci-layout, DIR/index.json      OCI layout naming the kite manifest
//! DIR/blobs/sha256/<hex>              the bootstrap as one zstd frame (the
//!                                     layer pushed), data blobs, config,
//!                                     manifest
//! DIR/bootstrap                       the bootstrap, for local mounts
//! ```
//!
//! All of it is built in a temporary sibling directory ([`Staging`]),
//! `.DIR.kite-tmp-PID`, that is renamed over `DIR` at the end and removed if
//! anything fails. One that a killed conversion left (its process gone) is
//! removed by the next conversion to `DIR`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kite_erofs::{Device, ImageOptions, Tree};
use kite_format::{encode_index, BlobEntry, Digest};
use kite_oci::{media, Descriptor, Manifest};

use crate::{ConvertError, ConvertOptions, Interrupt};

/// File name of the bootstrap in the output directory.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

/// The process id in a staging directory's name, `.{name}.kite-tmp-PID`,
/// if `file` is one for an output called `name`.
fn staging_pid(file: &str, name: &str) -> Option<u32> {
    let pid = file
        .strip_prefix('.')?
        .strip_prefix(name)?
        .strip_prefix(".kite-tmp-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Remove the staging directories that conversions to `name` left in
/// `parent` when they were killed (SIGKILL cannot clean up): directories
/// named exactly `.{name}.kite-tmp-PID` whose process no longer exists. A
/// live conversion's is left alone, and so is anything else (a symlink or
/// a file of that name, another output's staging).
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|f| staging_pid(f, name)) else {
            continue;
        };
        // The entry's own type: a symlink is not followed.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Best effort: a directory that cannot be removed is left as it was.
        let _ = fs::remove_dir_all(e.path());
    }
}

/// A temporary output directory, removed on drop unless committed. While
/// it exists, `interrupt` knows its path (so a signal handler can remove
/// it when the conversion does not stop).
pub(crate) struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
    interrupt: Interrupt,
}

impl Staging {
    /// `out` must not exist or be an empty directory.
    pub fn create(out: &Path, interrupt: &Interrupt) -> Result<Self, ConvertError> {
        match fs::read_dir(out) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(ConvertError::OutputExists(out.to_path_buf()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConvertError::io(out, e)),
        }
        let name = out
            .file_name()
            .ok_or_else(|| ConvertError::OutputExists(out.to_path_buf()))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| ConvertError::io(&parent, e))?;
        remove_stale(&parent, &name);
        let tmp = parent.join(format!(".{name}.kite-tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        // Known to the interrupt before it exists, so that no moment has a
        // staging directory a signal handler cannot find.
        *interrupt.staging() = Some(tmp.clone());
        let staging = Self {
            tmp,
            out: out.to_path_buf(),
            committed: false,
            interrupt: interrupt.clone(),
        };
        let blobs = staging.blob_dir();
        fs::create_dir_all(&blobs).map_err(|e| ConvertError::io(&blobs, e))?;
        Ok(staging)
    }

    pub fn final_path(&self) -> &Path {
        &self.out
    }

    fn blob_dir(&self) -> PathBuf {
        self.tmp.join("blobs").join("sha256")
    }

    pub fn temp_blob_path(&self, layer: usize) -> PathBuf {
        self.blob_dir().join(format!(".layer-{layer}.tmp"))
    }

    /// Move the finished directory into place.
    pub fn commit(mut self) -> Result<(), ConvertError> {
        if let Ok(f) = fs::File::open(&self.tmp) {
            let _ = f.sync_all();
        }
        // Under the interrupt's lock: a signal handler removing the
        // staging directory either goes first (and the rename fails) or
        // finds it renamed into place.
        let mut known = self.interrupt.staging();
        if known.is_none() {
            return Err(ConvertError::Interrupted);
        }
        // An empty existing directory is replaced; rename(2) does that
        // atomically for directories.
        fs::rename(&self.tmp, &self.out).map_err(|e| ConvertError::io(&self.out, e))?;
        *known = None;
        drop(known);
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
            *self.interrupt.staging() = None;
        }
    }
}

pub(crate) struct Built {
    pub bootstrap_digest: Digest,
    pub bootstrap_size: u64,
    pub manifest_digest: String,
}

pub(crate) fn write(
    staging: &Staging,
    tree: Tree,
    blobs: &[(BlobEntry, PathBuf, Option<String>)],
    opts: &ConvertOptions,
    source_manifest: Option<&str>,
    source_ref: Option<&str>,
    source_config: Option<&[u8]>,
) -> Result<Built, ConvertError> {
    let blob_dir = staging.blob_dir();
    // Data blobs: rename temp files to their digest.
    let mut layer_descs = Vec::new();
    for (entry, tmp, src) in blobs {
        let hex = entry.record.digest.hex();
        let dst = blob_dir.join(&hex);
        fs::rename(tmp, &dst).map_err(|e| ConvertError::io(&dst, e))?;
        let mut annotations = BTreeMap::new();
        if let Some(s) = src {
            annotations.insert(kite_oci::ANNOTATION_SOURCE_LAYER.to_string(), s.clone());
        }
        layer_descs.push(Descriptor {
            media_type: media::KITE_LAYER_BLOB.into(),
            digest: entry.record.digest.oci(),
            size: entry.record.compressed_size,
            platform: None,
            annotations,
            artifact_type: None,
        });
    }

    // Bootstrap = EROFS image + index section.
    let entries: Vec<BlobEntry> = blobs.iter().map(|(e, _, _)| e.clone()).collect();
    let index = encode_index(opts.chunk_size.bytes(), opts.fine_chunk_size(), &entries);
    let devices: Vec<Device> = entries
        .iter()
        .map(|e| {
            let mut tag = [0u8; 64];
            tag.copy_from_slice(e.record.digest.hex().as_bytes());
            let blocks = u32::try_from(e.record.uncompressed_size / 4096)
                .map_err(|_| ConvertError::Internal("blob larger than 16 TiB"))?;
            Ok(Device { tag, blocks })
        })
        .collect::<Result<_, ConvertError>>()?;
    // A stable volume identity derived from the content.
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&Digest::of(&index).0[..16]);
    let mut volume_name = [0u8; 16];
    volume_name[..4].copy_from_slice(b"kite");
    let mut bootstrap =
        kite_erofs::write_image(&tree, &devices, &ImageOptions { uuid, volume_name })?;
    drop(tree);
    bootstrap.extend_from_slice(&index);
    // Check what we wrote parses, before anybody else trusts it.
    kite_format::Bootstrap::parse(&bootstrap)?;
    let boot_digest = Digest::of(&bootstrap);
    write_synced(&staging.tmp.join(BOOTSTRAP_NAME), &bootstrap)?;
    // Published compressed (about a third of the size): it is fetched
    // whole before a first mount. The uncompressed bootstrap is the
    // `bootstrap` file, for local mounts and tools.
    let boot_frame = kite_format::compress_bootstrap(&bootstrap)?;
    let boot_frame_digest = Digest::of(&boot_frame);
    write_synced(&blob_dir.join(boot_frame_digest.hex()), &boot_frame)?;

    let mut layers = vec![Descriptor {
        media_type: media::KITE_LAYER_BOOTSTRAP_ZSTD.into(),
        digest: boot_frame_digest.oci(),
        size: boot_frame.len() as u64,
        platform: None,
        annotations: BTreeMap::from([
            (
                kite_oci::ANNOTATION_BOOTSTRAP_DIGEST.to_string(),
                boot_digest.oci(),
            ),
            (
                kite_oci::ANNOTATION_BOOTSTRAP_SIZE.to_string(),
                bootstrap.len().to_string(),
            ),
        ]),
        artifact_type: None,
    }];
    layers.extend(layer_descs);
    let mut annotations = BTreeMap::new();
    if let Some(s) = source_manifest {
        annotations.insert(
            kite_oci::ANNOTATION_SOURCE_DIGEST.to_string(),
            s.to_string(),
        );
    }
    if let Some(r) = source_ref {
        annotations.insert(kite_oci::ANNOTATION_SOURCE_REF.to_string(), r.to_string());
    }
    annotations.insert(
        kite_oci::ANNOTATION_KITE_FORMAT.to_string(),
        kite_format::index::INDEX_VERSION.to_string(),
    );
    annotations.insert(
        kite_oci::ANNOTATION_CHUNK_SIZE.to_string(),
        opts.chunk_size.bytes().to_string(),
    );
    let mut manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(media::KITE_ARTIFACT.into()),
        config: Descriptor {
            media_type: media::OCI_CONFIG.into(),
            digest: String::new(),
            size: 0,
            platform: None,
            annotations: BTreeMap::new(),
            artifact_type: None,
        },
        layers,
        annotations,
    };
    set_config(
        &staging.tmp,
        &mut manifest,
        &boot_digest.oci(),
        source_config,
        &opts.platform,
    )?;
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|_| ConvertError::Internal("manifest JSON"))?;
    let manifest_digest = kite_oci::write_blob(&staging.tmp, &manifest_bytes)?;
    let mut ann = BTreeMap::new();
    ann.insert(
        kite_oci::ANNOTATION_REF_NAME.to_string(),
        source_ref.unwrap_or("latest").to_string(),
    );
    kite_oci::write_layout_index(
        &staging.tmp,
        Descriptor {
            media_type: media::OCI_MANIFEST.into(),
            digest: manifest_digest.clone(),
            size: manifest_bytes.len() as u64,
            platform: None,
            annotations: ann,
            artifact_type: Some(media::KITE_ARTIFACT.into()),
        },
    )?;
    Ok(Built {
        bootstrap_digest: boot_digest,
        bootstrap_size: bootstrap.len() as u64,
        manifest_digest,
    })
}

/// Label the kite layers of `manifest` for containerd and write its OCI
/// config (the source's, with a diff_id per layer) into the layout at
/// `root`, pointing the manifest at it. Run whenever the layers change.
pub(crate) fn set_config(
    root: &Path,
    manifest: &mut Manifest,
    bootstrap: &str,
    source_config: Option<&[u8]>,
    platform: &kite_oci::Platform,
) -> Result<(), ConvertError> {
    kite_oci::label_kite_layers(manifest, bootstrap);
    let config = kite_oci::kite_image_config(source_config, manifest, platform)?;
    manifest.config.media_type = media::OCI_CONFIG.into();
    manifest.config.digest = kite_oci::write_blob(root, &config)?;
    manifest.config.size = config.len() as u64;
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), ConvertError> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(|e| ConvertError::io(path, e))?;
    f.write_all(data).map_err(|e| ConvertError::io(path, e))?;
    f.sync_all().map_err(|e| ConvertError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_matched_exactly() {
        assert_eq!(staging_pid(".out.kite-tmp-123", "out"), Some(123));
        assert_eq!(staging_pid(".a.b.kite-tmp-7", "a.b"), Some(7));
        for other in [
            ".out.kite-tmp-",
            ".out.kite-tmp-+12",
            ".out.kite-tmp--1",
            ".out.kite-tmp-12a",
            ".out.kite-tmp-99999999999",
            "out.kite-tmp-12",
            ".outx.kite-tmp-12",
            ".out.kite-tmp-12/x",
            ".out",
        ] {
            assert_eq!(staging_pid(other, "out"), None, "{other}");
        }
    }

    #[test]
    fn only_dead_conversions_staging_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = p.join(format!(".out.kite-tmp-{dead}"));
        fs::create_dir_all(stale.join("blobs/sha256")).unwrap();
        fs::write(stale.join("bootstrap"), b"partial").unwrap();
        let ours = p.join(format!(".out.kite-tmp-{}", std::process::id()));
        fs::create_dir(&ours).unwrap();
        let other_output = p.join(format!(".other.kite-tmp-{dead}"));
        fs::create_dir(&other_output).unwrap();
        let not_digits = p.join(format!(".out.kite-tmp-{dead}x"));
        fs::create_dir(&not_digits).unwrap();
        // A symlink of the pattern pointing elsewhere: neither it nor its
        // target is touched.
        let target = p.join("precious");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"keep").unwrap();
        let mut gone2 = std::process::Command::new("true").spawn().unwrap();
        let dead2 = gone2.id();
        gone2.wait().unwrap();
        let link = p.join(format!(".out.kite-tmp-{dead2}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_stale(p, "out");
        assert!(!stale.exists());
        for kept in [&ours, &other_output, &not_digits, &target.join("keep")] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        assert!(link.symlink_metadata().is_ok(), "the symlink was removed");
    }
}
