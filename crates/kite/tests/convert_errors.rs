//! Bad input: every kind of broken image is refused with an error naming
//! the layer digest and the tar entry, a non-zero exit status, and nothing
//! left under `--to` (not even a staging directory beside it).

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
    assert!(
        !out.exists(),
        "{kind}: partial output left at {}",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kite-tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{kind}: staging left behind: {leftovers:?}"
    );
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
