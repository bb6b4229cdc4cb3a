//! A whole layer through the converter: decompression (first input byte
//! picks none, gzip or zstd), digest checks, the tar reader, the merged
//! tree and the output (bootstrap, blob, layout). Whatever the bytes, the
//! conversion succeeds or fails with an error, and a success is a bootstrap
//! the reader accepts.
#![no_main]

use std::io::Read;
use std::sync::Arc;

use kite_convert::{ConvertOptions, LayerOpener, NoProgress, RemoteImage, Source};
use kite_oci::{media, Descriptor, Manifest};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

struct Bytes(Vec<u8>);

impl LayerOpener for Bytes {
    fn open(&self, _: &Descriptor) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::io::Cursor::new(self.0.clone())))
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn desc(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest(data),
        size: data.len() as u64,
        platform: None,
        annotations: Default::default(),
        artifact_type: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, layer)) = data.split_first() else {
        return;
    };
    // The diff_id the config must name: the uncompressed stream's digest
    // (a stream that does not decompress gets a digest of nothing; the
    // converter fails on the stream first).
    let mut plain = Vec::new();
    let (media_type, ok) = match sel % 3 {
        0 => (media::OCI_LAYER_TAR, {
            plain.extend_from_slice(layer);
            true
        }),
        1 => (
            media::OCI_LAYER_GZIP,
            flate2::read::GzDecoder::new(layer)
                .take(256 << 20)
                .read_to_end(&mut plain)
                .is_ok(),
        ),
        _ => (
            media::OCI_LAYER_ZSTD,
            zstd::Decoder::new(layer)
                .map(|d| d.take(256 << 20).read_to_end(&mut plain).is_ok())
                .unwrap_or(false),
        ),
    };
    let diff_id = if ok { digest(&plain) } else { digest(b"") };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    )
    .into_bytes();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: None,
        config: desc(media::OCI_CONFIG, &config),
        layers: vec![desc(media_type, layer)],
        annotations: Default::default(),
    };
    let source = Source::Remote(Box::new(RemoteImage {
        reference: "fuzz.invalid/layer:latest".into(),
        manifest_digest: digest(b"manifest"),
        manifest,
        config,
        opener: Arc::new(Bytes(layer.to_vec())),
    }));
    // tmpfs when there is one: every run writes an output.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let tmp = tempfile::Builder::new()
        .prefix("kite-fuzz-")
        .tempdir_in(base)
        .expect("a temporary directory for the output");
    let out = tmp.path().join("out");
    let opts = ConvertOptions {
        threads: 1,
        ..ConvertOptions::default()
    };
    if kite_convert::convert(&source, &out, &opts, &NoProgress).is_ok() {
        let boot =
            std::fs::read(out.join(kite_convert::BOOTSTRAP_NAME)).expect("bootstrap written");
        let parsed =
            kite_format::Bootstrap::parse(&boot).expect("the converter's bootstrap parses");
        parsed
            .validate()
            .expect("the converter's bootstrap validates");
    }
});
