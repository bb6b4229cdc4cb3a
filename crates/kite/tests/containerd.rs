//! kite as containerd's snapshotter, end to end: Debian's containerd 1.6
//! and runc, a `kite snapshotter` and a `kite daemon` (children of the
//! test), and images on a `docker-registry` on 127.0.0.1. Pods are driven
//! through CRI as kubelet does (PullImage, RunPodSandbox, CreateContainer,
//! StartContainer), lazy pulls without CRI through `ctr-remote images
//! rpull`.
//!
//! Needs root, the fanotify path (Linux >= 6.14), containerd, runc,
//! ctr-remote, skopeo, busybox-static and docker-registry (ci/setup
//! installs them). Skipped loudly elsewhere, a failure in CI.

mod util;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::containerd::{containerd_available, unmount_under, Containerd, Snapshotter};
use util::cri::{Cri, Pod};
use util::daemon::Daemon;
use util::registry::Registry;
use util::*;

/// Everything a test needs, torn down in order (containers, containerd,
/// snapshotter, daemon, registry), then whatever is still mounted.
struct World {
    cri: Cri,
    ctrd: Containerd,
    snap: Snapshotter,
    daemon: Daemon,
    reg: Registry,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

fn world(test: &str) -> Option<World> {
    if !require(test, containerd_available()) {
        return None;
    }
    let dir = tempdir();
    let d = dir.path();
    let reg = Registry::start(&d.join("registry"), None);
    // The pod sandbox ("pause") image: an ordinary image, as kubelet's is.
    let pause = format!("{}/kite-test/pause:1", reg.addr);
    let src = d.join("pause-src");
    py(
        "ocigen.py",
        &[
            "runnable",
            src.to_str().unwrap(),
            "--payload-mb",
            "0",
            "--cmd",
            r#"["/bin/sleep", "2147483647"]"#,
        ],
    );
    push_plain(&src, &pause);
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    let daemon = Daemon::start(&d.join("daemon"), &[]);
    let snap = Snapshotter::start(&d.join("snapshotter"), &daemon.socket);
    let ctrd = Containerd::start(&d.join("containerd"), &snap.address, &pause);
    let cri = ctrd.cri();
    Some(World {
        cri,
        ctrd,
        snap,
        daemon,
        reg,
        dir,
    })
}

/// Push an OCI layout as an ordinary image (skopeo, plain HTTP).
fn push_plain(src: &Path, reference: &str) {
    let o = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", src.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        o.status.success(),
        "skopeo copy to {reference}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A runnable image converted and pushed as a kite image: (source layout,
/// converted directory).
fn push_kite(
    w: &World,
    name: &str,
    payload_mb: u32,
    message: &str,
    reference: &str,
) -> (PathBuf, PathBuf) {
    let d = w.dir.path();
    let src = d.join(format!("{name}-src"));
    py(
        "ocigen.py",
        &[
            "runnable",
            src.to_str().unwrap(),
            "--payload-mb",
            &payload_mb.to_string(),
            "--message",
            message,
        ],
    );
    let conv = d.join(format!("{name}-kite"));
    convert(&format!("oci:{}", src.display()), &conv, &[]);
    kite_ok(&["push", conv.to_str().unwrap(), reference]);
    (src, conv)
}

fn stored_bytes(conv: &Path) -> u64 {
    std::fs::read_dir(conv.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// The image's fsid: hex sha256 of its bootstrap.
fn fsid_of(conv: &Path) -> String {
    use sha2::Digest;
    let boot = std::fs::read(conv.join("bootstrap")).unwrap();
    sha2::Sha256::digest(&boot)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Layers of the pause image `ocigen.py runnable --payload-mb 0` makes.
const PAUSE_LAYERS: usize = 2;

/// Snapshots containerd's k8s.io namespace has in kite's snapshotter.
fn snapshot_count(w: &World) -> usize {
    let o = w
        .ctrd
        .ctr("k8s.io", &["snapshots", "--snapshotter", "kite", "ls"]);
    assert!(
        o.status.success(),
        "ctr snapshots ls: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).lines().skip(1).count()
}

fn manifest_layers(conv: &Path) -> usize {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conv.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(conv.join("blobs/sha256").join(&mdigest[7..])).unwrap(),
    )
    .unwrap();
    manifest["layers"].as_array().unwrap().len()
}

fn erofs_mounts_of(fsid: &str) -> usize {
    kite_kernel::mount::erofs_mounts()
        .iter()
        .filter(|m| m.fsid == fsid)
        .count()
}

fn daemon_has(daemon: &Daemon, fsid: &str) -> bool {
    daemon.status()["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["fsid"] == fsid)
}

fn run_to_exit(w: &mut World, pod: &Pod, name: &str, image: &str) -> String {
    let id = w
        .cri
        .start(pod, name, image, &[])
        .unwrap_or_else(|e| panic!("{e}\nsnapshotter:\n{}", w.snap.log_text()));
    let code = w.cri.wait_exit(&id, Duration::from_secs(60));
    let out = w.cri.output(pod, name);
    assert_eq!(code, 0, "container {name} exited {code}: {out}");
    out
}

#[test]
fn a_pod_starts_from_a_kite_image_lazily_and_sees_the_source_tree() {
    let Some(mut w) = world("a_pod_starts_from_a_kite_image_lazily_and_sees_the_source_tree")
    else {
        return;
    };
    let image = format!("{}/kite/app:v1", w.reg.addr);
    let (src, conv) = push_kite(&w, "app", 128, "hello from kite", &image);
    let fsid = fsid_of(&conv);
    let pod = w.cri.run_pod("app");

    // Pod requested -> first output: PullImage, create, start.
    let before = w.reg.blob_bytes_served();
    let t = Instant::now();
    w.cri
        .pull(&image)
        .unwrap_or_else(|e| panic!("PullImage: {e}\nsnapshotter:\n{}", w.snap.log_text()));
    let pulled = w.reg.blob_bytes_served() - before;
    let out = run_to_exit(&mut w, &pod, "hello", &image);
    let first_output = t.elapsed();
    let fetched = w.reg.blob_bytes_served() - before;
    let total = stored_bytes(&conv);
    let pct = 100.0 * fetched as f64 / total as f64;
    eprintln!(
        "CRI pull {pulled} bytes; first output after {first_output:?} and {fetched} of {total} bytes ({pct:.2}%)"
    );
    assert_eq!(out, "hello from kite\n");
    assert!(
        pct < 5.0,
        "{fetched} of {total} bytes ({pct:.2}%) before the first output"
    );
    assert!(fetched > 0, "nothing counted: is the access log read?");
    // No kite layer went through containerd's content store.
    let log = w.snap.log_text();
    assert!(
        log.contains("kite layer committed without download"),
        "{log}"
    );
    assert_eq!(erofs_mounts_of(&fsid), 1);

    // Two running containers of the image share its one EROFS mount, and
    // a container's root is the source image's tree.
    let a = w
        .cri
        .start(&pod, "sleep-a", &image, &["/bin/sleep", "3600"])
        .unwrap();
    let b = w
        .cri
        .start(&pod, "sleep-b", &image, &["/bin/sleep", "3600"])
        .unwrap();
    for c in [&a, &b] {
        assert_eq!(
            w.cri.state(c).0,
            k8s_cri::v1::ContainerState::ContainerRunning
        );
    }
    assert_eq!(erofs_mounts_of(&fsid), 1, "one EROFS mount per image");
    assert_tree_matches_reference(
        "a running container's rootfs",
        &w.ctrd.rootfs("k8s.io", &a),
        &format!("oci:{}", src.display()),
        w.dir.path(),
    );

    // Removing the image removes its snapshots and tells the daemon.
    assert!(daemon_has(&w.daemon, &fsid));
    w.cri.stop_remove_pod(&pod);
    let kite_layers = manifest_layers(&conv);
    assert_eq!(
        snapshot_count(&w),
        PAUSE_LAYERS + kite_layers,
        "the pause image's and the kite image's layers"
    );
    w.cri.remove_image(&image);
    let t = Instant::now();
    while daemon_has(&w.daemon, &fsid) || erofs_mounts_of(&fsid) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "image removed, but still registered or mounted:\n{}",
            w.snap.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Only the pause image's layers remain.
    assert_eq!(
        snapshot_count(&w),
        PAUSE_LAYERS,
        "snapshots left after removing the image"
    );
    assert!(w
        .snap
        .log_text()
        .contains("image no longer used: told the daemon"));
}

#[test]
fn a_snapshotter_restart_keeps_containers_running_and_new_ones_starting() {
    let Some(mut w) = world("a_snapshotter_restart_keeps_containers_running_and_new_ones_starting")
    else {
        return;
    };
    let image = format!("{}/kite/app:v1", w.reg.addr);
    let (_, conv) = push_kite(&w, "app", 16, "still here", &image);
    let fsid = fsid_of(&conv);
    let pod = w.cri.run_pod("restart");
    w.cri.pull(&image).unwrap();
    let running = w
        .cri
        .start(&pod, "sleeper", &image, &["/bin/sleep", "3600"])
        .unwrap();
    w.snap.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w.cri.state(&running).0,
        k8s_cri::v1::ContainerState::ContainerRunning,
        "a container stopped while the snapshotter was down"
    );
    w.snap.restart();
    assert_eq!(
        w.cri.state(&running).0,
        k8s_cri::v1::ContainerState::ContainerRunning
    );
    // containerd's client finds its connection closed and reconnects with
    // a backoff (at most 3 s): calls until then fail as unavailable, and
    // kubelet retries them.
    let t = Instant::now();
    loop {
        let o = w
            .ctrd
            .ctr("k8s.io", &["snapshots", "--snapshotter", "kite", "ls"]);
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(err.contains("unavailable"), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "containerd did not reconnect: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "containerd reconnected {:?} after the snapshotter was back",
        t.elapsed()
    );
    // A new container of the same image, and a pull of it again, work
    // from the stored snapshots; the image is still mounted once.
    w.cri.pull(&image).unwrap();
    let out = run_to_exit(&mut w, &pod, "after", &image);
    assert_eq!(out, "still here\n");
    assert_eq!(erofs_mounts_of(&fsid), 1);
    w.cri.stop_remove_pod(&pod);
}

#[test]
fn ctr_remote_rpull_is_lazy_and_ordinary_images_still_run() {
    let Some(mut w) = world("ctr_remote_rpull_is_lazy_and_ordinary_images_still_run") else {
        return;
    };
    let image = format!("{}/kite/app:v1", w.reg.addr);
    let (_, conv) = push_kite(&w, "app", 64, "pulled by ctr-remote", &image);
    let before = w.reg.blob_bytes_served();
    let o = w.ctrd.ctr_remote(
        "default",
        &[
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "kite",
            &image,
        ],
    );
    assert!(
        o.status.success(),
        "ctr-remote rpull: {}\nsnapshotter:\n{}",
        String::from_utf8_lossy(&o.stderr),
        w.snap.log_text()
    );
    let pulled = w.reg.blob_bytes_served() - before;
    let total = stored_bytes(&conv);
    eprintln!("ctr-remote rpull: {pulled} of {total} bytes");
    assert!(
        (pulled as f64) < 0.05 * total as f64,
        "rpull fetched {pulled} of {total} bytes"
    );
    let o = w.ctrd.ctr(
        "default",
        &["run", "--rm", "--snapshotter", "kite", &image, "rpulled"],
    );
    assert!(
        o.status.success(),
        "ctr run: {}\nsnapshotter:\n{}",
        String::from_utf8_lossy(&o.stderr),
        w.snap.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "pulled by ctr-remote\n");

    // An ordinary image through the same snapshotter: containerd
    // downloads and unpacks it, and the log says why it was not lazy.
    let plain = format!("{}/plain/app:v1", w.reg.addr);
    let src = w.dir.path().join("plain-src");
    py(
        "ocigen.py",
        &[
            "runnable",
            src.to_str().unwrap(),
            "--payload-mb",
            "4",
            "--message",
            "plain image",
        ],
    );
    push_plain(&src, &plain);
    let pod = w.cri.run_pod("plain");
    w.cri.pull(&plain).unwrap();
    let out = run_to_exit(&mut w, &pod, "plain", &plain);
    assert_eq!(out, "plain image\n");
    let log = w.snap.log_text();
    assert!(
        log.contains("pull is not lazy: layer") && log.contains(&plain),
        "{log}"
    );
    w.cri.stop_remove_pod(&pod);
}

#[test]
fn a_kite_image_with_a_missing_or_corrupt_bootstrap_fails_the_pull_naming_the_layer() {
    let Some(mut w) =
        world("a_kite_image_with_a_missing_or_corrupt_bootstrap_fails_the_pull_naming_the_layer")
    else {
        return;
    };
    for (name, damage) in [("corrupt", true), ("missing", false)] {
        let image = format!("{}/kite/{name}:v1", w.reg.addr);
        let (_, conv) = push_kite(&w, name, 4, name, &image);
        let fsid = fsid_of(&conv);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(conv.join("index.json")).unwrap()).unwrap();
        let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(conv.join("blobs/sha256").join(&mdigest[7..])).unwrap(),
        )
        .unwrap();
        let boot_layer = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let stored = w.reg.blob_file(&boot_layer);
        if damage {
            let mut bytes = std::fs::read(&stored).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x5a;
            std::fs::write(&stored, bytes).unwrap();
        } else {
            std::fs::remove_file(&stored).unwrap();
        }
        let err = w
            .cri
            .pull(&image)
            .expect_err("the pull of a damaged image succeeded");
        eprintln!("{name} bootstrap: PullImage failed: {err}");
        assert!(
            err.contains(&boot_layer),
            "the error does not name the layer: {err}"
        );
        assert_eq!(erofs_mounts_of(&fsid), 0, "a damaged image was mounted");
        assert!(
            !daemon_has(&w.daemon, &fsid),
            "a damaged image stayed registered"
        );
    }
}
