//! The labels containerd passes with a snapshot, and what kite reads from
//! them.
//!
//! containerd's unpacker labels each layer's Prepare with
//! `containerd.io/snapshot.ref` (the chain ID it wants committed) plus every
//! `containerd.io/snapshot/` annotation of the layer's descriptor. kite's
//! converter annotates its layers ([`kite_oci::snapshot_labels`]); the
//! image's reference comes from CRI (`cri.image-ref` + `cri.manifest-digest`,
//! with `disable_snapshot_annotations = false`) or from `ctr-remote images
//! rpull` (`remote/stargz.reference`).

use std::collections::BTreeMap;

pub use kite_oci::snapshot_labels as kite;

/// The chain ID the unpacker wants committed.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// CRI: the image reference as pulled (normalized).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI: the manifest digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// CRI: this layer's descriptor digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// `ctr-remote images rpull`: the reference as given.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// `ctr-remote images rpull`: this layer's descriptor digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set by kite on the snapshots it commits for kite layers.
pub const KITE_REMOTE: &str = "containerd.io/snapshot/kite.remote";

/// What kind of kite layer a Prepare is for, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KiteLayer {
    Bootstrap,
    Blob,
    Prefetch,
}

impl KiteLayer {
    /// `Ok(None)` for a layer that is not kite's; an error for a kite
    /// label kite does not know (a newer converter).
    pub fn of(labels: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        match labels.get(kite::LAYER).map(String::as_str) {
            None => Ok(None),
            Some("bootstrap") => Ok(Some(Self::Bootstrap)),
            Some("blob") => Ok(Some(Self::Blob)),
            Some("prefetch") => Ok(Some(Self::Prefetch)),
            Some(other) => Err(format!(
                "unknown kite layer kind {other:?} (label {}); is this snapshotter older than the converter?",
                kite::LAYER
            )),
        }
    }
}

/// The descriptor digest of the layer being prepared, for messages.
pub fn layer_digest(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get(CRI_LAYER_DIGEST)
        .or_else(|| labels.get(STARGZ_DIGEST))
        .map(String::as_str)
}

/// The reference to register a kite image by: pinned to the manifest
/// digest when CRI gave one, else the reference `ctr-remote` was given.
pub fn image_reference(labels: &BTreeMap<String, String>) -> Result<String, String> {
    if let (Some(r), Some(d)) = (labels.get(CRI_IMAGE_REF), labels.get(CRI_MANIFEST_DIGEST)) {
        let parsed = kite_registry::Reference::parse(r)
            .map_err(|e| format!("label {CRI_IMAGE_REF}={r:?}: {e}"))?;
        kite_oci::digest_hex(d).map_err(|e| format!("label {CRI_MANIFEST_DIGEST}: {e}"))?;
        return Ok(parsed.pinned(d).to_string());
    }
    if let Some(r) = labels.get(STARGZ_REFERENCE) {
        kite_registry::Reference::parse(r)
            .map_err(|e| format!("label {STARGZ_REFERENCE}={r:?}: {e}"))?;
        return Ok(r.clone());
    }
    Err(format!(
        "no image reference among its labels: pull through CRI with `disable_snapshot_annotations = false` in containerd's CRI config, or with `ctr-remote images rpull --snapshotter kite` (labels given: {})",
        labels.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn cri_labels_pin_the_reference_to_the_manifest() {
        let r = image_reference(&l(&[
            (CRI_IMAGE_REF, "127.0.0.1:5000/kite/app:v1"),
            (CRI_MANIFEST_DIGEST, D),
        ]))
        .unwrap();
        assert_eq!(r, format!("127.0.0.1:5000/kite/app@{D}"));
    }

    #[test]
    fn rpull_labels_give_the_reference_as_pulled() {
        let r = image_reference(&l(&[(STARGZ_REFERENCE, "127.0.0.1:5000/kite/app:v1")])).unwrap();
        assert_eq!(r, "127.0.0.1:5000/kite/app:v1");
    }

    #[test]
    fn no_reference_labels_say_what_to_configure() {
        let e = image_reference(&l(&[(TARGET_REF, D)])).unwrap_err();
        assert!(e.contains("disable_snapshot_annotations = false"), "{e}");
        let e = image_reference(&l(&[
            (CRI_IMAGE_REF, "127.0.0.1:5000/kite/app:v1"),
            (CRI_MANIFEST_DIGEST, "sha256:short"),
        ]))
        .unwrap_err();
        assert!(e.contains(CRI_MANIFEST_DIGEST), "{e}");
    }

    #[test]
    fn layer_kinds() {
        assert_eq!(KiteLayer::of(&l(&[])), Ok(None));
        assert_eq!(
            KiteLayer::of(&l(&[(kite::LAYER, "bootstrap")])),
            Ok(Some(KiteLayer::Bootstrap))
        );
        assert!(KiteLayer::of(&l(&[(kite::LAYER, "future")])).is_err());
    }
}
