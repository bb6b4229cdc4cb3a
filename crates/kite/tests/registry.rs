//! kite against a real registry: Debian's `docker-registry` (distribution
//! v2) started by the test on 127.0.0.1, plus a fault-injecting proxy in
//! front of it (util/registry.rs). Covers push (skip, cross-repo mount),
//! `convert --from docker://` (streamed, resumed after a registry restart),
//! auth (bearer with a token endpoint and renewal, basic against the real
//! registry, docker config, wrong credentials), redirects without leaking
//! Authorization, digest checks, mirrors, and lazy mounts by reference
//! through the daemon (root and the fanotify path).
//!
//! Needs `docker-registry` and `htpasswd` (ci/setup installs them); the
//! mount tests also need root and Linux >= 6.14. Skipped loudly elsewhere,
//! a failure in CI.

mod util;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use util::daemon::{fanotify_path, Daemon};
use util::registry::{registry_available, Proxy, Registry};
use util::*;

fn setup(test: &str) -> Option<(tempfile::TempDir, Registry)> {
    if !require(test, registry_available()) {
        return None;
    }
    let dir = tempdir();
    let reg = Registry::start(&dir.path().join("registry"), None);
    Some((dir, reg))
}

/// [`setup`] for tests that also mount (the fanotify path, as root).
fn setup_mounting(test: &str) -> Option<(tempfile::TempDir, Registry)> {
    if !require(test, fanotify_path()) {
        return None;
    }
    setup(test)
}

/// `kite ARGS` with extra environment and optional stdin.
fn kite_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut c = Command::new(kite_bin());
    c.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn kite");
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Generate an image with ocigen and push it as a plain OCI image.
fn push_source(dir: &Path, kind: &[&str], target: &str) -> PathBuf {
    let img = dir.join(format!("src-{}", kind[0]));
    let mut args = kind.to_vec();
    let img_s = img.to_str().unwrap().to_string();
    args.insert(1, &img_s);
    py("ocigen.py", &args);
    ok(
        kite_with(&["push", img.to_str().unwrap(), target], &[], None),
        "push source image",
    );
    img
}

fn pinned_of(push_stdout: &str) -> String {
    let line = push_stdout.lines().last().unwrap_or("").trim().to_string();
    assert!(line.contains("@sha256:"), "push printed {push_stdout:?}");
    line
}

#[test]
fn push_skips_present_blobs_and_mounts_across_repositories() {
    let Some((dir, reg)) = setup("push_skips_present_blobs_and_mounts_across_repositories") else {
        return;
    };
    let d = dir.path();
    let src = push_source(d, &["example"], &format!("{}/src/example:v1", reg.addr));
    // Convert straight from the registry; the result equals converting the
    // same image from its layout.
    let from_reg = d.join("conv-reg");
    convert(
        &format!("docker://{}/src/example:v1", reg.addr),
        &from_reg,
        &[],
    );
    let from_dir = d.join("conv-dir");
    convert(&format!("oci:{}", src.display()), &from_dir, &[]);
    assert_eq!(
        std::fs::read(from_reg.join("bootstrap")).unwrap(),
        std::fs::read(from_dir.join("bootstrap")).unwrap(),
        "bootstrap from the registry differs from the local conversion"
    );
    // Chunked upload (PATCH per MiB), then the same conversion again.
    let o = kite_with(
        &[
            "push",
            src.to_str().unwrap(),
            &format!("{}/src/chunked:v1", reg.addr),
            "--upload-chunk",
            "1048576",
        ],
        &[],
        None,
    );
    ok(o, "chunked push");
    assert!(
        reg.count("PATCH", "/v2/src/chunked/blobs/uploads/") >= 10,
        "no chunked upload: {}",
        reg.log_text()
    );
    let from_chunked = d.join("conv-chunked");
    convert(
        &format!("docker://{}/src/chunked:v1", reg.addr),
        &from_chunked,
        &[],
    );
    assert_eq!(
        std::fs::read(from_chunked.join("bootstrap")).unwrap(),
        std::fs::read(from_dir.join("bootstrap")).unwrap(),
    );
    kite_ok(&[
        "check",
        from_reg.join("bootstrap").to_str().unwrap(),
        "--blobs",
        from_reg.to_str().unwrap(),
    ]);

    let target = format!("{}/kite/example:v1", reg.addr);
    let first = ok(
        kite_with(&["push", from_reg.to_str().unwrap(), &target], &[], None),
        "first push",
    );
    let pinned = pinned_of(&first);
    let uploads = |repo: &str| reg.count("POST", &format!("/v2/{repo}/blobs/uploads/"));
    let blob_puts = |repo: &str| {
        reg.access_log()
            .iter()
            .filter(|(m, u, _, _)| {
                (m == "PUT" || m == "PATCH") && u.starts_with(&format!("/v2/{repo}/blobs/uploads/"))
            })
            .count()
    };
    // Config and layers (the manifest is not a blob upload).
    let n_blobs = std::fs::read_dir(from_reg.join("blobs/sha256"))
        .unwrap()
        .count()
        - 1;
    assert_eq!(uploads("kite/example"), n_blobs, "{}", reg.log_text());

    // The same image again: every blob is found by HEAD, nothing uploaded.
    let again = kite_with(&["push", from_reg.to_str().unwrap(), &target], &[], None);
    let again_err = stderr(&again);
    assert_eq!(pinned_of(&ok(again, "second push")), pinned);
    assert_eq!(uploads("kite/example"), n_blobs, "second push uploaded");
    assert!(again_err.contains("(0 uploaded)"), "{again_err}");

    // Another repository of the same registry: blobs are mounted.
    let other = format!("{}/kite/other:v1", reg.addr);
    let out = kite_with(
        &[
            "push",
            from_reg.to_str().unwrap(),
            &other,
            "--mount-from",
            "kite/example",
        ],
        &[],
        None,
    );
    let err = stderr(&out);
    ok(out, "push with --mount-from");
    assert_eq!(blob_puts("kite/other"), 0, "blobs were uploaded: {err}");
    assert_eq!(
        reg.count("POST", "/v2/kite/other/blobs/uploads/?mount="),
        n_blobs
    );
    assert!(err.contains("mounted"), "{err}");
}

