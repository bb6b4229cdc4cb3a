//! End to end through the fanotify path on this host's kernel: a real
//! `kite daemon` (forced to `--kernel-path fanotify`), `kite mount`,
//! file-backed EROFS over sparse blob files filled on pre-content events.
//! The daemon issue's checks (a)-(g), plus: a complete blob raises no event
//! after drop_caches, and mmap/exec/import from a cold image work.
//!
//! Needs root and Linux >= 6.14 with pre-content fanotify and file-backed
//! EROFS; skipped loudly elsewhere, a failure in CI.

mod util;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::daemon::{fanotify_path, hanging_server, Daemon, RangeServer};
use util::*;

fn example(dir: &Path) -> PathBuf {
    let img = dir.join("img");
    py("ocigen.py", &["example", img.to_str().unwrap()]);
    let conv = dir.join("conv");
    convert(&format!("oci:{}", img.display()), &conv, &[]);
    conv
}

/// The same image mounted with all blobs unpacked locally (the reference).
fn reference_mount(conv: &Path, dir: &Path) -> Mount {
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let devices = unpack_all(conv, &raw);
    Mount::erofs(&conv.join("bootstrap"), &devices, &dir.join("ref")).unwrap()
}

fn is_eio(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(5)
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[test]
fn a_lazy_full_tree_matches_reference() {
    if !require("a_lazy_full_tree_matches_reference", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("img");
    let info = json_line(&py("ocigen.py", &["full", img.to_str().unwrap()]));
    let image_ref = info["ref"].as_str().unwrap();
    let conv = dir.path().join("conv");
    convert(image_ref, &conv, &[]);
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    assert_tree_matches_reference("lazy mount", &m.mnt, image_ref, dir.path());
    assert_eq!(d.status()["health"]["reads_failed"], 0, "{}", d.log_text());
    m.umount();
}

#[test]
fn b_parallel_random_readers_are_byte_exact() {
    if !require("b_parallel_random_readers_are_byte_exact", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let reference = reference_mount(&conv, dir.path());
    let want = read_all(&reference.dir);
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let files: Vec<(PathBuf, usize)> = want
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(p, v)| (p.clone(), v.len()))
        .collect();
    std::thread::scope(|s| {
        for t in 0..32u64 {
            let (files, want, mnt) = (&files, &want, &m.mnt);
            s.spawn(move || {
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t * 7919);
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for _ in 0..16 {
                    let (p, len) = &files[(next() % files.len() as u64) as usize];
                    let off = (next() % *len as u64) as usize;
                    let n = 1 + (next() % (*len - off).min(512 * 1024) as u64) as usize;
                    let f = std::fs::File::open(mnt.join(p)).unwrap();
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(
                        buf == want[p][off..off + n],
                        "thread {t}: {} at {off}+{n} differs",
                        p.display()
                    );
                }
            });
        }
    });
    assert_eq!(read_all(&m.mnt), want);
    m.umount();
}

#[test]
fn c_corrupt_chunk_gives_eio_and_never_reaches_the_cache() {
    if !require(
        "c_corrupt_chunk_gives_eio_and_never_reaches_the_cache",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let noise = |seed: u64, n: usize| -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut good = b"KITE-MARKER-GOOD-7f3a".to_vec();
    good.extend(noise(1, 2 << 20));
    let mut bad = b"KITE-MARKER-BAD-91c2".to_vec();
    bad.extend(noise(2, 1 << 20));
    std::fs::write(src.join("a_good"), &good).unwrap();
    std::fs::write(src.join("z_bad"), &bad).unwrap();
    let conv = dir.path().join("conv");
    convert(&format!("dir:{}", src.display()), &conv, &[]);
    // Random data is stored raw, so the blob is a_good's 3 chunks, then
    // z_bad's first chunk (which carries its marker) and a 20-byte tail.
    // Flip a byte in the middle of z_bad's first chunk.
    let boot = conv.join("bootstrap");
    let summary = kite_ok(&["inspect", boot.to_str().unwrap(), "--summary"]);
    assert!(summary.contains("chunks       5 (5 raw)"), "{summary}");
    let hex = kite_ok(&["inspect", boot.to_str().unwrap(), "--blobs-only"])
        .trim()
        .to_string();
    let blob = conv.join("blobs/sha256").join(&hex);
    let mut data = std::fs::read(&blob).unwrap();
    let pos = data.len() - 20 - (1 << 19);
    data[pos] ^= 0x40;
    std::fs::write(&blob, &data).unwrap();

    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let err = std::fs::read(m.mnt.join("z_bad")).expect_err("reading a corrupt chunk must fail");
    assert!(is_eio(&err), "expected EIO, got {err}");
    assert_eq!(std::fs::read(m.mnt.join("a_good")).unwrap(), good);
    assert!(d.blob_sum("corrupt_chunks") >= 1);
    // Inspect the cache file with the daemon gone: while it runs, the file
    // is marked and reading it would itself raise (and be denied) events.
    m.umount();
    let cache = d.cache.clone();
    d.stop();
    let cached = std::fs::read(cache.join("blobs").join(&hex)).unwrap();
    let has = |needle: &[u8]| cached.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(b"KITE-MARKER-GOOD-7f3a"),
        "the check cannot see cached data"
    );
    assert!(
        !has(b"KITE-MARKER-BAD-91c2"),
        "corrupt bytes reached the cache"
    );
}

#[test]
fn d_backend_gone_gives_eio_within_the_timeout() {
    if !require(
        "d_backend_gone_gives_eio_within_the_timeout",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let server = RangeServer::start(&conv);
    let d = Daemon::start(dir.path(), &["--fetch-timeout", "3"]);
    let m = d.mount(
        &conv,
        &dir.path().join("mnt"),
        &["--backend-url", &server.url],
    );
    assert_eq!(
        std::fs::read(m.mnt.join("opt/app/README")).unwrap(),
        b"A small demo app for kite's README.\n"
    );
    assert!(server.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    server.stop();
    let t = Instant::now();
    let err = std::fs::read(m.mnt.join("opt/app/models/weights.bin")).expect_err("backend is gone");
    assert!(is_eio(&err), "expected EIO, got {err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    drop(m);

    // A backend that accepts and never answers: EIO after the timeout.
    // (Another image: a registered fsid keeps the backend it came with.)
    let src = dir.path().join("src2");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("file"), vec![7u8; 300_000]).unwrap();
    let conv2 = dir.path().join("conv2");
    convert(&format!("dir:{}", src.display()), &conv2, &[]);
    let (url, _h) = hanging_server();
    let m2 = d.mount(&conv2, &dir.path().join("mnt2"), &["--backend-url", &url]);
    let t = Instant::now();
    let err = std::fs::read(m2.mnt.join("file")).expect_err("backend hangs");
    assert!(is_eio(&err), "expected EIO, got {err}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

#[test]
fn e_warm_restart_fetches_nothing() {
    if !require("e_warm_restart_fetches_nothing", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let first = read_all(&m.mnt);
    assert!(d.backend_requests() > 0);
    m.umount();
    d.stop();

    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    drop_caches();
    assert_eq!(read_all(&m.mnt), first);
    assert_eq!(
        d.backend_requests(),
        0,
        "warm cache refetched: {}",
        d.log_text()
    );
    assert_eq!(
        d.blob_sum("events"),
        0,
        "complete blobs should not be marked after restart"
    );
    m.umount();
}

#[test]
fn e_a_corrupt_fetch_state_is_never_trusted() {
    if !require("e_a_corrupt_fetch_state_is_never_trusted", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let reference = reference_mount(&conv, dir.path());
    let want = read_all(&reference.dir);
    // Read one file: the state on disk says "some chunks fetched".
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let (first, _) = want.iter().max_by_key(|(_, v)| v.len()).unwrap();
    assert_eq!(&std::fs::read(m.mnt.join(first)).unwrap(), &want[first]);
    m.umount();
    let cache = d.cache.clone();
    d.stop();
    // Damage every state file the way a bad disk or a stray write would:
    // every chunk claimed fetched (holes included), checksum untouched.
    let states: Vec<PathBuf> = std::fs::read_dir(cache.join("kite-state"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "fetched"))
        .collect();
    assert!(!states.is_empty(), "no fetch state was saved");
    let mut claimed_holes = false;
    for p in &states {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        for x in &mut b[16..n - 32] {
            claimed_holes |= *x == 0;
            *x = 1;
        }
        std::fs::write(p, b).unwrap();
    }
    assert!(
        claimed_holes,
        "the partial read left no chunk unfetched to lie about"
    );
    // Trusting the damaged map would read the blob files' holes as zeros.
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    drop_caches();
    assert_eq!(read_all(&m.mnt), want, "{}", d.log_text());
    assert!(
        d.log_text().contains("fetch state not used"),
        "the daemon says why it did not use the state:\n{}",
        d.log_text()
    );
    m.umount();
}

#[test]
fn h_background_prefetch_completes_the_image_and_resumes_after_a_worker_crash() {
    if !require(
        "h_background_prefetch_completes_the_image_and_resumes_after_a_worker_crash",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut want = std::collections::BTreeMap::new();
    for i in 0..48u64 {
        let data = noise(700 + i, (1 << 20) - 1000 * i as usize);
        std::fs::write(src.join(format!("f{i:02}")), &data).unwrap();
        want.insert(PathBuf::from(format!("f{i:02}")), data);
    }
    let conv = dir.path().join("conv");
    convert(&format!("dir:{}", src.display()), &conv, &[]);
    // One request per chunk, each answered after 300 ms: the background
    // fetch takes seconds, so the worker dies in the middle of it.
    let server = RangeServer::start(&conv);
    server
        .delay_ms
        .store(300, std::sync::atomic::Ordering::Relaxed);
    let d = Daemon::start(dir.path(), &["--merge-bound", "131072"]);
    let m = d.mount(
        &conv,
        &dir.path().join("mnt"),
        &["--prefetch", "all", "--backend-url", &server.url],
    );
    let image = |d: &Daemon| d.status()["images"][0].clone();
    assert_eq!(image(&d)["prefetch_all"], true, "{}", image(&d));
    let missing = |d: &Daemon| d.blob_sum("missing_chunks");
    let t = Instant::now();
    while d.blob_sum("fetched_chunks") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no background fetch started: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = missing(&d);
    assert!(
        before > 0,
        "the whole image arrived before the crash; the test needs a slower backend"
    );
    let worker = d.worker_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    while d.status()["health"]["pid"].as_i64().unwrap_or(0) as i32 == worker {
        assert!(t.elapsed() < Duration::from_secs(10), "no new worker");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The new worker resumes it; nothing is read meanwhile.
    let t = Instant::now();
    while missing(&d) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "background prefetch did not finish after the crash ({} chunks missing): {}",
            missing(&d),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.log_text().contains("background prefetch resumed"),
        "{}",
        d.log_text()
    );
    // Complete on disk: every byte right, and reading it fetches nothing.
    let requests = server.requests.load(std::sync::atomic::Ordering::Relaxed);
    drop_caches();
    assert!(
        read_all(&m.mnt) == want,
        "the prefetched image reads differently"
    );
    assert_eq!(
        server.requests.load(std::sync::atomic::Ordering::Relaxed),
        requests,
        "reading a complete image fetched again"
    );
    m.umount();
}

#[test]
fn f_shared_layer_is_fetched_once() {
    if !require("f_shared_layer_is_fetched_once", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    py(
        "ocigen.py",
        &["pair", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    let (ca, cb) = (dir.path().join("ca"), dir.path().join("cb"));
    convert(&format!("oci:{}", a.display()), &ca, &[]);
    convert(&format!("oci:{}", b.display()), &cb, &[]);
    let blobs = |c: &Path| {
        kite_ok(&[
            "inspect",
            c.join("bootstrap").to_str().unwrap(),
            "--blobs-only",
        ])
    };
    let (ba, bb) = (blobs(&ca), blobs(&cb));
    let shared = ba.lines().next().unwrap().to_string();
    assert_eq!(
        bb.lines().next().unwrap(),
        shared,
        "images should share their base blob"
    );

    let d = Daemon::start(dir.path(), &[]);
    let ma = d.mount(&ca, &dir.path().join("ma"), &[]);
    read_all(&ma.mnt);
    let shared_fetched = |d: &Daemon| -> u64 {
        d.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["blobs"].as_array().unwrap().clone())
            .find(|b| b["digest"].as_str().unwrap().ends_with(&shared))
            .map(|b| {
                b["fetched_chunks"].as_u64().unwrap() * 1_000_000
                    + b["backend_requests"].as_u64().unwrap()
            })
            .unwrap()
    };
    let before = shared_fetched(&d);
    let mb = d.mount(&cb, &dir.path().join("mb"), &[]);
    drop_caches();
    let got = read_all(&mb.mnt);
    assert!(got.contains_key(Path::new("app/only-1.bin")));
    assert_eq!(
        shared_fetched(&d),
        before,
        "the shared blob was fetched again"
    );
    // Image b's backend served only b's own blob.
    let status = d.status();
    let img_b = status["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["source"].as_str().unwrap().contains("/cb/"))
        .unwrap()
        .clone();
    let own = &img_b["blobs"][1];
    assert!(own["backend_bytes"].as_u64().unwrap() <= own["compressed_size"].as_u64().unwrap());
    ma.umount();
    mb.umount();
}

#[test]
fn g_one_small_file_of_a_1gb_image_fetches_one_chunk() {
    if !require(
        "g_one_small_file_of_a_1gb_image_fetches_one_chunk",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    {
        // 1 GiB, every 1 MiB chunk different (its index) and compressible.
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(src.join("big")).unwrap());
        let mut chunk = vec![b'k'; 1 << 20];
        for i in 0..1024u64 {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&chunk).unwrap();
        }
    }
    let small: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(src.join("small"), &small).unwrap();
    let conv = dir.path().join("conv");
    convert(&format!("dir:{}", src.display()), &conv, &[]);
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    assert_eq!(std::fs::read(m.mnt.join("small")).unwrap(), small);
    let st = d.status();
    let blob = &st["images"][0]["blobs"][0];
    assert!(blob["uncompressed_size"].as_u64().unwrap() >= 1 << 30);
    assert_eq!(blob["backend_requests"], 1, "{blob}");
    assert!(blob["backend_bytes"].as_u64().unwrap() <= 4096, "{blob}");
    m.umount();
}

#[test]
fn complete_blob_raises_no_event_after_drop_caches() {
    if !require(
        "complete_blob_raises_no_event_after_drop_caches",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let first = read_all(&m.mnt);
    // Every blob is complete now (all files read).
    let st = d.status();
    let blobs = st["images"][0]["blobs"].as_array().unwrap().clone();
    for b in &blobs {
        assert_eq!(b["fetched_chunks"], b["chunks"], "{b}");
    }
    // The marks go after the blob files are synced and their state saved,
    // on the blocking pool, a moment after the last chunk: wait for that.
    let t = Instant::now();
    while d
        .log_text()
        .matches("blob complete on disk: mark removed")
        .count()
        < blobs.len()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "complete blobs were not unmarked: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = d.blob_sum("events");
    drop_caches();
    assert_eq!(read_all(&m.mnt), first);
    assert_eq!(
        d.blob_sum("events"),
        events,
        "a complete blob raised events"
    );
    m.umount();
}

#[test]
fn chunks_of_deleted_files_do_not_keep_a_blob_watched() {
    let test = "chunks_of_deleted_files_do_not_keep_a_blob_watched";
    if !require(test, fanotify_path()) {
        return;
    }
    // The full image deletes and replaces files of lower layers, so its
    // lower blobs hold chunks no file of the merged tree points at.
    let dir = tempdir();
    let img = dir.path().join("img");
    py("ocigen.py", &["full", img.to_str().unwrap(), "--no-sparse"]);
    let conv = dir.path().join("conv");
    convert(&format!("oci:{}", img.display()), &conv, &[]);
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let first = read_all(&m.mnt);
    let st = d.status();
    let blobs = st["images"][0]["blobs"].as_array().unwrap().clone();
    assert!(
        blobs.iter().any(|b| b["fetched_chunks"].as_u64() < b["chunks"].as_u64()),
        "every chunk was read: the image has no unreferenced chunks, so this test shows nothing: {blobs:?}"
    );
    // Every referenced chunk is on disk: the marks are gone, and reads
    // after drop_caches raise no event.
    std::thread::sleep(Duration::from_millis(300));
    let events = d.blob_sum("events");
    drop_caches();
    assert_eq!(read_all(&m.mnt), first);
    assert_eq!(
        d.blob_sum("events"),
        events,
        "a blob with only unreferenced chunks missing is still watched"
    );
    m.umount();
}

#[test]
fn bootstraps_are_locked_in_memory_while_mounted_within_the_budget() {
    if !require(
        "bootstraps_are_locked_in_memory_while_mounted_within_the_budget",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let size = std::fs::metadata(conv.join("bootstrap")).unwrap().len();
    let pinned = |d: &Daemon| d.status()["health"]["pinned_bytes"].as_u64().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    assert_eq!(pinned(&d), size, "bootstrap not locked after mount");
    m.umount();
    assert_eq!(
        pinned(&d),
        0,
        "lock not released when the image is forgotten"
    );
    d.stop();
    // A zero budget locks nothing; the mount works the same.
    let d = Daemon::start(dir.path(), &["--pin-metadata-mib", "0"]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    assert_eq!(pinned(&d), 0);
    assert!(!read_all(&m.mnt).is_empty());
    m.umount();
}

#[test]
fn mmap_exec_and_import_work_on_a_cold_cache() {
    if !require("mmap_exec_and_import_work_on_a_cold_cache", fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("kmod")).unwrap();
    std::fs::write(
        src.join("kmod/__init__.py"),
        "ANSWER = 42\ndef answer():\n    return ANSWER\n",
    )
    .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("data.bin"), &data).unwrap();
    std::fs::copy("/bin/echo", src.join("echo")).unwrap();
    let conv = dir.path().join("conv");
    convert(
        &format!("dir:{}", src.display()),
        &conv,
        &["--chunk-size", "64K"],
    );
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    let mnt = m.mnt.to_str().unwrap().to_string();
    let script = format!(
        "import sys, mmap, hashlib; sys.path.insert(0, {mnt:?}); import kmod; \
         f = open({mnt:?} + '/data.bin', 'rb'); mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); \
         print(kmod.answer(), hashlib.sha256(mm).hexdigest())"
    );
    let out = std::process::Command::new("python3")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use sha2::Digest;
    let want = format!("42 {:x}\n", sha2::Sha256::digest(&data));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let out = std::process::Command::new(m.mnt.join("echo"))
        .arg("hello from the image")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the image\n"
    );
    m.umount();
}

#[test]
fn a_recorded_profile_is_prefetched_on_the_next_cold_mount() {
    let test = "a_recorded_profile_is_prefetched_on_the_next_cold_mount";
    if !require(test, fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // One layer, 64 KiB chunks: a and c one chunk each, b four, d (never
    // read while recording) four.
    let files = [
        ("a", noise(1, 10_000)),
        ("b", noise(2, 3 * 65536 + 100)),
        ("c", noise(3, 5_000)),
        ("d", noise(4, 4 * 65536)),
    ];
    for (name, data) in &files {
        std::fs::write(src.join(name), data).unwrap();
    }
    let conv = dir.path().join("conv");
    convert(
        &format!("dir:{}", src.display()),
        &conv,
        &["--chunk-size", "64K"],
    );

    // Record: a cold run reading a, b, c.
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let d = Daemon::start(&rec, &[]);
    let m = d.mount(&conv, &rec.join("mnt"), &[]);
    for (name, data) in &files[..3] {
        assert_eq!(&std::fs::read(m.mnt.join(name)).unwrap(), data);
    }
    let n = d.save_profile(&m.mnt, &conv);
    assert_eq!(n, 6, "a, b and c are 6 chunks");
    m.umount();
    d.stop();

    // Replay on a fresh cache: the first read hands the daemon the blob
    // file, and the prefetcher fetches the rest of the profile with no
    // reader asking; reading b and c then costs no request; d (not in the
    // profile) is fetched on demand.
    let rep = dir.path().join("rep");
    std::fs::create_dir_all(&rep).unwrap();
    let d = Daemon::start(&rep, &[]);
    let m = d.mount(&conv, &rep.join("mnt"), &[]);
    assert!(
        d.log_text().contains("prefetch profile queued"),
        "{}",
        d.log_text()
    );
    assert_eq!(&std::fs::read(m.mnt.join("a")).unwrap(), &files[0].1);
    let t = Instant::now();
    while d.blob_sum("fetched_chunks") < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "profile not prefetched: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        d.blob_sum("fetched_chunks"),
        n,
        "fetched beyond the profile"
    );
    assert!(d.blob_sum("prefetched_chunks") >= n - 1);
    let requests = d.backend_requests();
    for (name, data) in &files[1..3] {
        assert_eq!(&std::fs::read(m.mnt.join(name)).unwrap(), data);
    }
    assert_eq!(
        d.backend_requests(),
        requests,
        "reads of prefetched files went to the backend"
    );
    assert_eq!(&std::fs::read(m.mnt.join("d")).unwrap(), &files[3].1);
    assert!(d.backend_requests() > requests);
    m.umount();

    // A damaged profile is refused at mount, naming it; nothing is mounted.
    let pf = conv.join("prefetch");
    let bytes = std::fs::read(&pf).unwrap();
    std::fs::write(&pf, &bytes[..bytes.len() - 3]).unwrap();
    let mnt = rep.join("mnt2");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = kite(&[
        "mount",
        conv.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--socket",
        d.socket.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("prefetch profile") && err.contains(pf.to_str().unwrap()),
        "{err}"
    );
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(mnt.to_str().unwrap()));
    // --no-prefetch ignores it.
    let m = d.mount(&conv, &mnt, &["--no-prefetch"]);
    assert_eq!(&std::fs::read(m.mnt.join("c")).unwrap(), &files[2].1);
    m.umount();
}

#[test]
fn a_mount_reads_ahead_one_chunk() {
    let test = "a_mount_reads_ahead_one_chunk";
    if !require(test, fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), noise(9, 300_000)).unwrap();
    let conv = dir.path().join("conv");
    convert(
        &format!("dir:{}", src.display()),
        &conv,
        &["--chunk-size", "256K"],
    );
    let d = Daemon::start(dir.path(), &[]);
    let ra_of = |out: &str| -> u64 {
        let bdi = out
            .split(['(', ')'])
            .find(|w| w.starts_with("erofs-"))
            .unwrap_or_else(|| panic!("no bdi in {out:?}"));
        std::fs::read_to_string(format!("/sys/class/bdi/{bdi}/read_ahead_kb"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock = d.socket.to_str().unwrap().to_string();
    let m = mnt.to_str().unwrap();
    // The image's chunk size, not the kernel's 128 KiB.
    let out = kite_ok(&["mount", conv.to_str().unwrap(), m, "--socket", &sock]);
    assert!(out.contains("readahead 256 KiB"), "{out}");
    assert_eq!(ra_of(&out), 256);
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), noise(9, 300_000));
    kite_ok(&["umount", m, "--socket", &sock]);
    // Or what the user asks for.
    let out = kite_ok(&[
        "mount",
        conv.to_str().unwrap(),
        m,
        "--socket",
        &sock,
        "--read-ahead-kb",
        "2048",
    ]);
    assert_eq!(ra_of(&out), 2048);
    kite_ok(&["umount", m, "--socket", &sock]);
}

/// The mount options of `mnt` in /proc/self/mountinfo.
fn mount_options(mnt: &Path) -> Option<String> {
    let want = mnt.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4).map(std::path::PathBuf::from) == Some(want.clone()))
            .then(|| f.last().unwrap_or(&"").to_string())
    })
}

#[test]
fn a_complete_image_is_remounted_with_direct_io() {
    let test = "a_complete_image_is_remounted_with_direct_io";
    if !require(test, fanotify_path()) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    let d = Daemon::start(dir.path(), &[]);
    let m = d.mount(&conv, &dir.path().join("mnt"), &[]);
    // Buffered while chunks are being written.
    let opts = mount_options(&m.mnt).unwrap();
    assert!(!opts.contains("directio"), "{opts}");
    let first = read_all(&m.mnt);
    let t = Instant::now();
    while !mount_options(&m.mnt).unwrap().contains("directio") {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not remounted with direct I/O after the image completed: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.status()["images"][0]["direct_io_mounts"][0][1],
        true,
        "{}",
        d.status()
    );
    // The same bytes, now read from the blob files directly.
    drop_caches();
    assert!(
        read_all(&m.mnt) == first,
        "contents changed after the remount"
    );
    m.umount();
}

#[test]
fn a_directory_image_whose_bootstrap_changed_after_conversion_is_refused() {
    if !require(
        "a_directory_image_whose_bootstrap_changed_after_conversion_is_refused",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let conv = example(dir.path());
    // One byte of a file name in the metadata: an image that still parses
    // and validates, but is not the image the manifest names.
    let boot = conv.join("bootstrap");
    let mut bytes = std::fs::read(&boot).unwrap();
    let name = bytes
        .windows(4)
        .position(|w| w == b"etc\0" || w == b"usr\0" || w == b"bin\0")
        .or_else(|| bytes.windows(3).position(|w| w == b"etc"))
        .expect("a directory name in the example bootstrap");
    bytes[name] ^= 0x01;
    std::fs::write(&boot, &bytes).unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let o = kite(&[
        "mount",
        conv.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--socket",
        d.socket.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "a tampered bootstrap was mounted");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the image's manifest names sha256:"), "{err}");
    assert!(
        err.contains(boot.to_str().unwrap()),
        "the error names the file: {err}"
    );
    assert_eq!(d.status()["images"].as_array().map_or(0, |a| a.len()), 0);
}
