//! `kite check` finds corruption anywhere in a blob; conversion is
//! reproducible; dedup across layers shows in `inspect`; `unpack` refuses
//! blobs that are not part of the image.

mod util;
use std::path::Path;
use util::*;

fn convert_example(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let img = dir.join("img");
    if !img.exists() {
        py("ocigen.py", &["example", img.to_str().unwrap()]);
    }
    let out = dir.join(format!("conv{}", extra.join("")));
    let mut args = vec!["convert", "--quiet", "--from"];
    let from = format!("oci:{}", img.display());
    args.push(&from);
    args.push("--to");
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    kite_ok(&args);
    out
}

#[test]
fn check_catches_a_flipped_byte_in_every_blob() {
    let dir = tempdir();
    let conv = convert_example(dir.path(), &[]);
    let boot = conv.join("bootstrap");
    let boot_s = boot.to_str().unwrap();
    let conv_s = conv.to_str().unwrap();
    let ok = kite_ok(&["check", boot_s, "--blobs", conv_s]);
    assert!(ok.starts_with("ok:"), "{ok}");
    let blobs: Vec<String> = kite_ok(&["inspect", boot_s, "--blobs-only"])
        .lines()
        .map(String::from)
        .collect();
    assert!(
        blobs.len() >= 2,
        "example image should have several blobs: {blobs:?}"
    );
    for hex in &blobs {
        let path = conv.join("blobs/sha256").join(hex);
        let orig = std::fs::read(&path).unwrap();
        for pos in [0, orig.len() / 3, orig.len() / 2, orig.len() - 1] {
            let mut bad = orig.clone();
            bad[pos] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let r = kite(&["check", boot_s, "--blobs", conv_s]);
            let stderr = String::from_utf8_lossy(&r.stderr);
            assert_eq!(
                r.status.code(),
                Some(1),
                "flip at {pos} of {hex} not caught"
            );
            assert!(
                stderr.contains(hex.as_str()),
                "error does not name blob {hex}: {stderr}"
            );
            assert!(
                stderr.contains("chunk "),
                "error does not name the chunk: {stderr}"
            );
        }
        std::fs::write(&path, &orig).unwrap();
    }
    kite_ok(&["check", boot_s, "--blobs", conv_s]);
}