#[test]
fn registry_conversion_resumes_after_the_registry_is_killed() {
    let Some((dir, mut reg)) = setup("registry_conversion_resumes_after_the_registry_is_killed")
    else {
        return;
    };
    let d = dir.path();
    let src = push_source(
        d,
        &["big", "--size-gb", "0.25", "--compression", "gzip"],
        &format!("{}/src/big:v1", reg.addr),
    );
    // Layer sizes in download order (the converter reads them in order).
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = json(src.join("index.json"));
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = json(src.join("blobs/sha256").join(&mdigest[7..]));
    let sizes: Vec<u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    let layer_bytes: u64 = sizes.iter().sum();
    // Kill point: the middle of the largest layer, so a download is in
    // flight then (between layers the converter may be busy, not reading).
    let largest = (0..sizes.len()).max_by_key(|&i| sizes[i]).unwrap();
    let kill_at = sizes[..largest].iter().sum::<u64>() + sizes[largest] / 2;
    let proxy = Proxy::start(&reg.addr);
    proxy.state.throttle.store(true, Ordering::Relaxed);
    let out_dir = d.join("conv");
    let log = d.join("convert.log");
    let mut child = Command::new(kite_bin())
        .args([
            "convert",
            "--quiet",
            "--from",
            &format!("docker://{}/src/big:v1", proxy.addr),
            "--to",
            out_dir.to_str().unwrap(),
        ])
        .env("KITE_LOG", "kite_registry=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while proxy.state.blob_body_bytes.load(Ordering::Relaxed) < kill_at {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "download did not progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "convert ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_kill = proxy.state.blob_body_bytes.load(Ordering::Relaxed);
    reg.kill();
    std::thread::sleep(Duration::from_millis(700));
    reg.restart();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "convert failed after the restart:\n{text}"
    );
    assert!(text.contains("resum"), "no resumption logged:\n{text}");
    let sent = proxy.state.blob_body_bytes.load(Ordering::Relaxed);
    // Every byte crossed once, give or take what was in flight at the kill.
    assert!(
        sent <= layer_bytes + (2 << 20),
        "{sent} bytes sent for {layer_bytes} bytes of layers (killed at {at_kill}): received bytes were downloaded again"
    );
    let local = d.join("conv-local");
    convert(&format!("oci:{}", src.display()), &local, &[]);
    assert_eq!(
        std::fs::read(out_dir.join("bootstrap")).unwrap(),
        std::fs::read(local.join("bootstrap")).unwrap()
    );
}

