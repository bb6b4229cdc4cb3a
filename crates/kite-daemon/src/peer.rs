//! Peers: the nodes of one site serve each other the chunks they hold, so
//! the site fetches each chunk from the registry once.
//!
//! **Serving** (`--peer-listen`): the OCI distribution blob routes, `GET`
//! and `HEAD /v2/<name>/blobs/<digest>`, read-only. A node keeps a blob's
//! chunks decoded and verified (its cache holds the blob's *uncompressed
//! layout*, the one the bootstrap's chunk table describes), not the stored
//! zstd bytes; so a peer serves that layout, and says so: the request must
//! accept [`MEDIA_TYPE`] (anything else gets 406, never bytes that do not
//! hash to the digest in the URL), and a `Range` addresses the
//! uncompressed layout, from the first byte of one chunk to the last byte
//! of another. Only ranges whose chunks are all on disk are answered
//! (206); a blob this node does not know is 404, a range that is not on
//! disk (or not on chunk boundaries) 416. Each chunk is verified against
//! its sha256 again as it is read, so a node never passes on what its own
//! disk damaged. There is no listing route: a requester gets only blobs
//! whose digest it names, so only what it could have pulled itself.
//!
//! A request with `kite-fill: 1` asks the node, as the blob's *home*, to
//! fetch the missing chunks from its own upstream first (the same fetch
//! path as its own readers: in-flight fetches are joined, so concurrent
//! requests for one range cost one upstream fetch). A node fills only for
//! blobs it is the home of by its own view, and a home fetches from
//! upstream, never from another peer, so requests cannot chain or loop.
//!
//! **Asking** (`--peers`): every blob has a home among the live peers,
//! chosen by rendezvous hashing of (peer address, blob digest): all nodes
//! agree on it without talking, and a peer that leaves moves only its own
//! blobs. Before fetching a run of chunks from the registry, a node asks
//! the run's home (unless it is the home itself), with a deadline. The
//! answer's chunks are verified against the chunk table before anything
//! is written; a miss (404/416) goes to the registry; a peer that fails,
//! times out or serves a wrong byte is skipped for [`PEER_BACKOFF`], and
//! the registry serves the run. Peers are not trusted, only used.
//!
//! **Access**: with `--peer-token-file`, both sides use the token as a
//! bearer token; a request without it is refused with 401. The token is
//! never logged (its header is marked sensitive, and errors never quote
//! headers). With `--peer-tls-cert`/`--peer-tls-key` a node serves over
//! TLS (rustls), and with `--peer-tls-ca` it asks over TLS, trusting only
//! that CA, for certificates naming the site's peer name
//! (`--peer-tls-name`, default `kite-peer`) whatever address it dials: a
//! site shares one CA and name as it shares one token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kite_format::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::blob::BlobState;
use crate::daemon::Daemon;

/// The media type of a blob's uncompressed layout, as peers serve it.
pub const MEDIA_TYPE: &str = "application/vnd.kite.blob.uncompressed";
/// Request header: fetch missing chunks from upstream first (home peer).
pub const FILL_HEADER: &str = "kite-fill";
/// How long a peer that failed is left out of the live set.
pub const PEER_BACKOFF: Duration = Duration::from_secs(30);
/// Largest range a peer serves in one response.
pub const MAX_RANGE: u64 = 64 << 20;
/// How often peer names (`dns:`) are resolved again.
const REFRESH: Duration = Duration::from_secs(10);
/// Responses being read from disk at once; more wait.
const SERVE_CONCURRENCY: usize = 16;

/// Where a node's peers are: addresses, or the A/AAAA records of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// `HOST:PORT` (an address, or a name resolved like one).
    Addr(String),
    /// `dns:NAME[:PORT]`: every address of NAME (a headless service),
    /// at PORT or the port this node listens on.
    Dns { name: String, port: Option<u16> },
}

