//! The mount helper as mount(8) calls it, and the daemon's refusal of a
//! kernel path the running kernel lacks.

mod util;
use std::process::Command;
use util::daemon::{fanotify_path, Daemon};
use util::*;

#[test]
fn mount_kite_called_like_mount_8_mounts_lazily() {
    if !require(
        "mount_kite_called_like_mount_8_mounts_lazily",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello"), b"from mount.kite\n").unwrap();
    let conv = dir.path().join("conv");
    convert(&format!("dir:{}", src.display()), &conv, &[]);
    let d = Daemon::start(dir.path(), &[]);
    // mount -t kite SOURCE DIR runs /sbin/mount.kite SOURCE DIR -o OPTIONS.
    let helper = dir.path().join("mount.kite");
    std::os::unix::fs::symlink(kite_bin(), &helper).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new(&helper)
        .args([conv.to_str().unwrap(), mnt.to_str().unwrap(), "-o", "ro"])
        .env("KITE_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.kite failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(mnt.join("hello")).unwrap(),
        b"from mount.kite\n"
    );
    let out = Command::new(kite_bin())
        .args(["umount", mnt.to_str().unwrap()])
        .env("KITE_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn daemon_names_the_options_a_forced_kernel_path_lacks() {
    let f = kite_kernel::features::Features::probe();
    let (path, needle) = if !f.cachefiles_missing().is_empty() {
        ("cachefiles", "CACHEFILES_ONDEMAND")
    } else if !f.fanotify_missing().is_empty() {
        ("fanotify", "FANOTIFY_ACCESS_PERMISSIONS")
    } else {
        require(
            "daemon_names_the_options_a_forced_kernel_path_lacks",
            Err("this kernel offers both paths; nothing is missing".into()),
        );
        return;
    };
    let dir = tempdir();
    let out = kite(&[
        "daemon",
        "--kernel-path",
        path,
        "--cache-dir",
        dir.path().join("cache").to_str().unwrap(),
        "--socket",
        dir.path().join("s").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(needle) && stderr.contains(&f.release),
        "{stderr}"
    );
}
