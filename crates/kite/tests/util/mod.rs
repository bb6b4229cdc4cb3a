//! Shared helpers for end-to-end tests of the `kite` binary: fresh temp
//! dirs, running kite and the Python test tools, mounting images, and the
//! skip policy for tests that need root or a kernel feature.
//!
//! Skip policy: outside CI a missing prerequisite skips the test loudly (a
//! line on stderr and in `target/kite-skipped-tests.txt`, which the test
//! command prints at the end); with `CI=true` it fails the test.

#![allow(dead_code)]

pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod ocilayout;
pub mod registry;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kite_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kite"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn tool(name: &str) -> PathBuf {
    repo_root().join("tests/tools").join(name)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kite-test-")
        .tempdir()
        .expect("tempdir")
}

/// Run kite with `args`; returns the output (no assertion on status).
pub fn kite(args: &[&str]) -> Output {
    Command::new(kite_bin())
        .args(args)
        .output()
        .expect("run kite")
}

/// Run kite and require success; returns stdout.
pub fn kite_ok(args: &[&str]) -> String {
    let out = kite(args);
    assert!(
        out.status.success(),
        "kite {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 stdout")
}

/// Run a Python tool from tests/tools and require success; returns stdout.
pub fn py(name: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(tool(name))
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 stdout")
}

/// Apply the skip policy. Returns true if the test may run.
pub fn require(test: &str, prereq: Result<(), String>) -> bool {
    let Err(why) = prereq else { return true };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: prerequisite missing in CI: {why}");
    }
    let line = format!("SKIPPED {test}: {why} (runs in CI, where this is a failure)");
    eprintln!("{line}");
    let list = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../kite-skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
    {
        let _ = writeln!(f, "{line}");
    }
    false
}

/// Root and file-backed EROFS (mount(2) with a regular file as source).
pub fn erofs_file_backed() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("erofs")) {
        return Err("kernel has no EROFS".into());
    }
    Ok(())
}

/// A mounted EROFS image, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// Mount `bootstrap` file-backed with `devices` as its blobs, read-only.
    pub fn erofs(bootstrap: &Path, devices: &[PathBuf], dir: &Path) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let opts: Vec<String> = devices
            .iter()
            .map(|d| format!("device={}", d.display()))
            .collect();
        let data = opts.join(",");
        nix::mount::mount(
            Some(bootstrap),
            dir,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            if data.is_empty() {
                None
            } else {
                Some(data.as_str())
            },
        )
        .map_err(|e| format!("mount -t erofs {} ({data}): {e}", bootstrap.display()))?;
        Ok(Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Unpack every blob of a converted directory; returns the raw device
/// files in device-table order.
pub fn unpack_all(conv: &Path, into: &Path) -> Vec<PathBuf> {
    let boot = conv.join("bootstrap");
    let boot_s = boot.to_str().unwrap();
    kite_ok(&["inspect", boot_s, "--blobs-only"])
        .lines()
        .map(|hex| {
            let raw = into.join(format!("{hex}.raw"));
            let blob = conv.join("blobs/sha256").join(hex);
            kite_ok(&[
                "unpack",
                "--bootstrap",
                boot_s,
                blob.to_str().unwrap(),
                "-o",
                raw.to_str().unwrap(),
            ]);
            raw
        })
        .collect()
}

/// Parse the JSON line a generator prints.
pub fn json_line(s: &str) -> serde_json::Value {
    let line = s
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .expect("a JSON line");
    serde_json::from_str(line).expect("valid JSON")
}

/// `kite convert --quiet --from FROM --to OUT EXTRA...`, requiring success.
pub fn convert(from: &str, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert",
        "--quiet",
        "--from",
        from,
        "--to",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kite_ok(&args);
}

/// Compare the tree mounted at `mnt` with tests/tools/refapply.py's
/// independent application of `image_ref`, field by field (manifests are
/// written under `dir`).
pub fn assert_tree_matches_reference(what: &str, mnt: &Path, image_ref: &str, dir: &Path) {
    let got = dir.join("mounted.json");
    py(
        "treemanifest.py",
        &[mnt.to_str().unwrap(), "-o", got.to_str().unwrap()],
    );
    let want = dir.join("reference.json");
    py("refapply.py", &[image_ref, "-o", want.to_str().unwrap()]);
    let diff = Command::new("python3")
        .arg(tool("manifestdiff.py"))
        .args([want.to_str().unwrap(), got.to_str().unwrap()])
        .output()
        .expect("run manifestdiff.py");
    assert!(
        diff.status.success(),
        "{what}: mounted tree differs from the reference:\n{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
}

/// Every regular file under `root` (full paths), sorted.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Every regular file under `root`, with its content.
pub fn read_all(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(root)
        .into_iter()
        .map(|p| {
            let data =
                std::fs::read(&p).unwrap_or_else(|err| panic!("reading {}: {err}", p.display()));
            (p.strip_prefix(root).unwrap().to_path_buf(), data)
        })
        .collect()
}

/// Deterministic incompressible-ish bytes (no chunk dedups away).
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
