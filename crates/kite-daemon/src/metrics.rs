//! Prometheus metrics: `kite daemon --metrics-addr ADDR` serves them at
//! `GET /metrics` (OpenMetrics text, which Prometheus scrapes).
//!
//! Two kinds, both named `kite_*` in base units:
//! - **live** metrics, updated where things happen: backend fetch latency
//!   (histogram) and outcome, bytes fetched by source, chunks refused as
//!   corrupt, images evicted ([`record_fetch`], [`record_corrupt`],
//!   [`record_eviction`]). They live for the
//!   process; a new worker starts them from zero, which Prometheus reads
//!   as a counter reset.
//! - **collected** metrics, read from the worker's state at each scrape
//!   ([`StateCollector`]): kernel requests and failures by path, requests in
//!   flight, images registered and mounted, cache bytes held and on disk,
//!   the bound, and each
//!   image's fetched fraction (labelled by fsid: one series per image,
//!   never per chunk).
//!
//! `kite status` stays the human view of the same state.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::api::ApiContext;

type SourceLabel = [(&'static str, &'static str); 1];
type OutcomeLabels = [(&'static str, &'static str); 2];

/// Metrics updated where fetches happen.
#[derive(Debug)]
pub struct Live {
    fetch_seconds: Family<SourceLabel, Histogram>,
    fetches: Family<OutcomeLabels, Counter>,
    fetched_bytes: Family<SourceLabel, Counter>,
    corrupt_chunks: Counter,
    evictions: Counter,
}

fn fetch_histogram() -> Histogram {
    // 1 ms .. ~33 s: a local read to a stalled registry.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The process's live metrics.
pub fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| Live {
        fetch_seconds: Family::new_with_constructor(fetch_histogram),
        fetches: Family::default(),
        fetched_bytes: Family::default(),
        corrupt_chunks: Counter::default(),
        evictions: Counter::default(),
    })
}

/// How a backend fetch ended.
#[derive(Debug, Clone, Copy)]
pub enum FetchOutcome {
    /// `n` stored bytes arrived.
    Ok(u64),
    Error,
    /// The fetch deadline (`--fetch-timeout`) cut it off.
    Timeout,
}

/// One request of a run of chunks, from `source` (one of [`SOURCES`]).
pub fn record_fetch(source: &'static str, seconds: f64, outcome: FetchOutcome) {
    let l = live();
    l.fetch_seconds
        .get_or_create(&[("source", source)])
        .observe(seconds);
    let result = match outcome {
        FetchOutcome::Ok(n) => {
            l.fetched_bytes
                .get_or_create(&[("source", source)])
                .inc_by(n);
            "ok"
        }
        FetchOutcome::Error => "error",
        FetchOutcome::Timeout => "timeout",
    };
    l.fetches
        .get_or_create(&[("source", source), ("result", result)])
        .inc();
}

/// Chunks of `bytes` (uncompressed) copied from another blob on this
/// node instead of fetched: counted as bytes from source `chunk_copy`.
pub fn record_local_copy(bytes: u64) {
    live()
        .fetched_bytes
        .get_or_create(&[("source", "chunk_copy")])
        .inc_by(bytes);
}

/// The sources bytes are counted by, in `kite_fetched_bytes_total`.
pub const SOURCES: [&str; 6] = ["registry", "mirror", "peer", "http", "local", "chunk_copy"];

/// Bytes received from each source since this worker started (the
/// `kite_fetched_bytes_total` counters, for status), sources with none
/// left out.
pub fn fetched_by_source() -> std::collections::BTreeMap<String, u64> {
    let l = live();
    SOURCES
        .iter()
        // `get`, not `get_or_create`: reading must not add empty series.
        .filter_map(|s| {
            let n = l.fetched_bytes.get(&[("source", *s)])?.get();
            (n > 0).then(|| (s.to_string(), n))
        })
        .collect()
}

/// A chunk whose stored bytes failed verification (never cached).
pub fn record_corrupt() {
    live().corrupt_chunks.inc();
}

/// An image forgotten to keep the cache under its bound.
pub fn record_eviction() {
    live().evictions.inc();
}

