//! Real registries for the registry tests: Debian's `docker-registry`
//! (distribution v2) started on 127.0.0.1 with a free port and storage in a
//! temp dir (optionally with htpasswd basic auth), and a fault-injecting
//! proxy in front of it that plays the parts distribution cannot play
//! alone: a bearer-token registry with its token endpoint (tokens can be
//! revoked mid-run), redirects of blob GETs to a second "storage" host,
//! manifests tampered in flight, and throttled blob bodies so a test can
//! kill the registry in the middle of a download.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The registry binary is installed (ci/setup installs it).
pub fn registry_available() -> Result<(), String> {
    for bin in ["docker-registry", "htpasswd"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "{bin} not installed (apt-get install docker-registry apache2-utils; ci/setup does)"
            ));
        }
    }
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry serve` child process.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// Access-log text of earlier (killed) instances.
    earlier_log: String,
}

impl Registry {
    /// Start a registry; with `basic`, htpasswd auth for (user, password).
    pub fn start(dir: &Path, basic: Option<(&str, &str)>) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((u, p)) = basic {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            let pw = dir.join("htpasswd");
            std::fs::write(&pw, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: kite-test\n    path: {}\n",
                pw.display()
            );
        }
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{auth}",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            child: None,
            addr,
            dir: dir.to_path_buf(),
            config,
            log: dir.join("registry.log"),
            earlier_log: String::new(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let logf = std::fs::File::create(&self.log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "docker-registry did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the registry (storage is kept).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.earlier_log.push_str(&self.log_text());
    }

    /// Start it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access-log lines (`"METHOD URI HTTP/1.1" STATUS BYTES`) of every
    /// instance so far, as (method, uri, status, bytes).
    pub fn access_log(&self) -> Vec<(String, String, u16, u64)> {
        let text = format!("{}{}", self.earlier_log, self.log_text());
        text.lines()
            .filter_map(|l| {
                let q = l.find("] \"")? + 3;
                let rest = &l[q..];
                let end = rest.find('"')?;
                let mut req = rest[..end].split(' ');
                let (m, u) = (req.next()?.to_string(), req.next()?.to_string());
                let mut nums = rest[end + 1..].split_whitespace();
                let status = nums.next()?.parse().ok()?;
                let bytes = nums.next()?.parse().unwrap_or(0);
                Some((m, u, status, bytes))
            })
            .collect()
    }

    /// Requests whose method is `method` and URI contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|(m, u, _, _)| m == method && u.contains(part))
            .count()
    }

    /// Body bytes served for GETs of blobs.
    pub fn blob_bytes_served(&self) -> u64 {
        self.access_log()
            .iter()
            .filter(|(m, u, _, _)| m == "GET" && u.contains("/blobs/sha256:"))
            .map(|e| e.3)
            .sum()
    }

    /// The file holding a blob in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the proxy does; flip the switches from the test.
#[derive(Default)]
pub struct ProxyState {
    /// Require bearer tokens from the proxy's own `/token` endpoint.
    pub bearer: AtomicBool,
    /// Revoke every token once, after this many authorized requests
    /// (0: never).
    pub revoke_after: AtomicU64,
    pub token_requests: AtomicU64,
    /// Answer token requests after this many milliseconds.
    pub token_delay_ms: AtomicU64,
    pub unauthorized: AtomicU64,
    /// Change one byte of every manifest body (keeping the registry's
    /// Docker-Content-Digest header).
    pub tamper_manifests: AtomicBool,
    /// Answer blob GETs with a 307 to the storage host.
    pub redirect_blobs: AtomicBool,
    /// Send blob bodies slowly (about 50 MB/s).
    pub throttle: AtomicBool,
    /// Body bytes sent for blob GETs (origin and storage host).
    pub blob_body_bytes: AtomicU64,
    /// Requests the storage host got, and how many carried Authorization.
    pub storage_requests: AtomicU64,
    pub storage_auth_headers: AtomicU64,
    /// Requests at the origin that carried Authorization.
    pub origin_auth_headers: AtomicU64,
    authorized: AtomicU64,
    revoked: AtomicBool,
    tokens: Mutex<HashSet<String>>,
}

pub struct Proxy {
    pub addr: String,
    pub storage_addr: String,
    pub state: Arc<ProxyState>,
    _rt: tokio::runtime::Runtime,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

struct Ctx {
    upstream: String,
    addr: String,
    storage_addr: String,
    state: Arc<ProxyState>,
    http: reqwest::Client,
    storage: bool,
}

impl Proxy {
    /// A proxy in front of the registry at `upstream` (`127.0.0.1:port`).
    pub fn start(upstream: &str) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(ProxyState::default());
        let (l1, l2) = rt.block_on(async {
            (
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
        });
        let addr = l1.local_addr().unwrap().to_string();
        let storage_addr = l2.local_addr().unwrap().to_string();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        for (l, storage) in [(l1, false), (l2, true)] {
            let ctx = Arc::new(Ctx {
                upstream: format!("http://{upstream}"),
                addr: addr.clone(),
                storage_addr: storage_addr.clone(),
                state: Arc::clone(&state),
                http: http.clone(),
                storage,
            });
            rt.spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else { return };
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let ctx = Arc::clone(&ctx);
                            async move { Ok::<_, std::convert::Infallible>(handle(ctx, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        }
        Proxy {
            addr,
            storage_addr,
            state,
            _rt: rt,
        }
    }
}

async fn handle(ctx: Arc<Ctx>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let st = &ctx.state;
    let path_q = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if ctx.storage {
        st.storage_requests.fetch_add(1, Ordering::Relaxed);
        if auth.is_some() {
            st.storage_auth_headers.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        if auth.is_some() {
            st.origin_auth_headers.fetch_add(1, Ordering::Relaxed);
        }
        if path_q.starts_with("/token") {
            st.token_requests.fetch_add(1, Ordering::Relaxed);
            let delay = st.token_delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            let t = format!(
                "tok-{}-{}",
                st.token_requests.load(Ordering::Relaxed),
                std::process::id()
            );
            st.tokens.lock().unwrap().insert(t.clone());
            return full(200, format!(r#"{{"token":"{t}","expires_in":300}}"#));
        }
        if st.bearer.load(Ordering::Relaxed) && path_q.starts_with("/v2/") {
            let ok = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(|t| st.tokens.lock().unwrap().contains(t))
                .unwrap_or(false);
            if !ok {
                st.unauthorized.fetch_add(1, Ordering::Relaxed);
                let repo = path_q
                    .trim_start_matches("/v2/")
                    .split("/manifests/")
                    .next()
                    .unwrap_or("")
                    .split("/blobs/")
                    .next()
                    .unwrap_or("")
                    .to_string();
                let mut r = full(
                    401,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"token needed"}]}"#,
                );
                r.headers_mut().insert(
                    "www-authenticate",
                    format!(
                        r#"Bearer realm="http://{}/token",service="kite-test",scope="repository:{repo}:pull""#,
                        ctx.addr
                    )
                    .parse()
                    .unwrap(),
                );
                return r;
            }
            let n = st.authorized.fetch_add(1, Ordering::Relaxed) + 1;
            let after = st.revoke_after.load(Ordering::Relaxed);
            if after > 0 && n >= after && !st.revoked.swap(true, Ordering::Relaxed) {
                // Every token issued so far stops working: the next request
                // gets a fresh challenge.
                st.tokens.lock().unwrap().clear();
            }
        }
        let is_blob_get = req.method() == hyper::Method::GET && path_q.contains("/blobs/sha256:");
        if is_blob_get && st.redirect_blobs.load(Ordering::Relaxed) {
            let mut r = full(307, "");
            r.headers_mut().insert(
                "location",
                format!("http://{}/storage{path_q}", ctx.storage_addr)
                    .parse()
                    .unwrap(),
            );
            return r;
        }
    }
    // Forward to the registry (never with the client's Authorization).
    let upstream_path = path_q
        .strip_prefix("/storage")
        .unwrap_or(&path_q)
        .to_string();
    let method = req.method().clone();
    let mut fwd = ctx.http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
        format!("{}{upstream_path}", ctx.upstream),
    );
    for (k, v) in req.headers() {
        let k = k.as_str();
        if k != "host" && k != "authorization" && k != "content-length" {
            fwd = fwd.header(k, v.as_bytes());
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(400, "bad body"),
    };
    if !body.is_empty() || method == hyper::Method::PUT || method == hyper::Method::PATCH {
        fwd = fwd.body(body);
    }
    let resp = match fwd.send().await {
        Ok(r) => r,
        Err(e) => return full(502, format!(r#"{{"error":"upstream: {e}"}}"#)),
    };
    let status = resp.status().as_u16();
    let mut builder = Response::builder().status(status);
    let tamper = st.tamper_manifests.load(Ordering::Relaxed)
        && method == hyper::Method::GET
        && upstream_path.contains("/manifests/");
    for (k, v) in resp.headers() {
        let k = k.as_str();
        if k == "transfer-encoding" || k == "connection" || (tamper && k == "content-length") {
            continue;
        }
        if k == "location" {
            // Keep upload sessions going through the proxy.
            let l = String::from_utf8_lossy(v.as_bytes())
                .replace(&ctx.upstream, &format!("http://{}", ctx.addr));
            builder = builder.header(k, l);
            continue;
        }
        builder = builder.header(k, v.as_bytes());
    }
    if tamper {
        let mut b = resp.bytes().await.unwrap_or_default().to_vec();
        if let Some(i) = b.iter().position(|c| *c == b'{') {
            // Insert a space: still JSON, different bytes.
            b.insert(i + 1, b' ');
        }
        return builder
            .body(Full::new(Bytes::from(b)).map_err(|n| match n {}).boxed())
            .unwrap();
    }
    let counting = method == hyper::Method::GET && upstream_path.contains("/blobs/sha256:");
    let state = Arc::clone(&ctx.state);
    let stream = futures::stream::unfold((resp, 0u64), move |(mut resp, sent)| {
        let state = Arc::clone(&state);
        async move {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let now = sent + c.len() as u64;
                    if counting {
                        // About 50 MB/s: 20 ms per MiB boundary crossed.
                        if state.throttle.load(Ordering::Relaxed) && now >> 20 != sent >> 20 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        state
                            .blob_body_bytes
                            .fetch_add(c.len() as u64, Ordering::Relaxed);
                    }
                    Some((Ok(Frame::data(c)), (resp, now)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), (resp, sent))),
            }
        }
    });
    builder
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}
