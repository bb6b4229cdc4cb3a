//! OCI manifest, index and config parsing, and what kite reads from them:
//! platforms, bootstrap layers, layer compression, digests.
#![no_main]

use kite_oci::{BootstrapLayer, ImageIndex, Manifest, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        for l in m.layers.iter().chain(std::iter::once(&m.config)) {
            let _ = BootstrapLayer::of(l);
            let _ = kite_oci::layer_compression(&l.media_type);
            let _ = kite_oci::digest_hex(&l.digest);
        }
    }
    if let Ok(i) = serde_json::from_slice::<ImageIndex>(data) {
        for d in &i.manifests {
            if let Some(p) = &d.platform {
                let _ = Platform::parse(&p.to_string());
            }
        }
    }
    let _ = kite_oci::config_diff_ids(data, "fuzz config");
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Platform::parse(s);
        let _ = kite_oci::digest_hex(s);
    }
});