#[test]
fn bearer_tokens_are_renewed_and_not_sent_to_redirect_targets() {
    let Some((dir, reg)) = setup("bearer_tokens_are_renewed_and_not_sent_to_redirect_targets")
    else {
        return;
    };
    let d = dir.path();
    push_source(d, &["example"], &format!("{}/src/example:v1", reg.addr));
    let proxy = Proxy::start(&reg.addr);
    let st = &proxy.state;
    st.bearer.store(true, Ordering::Relaxed);
    st.redirect_blobs.store(true, Ordering::Relaxed);
    // Every token dies after the third authorized request.
    st.revoke_after.store(3, Ordering::Relaxed);
    let out = d.join("conv");
    let o = kite_with(
        &[
            "convert",
            "--quiet",
            "--from",
            &format!("docker://{}/src/example:v1", proxy.addr),
            "--to",
            out.to_str().unwrap(),
        ],
        &[("KITE_LOG", "kite_registry=debug")],
        None,
    );
    let err = stderr(&o);
    ok(o, "convert through the bearer proxy");
    assert!(
        st.token_requests.load(Ordering::Relaxed) >= 2,
        "the revoked token was not renewed: {err}"
    );
    assert!(st.unauthorized.load(Ordering::Relaxed) >= 2);
    assert!(st.origin_auth_headers.load(Ordering::Relaxed) > 0);
    assert!(
        st.storage_requests.load(Ordering::Relaxed) > 0,
        "no redirect followed"
    );
    assert_eq!(
        st.storage_auth_headers.load(Ordering::Relaxed),
        0,
        "Authorization leaked to the redirect target"
    );
    assert!(!err.contains("tok-"), "a token appeared in the log: {err}");
}

