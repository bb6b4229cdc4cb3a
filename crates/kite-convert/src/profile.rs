//! Attaching a prefetch profile to a converted image directory.
//!
//! The profile (`kite_format::prefetch`) is written as a blob, linked as
//! `prefetch` beside `bootstrap`, and listed in a new kite manifest as one
//! more layer (media type `KITE_LAYER_PREFETCH`), replacing any earlier
//! profile; `kite push` then publishes it with the image. The blobs and
//! bootstrap are untouched, so the bootstrap digest (the fsid) stays the
//! same; the config gets one more diff_id and the layers' containerd
//! labels their new count. A directory of the first form (kite config)
//! gets a first-form profile layer and keeps its config.

use std::fs;
use std::path::Path;

use kite_format::prefetch::{Footprint, Profile};
use kite_format::{Bootstrap, Digest};
use kite_oci::{media, Descriptor, Layout, Manifest};

use crate::{ConvertError, BOOTSTRAP_NAME};

/// File name of the profile in a kite image directory.
pub const PREFETCH_NAME: &str = "prefetch";

/// What [`attach_profile`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Digest of the new kite manifest.
    pub manifest: String,
    /// What prefetching the profile will fetch.
    pub footprint: Footprint,
}

/// Check `profile` against the directory's bootstrap and attach it.
pub fn attach_profile(dir: &Path, profile: &Profile) -> Result<Attached, ConvertError> {
    let boot_path = dir.join(BOOTSTRAP_NAME);
    let boot = fs::read(&boot_path).map_err(|e| ConvertError::io(&boot_path, e))?;
    let parsed = Bootstrap::parse(&boot)?;
    let boot_digest = Digest::of(&boot);
    profile
        .check(&boot_digest, &parsed)
        .map_err(|e| ConvertError::Profile(e.to_string()))?;

    let layout = Layout::open(dir)?;
    let index = layout.index()?;
    let [desc] = index.manifests.as_slice() else {
        return Err(ConvertError::Profile(format!(
            "{} holds {} manifests; a kite image directory holds one",
            dir.display(),
            index.manifests.len()
        )));
    };
    let bytes = layout.read_verified(desc, "kite manifest")?;
    let mut manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ConvertError::Profile(format!("kite manifest {}: {e}", desc.digest)))?;
    let mut has_bootstrap = false;
    for l in &manifest.layers {
        let layer = kite_oci::BootstrapLayer::of(l).map_err(ConvertError::Profile)?;
        has_bootstrap |= layer.is_some_and(|b| b.digest == boot_digest.oci());
    }
    let first_form = manifest.config.media_type == media::KITE_CONFIG;
    if !(first_form || manifest.config.media_type == media::OCI_CONFIG) || !has_bootstrap {
        return Err(ConvertError::Profile(format!(
            "manifest {} is not the kite manifest of bootstrap {}",
            desc.digest,
            boot_digest.oci()
        )));
    }

    let mut unused_config = None;
    let data = profile.encode();
    let digest = kite_oci::write_blob(dir, &data)?;
    // The `prefetch` file: a copy renamed into place (a hard link to the
    // blob would do, but a copy survives someone editing blobs/ by hand).
    let link = dir.join(PREFETCH_NAME);
    let tmp = dir.join(format!(".{PREFETCH_NAME}.tmp"));
    fs::write(&tmp, &data).map_err(|e| ConvertError::io(&tmp, e))?;
    fs::rename(&tmp, &link).map_err(|e| ConvertError::io(&link, e))?;

    let replaced: Vec<String> = manifest
        .layers
        .iter()
        .filter(|l| media::is_kite_prefetch(&l.media_type) && l.digest != digest)
        .map(|l| l.digest.clone())
        .collect();
    manifest
        .layers
        .retain(|l| !media::is_kite_prefetch(&l.media_type));
    manifest.layers.push(Descriptor {
        media_type: if first_form {
            media::KITE_PREFETCH
        } else {
            media::KITE_LAYER_PREFETCH
        }
        .into(),
        digest,
        size: data.len() as u64,
        platform: None,
        annotations: Default::default(),
        artifact_type: None,
    });
    let old_config = manifest.config.clone();
    if !first_form {
        let current = layout.read_verified(&old_config, "kite image config")?;
        crate::output::set_config(
            dir,
            &mut manifest,
            &boot_digest.oci(),
            Some(&current),
            &kite_oci::Platform::parse("linux/amd64")?,
        )?;
        if manifest.config.digest != old_config.digest {
            unused_config = Some(old_config.digest);
        }
    }
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|_| ConvertError::Internal("manifest JSON"))?;
    let manifest_digest = kite_oci::write_blob(dir, &manifest_bytes)?;
    let mut new_desc = desc.clone();
    new_desc.digest = manifest_digest.clone();
    new_desc.size = manifest_bytes.len() as u64;
    kite_oci::write_layout_index(dir, new_desc)?;
    // The old manifest and a replaced profile are no longer referenced.
    let mut unused = replaced;
    unused.extend(unused_config);
    if desc.digest != manifest_digest {
        unused.push(desc.digest.clone());
    }
    for d in unused {
        if let Ok(old) = layout.blob_path(&d) {
            let _ = fs::remove_file(old);
        }
    }
    Ok(Attached {
        manifest: manifest_digest,
        footprint: profile.footprint(&parsed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kite_format::prefetch::Entry;

    fn converted() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), vec![7u8; 9000]).unwrap();
        fs::write(src.join("b"), b"bee").unwrap();
        let out = dir.path().join("conv");
        crate::convert(
            &crate::Source::Dir(src),
            &out,
            &crate::ConvertOptions::default(),
            &crate::NoProgress,
        )
        .unwrap();
        (dir, out)
    }

    fn manifest_of(dir: &Path) -> (String, Manifest) {
        let layout = Layout::open(dir).unwrap();
        let desc = layout.index().unwrap().manifests[0].clone();
        let bytes = layout.read_verified(&desc, "manifest").unwrap();
        (desc.digest, serde_json::from_slice(&bytes).unwrap())
    }

    fn profile_layers(m: &Manifest) -> Vec<&Descriptor> {
        m.layers
            .iter()
            .filter(|l| media::is_kite_prefetch(&l.media_type))
            .collect()
    }

    #[test]
    fn attaching_replaces_the_profile_layer_and_keeps_the_bootstrap() {
        let (_t, dir) = converted();
        let boot = fs::read(dir.join(BOOTSTRAP_NAME)).unwrap();
        let (old_digest, old) = manifest_of(&dir);
        let mut p = Profile {
            bootstrap: Digest::of(&boot),
            entries: vec![Entry { blob: 0, chunk: 1 }, Entry { blob: 0, chunk: 0 }],
        };
        let attached = attach_profile(&dir, &p).unwrap();
        let (digest, m) = manifest_of(&dir);
        assert_eq!(digest, attached.manifest);
        // Both files' chunks: 9000 + 3 bytes; the run of 7s compresses.
        assert_eq!(attached.footprint.uncompressed_bytes, 9003);
        assert!(
            attached.footprint.stored_bytes > 0 && attached.footprint.stored_bytes < 9003,
            "{:?}",
            attached.footprint
        );
        assert_ne!(digest, old_digest);
        assert_eq!(m.layers.len(), old.layers.len() + 1);
        let pf = profile_layers(&m);
        assert_eq!(pf.len(), 1);
        let stored = Layout::open(&dir)
            .unwrap()
            .read_verified(pf[0], "profile")
            .unwrap();
        assert_eq!(Profile::decode(&stored).unwrap(), p);
        assert_eq!(fs::read(dir.join(PREFETCH_NAME)).unwrap(), stored);
        assert_eq!(fs::read(dir.join(BOOTSTRAP_NAME)).unwrap(), boot);
        // containerd's view follows: a diff_id per layer, the new layer
        // labelled, every layer's count updated; the old config is gone.
        assert_eq!(pf[0].media_type, media::KITE_LAYER_PREFETCH);
        let layout = Layout::open(&dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&layout.read_verified(&m.config, "config").unwrap()).unwrap();
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        let digests: Vec<&str> = m.layers.iter().map(|l| l.digest.as_str()).collect();
        assert_eq!(diff_ids, digests);
        for l in &m.layers {
            assert_eq!(
                l.annotations[kite_oci::snapshot_labels::LAYERS],
                m.layers.len().to_string()
            );
        }
        assert_eq!(
            pf[0].annotations[kite_oci::snapshot_labels::LAYER],
            "prefetch"
        );
        assert!(!layout.blob_path(&old.config.digest).unwrap().exists());
        assert!(
            !Layout::open(&dir)
                .unwrap()
                .blob_path(&old_digest)
                .unwrap()
                .exists(),
            "the replaced manifest was left behind"
        );
        // A second profile replaces the first: still one profile layer,
        // and the first one's blob is gone.
        let first = Layout::open(&dir)
            .unwrap()
            .blob_path(&pf[0].digest)
            .unwrap();
        p.entries.truncate(1);
        let attached = attach_profile(&dir, &p).unwrap();
        assert!(
            [3, 9000].contains(&attached.footprint.uncompressed_bytes),
            "{:?}",
            attached.footprint
        );
        assert!(!first.exists(), "the replaced profile was left behind");
        let (_, m) = manifest_of(&dir);
        let pf = profile_layers(&m);
        assert_eq!(pf.len(), 1);
        assert_eq!(pf[0].size, 48 + 8);
    }

    #[test]
    fn a_profile_that_does_not_fit_the_bootstrap_changes_nothing() {
        let (_t, dir) = converted();
        let boot = fs::read(dir.join(BOOTSTRAP_NAME)).unwrap();
        let before = manifest_of(&dir).0;
        let cases = [
            Profile {
                bootstrap: Digest::of(b"another image"),
                entries: vec![Entry { blob: 0, chunk: 0 }],
            },
            Profile {
                bootstrap: Digest::of(&boot),
                entries: vec![Entry { blob: 3, chunk: 0 }],
            },
            Profile {
                bootstrap: Digest::of(&boot),
                entries: vec![Entry {
                    blob: 0,
                    chunk: 999,
                }],
            },
            Profile {
                bootstrap: Digest::of(&boot),
                entries: vec![Entry { blob: 0, chunk: 0 }, Entry { blob: 0, chunk: 0 }],
            },
        ];
        let wants = ["not this one", "blob index 3", "chunk 999", "listed twice"];
        for (p, want) in cases.iter().zip(wants) {
            let e = attach_profile(&dir, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert_eq!(manifest_of(&dir).0, before);
            assert!(!dir.join(PREFETCH_NAME).exists());
        }
    }
}