/// Metrics read from the worker's state at each scrape.
pub struct StateCollector {
    ctx: Arc<ApiContext>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.ctx.daemon.stats;
        let path = [("path", self.ctx.kernel_path.as_str())];
        counter_family(
            &mut enc,
            "kernel_requests",
            "Kernel requests for data not in the cache (cachefiles READs, fanotify pre-content events)",
            &path,
            s.reads.load(Ordering::Relaxed),
        )?;
        counter_family(
            &mut enc,
            "kernel_request_errors",
            "Kernel requests answered with an error (the reader got EIO)",
            &path,
            s.reads_failed.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "kernel_requests_in_flight",
            "Kernel requests taken and not answered yet",
            None,
            s.reads_inflight.load(Ordering::Relaxed) as i64,
        )?;
        let images = crate::api::images_status(&self.ctx.daemon, self.ctx.fanotify.as_deref());
        gauge(
            &mut enc,
            "images_registered",
            "Images registered with the daemon",
            None,
            images.len() as i64,
        )?;
        let mounts = kite_kernel::mount::erofs_mounts();
        let mounted = images
            .iter()
            .filter(|i| mounts.iter().any(|m| m.fsid == i.fsid))
            .count();
        gauge(
            &mut enc,
            "images_mounted",
            "Registered images with at least one EROFS mount on this host",
            None,
            mounted as i64,
        )?;
        // A blob shared by images is held once.
        let mut seen = std::collections::BTreeSet::new();
        let held: u64 = images
            .iter()
            .flat_map(|i| i.blobs.iter())
            .filter(|b| seen.insert(b.digest.clone()))
            .map(|b| b.fetched_bytes)
            .sum();
        gauge(
            &mut enc,
            "cache_data",
            "Uncompressed chunk bytes the cache holds for registered images",
            Some(&Unit::Bytes),
            held as i64,
        )?;
        gauge(
            &mut enc,
            "cache_disk",
            "Disk space the cache's files take (blob files, state, bootstraps, manifests)",
            Some(&Unit::Bytes),
            crate::gc::cache_usage(&self.ctx.cache_dir) as i64,
        )?;
        if self.ctx.cache_bound > 0 {
            gauge(
                &mut enc,
                "cache_bound",
                "The cache's size bound (--cache-size)",
                Some(&Unit::Bytes),
                self.ctx.cache_bound as i64,
            )?;
        }
        if let Some(p) = &self.ctx.peers {
            let st = &p.stats;
            for (name, help, v) in [
                (
                    "peer_served_requests",
                    "Peer requests this node answered with chunk data",
                    st.served.load(Ordering::Relaxed),
                ),
                (
                    "peer_served_bytes",
                    "Chunk bytes (uncompressed) this node served to peers",
                    st.served_bytes.load(Ordering::Relaxed),
                ),
                (
                    "peer_refused_requests",
                    "Peer requests refused for a missing or wrong site token",
                    st.refused.load(Ordering::Relaxed),
                ),
                (
                    "peer_failures",
                    "Times a peer failed or served corrupt data and was skipped",
                    st.failures.load(Ordering::Relaxed),
                ),
                (
                    "peer_misses",
                    "Peer requests answered 404/416/503 (the registry served instead)",
                    st.misses.load(Ordering::Relaxed),
                ),
            ] {
                let c = ConstCounter::new(v);
                let name = format!("kite_{name}");
                let m = enc.encode_descriptor(&name, help, None, c.metric_type())?;
                c.encode(m)?;
            }
        }
        let g = ConstGauge::new(0.0f64);
        let mut fam = enc.encode_descriptor(
            "kite_image_fetched_ratio",
            "Fraction of each registered image's data in the cache (0 to 1)",
            None,
            g.metric_type(),
        )?;
        for i in &images {
            let total: u64 = i.blobs.iter().map(|b| b.uncompressed_size).sum();
            let got: u64 = i.blobs.iter().map(|b| b.fetched_bytes).sum();
            let ratio = if total == 0 {
                1.0
            } else {
                got as f64 / total as f64
            };
            let labels = [("image", i.fsid.as_str())];
            ConstGauge::new(ratio).encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, &str); 1],
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let name = format!("kite_{name}");
    let mut m = enc.encode_descriptor(&name, help, None, c.metric_type())?;
    c.encode(m.encode_family(labels)?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let name = format!("kite_{name}");
    let m = enc.encode_descriptor(&name, help, unit, g.metric_type())?;
    g.encode(m)
}

/// The registry of everything `/metrics` shows.
pub fn registry(ctx: Arc<ApiContext>) -> Registry {
    let mut r = Registry::default();
    let l = live();
    let k = r.sub_registry_with_prefix("kite");
    k.register_with_unit(
        "fetch_duration",
        "Latency of backend requests (one request fetches a run of chunks)",
        Unit::Seconds,
        l.fetch_seconds.clone(),
    );
    k.register(
        "fetches",
        "Backend requests by source and result (ok, error, timeout)",
        l.fetches.clone(),
    );
    k.register_with_unit(
        "fetched",
        "Bytes received from each source (registry, mirror, http, local: stored bytes; peer: verified uncompressed chunk bytes; chunk_copy: copied from another blob on this node)",
        Unit::Bytes,
        l.fetched_bytes.clone(),
    );
    k.register(
        "evictions",
        "Unmounted images forgotten (and their data deleted) to keep the cache under --cache-size",
        l.evictions.clone(),
    );
    k.register(
        "corrupt_chunks",
        "Chunks whose bytes failed verification and were refused",
        l.corrupt_chunks.clone(),
    );
    r.register_collector(Box::new(StateCollector { ctx }));
    r
}

/// Serve `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, ctx: Arc<ApiContext>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    let registry = Arc::new(registry(ctx));
    loop {
        let (stream, _) = listener.accept().await?;
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, hyper::Error>(answer(&req, &registry)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "kite: only GET /metrics here\n".into(),
        );
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("kite: encoding metrics: {e}\n"),
        ),
    }
}