#[test]
fn tampered_manifests_are_refused() {
    let Some((dir, reg)) = setup("tampered_manifests_are_refused") else {
        return;
    };
    let d = dir.path();
    let pushed = ok(
        kite_with(
            &[
                "push",
                {
                    py("ocigen.py", &["example", d.join("src").to_str().unwrap()]);
                    d.join("src").to_str().unwrap()
                },
                &format!("{}/src/example:v1", reg.addr),
            ],
            &[],
            None,
        ),
        "push",
    );
    let digest = pinned_of(&pushed).split('@').nth(1).unwrap().to_string();
    let proxy = Proxy::start(&reg.addr);
    proxy.state.tamper_manifests.store(true, Ordering::Relaxed);
    for reference in [
        format!("{}/src/example@{digest}", proxy.addr),
        format!("{}/src/example:v1", proxy.addr),
    ] {
        let out = d.join("conv");
        let o = kite_with(
            &[
                "convert",
                "--quiet",
                "--from",
                &format!("docker://{reference}"),
                "--to",
                out.to_str().unwrap(),
            ],
            &[],
            None,
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{reference}: {err}");
        assert!(
            err.contains("digest mismatch") && err.contains(&digest),
            "{reference}: {err}"
        );
        assert!(!out.exists(), "output left behind");
    }
}

#[test]
fn basic_auth_docker_config_and_wrong_credentials() {
    if !require(
        "basic_auth_docker_config_and_wrong_credentials",
        registry_available(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let reg = Registry::start(&d.join("registry"), Some(("alice", "s3cret-pw")));
    let img = d.join("src");
    py("ocigen.py", &["example", img.to_str().unwrap()]);
    let target = format!("{}/src/example:v1", reg.addr);
    // No docker config anywhere unless a step asks for one.
    let no_cfg = d.join("no-docker-config");
    std::fs::create_dir_all(&no_cfg).unwrap();
    let no_cfg = no_cfg.to_str().unwrap().to_string();
    let push = |pw: &str| {
        kite_with(
            &[
                "push",
                img.to_str().unwrap(),
                &target,
                "--username",
                "alice",
                "--password-stdin",
            ],
            &[
                ("HOME", d.to_str().unwrap()),
                ("DOCKER_CONFIG", no_cfg.as_str()),
                ("KITE_LOG", "kite_registry=debug"),
            ],
            Some(pw),
        )
    };
    // Wrong password: a clear error after one challenge, no retry storm,
    // and the password is never printed.
    let before = reg.access_log().len();
    let o = push("wrong-pw\n");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("authentication failed") && err.contains("\"alice\""),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "password printed: {err}");
    let requests = reg.access_log().len() - before;
    assert!(requests <= 3, "{requests} requests for a wrong password");

    // No credentials at all: says what to do.
    let o = kite_with(
        &["push", img.to_str().unwrap(), &target],
        &[("HOME", d.to_str().unwrap()), ("DOCKER_CONFIG", &no_cfg)],
        None,
    );
    assert!(stderr(&o).contains("needs credentials"), "{}", stderr(&o));

    // The right password works (basic auth against the real registry).
    ok(push("s3cret-pw\n"), "push with the right password");

    // Credentials from a docker config.json.
    let cfg = d.join("docker");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.json"),
        // base64("alice:s3cret-pw")
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0LXB3"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let out = d.join("conv");
    ok(
        kite_with(
            &[
                "convert",
                "--quiet",
                "--from",
                &format!("docker://{target}"),
                "--to",
                out.to_str().unwrap(),
            ],
            &[("DOCKER_CONFIG", cfg.to_str().unwrap())],
            None,
        ),
        "convert with docker config credentials",
    );
}

#[test]
fn mirrors_are_tried_in_order_then_the_origin() {
    let Some((dir, reg)) = setup("mirrors_are_tried_in_order_then_the_origin") else {
        return;
    };
    let d = dir.path();
    push_source(d, &["example"], &format!("{}/src/example:v1", reg.addr));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let from = format!("docker://{}/src/example:v1", reg.addr);
    // An unreachable mirror: the origin is used.
    let out = d.join("conv1");
    let o = kite_with(
        &[
            "convert",
            "--quiet",
            "--from",
            &from,
            "--to",
            out.to_str().unwrap(),
            "--mirror",
            &format!("{}=http://127.0.0.1:{closed}", reg.addr),
        ],
        &[("KITE_LOG", "kite_registry=info")],
        None,
    );
    let err = stderr(&o);
    ok(o, "convert with an unreachable mirror");
    assert!(err.contains("mirror failed"), "{err}");
    // A working mirror after the dead one serves the blobs.
    let proxy = Proxy::start(&reg.addr);
    let out = d.join("conv2");
    ok(
        kite_with(
            &[
                "convert",
                "--quiet",
                "--from",
                &from,
                "--to",
                out.to_str().unwrap(),
                "--mirror",
                &format!("{}=http://127.0.0.1:{closed}", reg.addr),
                "--mirror",
                &format!("{}=http://{}", reg.addr, proxy.addr),
            ],
            &[],
            None,
        ),
        "convert with a mirror list",
    );
    assert!(proxy.state.blob_body_bytes.load(Ordering::Relaxed) > 0);

    // A mirror that refuses us (basic auth, no credentials for it): the
    // origin is used.
    let locked = Registry::start(&d.join("locked"), Some(("bob", "pw")));
    let out = d.join("conv3");
    let o = kite_with(
        &[
            "convert",
            "--quiet",
            "--from",
            &from,
            "--to",
            out.to_str().unwrap(),
            "--mirror",
            &format!("{}=http://{}", reg.addr, locked.addr),
        ],
        &[
            ("KITE_LOG", "kite_registry=info"),
            ("DOCKER_CONFIG", d.to_str().unwrap()),
        ],
        None,
    );
    let err = stderr(&o);
    ok(o, "convert with a mirror that refuses us");
    assert!(err.contains("mirror failed"), "{err}");
}

/// Generate an image with ocigen `args` (its output path added), convert
/// it, and push the kite image to `reference`. Returns (source layout,
/// converted dir, pinned reference).
fn convert_and_push(d: &Path, args: &[&str], reference: &str) -> (PathBuf, PathBuf, String) {
    let img = d.join("src");
    let mut a = args.to_vec();
    let img_s = img.to_str().unwrap().to_string();
    a.insert(1, &img_s);
    py("ocigen.py", &a);
    let conv = d.join("conv");
    convert(&format!("oci:{}", img.display()), &conv, &[]);
    let out = ok(
        kite_with(&["push", conv.to_str().unwrap(), reference], &[], None),
        "push",
    );
    (img, conv, pinned_of(&out))
}

fn start_daemon(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    Daemon::start(dir, &[])
}

fn mount_ref(daemon: &Daemon, reference: &str, mnt: &Path) -> Output {
    std::fs::create_dir_all(mnt).unwrap();
    kite_with(
        &[
            "mount",
            reference,
            mnt.to_str().unwrap(),
            "--socket",
            daemon.socket.to_str().unwrap(),
        ],
        &[],
        None,
    )
}

fn umount(daemon: &Daemon, mnt: &Path) {
    kite_ok(&[
        "umount",
        mnt.to_str().unwrap(),
        "--socket",
        daemon.socket.to_str().unwrap(),
    ]);
}

#[test]
fn mount_by_tag_and_by_digest_reads_everything() {
    let Some((dir, reg)) = setup_mounting("mount_by_tag_and_by_digest_reads_everything") else {
        return;
    };
    let d = dir.path();
    let (img, _, pinned) = convert_and_push(
        d,
        &["full", "--no-sparse"],
        &format!("{}/kite/full:v1", reg.addr),
    );
    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    let o = mount_ref(&daemon, &format!("{}/kite/full:v1", reg.addr), &mnt);
    let out = ok(o, "mount by tag");
    assert!(
        out.contains(&pinned),
        "mount did not report the pinned digest: {out}"
    );
    assert_tree_matches_reference("mounted by tag", &mnt, &format!("oci:{}", img.display()), d);
    let by_tag = read_all(&mnt);
    let status = daemon.status();
    assert_eq!(
        status["images"][0]["source"].as_str(),
        Some(pinned.as_str())
    );
    assert!(status["images"][0]["blobs"][0]["backend"]
        .as_str()
        .unwrap()
        .starts_with("registry:"));
    umount(&daemon, &mnt);

    let o = mount_ref(&daemon, &format!("docker://{pinned}"), &mnt);
    ok(o, "mount by digest");
    assert!(
        read_all(&mnt) == by_tag,
        "by-digest mount differs from by-tag mount"
    );
    umount(&daemon, &mnt);
}

#[test]
fn range_fetch_reads_one_small_file_with_a_tiny_fraction_of_the_image() {
    let Some((dir, reg)) =
        setup_mounting("range_fetch_reads_one_small_file_with_a_tiny_fraction_of_the_image")
    else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/big:v1", reg.addr);
    let (_, conv, _) = convert_and_push(d, &["big", "--size-gb", "0.3"], &reference);
    let image_bytes: u64 = std::fs::read_dir(conv.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let served_before = reg.blob_bytes_served();
    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    ok(mount_ref(&daemon, &reference, &mnt), "mount");
    // The first small file of the first layer.
    let layer = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("small-000").is_dir())
        .expect("a layer directory with small files");
    let small = layer.join("small-000/f00000");
    let data = std::fs::read(&small).unwrap();
    assert!(!data.is_empty() && data.len() <= 16384);
    let served = reg.blob_bytes_served() - served_before;
    let pct = 100.0 * served as f64 / image_bytes as f64;
    eprintln!(
        "one small file: {served} bytes from the registry (bootstrap included) of {image_bytes} ({pct:.3}%)"
    );
    assert!(
        pct < 1.0,
        "{served} of {image_bytes} bytes fetched ({pct:.2}%)"
    );
    assert!(served > 0, "nothing fetched: the log is not counting");
    umount(&daemon, &mnt);
}

#[test]
fn a_corrupt_bootstrap_in_the_registry_is_refused() {
    let Some((dir, reg)) = setup_mounting("a_corrupt_bootstrap_in_the_registry_is_refused") else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/example:v1", reg.addr);
    let (_, conv, _) = convert_and_push(d, &["example"], &reference);
    // The bootstrap layer (compressed) as the registry stores it.
    let boot = manifest_of(&conv)["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = reg.blob_file(&boot);
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, bytes).unwrap();
    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    let o = mount_ref(&daemon, &reference, &mnt);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("digest mismatch") && err.contains(&boot),
        "{err}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(mnt.to_str().unwrap()), "mounted anyway");
    assert_eq!(
        daemon.status()["images"].as_array().unwrap().len(),
        0,
        "image registered anyway"
    );
}

/// The kite manifest of an image directory.
fn manifest_of(dir: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(&mdigest[7..])).unwrap())
        .unwrap()
}