/// Parse `--peers`: a comma-separated list of `HOST:PORT`, or
/// `dns:NAME[:PORT]`.
pub fn parse_peers(s: &str) -> Result<Vec<PeerSpec>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if let Some(rest) = item.strip_prefix("dns:") {
            let (name, port) = match rest.rsplit_once(':') {
                Some((n, p)) => (
                    n,
                    Some(
                        p.parse::<u16>()
                            .map_err(|_| format!("--peers {item:?}: {p:?} is not a port number"))?,
                    ),
                ),
                None => (rest, None),
            };
            if name.is_empty() {
                return Err(format!("--peers {item:?}: no name after dns:"));
            }
            out.push(PeerSpec::Dns {
                name: name.to_string(),
                port,
            });
        } else {
            let ok = item
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!(
                    "--peers {item:?}: expected HOST:PORT or dns:NAME[:PORT]"
                ));
            }
            out.push(PeerSpec::Addr(item.to_string()));
        }
    }
    if out.is_empty() {
        return Err("--peers: no peer given".into());
    }
    Ok(out)
}

/// TLS on the peer port (PEM files). A site shares one CA; every peer's
/// certificate carries one name (`name`, a DNS SAN) whatever address it
/// is dialled at, the way the site shares one token.
#[derive(Debug, Clone, Default)]
pub struct PeerTls {
    /// This node's certificate chain and key: serve over TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The CA the peers' certificates must chain to: ask over TLS.
    pub ca: Option<PathBuf>,
    /// The name the peers' certificates must carry.
    pub name: String,
}

/// The default name peer certificates carry.
pub const DEFAULT_TLS_NAME: &str = "kite-peer";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS acceptor for serving with `cert` (chain) and `key`.
pub fn server_tls(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--peer-tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--peer-tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--peer-tls-key {}: {e}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--peer-tls-cert/--peer-tls-key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Verifies a peer's chain against the site CA, for the site's peer name
/// rather than the address dialled.
#[derive(Debug)]
struct SiteName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for SiteName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client TLS settings for asking peers: only `ca` is trusted, and
/// certificates must name `name`.
pub fn client_tls(ca: &Path, name: &str) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--peer-tls-ca {}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "--peer-tls-ca {}: no usable CA certificate in it",
            ca.display()
        ));
    }
    let name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| format!("--peer-tls-name {name:?}: {e}"))?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("--peer-tls-ca {}: {e}", ca.display()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SiteName { inner, name }))
        .with_no_client_auth();
    Ok(cfg)
}

/// Peer settings of a worker.
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    /// Serve this node's chunks to peers here.
    pub listen: Option<SocketAddr>,
    /// Ask these peers before the registry.
    pub peers: Vec<PeerSpec>,
    /// Bearer token both sides require (from `--peer-token-file`).
    pub token: Option<String>,
    /// Deadline of one request to a peer.
    pub timeout: Duration,
    /// TLS on the peer port (off unless files are given).
    pub tls: PeerTls,
}

/// The home of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// This node: fetch from the registry (and serve the others).
    Local,
    /// Another node: ask it first.
    Peer(SocketAddr),
}

/// The highest-scoring member for `blob` (rendezvous hashing).
pub fn rendezvous(members: &[SocketAddr], blob: &Digest) -> Option<SocketAddr> {
    members.iter().copied().max_by_key(|m| score(m, blob))
}

fn score(member: &SocketAddr, blob: &Digest) -> (u64, SocketAddr) {
    let mut h = Sha256::new();
    h.update(member.to_string().as_bytes());
    h.update(b"\0");
    h.update(blob.0);
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // Ties (never in practice) break by address, so every node agrees.
    (u64::from_be_bytes(b), *member)
}

/// Counters of both sides.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Requests this node made to peers, and the chunk bytes they gave
    /// that were verified and used.
    pub asked: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Answers that were a miss (404, 416): the registry served instead.
    pub misses: AtomicU64,
    /// Peers that failed (transport, deadline, status) and were skipped.
    pub failures: AtomicU64,
    /// Answers refused because a chunk did not match its digest.
    pub corrupt: AtomicU64,
    /// Requests served to peers, and their bytes.
    pub served: AtomicU64,
    pub served_bytes: AtomicU64,
    /// Requests answered 404/416.
    pub served_misses: AtomicU64,
    /// Requests refused for a missing or wrong token.
    pub refused: AtomicU64,
}