#[test]
fn check_names_the_exact_chunk() {
    let dir = tempdir();
    let conv = convert_example(dir.path(), &["--chunk-size", "64K"]);
    let boot = conv.join("bootstrap");
    let boot_s = boot.to_str().unwrap();
    let hex = kite_ok(&["inspect", boot_s, "--blobs-only"])
        .lines()
        .next()
        .unwrap()
        .to_string();
    let path = conv.join("blobs/sha256").join(&hex);
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let r = kite(&["check", boot_s, "--blobs", conv.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    // The last byte belongs to the last chunk of the blob.
    let summary = kite_ok(&["inspect", boot_s, "--summary"]);
    let line = summary.lines().find(|l| l.contains(&hex)).unwrap();
    let chunks: usize = line
        .split("chunks")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stderr.contains(&format!("chunk {}", chunks - 1)),
        "expected chunk {} in: {stderr}",
        chunks - 1
    );
}

#[test]
fn conversion_is_byte_reproducible() {
    let dir = tempdir();
    let a = convert_example(dir.path(), &[]);
    let b = convert_example(dir.path(), &["--threads", "1"]);
    let ra = std::fs::read(a.join("bootstrap")).unwrap();
    let rb = std::fs::read(b.join("bootstrap")).unwrap();
    assert!(ra == rb, "bootstraps differ between runs");
    assert_eq!(
        std::fs::read(a.join("index.json")).unwrap(),
        std::fs::read(b.join("index.json")).unwrap()
    );
}

#[test]
fn unpack_refuses_a_foreign_blob_and_leaves_no_output() {
    let dir = tempdir();
    let conv = convert_example(dir.path(), &[]);
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"not a blob").unwrap();
    let out = dir.path().join("raw");
    let r = kite(&[
        "unpack",
        "--bootstrap",
        conv.join("bootstrap").to_str().unwrap(),
        foreign.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a blob of this bootstrap"));
    assert!(!out.exists());
}

#[test]
fn oci_output_names_bootstrap_and_blobs() {
    let dir = tempdir();
    let conv = convert_example(dir.path(), &[]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conv.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            conv.join("blobs/sha256")
                .join(mdigest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    // The bootstrap is published as one zstd frame whose annotations name
    // the bootstrap's own digest and size.
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.kite.bootstrap.v1.erofs+zstd"
    );
    let boot = std::fs::read(conv.join("bootstrap")).unwrap();
    use sha2::Digest;
    let boot_digest = format!("sha256:{}", hex(&sha2::Sha256::digest(&boot)));
    // containerd's form: every layer is labelled for the snapshotter, and
    // the config is the source's with one diff_id per layer.
    for (i, l) in layers.iter().enumerate() {
        let ann = &l["annotations"];
        let kind = if i == 0 { "bootstrap" } else { "blob" };
        assert_eq!(ann["containerd.io/snapshot/kite.layer"], kind, "layer {i}");
        assert_eq!(
            ann["containerd.io/snapshot/kite.image"],
            boot_digest.as_str()
        );
        assert_eq!(
            ann["containerd.io/snapshot/kite.layers"],
            layers.len().to_string()
        );
        if i > 0 {
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.kite.blob.v1.chunked-zstd"
            );
        }
    }
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            conv.join("blobs/sha256").join(
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let diff_ids: Vec<&serde_json::Value> = layers.iter().map(|l| &l["digest"]).collect();
    assert_eq!(
        config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        diff_ids
    );
    assert_eq!(config["rootfs"]["type"], "layers");
    // The example's runtime config is carried over.
    assert_eq!(config["config"]["Cmd"][0], "/opt/app/bin/hello.sh");
    assert_eq!(config["config"]["WorkingDir"], "/opt/app");
    assert!(config.get("history").is_none());
    let ann = &layers[0]["annotations"];
    assert_eq!(
        ann["dev.kite.bootstrap.digest"].as_str().unwrap(),
        format!("sha256:{}", hex(&sha2::Sha256::digest(&boot)))
    );
    assert_eq!(
        ann["dev.kite.bootstrap.size"].as_str().unwrap(),
        boot.len().to_string()
    );
    let frame = std::fs::read(
        conv.join("blobs/sha256").join(
            layers[0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        ),
    )
    .unwrap();
    assert_eq!(frame.len() as u64, layers[0]["size"].as_u64().unwrap());
    assert!(
        frame.len() < boot.len() / 2,
        "{} of {}",
        frame.len(),
        boot.len()
    );
    assert_eq!(zstd::decode_all(&frame[..]).unwrap(), boot);
    let src = manifest["annotations"]["dev.kite.source.manifest.digest"]
        .as_str()
        .unwrap();
    assert!(src.starts_with("sha256:"));
    let blobs = kite_ok(&[
        "inspect",
        conv.join("bootstrap").to_str().unwrap(),
        "--blobs-only",
    ]);
    let listed: Vec<String> = layers[1..]
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    assert_eq!(blobs.lines().map(String::from).collect::<Vec<_>>(), listed);
    for hexd in &listed {
        let data = std::fs::read(conv.join("blobs/sha256").join(hexd)).unwrap();
        assert_eq!(
            &hex(&sha2::Sha256::digest(&data)),
            hexd,
            "blob file not named by its digest"
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Chunks of `size` uncompressed bytes in `conv`'s index.
fn chunks_of_size(conv: &Path, size: u64) -> usize {
    kite_ok(&[
        "inspect",
        conv.join("bootstrap").to_str().unwrap(),
        "--chunks",
    ])
    .lines()
    .filter(|l| l.split_whitespace().nth(4) == Some(size.to_string().as_str()))
    .count()
}

/// ELF files (the full image's usr/bin/tool, 200000 bytes, and
/// usr/lib/libfoo.so.1, 1500000 bytes, both starting with the ELF magic)
/// are cut in 64 KiB chunks by default, every other file in 1 MiB ones;
/// `--elf-chunk-size off` cuts them like the rest. The index records the
/// fine size, which `inspect` shows. (Their bytes read back through a
/// mount are compared with the reference in the lazy mount tests.)
#[test]
fn elf_files_are_cut_in_fine_chunks() {
    let dir = tempdir();
    let img = dir.path().join("img");
    py("ocigen.py", &["full", img.to_str().unwrap()]);
    let from = format!("oci:{}", img.display());
    let convert = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        util::convert(&from, &out, extra);
        out
    };
    let fine = convert("fine", &[]);
    let off = convert("off", &["--elf-chunk-size", "off"]);
    let custom = convert("custom", &["--elf-chunk-size", "16K"]);
    // 200000 / 64 KiB -> 3 full chunks, 1500000 / 64 KiB -> 22.
    let k64 = chunks_of_size(&fine, 64 << 10) - chunks_of_size(&off, 64 << 10);
    assert_eq!(k64, 3 + 22, "64 KiB chunks of the two ELF files");
    let k16 = chunks_of_size(&custom, 16 << 10) - chunks_of_size(&off, 16 << 10);
    assert_eq!(k16, 12 + 91, "16 KiB chunks of the two ELF files");
    let summary = |c: &Path| {
        kite_ok(&[
            "inspect",
            c.join("bootstrap").to_str().unwrap(),
            "--summary",
        ])
    };
    assert!(
        summary(&fine).contains("chunk size: 1048576 (ELF files: 65536)"),
        "{}",
        summary(&fine)
    );
    let s = summary(&off);
    assert!(
        s.contains("chunk size: 1048576") && !s.contains("ELF files"),
        "{s}"
    );
    // An image without ELF files names no fine size.
    let other = tempdir();
    let plain = convert_example(other.path(), &[]);
    assert!(
        !summary(&plain).contains("ELF files"),
        "{}",
        summary(&plain)
    );
    // An ELF chunk size not below the chunk size does not apply.
    let big = convert("big", &["--chunk-size", "64K", "--elf-chunk-size", "64K"]);
    assert!(!summary(&big).contains("ELF files"), "{}", summary(&big));
}

/// The root inode's offset in a bootstrap kite wrote (meta_blkaddr 0).
fn root_inode_offset(boot: &[u8]) -> usize {
    let root_nid = u16::from_le_bytes([boot[1024 + 14], boot[1024 + 15]]) as usize;
    root_nid * 32
}

#[test]
fn check_metadata_validates_a_bootstrap_without_its_blobs() {
    let dir = tempdir();
    let conv = convert_example(dir.path(), &[]);
    let boot = conv.join("bootstrap");
    let out = kite_ok(&["check", "--metadata", boot.to_str().unwrap()]);
    assert!(out.starts_with("ok: "), "{out}");
    assert!(out.contains(" directories, "), "{out}");

    // A root inode that says it is a regular file: the kernel would refuse
    // the mount; the validator names the inode first.
    let mut bytes = std::fs::read(&boot).unwrap();
    let at = root_inode_offset(&bytes) + 4;
    bytes[at..at + 2].copy_from_slice(&0o100644u16.to_le_bytes());
    let bad = dir.path().join("bad-bootstrap");
    std::fs::write(&bad, &bytes).unwrap();
    let o = kite(&["check", "--metadata", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a valid bootstrap"), "{err}");
    assert!(err.contains("the inode is type 1"), "{err}");
    // The full check validates first, too.
    let o = kite(&[
        "check",
        bad.to_str().unwrap(),
        "--blobs",
        conv.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}
