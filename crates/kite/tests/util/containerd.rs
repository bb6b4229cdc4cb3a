//! A private containerd (Debian's 1.6, with runc) wired to a `kite
//! snapshotter` child process, and a CRI client that drives it as kubelet
//! would. Everything lives in the test's temp dir: containerd's root,
//! state and sockets, the snapshotter's root and socket; the host's own
//! containerd (if any) is untouched. Pods use the host network, so no CNI
//! plugin is needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use kite_snapshotter::tonic;

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

/// A CRI client on containerd's socket, blocking (each call runs on its
/// own runtime).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    images: cri::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    logs: PathBuf,
}

/// A pod sandbox and the config containers in it are created with.
pub struct Pod {
    pub id: String,
    config: cri::PodSandboxConfig,
}

impl Cri {
    pub fn connect(containerd: &Containerd) -> Cri {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let path = containerd.address.clone();
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::try_from("http://[::]")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        tokio::net::UnixStream::connect(path.clone())
                    })),
            )
            .expect("connect to containerd's CRI");
        let logs = containerd.dir.join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        Cri {
            rt,
            runtime: cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            images: cri::image_service_client::ImageServiceClient::new(channel),
            logs,
        }
    }

    /// PullImage as kubelet calls it; the image ref, or the error text.
    pub fn pull(&mut self, image: &str) -> Result<String, String> {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.rt
            .block_on(self.images.pull_image(req))
            .map(|r| r.into_inner().image_ref)
            .map_err(|s| s.message().to_string())
    }

    pub fn remove_image(&mut self, image: &str) {
        let req = cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
        };
        self.rt
            .block_on(self.images.remove_image(req))
            .expect("RemoveImage");
    }

    pub fn list_images(&mut self) -> Vec<String> {
        self.rt
            .block_on(self.images.list_images(cri::ListImagesRequest::default()))
            .expect("ListImages")
            .into_inner()
            .images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect()
    }

    /// RunPodSandbox with the host network.
    pub fn run_pod(&mut self, name: &str) -> Pod {
        let log_dir = self.logs.join(name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "kite-test".into(),
                attempt: 0,
            }),
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Pod as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {}", e.message()))
            .into_inner()
            .pod_sandbox_id;
        Pod { id, config }
    }

    /// CreateContainer + StartContainer; `command` overrides the image's.
    pub fn start(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(self.runtime.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }))
            .map_err(|e| format!("CreateContainer {name}: {}", e.message()))?
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.runtime.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .map_err(|e| format!("StartContainer {name}: {}", e.message()))?;
        Ok(id)
    }

    pub fn state(&mut self, container: &str) -> (cri::ContainerState, i32) {
        let st = self
            .rt
            .block_on(self.runtime.container_status(cri::ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            }))
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a container status");
        (
            cri::ContainerState::from_i32(st.state)
                .unwrap_or(cri::ContainerState::ContainerUnknown),
            st.exit_code,
        )
    }

    /// Wait for the container to exit; its exit code.
    pub fn wait_exit(&mut self, container: &str, limit: Duration) -> i32 {
        let t = Instant::now();
        loop {
            let (state, code) = self.state(container);
            if state == cri::ContainerState::ContainerExited {
                return code;
            }
            assert!(t.elapsed() < limit, "container {container} still {state:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the container wrote to stdout/stderr (CRI log lines:
    /// `TIME STREAM TAG MESSAGE`), messages only.
    pub fn output(&self, pod: &Pod, name: &str) -> String {
        let path = PathBuf::from(&pod.config.log_directory).join(format!("{name}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|m| format!("{m}\n"))
            .collect()
    }

    pub fn stop_remove_pod(&mut self, pod: &Pod) {
        let id = pod.id.clone();
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .expect("StopPodSandbox");
        self.rt
            .block_on(
                self.runtime
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }),
            )
            .expect("RemovePodSandbox");
    }
}
