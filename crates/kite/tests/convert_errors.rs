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
