//! Bad input: every kind of broken image is refused with an error naming
//! the layer digest and the tar entry, a non-zero exit status, and nothing
//! left under `--to` (not even a staging directory beside it). So is an
//! interrupted conversion: SIGTERM leaves nothing, and the staging
//! directory a SIGKILL leaves is removed by the next conversion.

mod util;
use util::*;

fn assert_refused(kind: &str) {
    let dir = tempdir();
    let img = dir.path().join("img");
    let info = json_line(&py("ocigen.py", &["bad", kind, img.to_str().unwrap()]));
    let out = dir.path().join("out");
    let r = kite(&[
        "convert",
        "--quiet",
        "--from",
        info["ref"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{kind}: expected exit 1, stderr: {stderr}"
    );
    if let Some(layer) = info["layer_digest"].as_str() {
        assert!(
            stderr.contains(layer),
            "{kind}: error does not name layer {layer}: {stderr}"
        );
    }
    if let Some(entry) = info["entry"].as_str() {
        assert!(
            stderr.contains(entry),
            "{kind}: error does not name entry {entry}: {stderr}"
        );
    }
    // Whatever else the error must name (expected and actual diff_ids...).
    for name in info["names"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap();
        assert!(
            stderr.contains(name),
            "{kind}: error does not name {name}: {stderr}"
        );
    }
    assert_nothing_left(kind, dir.path(), &out);
}

/// Neither `out` nor a staging directory beside it in `dir`.
fn assert_nothing_left(what: &str, dir: &std::path::Path, out: &std::path::Path) {
    assert!(
        !out.exists(),
        "{what}: partial output left at {}",
        out.display()
    );
    let leftovers = staging_dirs(dir);
    assert!(
        leftovers.is_empty(),
        "{what}: staging left behind: {leftovers:?}"
    );
}

fn staging_dirs(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kite-tmp"))
        .collect()
}

macro_rules! refused {
    ($($name:ident => $kind:literal),* $(,)?) => {$(
        #[test]
        fn $name() {
            assert_refused($kind);
        }
    )*};
}

refused! {
    truncated_gzip_is_refused => "truncated-gzip",
    corrupt_zstd_is_refused => "corrupt-zstd",
    truncated_tar_is_refused => "truncated-tar",
    dotdot_entry_is_refused => "dotdot-entry",
    absolute_path_is_refused => "absolute-path",
    entry_written_through_symlink_is_refused => "symlink-escape",
    hardlink_to_missing_target_is_refused => "hardlink-missing",
    name_over_255_bytes_is_refused => "long-name",
    layer_digest_mismatch_is_refused => "digest-mismatch",
    index_without_matching_platform_is_refused => "no-platform",
    whiteout_of_dot_is_refused => "dot-whiteout",
    whiteout_of_dotdot_is_refused => "dotdot-whiteout",
    device_number_too_big_for_erofs_is_refused => "big-device",
    layer_size_mismatch_is_refused => "size-mismatch",
    config_with_all_zero_diff_ids_is_refused => "zero-diff-ids",
    config_with_another_layers_diff_id_is_refused => "wrong-diff-id",
    config_with_a_diff_id_missing_is_refused => "diff-id-count",
    config_of_media_type_text_plain_is_refused => "text-plain-config",
}

#[test]
fn a_size_only_mismatch_is_reported_as_a_size_mismatch() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let info = json_line(&py(
        "ocigen.py",
        &["bad", "size-mismatch", img.to_str().unwrap()],
    ));
    let r = kite(&[
        "convert",
        "--quiet",
        "--from",
        info["ref"].as_str().unwrap(),
        "--to",
        dir.path().join("out").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("size mismatch") && !stderr.contains("digest mismatch"),
        "{stderr}"
    );
}

#[test]
fn no_platform_error_lists_available_platforms() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let info = json_line(&py(
        "ocigen.py",
        &["bad", "no-platform", img.to_str().unwrap()],
    ));
    let out = dir.path().join("out");
    let r = kite(&[
        "convert",
        "--quiet",
        "--from",
        info["ref"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("linux/amd64") && stderr.contains("linux/s390x"),
        "{stderr}"
    );
}

#[test]
fn existing_nonempty_output_is_not_touched() {
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious"), b"keep me").unwrap();
    let r = kite(&[
        "convert",
        "--quiet",
        "--from",
        &format!("dir:{}", src.display()),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not empty"));
    assert_eq!(std::fs::read(out.join("precious")).unwrap(), b"keep me");
}

#[test]
fn bad_chunk_sizes_are_usage_errors() {
    let dir = tempdir();
    for cs in ["3K", "2K", "32M", "banana"] {
        let r = kite(&[
            "convert",
            "--from",
            "dir:/nonexistent",
            "--to",
            dir.path().join("o").to_str().unwrap(),
            "--chunk-size",
            cs,
        ]);
        assert_eq!(r.status.code(), Some(1), "{cs}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("chunk size"),
            "{cs}"
        );
    }
}

#[test]
fn the_staging_left_by_a_killed_conversion_is_removed_by_the_next() {
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    // A conversion that was killed: its process is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    // One that is still running.
    let mut live = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let stale = dir.path().join(format!(".out.kite-tmp-{dead}"));
    let running = dir.path().join(format!(".out.kite-tmp-{}", live.id()));
    for d in [&stale, &running] {
        std::fs::create_dir_all(d.join("blobs/sha256")).unwrap();
        std::fs::write(d.join("bootstrap"), b"partial").unwrap();
    }
    let out = dir.path().join("out");
    kite_ok(&[
        "convert",
        "--quiet",
        "--from",
        &format!("dir:{}", src.display()),
        "--to",
        out.to_str().unwrap(),
    ]);
    let _ = live.kill();
    let _ = live.wait();
    assert!(
        !stale.exists(),
        "the dead conversion's staging is still there"
    );
    assert!(
        running.exists(),
        "a running conversion's staging was removed"
    );
    assert!(out.join("bootstrap").is_file());
}

/// A conversion of an `ocigen.py stalled` image, running: its second
/// layer is a named pipe that the test feeds (or not).
struct Stalled {
    dir: tempfile::TempDir,
    info: serde_json::Value,
    out: std::path::PathBuf,
    child: std::process::Child,
}

impl Stalled {
    fn start() -> Self {
        let dir = tempdir();
        let img = dir.path().join("img");
        let info = json_line(&py("ocigen.py", &["stalled", img.to_str().unwrap()]));
        let out = dir.path().join("out");
        let child = std::process::Command::new(kite_bin())
            .args([
                "convert",
                "--quiet",
                "--from",
                info["ref"].as_str().unwrap(),
                "--to",
                out.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            dir,
            info,
            out,
            child,
        }
    }

    fn staging(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!(".out.kite-tmp-{}", self.child.id()))
    }

    /// Wait until the conversion has made its staging directory.
    fn wait_for_staging(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.staging().is_dir() {
            assert!(std::time::Instant::now() < deadline, "no staging directory");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Feed the pipe a tar of one endless file of zeros from a thread,
    /// until the reader goes away; returns once `min` bytes went in.
    fn feed(&self, min: u64) -> std::thread::JoinHandle<()> {
        use std::io::Write;
        let fifo = std::path::PathBuf::from(self.info["fifo"].as_str().unwrap());
        let head = hex::decode(self.info["tar_head"].as_str().unwrap()).unwrap();
        let fed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = std::sync::Arc::clone(&fed);
        let t = std::thread::spawn(move || {
            // Opening blocks until the conversion opens its end.
            let mut pipe = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            pipe.write_all(&head).unwrap();
            let zeros = vec![0u8; 1 << 20];
            // Ends with EPIPE when the conversion is gone (SIGPIPE is
            // ignored in Rust programs).
            while pipe.write_all(&zeros).is_ok() {
                counter.fetch_add(zeros.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while fed.load(std::sync::atomic::Ordering::SeqCst) < min {
            assert!(
                std::time::Instant::now() < deadline,
                "the conversion reads nothing"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        t
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    fn wait(self) -> (std::process::Output, tempfile::TempDir, std::path::PathBuf) {
        let out = self.child.wait_with_output().unwrap();
        (out, self.dir, self.out)
    }
}

#[test]
fn sigterm_mid_conversion_leaves_nothing() {
    let conv = Stalled::start();
    conv.wait_for_staging();
    // Mid-layer: 32 MiB of the endless file have gone in.
    let feeder = conv.feed(32 << 20);
    conv.signal(nix::sys::signal::Signal::SIGTERM);
    let (r, dir, out) = conv.wait();
    feeder.join().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(143), "{stderr}");
    // The conversion itself stopped (at its next chunk), not the watcher
    // after its grace period.
    assert!(
        stderr.contains("interrupted (SIGTERM); nothing was written"),
        "{stderr}"
    );
    assert_nothing_left("SIGTERM", dir.path(), &out);
}

#[test]
fn sigint_while_blocked_on_a_read_leaves_nothing() {
    // Nobody ever writes the pipe: the conversion never gets to look at
    // its interrupt, and the signal watcher removes the staging directory
    // itself after its grace period.
    let conv = Stalled::start();
    conv.wait_for_staging();
    conv.signal(nix::sys::signal::Signal::SIGINT);
    let (r, dir, out) = conv.wait();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("did not stop, removed"), "{stderr}");
    assert_nothing_left("SIGINT", dir.path(), &out);
}

#[test]
fn sigkill_mid_conversion_then_a_rerun_cleans_up() {
    let conv = Stalled::start();
    conv.wait_for_staging();
    let feeder = conv.feed(32 << 20);
    let staging = conv.staging();
    conv.signal(nix::sys::signal::Signal::SIGKILL);
    let (r, dir, out) = conv.wait();
    feeder.join().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&r.status),
        Some(9)
    );
    assert!(
        staging.is_dir(),
        "SIGKILL cleaned up? (the test needs it not to)"
    );
    // The next conversion to the same output removes it.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    kite_ok(&[
        "convert",
        "--quiet",
        "--from",
        &format!("dir:{}", src.display()),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("bootstrap").is_file());
    assert_eq!(staging_dirs(dir.path()), Vec::<String>::new());
}
