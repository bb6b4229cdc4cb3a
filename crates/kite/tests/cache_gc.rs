//! The node cache's lifecycle on the fanotify path: `kite images`, `kite
//! rm` (refused while mounted), `kite gc` and the daemon's own sweep after
//! `--gc-grace`. Collected: blob files, fetch state and bootstraps that no
//! registered image references; a blob another image shares stays, and
//! that image keeps reading the same bytes.
//!
//! Needs root and Linux >= 6.14 with the fanotify path; skipped loudly
//! elsewhere, a failure in CI.

mod util;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::daemon::{fanotify_path, Daemon};
use util::*;

/// Two converted images sharing their base layer's blob.
fn pair(d: &Path) -> (PathBuf, PathBuf) {
    let (i1, i2) = (d.join("img1"), d.join("img2"));
    py(
        "ocigen.py",
        &["pair", i1.to_str().unwrap(), i2.to_str().unwrap()],
    );
    let (c1, c2) = (d.join("conv1"), d.join("conv2"));
    convert(&format!("oci:{}", i1.display()), &c1, &[]);
    convert(&format!("oci:{}", i2.display()), &c2, &[]);
    (c1, c2)
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fsid(conv: &Path) -> String {
    hex_sha256(&std::fs::read(conv.join("bootstrap")).unwrap())
}

fn blobs_of(conv: &Path) -> BTreeSet<String> {
    kite_ok(&[
        "inspect",
        conv.join("bootstrap").to_str().unwrap(),
        "--blobs-only",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

fn names(dir: &Path, suffix: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(suffix))
                        .filter(|n| !n.starts_with('.'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn kite_sock(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let mut a = args.to_vec();
    a.extend(["--socket", daemon.socket.to_str().unwrap()]);
    kite(&a)
}

/// Unmount without `kite umount` (which would also forget the image).
fn plain_umount(mnt: &Path) {
    nix::mount::umount(mnt).unwrap();
}

#[test]
fn rm_and_gc_collect_what_no_image_references_and_keep_shared_blobs() {
    if !require(
        "rm_and_gc_collect_what_no_image_references_and_keep_shared_blobs",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (c1, c2) = pair(d);
    let (f1, f2) = (fsid(&c1), fsid(&c2));
    let (b1, b2) = (blobs_of(&c1), blobs_of(&c2));
    let shared: BTreeSet<String> = b1.intersection(&b2).cloned().collect();
    assert!(!shared.is_empty(), "the pair shares its base blob");
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    // Grace 0: only `kite gc` collects here.
    let daemon = Daemon::start(&d.join("daemon"), &["--gc-grace", "0"]);
    let (m1, m2) = (d.join("mnt1"), d.join("mnt2"));
    let _l1 = daemon.mount(&c1, &m1, &[]);
    let _l2 = daemon.mount(&c2, &m2, &[]);
    let first1 = read_all(&m1);
    let first2 = read_all(&m2);
    let cache = &daemon.cache;
    let all: BTreeSet<String> = b1.union(&b2).cloned().collect();
    assert_eq!(names(&cache.join("blobs"), ""), all);

    // `kite images` shows both, with their mounts.
    let listed: serde_json::Value =
        serde_json::from_slice(&kite_sock(&daemon, &["images", "--json"]).stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for row in listed {
        assert_eq!(row["mounts"].as_array().unwrap().len(), 1, "{row}");
        assert!(row["fetched"].as_u64().unwrap() > 0, "{row}");
        assert!(row["last_miss"].as_u64().unwrap() > 0, "{row}");
    }

    // Mounted: refused, naming the mountpoint.
    let o = kite_sock(&daemon, &["rm", &f1[..12]]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(m1.to_str().unwrap()), "{err}");
    // Unknown: refused, saying so.
    let o = kite_sock(&daemon, &["rm", "0123456789abcdef"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no registered image"));

    // Unmounted, removed, collected: image 1's own blobs, its bootstrap
    // and its state go; the shared blob stays.
    plain_umount(&m1);
    let o = kite_sock(&daemon, &["rm", &f1[..12]]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kite_sock(&daemon, &["gc"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    let only1 = b1.difference(&b2).count();
    assert!(
        said.starts_with(&format!("collected {only1} blob files, 1 bootstraps")),
        "{said}"
    );
    assert_eq!(names(&cache.join("blobs"), ""), b2);
    assert_eq!(
        names(&cache.join("bootstraps"), ""),
        BTreeSet::from([f2.clone()])
    );
    assert!(names(&cache.join("kite-state"), ".fetched").is_subset(&b2));
    // Image 2 reads the same, cold.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(
        read_all(&m2) == first2,
        "image 2 changed after the collection"
    );
    // Nothing left to collect.
    let said = String::from_utf8_lossy(&kite_sock(&daemon, &["gc"]).stdout).into_owned();
    assert!(
        said.starts_with("collected 0 blob files, 0 bootstraps"),
        "{said}"
    );

    // Image 1 again: registered anew, fetched anew, same bytes.
    plain_umount(&m2);
    let l1 = daemon.mount(&c1, &m1, &[]);
    assert!(
        read_all(&m1) == first1,
        "image 1 reads differently after its data was collected"
    );
    drop(l1);
}

#[test]
fn the_daemon_collects_by_itself_after_the_grace_period() {
    if !require(
        "the_daemon_collects_by_itself_after_the_grace_period",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // Not the pair: tests run side by side, and an image's fsid (and so
    // its mounts on this host) would be shared with the other test's.
    let img = d.join("img");
    py("ocigen.py", &["example", img.to_str().unwrap()]);
    let c1 = d.join("conv");
    convert(&format!("oci:{}", img.display()), &c1, &[]);
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    let daemon = Daemon::start(&d.join("daemon"), &["--gc-grace", "2"]);
    let m1 = d.join("mnt1");
    let _l = daemon.mount(&c1, &m1, &[]);
    read_all(&m1);
    let blobs = d.join("daemon/cache/blobs");
    assert_eq!(names(&blobs, ""), blobs_of(&c1));
    // Registered data is never collected, however long it waits.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(names(&blobs, ""), blobs_of(&c1));
    plain_umount(&m1);
    let o = kite_sock(&daemon, &["rm", &fsid(&c1)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    // Grace 2 s, a sweep every 2 s: gone within a few seconds.
    while !names(&blobs, "").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not collected after {:?}: {:?}\n{}",
            t.elapsed(),
            names(&blobs, ""),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let waited = t.elapsed();
    eprintln!("collected {waited:?} after kite rm (grace 2 s)");
    assert!(
        waited >= Duration::from_secs(2),
        "collected before the grace period: {waited:?}"
    );
    assert!(names(&d.join("daemon/cache/bootstraps"), "").is_empty());
}

/// Allocated bytes of the cache's files.
fn cache_usage(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    ["blobs", "bootstraps", "kite-state", "manifests"]
        .iter()
        .filter_map(|s| std::fs::read_dir(cache.join(s)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn registered(daemon: &Daemon) -> BTreeSet<String> {
    daemon.status()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fsid"].as_str().unwrap().to_string())
        .collect()
}

/// Wait until `ok()` holds (the bound is checked every 2 s).
fn eventually(what: &str, daemon: &Daemon, ok: impl Fn() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: not after {:?}\n{}",
            t.elapsed(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_size_bound_evicts_unmounted_images_least_recently_used_first_never_a_mounted_one() {
    if !require(
        "the_size_bound_evicts_unmounted_images_least_recently_used_first_never_a_mounted_one",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // Four images of 12-15 MiB each (10-13 MiB of data, a 2 MiB busybox):
    // 3x the bound together.
    let bound: u64 = 18 << 20;
    let convs: Vec<PathBuf> = (0..4)
        .map(|i| {
            let img = d.join(format!("img{i}"));
            py(
                "ocigen.py",
                &[
                    "runnable",
                    img.to_str().unwrap(),
                    "--payload-mb",
                    &(10 + i).to_string(),
                    "--message",
                    &format!("image {i}"),
                ],
            );
            let conv = d.join(format!("conv{i}"));
            convert(&format!("oci:{}", img.display()), &conv, &[]);
            conv
        })
        .collect();
    let fsids: Vec<String> = convs.iter().map(|c| fsid(c)).collect();
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    let daemon = Daemon::start(
        &d.join("daemon"),
        &["--cache-size", "18M", "--gc-grace", "0"],
    );
    let cache = daemon.cache.clone();
    // Each image in turn: mounted, read whole, then unmounted without
    // being forgotten (plain umount): registered, unmounted, evictable.
    let mut contents = Vec::new();
    let mut mounts = Vec::new();
    for (i, conv) in convs.iter().enumerate() {
        let mnt = d.join(format!("mnt{i}"));
        mounts.push(daemon.mount(conv, &mnt, &[]));
        contents.push(read_all(&mnt));
        if i < 3 {
            plain_umount(&mnt);
        }
        // Whatever is mounted fits: the bound holds after each step.
        eventually("the cache under its bound", &daemon, || {
            cache_usage(&cache) <= bound
        });
    }
    // Only the mounted image is left registered; the others were evicted,
    // oldest first.
    assert_eq!(registered(&daemon), BTreeSet::from([fsids[3].clone()]));
    let log = daemon.log_text();
    let order: Vec<usize> = (0..3)
        .map(|i| {
            log.lines()
                .position(|l| l.contains("evicted an unmounted image") && l.contains(&fsids[i]))
                .unwrap_or_else(|| panic!("image {i} was not evicted:\n{log}"))
        })
        .collect();
    assert!(
        order[0] < order[1] && order[1] < order[2],
        "eviction order {order:?}"
    );
    // The mounted image reads the same, cold.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(read_all(&d.join("mnt3")) == contents[3]);

    // Two mounted images over the bound: a warning, and both read right.
    let l0 = daemon.mount(&convs[0], &d.join("mnt0"), &[]);
    assert!(
        read_all(&d.join("mnt0")) == contents[0],
        "image 0 after its eviction"
    );
    eventually("the over-bound warning", &daemon, || {
        daemon.log_text().contains("the cache is over its bound")
    });
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(read_all(&d.join("mnt0")) == contents[0]);
    assert!(read_all(&d.join("mnt3")) == contents[3]);
    assert_eq!(registered(&daemon).len(), 2, "a mounted image was evicted");
    drop(l0);
    drop(mounts);
}
