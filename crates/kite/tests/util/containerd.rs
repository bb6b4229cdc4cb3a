//! A private containerd (Debian's 1.6, with runc) wired to a `kite
//! snapshotter` child process, and a CRI client that drives it as kubelet
//! would. Everything lives in the test's temp dir: containerd's root,
//! state and sockets, the snapshotter's root and socket; the host's own
//! containerd (if any) is untouched. Pods use the host network, so no CNI
//! plugin is needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::kite_bin;

/// Root, the fanotify path and the binaries of a containerd test.
pub fn containerd_available() -> Result<(), String> {
    super::daemon::fanotify_path()?;
    super::registry::registry_available()?;
    for bin in [
        "containerd",
        "ctr",
        "runc",
        "ctr-remote",
        "skopeo",
        "busybox",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "{bin} not installed (ci/setup installs containerd, runc, stargz-snapshotter, skopeo, busybox-static)"
            ));
        }
    }
    Ok(())
}

fn wait_for_socket(path: &Path, what: &str, log: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what} did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `kite snapshotter` child process.
pub struct Snapshotter {
    child: Option<Child>,
    pub root: PathBuf,
    pub address: PathBuf,
    pub daemon_socket: PathBuf,
    pub log: PathBuf,
}

impl Snapshotter {
    pub fn start(dir: &Path, daemon_socket: &Path) -> Snapshotter {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = Snapshotter {
            child: None,
            root: dir.join("root"),
            address: dir.join("snapshotter.sock"),
            daemon_socket: daemon_socket.to_path_buf(),
            log: dir.join("snapshotter.log"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(kite_bin())
            .arg("snapshotter")
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.address)
            .arg("--socket")
            .arg(&self.daemon_socket)
            .env("KITE_LOG", "info,kite_snapshotter=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn kite snapshotter");
        self.child = Some(child);
        wait_for_socket(&self.address, "kite snapshotter", &self.log);
    }

    /// SIGKILL the snapshotter (its state and mounts stay).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.address);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// A private containerd using the snapshotter at `snapshotter` for CRI.
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub address: PathBuf,
    pub log: PathBuf,
}

impl Containerd {
    /// `sandbox_image`: the pause image (a reference on the test registry).
    pub fn start(dir: &Path, snapshotter: &Path, sandbox_image: &str) -> Containerd {
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        // The shipped snippet (dist/containerd) with this test's paths.
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{a}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.kite]
  type = "snapshot"
  address = "{s}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "kite"
    disable_snapshot_annotations = false
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{d}/cni"
    bin_dir = "{d}/cni-bin"
"#,
                d = dir.display(),
                a = address.display(),
                s = snapshotter.display(),
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn containerd");
        wait_for_socket(&address, "containerd", &log);
        Containerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            address,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A CRI client on this containerd (pod logs under its directory).
    pub fn cri(&self) -> super::cri::Cri {
        super::cri::Cri::connect(&self.address, &self.dir.join("pod-logs"))
    }

    /// `ctr --address ... -n NAMESPACE ARGS`.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["-n", namespace])
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr-remote --address ... -n NAMESPACE ARGS`.
    pub fn ctr_remote(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("ctr-remote")
            .arg("--address")
            .arg(&self.address)
            .args(["-n", namespace])
            .args(args)
            .output()
            .expect("run ctr-remote")
    }

    /// The rootfs of a running container, as the host sees it.
    pub fn rootfs(&self, namespace: &str, container: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(namespace)
            .join(container)
            .join("rootfs")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims outlive containerd: kill them (and their containers) by
        // the address they were started with, then containerd, then what
        // is still mounted under the test's directories.
        let needle = self.address.to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains("containerd-shim") && cmd.contains(&needle) {
                    // Its children are the containers (pods are in its
                    // session); kill the group and the shim.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::thread::sleep(Duration::from_millis(200));
        unmount_under(&self.dir);
    }
}

/// Detach every mount below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(kite_kernel::mount::unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
