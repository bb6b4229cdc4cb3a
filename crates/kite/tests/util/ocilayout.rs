//! OCI image layouts built in code: a small tar writer (ustar headers, a
//! PAX record set for xattrs) and a layout writer (layer blobs, a config
//! whose `rootfs.diff_ids` are the uncompressed tars' digests, a manifest,
//! `index.json` tagging it `latest`). For tests that generate many small
//! images (the property tests) without a Python process per image.

use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Tar entry types (ustar `typeflag`).
pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHAR: u8 = b'3';
pub const BLOCK: u8 = b'4';
pub const DIR: u8 = b'5';
pub const FIFO: u8 = b'6';

/// One tar header. `name` and `link` must fit ustar's 100 bytes.
#[derive(Debug, Clone, Default)]
pub struct TarHeader {
    pub name: String,
    pub kind: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub link: String,
    pub dev: (u32, u32),
    /// Written as `SCHILY.xattr.NAME` PAX records (values non-empty: an
    /// empty PAX value means "unset").
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// An uncompressed tar stream being written.
#[derive(Default)]
pub struct TarBuilder {
    out: Vec<u8>,
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0width$o}", width = field.len() - 1);
    assert!(s.len() < field.len(), "{v} does not fit a tar field");
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

fn text(field: &mut [u8], s: &str) {
    assert!(s.len() <= field.len(), "{s:?} does not fit a tar field");
    field[..s.len()].copy_from_slice(s.as_bytes());
}

impl TarBuilder {
    fn block(&mut self, name: &str, kind: u8, h: &TarHeader, size: u64) {
        let mut b = [0u8; 512];
        text(&mut b[0..100], name);
        octal(&mut b[100..108], u64::from(h.mode));
        octal(&mut b[108..116], u64::from(h.uid));
        octal(&mut b[116..124], u64::from(h.gid));
        octal(&mut b[124..136], size);
        octal(&mut b[136..148], h.mtime);
        b[156] = kind;
        text(&mut b[157..257], &h.link);
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        octal(&mut b[329..337], u64::from(h.dev.0));
        octal(&mut b[337..345], u64::from(h.dev.1));
        b[148..156].fill(b' ');
        let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
        octal(&mut b[148..155], sum);
        self.out.extend_from_slice(&b);
    }

    fn data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        self.out.resize(self.out.len().next_multiple_of(512), 0);
    }

    /// Append an entry (with its PAX header first if it has xattrs).
    pub fn entry(&mut self, h: &TarHeader, data: &[u8]) {
        if !h.xattrs.is_empty() {
            let mut pax = Vec::new();
            for (name, value) in &h.xattrs {
                assert!(!value.is_empty(), "empty PAX values unset the key");
                let body = format!(" SCHILY.xattr.{name}=").len() + value.len() + 1;
                // The length prefix counts its own digits.
                let mut len = body + 1;
                while len != body + len.to_string().len() {
                    len = body + len.to_string().len();
                }
                pax.extend_from_slice(format!("{len} SCHILY.xattr.{name}=").as_bytes());
                pax.extend_from_slice(value);
                pax.push(b'\n');
            }
            let meta = TarHeader {
                mode: 0o644,
                ..Default::default()
            };
            self.block("PaxHeader", b'x', &meta, pax.len() as u64);
            self.data(&pax);
        }
        self.block(&h.name, h.kind, h, data.len() as u64);
        self.data(data);
    }

    /// The tar with its end-of-archive blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Write `data` as a blob of the layout; returns its descriptor.
fn add_blob(root: &Path, data: &[u8], media_type: &str) -> serde_json::Value {
    let digest = sha256(data);
    let path = root.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::write(path, data).expect("write blob");
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()})
}

/// Write a one-image OCI layout at `root` (created) from uncompressed
/// layer tars, lowest first, each stored as asked. Returns the reference
/// to convert, `oci:ROOT:latest`.
pub fn write_layout(root: &Path, layers: &[(Vec<u8>, LayerCompression)]) -> String {
    std::fs::create_dir_all(root.join("blobs/sha256")).expect("layout dir");
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, compression) in layers {
        diff_ids.push(sha256(tar));
        let (stored, media_type) = match compression {
            LayerCompression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            LayerCompression::Gzip => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).expect("gzip");
                (
                    e.finish().expect("gzip"),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            LayerCompression::Zstd => (
                zstd::encode_all(&tar[..], 1).expect("zstd"),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        descs.push(add_blob(root, &stored, media_type));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = add_blob(
        root,
        config.to_string().as_bytes(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descs,
    });
    let mut manifest = add_blob(
        root,
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    manifest["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    std::fs::write(root.join("index.json"), index.to_string()).expect("index.json");
    format!("oci:{}:latest", root.display())
}
