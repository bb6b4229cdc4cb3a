//! Node-level chunk dedup on the fanotify path: a new image version whose
//! layer was rebuilt with most files unchanged copies those files' chunks
//! from the old version's blob on this node (verified) instead of
//! fetching them; a local copy whose bytes are wrong is never used.
//! Every byte read is compared with the source trees.
//!
//! Needs root and Linux >= 6.14 with the fanotify path; skipped loudly
//! elsewhere, a failure in CI.

mod util;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use util::daemon::{fanotify_path, Daemon};
use util::*;

/// Write `files` under `root`.
fn tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, data) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

fn expect(files: &[(&str, Vec<u8>)]) -> BTreeMap<PathBuf, Vec<u8>> {
    files
        .iter()
        .map(|(n, d)| (PathBuf::from(n), d.clone()))
        .collect()
}

/// The blob status of the image mounted from `conv` (one layer).
fn blob_of(daemon: &Daemon, conv: &Path) -> serde_json::Value {
    use sha2::Digest;
    let fsid: String = sha2::Sha256::digest(std::fs::read(conv.join("bootstrap")).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let st = daemon.status();
    let img = st["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["fsid"] == fsid.as_str())
        .unwrap_or_else(|| panic!("image {fsid} not in status: {st}"))
        .clone();
    img["blobs"][0].clone()
}

#[test]
fn unchanged_chunks_are_copied_from_another_blob_and_a_bad_copy_is_never_used() {
    if !require(
        "unchanged_chunks_are_copied_from_another_blob_and_a_bad_copy_is_never_used",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // v1: a large file, a medium one, small files. v2 rebuilds the layer
    // with one small file changed and one added; v3 and v4 each add one
    // more file (more blobs holding the same unchanged chunks).
    let big = noise(1, 5 << 20);
    let medium = noise(2, 700 << 10);
    let mut v1: Vec<(&str, Vec<u8>)> = vec![
        ("lib/big.so", big.clone()),
        ("lib/medium.bin", medium.clone()),
    ];
    let smalls: Vec<String> = (0..20).map(|i| format!("pkg/mod{i}.py")).collect();
    for (i, n) in smalls.iter().enumerate() {
        v1.push((n.as_str(), noise(100 + i as u64, 3000 + 100 * i)));
    }
    let mut v2 = v1.clone();
    v2[2].1 = noise(999, 5000);
    v2.push(("pkg/new.py", noise(1000, 9000)));
    let mut v3 = v2.clone();
    v3.push(("pkg/v3.py", noise(1001, 4000)));
    let mut v4 = v3.clone();
    v4.push(("pkg/v4.py", noise(1002, 4000)));
    let mut convs = Vec::new();
    for (name, files) in [("v1", &v1), ("v2", &v2), ("v3", &v3), ("v4", &v4)] {
        let src = d.join(format!("{name}-src"));
        tree(&src, files);
        let conv = d.join(name);
        convert(&format!("dir:{}", src.display()), &conv, &[]);
        convs.push(conv);
    }
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    let daemon = Daemon::start(&d.join("daemon"), &[]);

    // v1 read whole: its chunks are on this node.
    let m1 = daemon.mount(&convs[0], &d.join("m1"), &[]);
    assert_eq!(read_all(&m1.mnt), expect(&v1), "v1 reads its own bytes");
    let b1 = blob_of(&daemon, &convs[0]);
    assert_eq!(b1["copied_chunks"], 0, "{b1}");

    // v2: only the changed and the new file come from the backend.
    let m2 = daemon.mount(&convs[1], &d.join("m2"), &[]);
    assert_eq!(read_all(&m2.mnt), expect(&v2), "v2 reads its own bytes");
    let b2 = blob_of(&daemon, &convs[1]);
    let copied = b2["copied_bytes"].as_u64().unwrap();
    let unchanged = (big.len() + medium.len()) as u64;
    assert!(
        copied >= unchanged,
        "v2 copied {copied} bytes locally, want at least the {unchanged} bytes of unchanged large files: {b2}"
    );
    let fetched = b2["backend_bytes"].as_u64().unwrap();
    let stored = b2["compressed_size"].as_u64().unwrap();
    assert!(
        fetched < 64 << 10,
        "v2 fetched {fetched} of {stored} stored bytes; only two small files changed: {b2}"
    );
    let st = daemon.status();
    assert!(st["health"]["indexed_chunks"].as_u64().unwrap() > 0, "{st}");

    // Forgetting v1, which the index names as the holder of the
    // unchanged chunks, hands its entries to v2: v3 copies them from v2.
    m1.umount();
    let m3 = daemon.mount(&convs[2], &d.join("m3"), &[]);
    assert_eq!(read_all(&m3.mnt), expect(&v3), "v3 reads its own bytes");
    let b3 = blob_of(&daemon, &convs[2]);
    let copied3 = b3["copied_bytes"].as_u64().unwrap();
    assert!(
        copied3 >= unchanged,
        "v3 copied {copied3} bytes after v1 was forgotten, want at least {unchanged}: {b3}"
    );
    assert!(b3["backend_bytes"].as_u64().unwrap() < 64 << 10, "{b3}");

    // Corrupt v2's and v3's blob files (every 4 KiB block gets one wrong
    // byte): v4 must fetch every chunk, never copy a corrupt one, and
    // still read exactly its bytes.
    for conv in &convs[1..3] {
        let b = blob_of(&daemon, conv);
        let hex = b["digest"].as_str().unwrap().trim_start_matches("sha256:");
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(daemon.cache.join("blobs").join(hex))
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut off = 0;
        while off < len {
            f.write_all_at(&[0x5a], off + 17).unwrap();
            off += 4096;
        }
        f.sync_all().unwrap();
    }
    let m4 = daemon.mount(&convs[3], &d.join("m4"), &[]);
    assert_eq!(
        read_all(&m4.mnt),
        expect(&v4),
        "v4 reads its own bytes, never a corrupt local copy"
    );
    let b4 = blob_of(&daemon, &convs[3]);
    assert_eq!(b4["copied_chunks"], 0, "no corrupt copy was used: {b4}");
    let fetched4 = b4["backend_bytes"].as_u64().unwrap();
    assert!(
        fetched4 >= unchanged,
        "v4 fetched only {fetched4} bytes: the unchanged files must come from the backend: {b4}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("not used, fetching it instead"),
        "the daemon says a local copy was refused:\n{log}"
    );
    m4.umount();
    m3.umount();
    m2.umount();
    daemon.stop();
}