/// One member of the peer set, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub addr: String,
    /// `self`, `live`, or `skipped` (failed recently).
    pub state: String,
    /// Why it was skipped (the last failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The peer section of `kite status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub listen: Option<String>,
    pub members: Vec<MemberStatus>,
    pub asked: u64,
    pub received_bytes: u64,
    pub misses: u64,
    pub failures: u64,
    pub corrupt: u64,
    pub served: u64,
    pub served_bytes: u64,
    pub served_misses: u64,
    pub refused: u64,
}

#[derive(Default)]
struct Members {
    /// Resolved members, sorted, with whether each is this node.
    list: Vec<(SocketAddr, bool)>,
    /// Skipped until, and why.
    down: HashMap<SocketAddr, (Instant, String)>,
}

/// Why a peer did not give a run.
#[derive(Debug)]
pub enum PeerMiss {
    /// The peer does not hold it (404, 416) or could not fetch it (503).
    NotThere(StatusCode),
    /// The peer failed; it is skipped for a while.
    Failed(String),
}

/// The asking side, shared by every blob of the worker.
pub struct Peers {
    /// `http`, or `https` with `--peer-tls-ca`.
    scheme: &'static str,
    specs: Vec<PeerSpec>,
    /// The address this node serves on (self detection), if it serves.
    listen: Option<SocketAddr>,
    token: Option<String>,
    timeout: Duration,
    client: reqwest::Client,
    members: Mutex<Members>,
    pub stats: PeerStats,
}