/// Store `data` as a blob of an image directory; its digest.
fn add_blob(dir: &Path, data: &[u8]) -> String {
    let digest = format!("sha256:{}", hex_sha256(data));
    std::fs::write(dir.join("blobs/sha256").join(&digest[7..]), data).unwrap();
    digest
}

/// Rewrite an image directory's kite manifest with `edit` (a test's way
/// to publish what a broken or an older converter would have).
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut manifest = manifest_of(dir);
    edit(&mut manifest);
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let new_digest = add_blob(dir, &mbytes);
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]["digest"] = new_digest.into();
    index["manifests"][0]["size"] = mbytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn compressed_bootstraps_are_checked_against_the_manifest_and_plain_ones_still_mount() {
    let Some((dir, reg)) = setup_mounting(
        "compressed_bootstraps_are_checked_against_the_manifest_and_plain_ones_still_mount",
    ) else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/example:v1", reg.addr);
    let (_, conv, _) = convert_and_push(d, &["example"], &reference);
    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    ok(mount_ref(&daemon, &reference, &mnt), "mount");
    let want = read_all(&mnt);
    umount(&daemon, &mnt);
    let boot = std::fs::read(conv.join("bootstrap")).unwrap();
    let layer = manifest_of(&conv)["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // The frame is fine, the manifest's annotations are not: each is
    // refused naming the layer, and nothing is mounted or registered.
    let cases: [(&str, serde_json::Value, &str); 2] = [
        (
            "dev.kite.bootstrap.digest",
            format!("sha256:{}", "0".repeat(64)).into(),
            "decompresses to",
        ),
        (
            "dev.kite.bootstrap.size",
            (boot.len() - 4096).to_string().into(),
            "bytes after decompression",
        ),
    ];
    for (k, (key, value, why)) in cases.into_iter().enumerate() {
        let img = d.join(format!("bad{k}"));
        copy_dir(&conv, &img);
        edit_manifest(&img, |m| m["layers"][0]["annotations"][key] = value);
        let r = format!("{}/kite/bad{k}:v1", reg.addr);
        ok(
            kite_with(&["push", img.to_str().unwrap(), &r], &[], None),
            "push",
        );
        let o = mount_ref(&daemon, &r, &mnt);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{key}: {err}");
        assert!(err.contains(&layer) && err.contains(why), "{key}: {err}");
        assert!(!std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(mnt.to_str().unwrap()));
        assert_eq!(daemon.status()["images"].as_array().unwrap().len(), 0);
    }

    // An image published in the first form, before bootstraps were
    // compressed and before the containerd form: a kite config, kite
    // media types, the layer is the bootstrap itself. It mounts and reads
    // the same.
    let old = d.join("old");
    copy_dir(&conv, &old);
    let plain = add_blob(&old, &boot);
    let old_config = br#"{"kiteFormat":1,"chunkSize":1048576}"#;
    let old_config_digest = add_blob(&old, old_config);
    edit_manifest(&old, |m| {
        m["config"] = serde_json::json!({
            "mediaType": "application/vnd.kite.image.config.v1+json",
            "digest": old_config_digest,
            "size": old_config.len(),
        });
        for l in m["layers"].as_array_mut().unwrap() {
            l["mediaType"] = "application/vnd.kite.blob.v1.chunked-zstd".into();
            l.as_object_mut().unwrap().remove("annotations");
        }
        m["layers"][0] = serde_json::json!({
            "mediaType": "application/vnd.kite.bootstrap.v1.erofs",
            "digest": plain,
            "size": boot.len(),
        })
    });
    let r = format!("{}/kite/old:v1", reg.addr);
    ok(
        kite_with(&["push", old.to_str().unwrap(), &r], &[], None),
        "push old",
    );
    ok(mount_ref(&daemon, &r, &mnt), "mount old");
    assert!(
        read_all(&mnt) == want,
        "the old-format image reads differently"
    );
    umount(&daemon, &mnt);
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .args(["-a", from.to_str().unwrap(), to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_pushed_prefetch_profile_is_fetched_and_replayed_by_a_registry_mount() {
    let Some((dir, reg)) =
        setup_mounting("a_pushed_prefetch_profile_is_fetched_and_replayed_by_a_registry_mount")
    else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/example:v1", reg.addr);
    let (src, conv, _) = convert_and_push(d, &["example"], &reference);
    // Record a profile from a cold run on local blobs, then push again:
    // only the profile and the new manifest are new.
    let rec = start_daemon(&d.join("rec"));
    let m = rec.mount(&conv, &d.join("rec-mnt"), &[]);
    let first = read_all(&m.mnt);
    let n = rec.save_profile(&m.mnt, &conv);
    let recorded = rec.blob_sum("fetched_chunks");
    m.umount();
    rec.stop();
    // Every chunk read, at most what was fetched (readahead may fetch
    // chunks nobody read).
    assert!(
        n > 0 && n <= recorded,
        "{n} in the profile, {recorded} fetched"
    );
    let out = ok(
        kite_with(&["push", conv.to_str().unwrap(), &reference], &[], None),
        "push with profile",
    );
    let pinned = pinned_of(&out);

    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    let out = ok(mount_ref(&daemon, &reference, &mnt), "mount with profile");
    assert!(
        out.contains(&pinned) && out.contains(&format!("prefetching {n} chunks")),
        "{out}"
    );
    assert!(read_all(&mnt) == first, "contents differ");
    let prefetched = daemon.blob_sum("prefetched_chunks");
    assert!(prefetched > 0, "nothing prefetched: {}", daemon.log_text());
    assert!(daemon.blob_sum("fetched_chunks") >= n);
    umount(&daemon, &mnt);

    // --no-prefetch: the profile is not even fetched.
    let fresh = start_daemon(&d.join("fresh"));
    std::fs::create_dir_all(&mnt).unwrap();
    let out = ok(
        kite_with(
            &[
                "mount",
                &reference,
                mnt.to_str().unwrap(),
                "--no-prefetch",
                "--socket",
                fresh.socket.to_str().unwrap(),
            ],
            &[],
            None,
        ),
        "mount --no-prefetch",
    );
    assert!(!out.contains("prefetching"), "{out}");
    assert!(read_all(&mnt) == first);
    assert_eq!(fresh.blob_sum("prefetched_chunks"), 0);
    umount(&fresh, &mnt);

    // A manifest carrying another build's profile (same files, 64 KiB
    // chunks: another bootstrap) is refused, naming the profile.
    let other = d.join("other");
    convert(
        &format!("oci:{}", src.display()),
        &other,
        &["--chunk-size", "64K"],
    );
    let profile = std::fs::read(conv.join("prefetch")).unwrap();
    let pdigest = add_blob(&other, &profile);
    edit_manifest(&other, |manifest| {
        manifest["layers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "mediaType": "application/vnd.kite.prefetch.v1",
                "digest": pdigest,
                "size": profile.len(),
            }))
    });
    let foreign = format!("{}/kite/foreign:v1", reg.addr);
    ok(
        kite_with(&["push", other.to_str().unwrap(), &foreign], &[], None),
        "push foreign",
    );
    let o = mount_ref(&fresh, &foreign, &mnt);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&pdigest) && err.contains("recorded for bootstrap"),
        "{err}"
    );
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(mnt.to_str().unwrap()));
}

