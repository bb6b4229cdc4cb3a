//! A blocking CRI client (kubelet's calls to containerd) for the containerd
//! tests, `ci/demo-containerd` and the realistic benchmark: the tests use
//! it as a module, `examples/cri.rs` wraps it as a command. It depends only
//! on k8s-cri, tonic, tower and tokio, so both can include it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use kite_snapshotter::tonic;

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
    /// Connect to containerd's socket `address`; pod logs go under `logs`.
    pub fn connect(address: &Path, logs: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let path = address.to_path_buf();
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::try_from("http://[::]")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        tokio::net::UnixStream::connect(path.clone())
                    })),
            )
            .expect("connect to containerd's CRI");
        let logs = logs.to_path_buf();
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
        self.log_lines(pod, name, None)
    }

    /// What the container wrote to stdout only.
    pub fn stdout(&self, pod: &Pod, name: &str) -> String {
        self.log_lines(pod, name, Some("stdout"))
    }

    fn log_lines(&self, pod: &Pod, name: &str, stream: Option<&str>) -> String {
        let path = PathBuf::from(&pod.config.log_directory).join(format!("{name}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                match f.as_slice() {
                    [_, s, _, m] if stream.is_none_or(|want| *s == want) => Some(format!("{m}\n")),
                    _ => None,
                }
            })
            .collect()
    }

    /// The first line the container writes to stdout, waiting up to
    /// `limit`; `None`
    /// if it exits (or the time is up) without writing one.
    pub fn first_output(
        &mut self,
        pod: &Pod,
        name: &str,
        container: &str,
        limit: Duration,
    ) -> Option<String> {
        let t = Instant::now();
        loop {
            if let Some(line) = self.stdout(pod, name).lines().next() {
                return Some(line.to_string());
            }
            if t.elapsed() > limit {
                return None;
            }
            let (state, _) = self.state(container);
            if state == cri::ContainerState::ContainerExited {
                // It may have written its line just before exiting.
                return self.stdout(pod, name).lines().next().map(str::to_string);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop and remove every pod sandbox (and so its containers).
    pub fn remove_all_pods(&mut self) {
        let pods = self
            .rt
            .block_on(
                self.runtime
                    .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
            )
            .expect("ListPodSandbox")
            .into_inner()
            .items;
        for p in pods {
            let pod = Pod {
                id: p.id,
                config: cri::PodSandboxConfig::default(),
            };
            self.stop_remove_pod(&pod);
        }
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