impl Peers {
    /// The asking side for `cfg`; `listen` is the address actually bound.
    pub fn new(cfg: &PeerConfig, listen: Option<SocketAddr>) -> Result<Arc<Self>, String> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(cfg.timeout.min(Duration::from_secs(2)))
            .timeout(cfg.timeout);
        let scheme = match &cfg.tls.ca {
            Some(ca) => {
                let name = if cfg.tls.name.is_empty() {
                    DEFAULT_TLS_NAME
                } else {
                    &cfg.tls.name
                };
                builder = builder.use_preconfigured_tls(client_tls(ca, name)?);
                "https"
            }
            None => "http",
        };
        let client = builder
            .build()
            .map_err(|e| format!("peer HTTP client: {e}"))?;
        Ok(Arc::new(Self {
            scheme,
            specs: cfg.peers.clone(),
            listen,
            token: cfg.token.clone(),
            timeout: cfg.timeout,
            client,
            members: Mutex::new(Members::default()),
            stats: PeerStats::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolve the peer specs now (names through the system resolver);
    /// the member list changes only if something resolved.
    pub async fn refresh(&self) {
        let mut found: Vec<SocketAddr> = Vec::new();
        for spec in &self.specs {
            let (host, what) = match spec {
                PeerSpec::Addr(a) => (a.clone(), a.clone()),
                PeerSpec::Dns { name, port } => {
                    let Some(port) = port.or(self.listen.map(|l| l.port())) else {
                        tracing::warn!(
                            "--peers dns:{name} names no port and this node serves none"
                        );
                        continue;
                    };
                    (format!("{name}:{port}"), format!("dns:{name}"))
                }
            };
            let resolved = tokio::net::lookup_host(host.clone()).await;
            match resolved {
                Ok(addrs) => found.extend(addrs),
                Err(e) => tracing::warn!(peer = %what, "resolving peer: {e}"),
            }
        }
        found.sort();
        found.dedup();
        if found.is_empty() {
            return;
        }
        let listed: Vec<(SocketAddr, bool)> =
            found.into_iter().map(|a| (a, self.is_self(a))).collect();
        let mut m = self.lock();
        if m.list != listed {
            tracing::info!(
                members = %listed.iter().map(|(a, s)| if *s { format!("{a} (this node)") } else { a.to_string() }).collect::<Vec<_>>().join(", "),
                "peer set"
            );
            m.list = listed;
        }
    }

    /// Keep the member list fresh (names may resolve differently later).
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.refresh().await;
            }
        })
    }

    /// Whether `addr` is this node's own peer endpoint.
    fn is_self(&self, addr: SocketAddr) -> bool {
        let Some(l) = self.listen else {
            return false;
        };
        if addr == l {
            return true;
        }
        l.ip().is_unspecified() && addr.port() == l.port() && is_local_ip(addr.ip())
    }

    /// The home of `blob` among the live members, if there are members.
    pub fn home(&self, blob: &Digest) -> Option<Home> {
        let now = Instant::now();
        let m = self.lock();
        let live: Vec<SocketAddr> = m
            .list
            .iter()
            .filter(|(a, me)| *me || m.down.get(a).is_none_or(|(until, _)| *until <= now))
            .map(|(a, _)| *a)
            .collect();
        let home = rendezvous(&live, blob)?;
        let me = m.list.iter().any(|(a, s)| *a == home && *s);
        Some(if me { Home::Local } else { Home::Peer(home) })
    }

    /// Leave `addr` out of the live set for [`PEER_BACKOFF`].
    pub fn skip(&self, addr: SocketAddr, why: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %addr, "peer skipped for {} s: {why}", PEER_BACKOFF.as_secs());
        self.lock()
            .down
            .insert(addr, (Instant::now() + PEER_BACKOFF, why.to_string()));
    }

    /// A peer served bytes that are not the chunks': skipped, counted.
    pub fn corrupt(&self, addr: SocketAddr, why: &str) {
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        self.skip(addr, &format!("served corrupt data ({why})"));
    }

    /// Ask `addr` for bytes `range` of `blob`'s uncompressed layout (chunk
    /// boundaries), as its home (`kite-fill`). The caller verifies them.
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        blob: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, PeerMiss> {
        self.stats.asked.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}://{addr}/v2/kite/blobs/{}", self.scheme, blob.oci());
        let mut req = self
            .client
            .get(&url)
            .header("accept", MEDIA_TYPE)
            .header("range", format!("bytes={}-{}", range.start, range.end - 1))
            .header(FILL_HEADER, "1");
        if let Some(t) = &self.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| PeerMiss::Failed("the peer token is not a valid header".into()))?;
            v.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, v);
        }
        let fail = |why: String| {
            self.skip(addr, &why);
            PeerMiss::Failed(why)
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(fail(format!(
                    "no answer within {} s",
                    self.timeout.as_secs_f32()
                )))
            }
            // The text names the URL (no secret there) and the causes,
            // never a header.
            Err(e) => return Err(fail(format!("request failed: {}", causes(&e)))),
        };
        let status = resp.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::NOT_FOUND
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::SERVICE_UNAVAILABLE => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Err(PeerMiss::NotThere(status));
            }
            s => return Err(fail(format!("status {s}"))),
        }
        let want = (range.end - range.start) as usize;
        let mut resp = resp;
        let mut body = Vec::with_capacity(want);
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if body.len() + c.len() > want {
                        return Err(fail(format!("more than the {want} bytes asked for")));
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    return Err(fail(format!(
                        "body not complete within {} s",
                        self.timeout.as_secs_f32()
                    )))
                }
                Err(e) => return Err(fail(format!("reading the body: {}", causes(&e)))),
            }
        }
        if body.len() != want {
            return Err(fail(format!("{} bytes, asked for {want}", body.len())));
        }
        Ok(Bytes::from(body))
    }

    /// For status.
    pub fn status(&self) -> PeerStatus {
        let now = Instant::now();
        let m = self.lock();
        let s = &self.stats;
        PeerStatus {
            listen: self.listen.map(|l| l.to_string()),
            members: m
                .list
                .iter()
                .map(|(a, me)| {
                    let down = m.down.get(a).filter(|(until, _)| *until > now && !*me);
                    MemberStatus {
                        addr: a.to_string(),
                        state: if *me {
                            "self"
                        } else if down.is_some() {
                            "skipped"
                        } else {
                            "live"
                        }
                        .into(),
                        why: down.map(|(_, w)| w.clone()),
                    }
                })
                .collect(),
            asked: s.asked.load(Ordering::Relaxed),
            received_bytes: s.received_bytes.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            corrupt: s.corrupt.load(Ordering::Relaxed),
            served: s.served.load(Ordering::Relaxed),
            served_bytes: s.served_bytes.load(Ordering::Relaxed),
            served_misses: s.served_misses.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
        }
    }
}