#[test]
fn readers_in_flight_when_the_token_is_revoked_share_one_new_token() {
    let Some((dir, reg)) =
        setup_mounting("readers_in_flight_when_the_token_is_revoked_share_one_new_token")
    else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/big:v1", reg.addr);
    convert_and_push(d, &["big", "--size-gb", "0.3"], &reference);
    let proxy = Proxy::start(&reg.addr);
    let st = &proxy.state;
    st.bearer.store(true, Ordering::Relaxed);
    // The mount takes a few authorized requests; the revocation lands
    // while the readers below keep many Range requests in flight.
    st.revoke_after.store(12, Ordering::Relaxed);
    // A slow token endpoint: requests refused while one renewal is under
    // way must wait for it, not start their own.
    st.token_delay_ms.store(400, Ordering::Relaxed);
    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    let via = format!("{}/kite/big:v1", proxy.addr);
    ok(
        mount_ref(&daemon, &via, &mnt),
        "mount through the bearer proxy",
    );
    let tokens_at_mount = st.token_requests.load(Ordering::Relaxed);
    let files = files_under(&mnt);
    let readers = 16;
    std::thread::scope(|s| {
        for r in 0..readers {
            let files = &files;
            s.spawn(move || {
                for f in files.iter().skip(r).step_by(readers) {
                    std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
            });
        }
    });
    let unauthorized = st.unauthorized.load(Ordering::Relaxed);
    let renewals = st.token_requests.load(Ordering::Relaxed) - tokens_at_mount;
    umount(&daemon, &mnt);
    assert!(
        unauthorized >= 2,
        "the revocation did not hit the readers ({unauthorized} 401s)"
    );
    // One fetch for all of them (two if a request was refused just as the
    // new token arrived), not one per request in flight.
    assert!(
        (1..=2).contains(&renewals),
        "{renewals} token fetches after the revocation for {unauthorized} refused requests\n{}",
        daemon.log_text()
    );
}

#[test]
fn offline_an_image_used_before_mounts_misses_fail_fast_and_recover_and_a_pulled_one_runs_whole() {
    let Some((dir, mut reg)) = setup_mounting(
        "offline_an_image_used_before_mounts_misses_fail_fast_and_recover_and_a_pulled_one_runs_whole",
    ) else {
        return;
    };
    let d = dir.path();
    let reference = format!("{}/kite/example:v1", reg.addr);
    let (_, conv, pinned) = convert_and_push(d, &["example"], &reference);
    // The reference tree, from local blobs.
    let raw = d.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let devices = unpack_all(&conv, &raw);
    let reference_mount = Mount::erofs(&conv.join("bootstrap"), &devices, &d.join("ref")).unwrap();
    let want = read_all(&d.join("ref"));
    drop(reference_mount);
    let hello = PathBuf::from("opt/app/bin/hello.sh");
    let manual = PathBuf::from("usr/share/doc/demo/manual.txt");

    let daemon = start_daemon(&d.join("daemon"));
    let mnt = d.join("mnt");
    // Used before: one small file read, then unmounted (and forgotten).
    ok(mount_ref(&daemon, &pinned, &mnt), "mount online");
    assert_eq!(std::fs::read(mnt.join(&hello)).unwrap(), want[&hello]);
    umount(&daemon, &mnt);

    // The registry goes away. The image mounts from what the node kept.
    reg.kill();
    let t = Instant::now();
    let out = ok(mount_ref(&daemon, &pinned, &mnt), "mount offline");
    eprintln!("offline mount in {:?}: {out}", t.elapsed());
    assert!(daemon
        .log_text()
        .contains("registering from the manifest and bootstrap kept on this node"));
    assert_eq!(std::fs::read(mnt.join(&hello)).unwrap(), want[&hello]);
    // Data never fetched: an error, soon; never zeros.
    let t = Instant::now();
    let e = std::fs::read(mnt.join(&manual)).unwrap_err();
    let failed_after = t.elapsed();
    assert_eq!(e.raw_os_error(), Some(5), "{e}");
    eprintln!("a miss with the registry down failed after {failed_after:?}");
    assert!(failed_after < Duration::from_secs(15), "{failed_after:?}");
    // The registry is back: the same mount reads it, no remount.
    reg.restart();
    std::thread::sleep(Duration::from_millis(2500)); // the failure is remembered 2 s
    assert!(
        std::fs::read(mnt.join(&manual)).unwrap() == want[&manual],
        "wrong bytes after the registry came back"
    );
    umount(&daemon, &mnt);

    // kite pull: the whole image, kept registered; then it runs whole
    // with the registry down.
    let out = ok(
        kite_with(
            &["pull", &pinned, "--socket", daemon.socket.to_str().unwrap()],
            &[],
            None,
        ),
        "kite pull",
    );
    assert!(out.contains("complete"), "{out}");
    let status = daemon.status();
    let missing: u64 = status["images"][0]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["missing_chunks"].as_u64().unwrap())
        .sum();
    assert_eq!(missing, 0);
    reg.kill();
    ok(
        mount_ref(&daemon, &pinned, &mnt),
        "mount the pulled image offline",
    );
    assert!(
        read_all(&mnt) == want,
        "the pulled image reads differently offline"
    );
    // A last unmount keeps a pulled image registered; kite rm forgets it.
    umount(&daemon, &mnt);
    assert_eq!(daemon.status()["images"].as_array().unwrap().len(), 1);
    // A reboot: the daemon stops and /run's records are gone (tmpfs). The
    // pulled image is registered again at start, still offline, and runs.
    let run_records = daemon.socket.parent().unwrap().join("images");
    daemon.stop();
    std::fs::remove_dir_all(&run_records).unwrap();
    let daemon = start_daemon(&d.join("daemon"));
    let images = daemon.status()["images"].as_array().unwrap().clone();
    assert_eq!(
        images.len(),
        1,
        "the pulled image is registered after a reboot"
    );
    assert_eq!(images[0]["kept"], true, "{images:?}");
    ok(
        mount_ref(&daemon, &pinned, &mnt),
        "mount the pulled image offline after a reboot",
    );
    assert!(
        read_all(&mnt) == want,
        "the pulled image reads differently after a reboot"
    );
    umount(&daemon, &mnt);
    let fsid = daemon.status()["images"][0]["fsid"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        kite_with(
            &["rm", &fsid, "--socket", daemon.socket.to_str().unwrap()],
            &[],
            None,
        ),
        "kite rm",
    );
    assert_eq!(daemon.status()["images"].as_array().unwrap().len(), 0);
    let kept = daemon.cache.join("kept-images");
    assert_eq!(
        std::fs::read_dir(&kept).map(|r| r.count()).unwrap_or(0),
        0,
        "kite rm leaves no kept record in {}",
        kept.display()
    );
}
