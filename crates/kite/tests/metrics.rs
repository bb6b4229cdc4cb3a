//! `kite daemon --metrics-addr`: the Prometheus endpoint, parsed by a
//! Prometheus text parser (prometheus-parse), its figures checked against
//! a known workload and against `kite status`.
//!
//! Needs root and the fanotify path (Linux >= 6.14); skipped loudly
//! elsewhere, a failure in CI.

mod util;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use util::daemon::{fanotify_path, Daemon};
use util::*;

fn scrape(addr: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: kite\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// Samples by name and labels (sorted `k=v` pairs joined by `,`).
fn samples(body: &str) -> BTreeMap<(String, String), f64> {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text that parses");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let labels: BTreeMap<String, String> = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => {
                    f64::NAN
                }
            };
            ((s.metric, labels), v)
        })
        .collect()
}

fn get(s: &BTreeMap<(String, String), f64>, name: &str, labels: &str) -> f64 {
    *s.get(&(name.to_string(), labels.to_string()))
        .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in {:#?}", s.keys()))
}

fn example(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img");
    py("ocigen.py", &["example", img.to_str().unwrap()]);
    let conv = dir.join("conv");
    convert(&format!("oci:{}", img.display()), &conv, &[]);
    conv
}

#[test]
fn metrics_count_a_known_workload_and_agree_with_status() {
    if !require(
        "metrics_count_a_known_workload_and_agree_with_status",
        fanotify_path(),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let conv = example(d);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::create_dir_all(d.join("daemon")).unwrap();
    let daemon = Daemon::start(&d.join("daemon"), &["--metrics-addr", &addr]);

    // Before any image: the endpoint answers, nothing registered.
    let (head, body) = scrape(&addr);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let s = samples(&body);
    assert_eq!(get(&s, "kite_images_registered", ""), 0.0);

    // The workload: mount, read one file whole.
    let mnt = d.join("mnt");
    let m = daemon.mount(&conv, &mnt, &[]);
    let hello = std::fs::read(mnt.join("opt/app/bin/hello.sh")).unwrap();
    assert!(!hello.is_empty());
    let manual = std::fs::read(mnt.join("usr/share/doc/demo/manual.txt")).unwrap();
    assert_eq!(manual.len(), 6 << 20);

    let (_, body) = scrape(&addr);
    let s = samples(&body);
    let status = daemon.status();
    let image = &status["images"][0];
    let fsid = image["fsid"].as_str().unwrap();
    let blobs = image["blobs"].as_array().unwrap();
    let sum = |f: &str| -> f64 { blobs.iter().map(|b| b[f].as_u64().unwrap()).sum::<u64>() as f64 };
    // One local backend per image: its counters are repeated per blob.
    let backend_bytes = blobs[0]["backend_bytes"].as_u64().unwrap() as f64;
    let backend_requests = blobs[0]["backend_requests"].as_u64().unwrap() as f64;
    assert!(backend_bytes > 0.0);
    assert_eq!(
        get(&s, "kite_fetched_bytes_total", "source=local"),
        backend_bytes
    );
    assert_eq!(
        get(&s, "kite_fetches_total", "result=ok,source=local"),
        backend_requests
    );
    assert_eq!(
        get(&s, "kite_fetch_duration_seconds_count", "source=local"),
        backend_requests,
        "one latency observation per backend request"
    );
    let reads = status["health"]["reads"].as_u64().unwrap() as f64;
    assert!(reads > 0.0);
    assert_eq!(
        get(&s, "kite_kernel_requests_total", "path=fanotify"),
        reads
    );
    assert_eq!(
        get(&s, "kite_kernel_request_errors_total", "path=fanotify"),
        0.0
    );
    assert_eq!(get(&s, "kite_kernel_requests_in_flight", ""), 0.0);
    assert_eq!(get(&s, "kite_images_registered", ""), 1.0);
    assert_eq!(get(&s, "kite_images_mounted", ""), 1.0);
    assert_eq!(get(&s, "kite_cache_data_bytes", ""), sum("fetched_bytes"));
    let ratio = get(&s, "kite_image_fetched_ratio", &format!("image={fsid}"));
    let want = sum("fetched_bytes") / sum("uncompressed_size");
    assert!((ratio - want).abs() < 1e-9, "{ratio} vs {want}");
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    // The manual alone is 6 MiB of chunks: the cache holds at least that.
    assert!(get(&s, "kite_cache_data_bytes", "") >= (6 << 20) as f64);

    // Naming: every family is kite_*, counters end in _total, no label
    // names a chunk.
    for (name, labels) in s.keys() {
        assert!(name.starts_with("kite_"), "{name}");
        assert!(!labels.contains("chunk"), "{name}{{{labels}}}");
    }
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut f = line.split_whitespace().skip(2);
        let (name, kind) = (f.next().unwrap(), f.next().unwrap());
        if kind == "counter" {
            assert!(
                body.lines()
                    .any(|l| l.starts_with(&format!("{name}_total"))),
                "counter {name} has no _total samples"
            );
        }
    }
    m.umount();
    let (_, body) = scrape(&addr);
    assert_eq!(get(&samples(&body), "kite_images_mounted", ""), 0.0);
}