/// An error and its sources, `: `-separated (reqwest's Display alone
/// hides why a connection failed).
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Whether `ip` is an address of this host (binding to it succeeds).
fn is_local_ip(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Equal without an early exit (the token check).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The serving side.
pub struct Server {
    daemon: Arc<Daemon>,
    token: Option<String>,
    /// The asking side: its counters (one status section) and the home
    /// check.
    peers: Arc<Peers>,
    permits: tokio::sync::Semaphore,
}

/// Serve peers on `listener` (over TLS with `tls`) until the task is
/// dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    daemon: Arc<Daemon>,
    token: Option<String>,
    peers: Arc<Peers>,
) {
    let server = Arc::new(Server {
        daemon,
        token,
        peers,
        permits: tokio::sync::Semaphore::new(SERVE_CONCURRENCY),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("peer listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(&server);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, server).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(s, server).await,
                        Ok(Err(e)) => tracing::debug!("peer TLS handshake: {e}"),
                        Err(_) => tracing::debug!("peer TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// How long a peer has to complete a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_connection<S>(io: S, server: Arc<Server>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let server = Arc::clone(&server);
        async move { Ok::<_, hyper::Error>(server.answer(req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("kite peer: {text}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// `/v2/<name>/blobs/<digest>` -> the digest; `None` for anything else.
pub fn blob_route(path: &str) -> Option<Result<Digest, ()>> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-/".contains(&c));
    let hex = digest.strip_prefix("sha256:")?;
    if !name_ok
        || hex.len() != 64
        || !hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Some(Err(()));
    }
    Some(Digest::parse(digest).ok_or(()))
}

/// `bytes=A-B` (one range, both ends given) -> `A..B+1`.
pub fn parse_range(v: &str) -> Option<Range<u64>> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let end = b.checked_add(1)?;
    (a <= b).then_some(a..end)
}

/// The chunks exactly covering `range` of the uncompressed layout (from
/// the start of one chunk to the end of another), if it is so.
fn chunks_exactly(blob: &BlobState, range: &Range<u64>) -> Option<Range<usize>> {
    let t = &blob.chunks;
    let first = t.partition_point(|c| c.uncompressed_offset < range.start);
    let last = t.partition_point(|c| c.uncompressed_offset < range.end);
    let (f, l) = (t.get(first)?, t.get(last.checked_sub(1)?)?);
    (first < last
        && f.uncompressed_offset == range.start
        && l.uncompressed_offset + u64::from(l.uncompressed_size) == range.end)
        .then_some(first..last)
}

impl Server {
    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let stats = &self.peers.stats;
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(given.as_bytes(), token.as_bytes()) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let mut r = reply(StatusCode::UNAUTHORIZED, "a site token is required");
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer realm=\"kite-peer\""),
                );
                return r;
            }
        }
        let path = req.uri().path();
        if path == "/v2/" || path == "/v2" {
            return reply(StatusCode::OK, "kite peer");
        }
        let digest = match blob_route(path) {
            None => return reply(StatusCode::NOT_FOUND, "only /v2/<name>/blobs/<digest>"),
            Some(Err(())) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "expected /v2/<name>/blobs/sha256:<64 hex digits>",
                )
            }
            Some(Ok(d)) => d,
        };
        let (head, get) = (req.method() == Method::HEAD, req.method() == Method::GET);
        if !head && !get {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET and HEAD");
        }
        let blob = self
            .daemon
            .registry
            .lock()
            .ok()
            .and_then(|r| r.blob(&digest));
        let Some(blob) = blob else {
            stats.served_misses.fetch_add(1, Ordering::Relaxed);
            return reply(StatusCode::NOT_FOUND, "blob unknown on this node");
        };
        let accepts = req
            .headers()
            .get_all(hyper::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().starts_with(MEDIA_TYPE)));
        if !accepts {
            return reply(
                StatusCode::NOT_ACCEPTABLE,
                &format!("this node holds blobs decoded; ask for {MEDIA_TYPE} ranges"),
            );
        }
        if head {
            let mut r = Response::new(Full::new(Bytes::new()));
            let h = r.headers_mut();
            h.insert(hyper::header::CONTENT_LENGTH, blob.uncompressed_size.into());
            h.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(MEDIA_TYPE),
            );
            h.insert(
                "kite-complete",
                hyper::header::HeaderValue::from_static(if blob.is_complete() {
                    "true"
                } else {
                    "false"
                }),
            );
            return r;
        }
        let range = req
            .headers()
            .get(hyper::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_range);
        let fill = req
            .headers()
            .get(FILL_HEADER)
            .is_some_and(|v| v.as_bytes() == b"1");
        let Some(range) = range.filter(|r| r.end - r.start <= MAX_RANGE) else {
            stats.served_misses.fetch_add(1, Ordering::Relaxed);
            return reply(
                StatusCode::RANGE_NOT_SATISFIABLE,
                &format!("one Range of at most {MAX_RANGE} bytes is required"),
            );
        };
        let Some(chunks) = chunks_exactly(&blob, &range) else {
            stats.served_misses.fetch_add(1, Ordering::Relaxed);
            return reply(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range must start and end on chunk boundaries",
            );
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        };
        match self.read_chunks(&blob, chunks, range.clone(), fill).await {
            Ok(body) => {
                stats.served.fetch_add(1, Ordering::Relaxed);
                stats
                    .served_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                let mut r = Response::new(Full::new(body));
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                let h = r.headers_mut();
                h.insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(MEDIA_TYPE),
                );
                if let Ok(v) = format!(
                    "bytes {}-{}/{}",
                    range.start,
                    range.end - 1,
                    blob.uncompressed_size
                )
                .parse()
                {
                    h.insert(hyper::header::CONTENT_RANGE, v);
                }
                r
            }
            Err((status, why)) => {
                stats.served_misses.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(blob = %blob.digest, %status, "peer request not served: {why}");
                reply(status, &why)
            }
        }
    }

    /// The verified bytes of `chunks` (`range` of the layout), fetching
    /// missing ones first when `fill`.
    async fn read_chunks(
        &self,
        blob: &Arc<BlobState>,
        chunks: Range<usize>,
        range: Range<u64>,
        fill: bool,
    ) -> Result<Bytes, (StatusCode, String)> {
        let Some(local) = blob.local_reader() else {
            return Err((
                StatusCode::NOT_FOUND,
                "this node cannot read the blob's cache directly".into(),
            ));
        };
        let missing: Vec<usize> = chunks.clone().filter(|&i| !blob.is_fetched(i)).collect();
        if !missing.is_empty() {
            if !fill {
                return Err((StatusCode::RANGE_NOT_SATISFIABLE, "not on disk".into()));
            }
            // Only the home fetches for others, and it fetches from
            // upstream: a node that sees another home (the nodes' views
            // differ for a moment after a failure) does not pass the
            // request on, so requests never chain or loop between peers.
            if blob
                .peers
                .as_ref()
                .is_some_and(|p| p.home(&blob.digest) != Some(Home::Local))
            {
                return Err((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "not on disk, and this node is not the blob's home".into(),
                ));
            }
            let object = match blob.held_object() {
                Some(o) => Some(o),
                None => match blob.request_object(missing[0], blob.timeout * 2).await {
                    Ok(()) => blob.held_object(),
                    Err(e) => {
                        tracing::debug!(blob = %blob.digest, "no cache object for a peer's request: {e}");
                        None
                    }
                },
            };
            let Some(object) = object else {
                return Err((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "not on disk, and no cache object to fetch into".into(),
                ));
            };
            if let Err(e) = blob
                .ensure(&missing, &object, self.daemon.merge_bound)
                .await
            {
                return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
            }
        }
        let filled = !missing.is_empty();
        let blob = Arc::clone(blob);
        tokio::task::spawn_blocking(move || -> Result<Bytes, (StatusCode, String)> {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            local.read_at(range.start, &mut buf).map_err(|e| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading the cache: {e}"),
                )
            })?;
            for i in chunks.clone() {
                if !blob.is_fetched(i) {
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("chunk {i} of {chunks:?} not fetched (filled: {filled})"),
                    ));
                }
                let c = blob.chunks[i];
                let off = (c.uncompressed_offset - range.start) as usize;
                let data = &buf[off..off + c.uncompressed_size as usize];
                if Digest::of(data) != c.digest {
                    tracing::error!(blob = %blob.digest, chunk = i, "chunk on disk does not match its digest; not served");
                    return Err((
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "a chunk on disk does not match its digest".into(),
                    ));
                }
            }
            Ok(Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, format!("reader: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peers_parse() {
        assert_eq!(
            parse_peers("10.0.0.1:7070, node-b:7070").unwrap(),
            vec![
                PeerSpec::Addr("10.0.0.1:7070".into()),
                PeerSpec::Addr("node-b:7070".into())
            ]
        );
        assert_eq!(
            parse_peers("dns:kite-peers.kube-system.svc").unwrap(),
            vec![PeerSpec::Dns {
                name: "kite-peers.kube-system.svc".into(),
                port: None
            }]
        );
        assert_eq!(
            parse_peers("dns:peers:7071").unwrap(),
            vec![PeerSpec::Dns {
                name: "peers".into(),
                port: Some(7071)
            }]
        );
        for bad in ["", "10.0.0.1", "dns:", "dns:x:port", "host:99999"] {
            assert!(parse_peers(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rendezvous_agrees_spreads_and_moves_only_the_leavers_blobs() {
        let members: Vec<SocketAddr> = (1..=4).map(|i| addr(&format!("10.0.0.{i}:7070"))).collect();
        let blobs: Vec<Digest> = (0u32..400).map(|i| Digest::of(&i.to_le_bytes())).collect();
        let homes: Vec<SocketAddr> = blobs
            .iter()
            .map(|b| rendezvous(&members, b).unwrap())
            .collect();
        // Independent of the order a node lists its members in.
        let mut rev = members.clone();
        rev.reverse();
        for (b, h) in blobs.iter().zip(&homes) {
            assert_eq!(rendezvous(&rev, b).unwrap(), *h);
        }
        // Spread: each of 4 members is home of a fair share of 400.
        for m in &members {
            let n = homes.iter().filter(|h| *h == m).count();
            assert!((60..=140).contains(&n), "{m} is home of {n} of 400");
        }
        // Member 2 leaves: only its blobs move.
        let without: Vec<SocketAddr> = members
            .iter()
            .copied()
            .filter(|m| *m != members[1])
            .collect();
        for (b, h) in blobs.iter().zip(&homes) {
            let now = rendezvous(&without, b).unwrap();
            if *h != members[1] {
                assert_eq!(now, *h, "a blob of a member that stayed moved");
            } else {
                assert_ne!(now, members[1]);
            }
        }
        assert_eq!(rendezvous(&[], &blobs[0]), None);
    }

    #[test]
    fn routes_and_ranges() {
        let d = Digest::of(b"x");
        assert_eq!(
            blob_route(&format!("/v2/library/app/blobs/{}", d.oci())),
            Some(Ok(d))
        );
        assert_eq!(blob_route("/v2/app/manifests/latest"), None);
        assert_eq!(blob_route("/v2/_catalog"), None);
        assert_eq!(blob_route("/v2/app/blobs/sha256:00"), Some(Err(())));
        assert_eq!(
            blob_route(&format!("/v2/App/blobs/{}", d.oci())),
            Some(Err(()))
        );
        assert_eq!(parse_range("bytes=0-4095"), Some(0..4096));
        assert_eq!(parse_range("bytes=4096-"), None);
        assert_eq!(parse_range("bytes=-100"), None);
        assert_eq!(parse_range("bytes=9-3"), None);
        assert_eq!(parse_range("bytes=0-1,5-9"), None);
        assert_eq!(parse_range(&format!("bytes=0-{}", u64::MAX)), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn self_is_the_listen_address_or_a_local_ip_on_its_port() {
        let cfg = PeerConfig {
            timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let p = Peers::new(&cfg, Some(addr("127.0.0.1:7070"))).unwrap();
        assert!(p.is_self(addr("127.0.0.1:7070")));
        assert!(!p.is_self(addr("127.0.0.1:7071")));
        let any = Peers::new(&cfg, Some(addr("0.0.0.0:7070"))).unwrap();
        assert!(any.is_self(addr("127.0.0.1:7070")));
        // TEST-NET-3: never an address of this host.
        assert!(!any.is_self(addr("203.0.113.9:7070")));
        let none = Peers::new(&cfg, None).unwrap();
        assert!(!none.is_self(addr("127.0.0.1:7070")));
    }
}
