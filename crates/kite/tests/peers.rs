//! A site pulls once: peer nodes serve each other verified chunks, and a
//! pull-through registry cache works as a mirror (issue 17).
//!
//! The site tests build a small network of namespaces: a router namespace
//! with one veth pair to each node namespace and one to an "uplink"
//! namespace holding the origin registry, whose egress is shaped with a
//! TBF qdisc. Uplink bytes are that veth's tx counter: everything the
//! registry sent to the site. Daemons run with only their network in a
//! node namespace (nsenter --net), so mounts and files stay the host's.
//!
//! Needs root, the fanotify path, docker-registry, and network
//! namespaces with veth and tbf; skipped loudly outside CI without them.

mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::daemon::{fanotify_path, Daemon};
use util::registry::{registry_available, Registry};
use util::*;

const PEER_PORT: u16 = 7070;

fn run(cmd: &[&str]) -> Result<String, String> {
    let o = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn sh(cmd: &[&str]) -> String {
    run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Root, the fanotify path, docker-registry, and namespaces with veth
/// pairs and a TBF qdisc (tried for real, once per test process).
fn site_prereqs() -> Result<(), String> {
    static PROBED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBED.get_or_init(probe_site).clone()
}

fn probe_site() -> Result<(), String> {
    fanotify_path()?;
    registry_available()?;
    for bin in ["ip", "tc", "nsenter"] {
        run(&["sh", "-c", &format!("command -v {bin}")])
            .map_err(|_| format!("{bin} not installed (iproute2, util-linux)"))?;
    }
    let ns = format!("kite-probe-{}", std::process::id());
    let v = format!("kp{}", std::process::id() % 100000);
    let r = run(&["ip", "netns", "add", &ns])
        .and_then(|_| {
            run(&[
                "ip",
                "link",
                "add",
                &format!("{v}a"),
                "type",
                "veth",
                "peer",
                "name",
                &format!("{v}b"),
                "netns",
                &ns,
            ])
        })
        .and_then(|_| {
            run(&[
                "tc",
                "-n",
                &ns,
                "qdisc",
                "add",
                "dev",
                &format!("{v}b"),
                "root",
                "tbf",
                "rate",
                "100mbit",
                "burst",
                "64kb",
                "latency",
                "50ms",
            ])
        });
    let _ = run(&["ip", "link", "del", &format!("{v}a")]);
    let _ = run(&["ip", "netns", "del", &ns]);
    r.map(|_| ())
        .map_err(|e| format!("network namespaces with veth and tbf: {e}"))
}

fn node_ip(i: usize) -> String {
    format!("10.77.{i}.2")
}

fn peer_addr(i: usize) -> String {
    format!("{}:{PEER_PORT}", node_ip(i))
}

const REGISTRY: &str = "10.78.0.2:5000";
const SITE_MIRROR: &str = "10.78.0.1:5001";

/// The namespaces of one test's site, deleted on drop.
struct Site {
    tag: &'static str,
    nodes: usize,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Site {
    fn ns(&self, what: &str) -> String {
        format!("kite-{}-{what}", self.tag)
    }

    fn node_ns(&self, i: usize) -> String {
        self.ns(&format!("n{i}"))
    }

    /// The uplink veth (uplink namespace side).
    fn uplink_dev(&self) -> String {
        format!("k{}u1", self.tag)
    }

    fn new(tag: &'static str, nodes: usize, dir: &Path, uplink_mbit: u32) -> Site {
        let s = Site {
            tag,
            nodes,
            dir: dir.to_path_buf(),
            children: Vec::new(),
        };
        s.delete();
        let (r, up) = (s.ns("r"), s.ns("up"));
        for ns in [&r, &up] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (u0, u1) = (format!("k{tag}u0"), s.uplink_dev());
        sh(&[
            "ip", "link", "add", &u0, "netns", &r, "type", "veth", "peer", "name", &u1, "netns",
            &up,
        ]);
        sh(&["ip", "-n", &r, "addr", "add", "10.78.0.1/24", "dev", &u0]);
        sh(&["ip", "-n", &up, "addr", "add", "10.78.0.2/24", "dev", &u1]);
        sh(&["ip", "-n", &r, "link", "set", &u0, "up"]);
        sh(&["ip", "-n", &up, "link", "set", &u1, "up"]);
        sh(&[
            "ip",
            "-n",
            &up,
            "route",
            "add",
            "default",
            "via",
            "10.78.0.1",
        ]);
        // The uplink: what the registry sends to the site is shaped.
        let rate = format!("{uplink_mbit}mbit");
        sh(&[
            "tc", "-n", &up, "qdisc", "add", "dev", &u1, "root", "tbf", "rate", &rate, "burst",
            "128kb", "latency", "200ms",
        ]);
        for i in 1..=nodes {
            let n = s.node_ns(i);
            sh(&["ip", "netns", "add", &n]);
            sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
            let (a, b) = (format!("k{tag}n{i}a"), format!("k{tag}n{i}b"));
            sh(&[
                "ip", "link", "add", &a, "netns", &r, "type", "veth", "peer", "name", &b, "netns",
                &n,
            ]);
            sh(&[
                "ip",
                "-n",
                &r,
                "addr",
                "add",
                &format!("10.77.{i}.1/24"),
                "dev",
                &a,
            ]);
            sh(&[
                "ip",
                "-n",
                &n,
                "addr",
                "add",
                &format!("{}/24", node_ip(i)),
                "dev",
                &b,
            ]);
            sh(&["ip", "-n", &r, "link", "set", &a, "up"]);
            sh(&["ip", "-n", &n, "link", "set", &b, "up"]);
            sh(&[
                "ip",
                "-n",
                &n,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{i}.1"),
            ]);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        s
    }

    fn delete(&self) {
        let mut names = vec![self.ns("r"), self.ns("up")];
        names.extend((1..=self.nodes).map(|i| self.node_ns(i)));
        for n in names {
            let _ = run(&["ip", "netns", "del", &n]);
        }
    }

    /// Bytes the registry side has sent into the site.
    fn uplink_bytes(&self) -> u64 {
        let out = sh(&[
            "ip",
            "-n",
            &self.ns("up"),
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            &self.uplink_dev(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap()
    }

    /// `docker-registry serve` in namespace `ns`, listening on `listen`;
    /// `proxy`: a pull-through cache of that URL.
    fn start_registry(&mut self, name: &str, ns: &str, listen: &str, proxy: Option<&str>) {
        let root = self.dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let cfg = root.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {listen}}}\n",
            root.join("data").display()
        );
        if let Some(url) = proxy {
            text.push_str(&format!("proxy: {{remoteurl: {url}}}\n"));
        }
        std::fs::write(&cfg, text).unwrap();
        let log = std::fs::File::create(root.join("log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "docker-registry", "serve"])
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.children.push(child);
        let (host, port) = listen.rsplit_once(':').unwrap();
        let host = if host == "0.0.0.0" { "127.0.0.1" } else { host };
        let probe = format!(
            "import socket,time\nfor _ in range(200):\n  try:\n    socket.create_connection(('{host}',{port}),1).close(); break\n  except OSError: time.sleep(0.05)\nelse: raise SystemExit('registry {name} did not start')"
        );
        sh(&[
            "nsenter",
            &format!("--net=/run/netns/{ns}"),
            "--",
            "python3",
            "-c",
            &probe,
        ]);
    }

    /// The origin registry in the uplink namespace.
    fn start_origin(&mut self) {
        let ns = self.ns("up");
        self.start_registry("origin", &ns, "0.0.0.0:5000", None);
    }

    /// A pull-through cache of the origin in the router namespace (the
    /// site's own registry cache).
    fn start_site_mirror(&mut self) {
        let ns = self.ns("r");
        self.start_registry(
            "mirror",
            &ns,
            SITE_MIRROR,
            Some(&format!("http://{REGISTRY}")),
        );
    }

    /// Push converted image `conv` to the origin as `name:v1` (from inside
    /// the uplink namespace, over its loopback: not uplink traffic).
    /// Returns the reference the site's nodes use.
    fn push(&self, conv: &Path, name: &str) -> String {
        sh(&[
            "nsenter",
            &format!("--net=/run/netns/{}", self.ns("up")),
            "--",
            kite_bin().to_str().unwrap(),
            "push",
            conv.to_str().unwrap(),
            &format!("127.0.0.1:5000/{name}:v1"),
        ]);
        format!("{REGISTRY}/{name}:v1")
    }

    /// A daemon in node `i`'s namespace.
    fn daemon(&self, i: usize, sub: &str, extra: &[&str]) -> Daemon {
        let dir = self.dir.join(format!("node{i}-{sub}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec!["--plain-http"];
        args.extend_from_slice(extra);
        Daemon::start_in(&dir, &args, Some(&self.node_ns(i)))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.delete();
    }
}

/// Mounts to take down before their daemons (lazily: a dead daemon's
/// mount may still be busy).
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn mount(d: &Daemon, reference: &str, mnt: &Path, mounts: &mut Mounts) {
    std::fs::create_dir_all(mnt).unwrap();
    kite_ok(&[
        "mount",
        reference,
        mnt.to_str().unwrap(),
        "--socket",
        d.socket.to_str().unwrap(),
        "--plain-http",
        "--prefetch",
        "none",
    ]);
    mounts.0.push(mnt.to_path_buf());
}

/// A converted image of ~60 MB (four layers of small and large files),
/// and every file's expected content (from the image unpacked locally).
fn site_image(d: &Path) -> (PathBuf, PathBuf, BTreeMap<PathBuf, Vec<u8>>) {
    let src = d.join("src");
    py(
        "ocigen.py",
        &["big", src.to_str().unwrap(), "--size-gb", "0.06"],
    );
    let conv = d.join("conv");
    convert(&format!("oci:{}", src.display()), &conv, &[]);
    // The expected tree: the same image mounted from the local directory
    // through a daemon of its own (no network involved).
    let local = Daemon::start(&d.join("local-daemon"), &[]);
    let mnt = d.join("local-mnt");
    let m = local.mount(&conv, &mnt, &[]);
    let want = read_all(&mnt);
    drop(m);
    local.stop();
    (src, conv, want)
}

fn check_tree(what: &str, got: &BTreeMap<PathBuf, Vec<u8>>, want: &BTreeMap<PathBuf, Vec<u8>>) {
    assert_eq!(got.len(), want.len(), "{what}: file count");
    for (p, data) in want {
        let g = got
            .get(p)
            .unwrap_or_else(|| panic!("{what}: {} missing", p.display()));
        assert!(g == data, "{what}: {} differs", p.display());
    }
}

fn peers_list(n: usize) -> String {
    (1..=n).map(peer_addr).collect::<Vec<_>>().join(",")
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

/// Read every file of each mountpoint, all at once (one thread each).
fn read_concurrently(mnts: &[PathBuf]) -> Vec<BTreeMap<PathBuf, Vec<u8>>> {
    let hs: Vec<_> = mnts
        .iter()
        .cloned()
        .map(|m| std::thread::spawn(move || read_all(&m)))
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("a reader failed"))
        .collect()
}

/// The test image pushed to a registry on 127.0.0.1 (the loopback tests):
/// the registry, the converted dir, the expected files, the reference.
fn pushed_on_loopback(d: &Path) -> (Registry, PathBuf, BTreeMap<PathBuf, Vec<u8>>, String) {
    let reg = Registry::start(&d.join("registry"), None);
    let (_src, conv, want) = site_image(d);
    let reference = format!("{}/site/app:v1", reg.addr);
    kite_ok(&["push", conv.to_str().unwrap(), &reference]);
    (reg, conv, want, reference)
}

/// A site of `nodes` nodes behind an uplink of `mbit`, with the test image
/// pushed to its origin (and, with `mirror`, a pull-through cache in the
/// router namespace): the site, the image's source layout, the expected
/// files and the reference the nodes use.
fn site_with_image(
    d: &Path,
    tag: &'static str,
    nodes: usize,
    mbit: u32,
    mirror: bool,
) -> (Site, PathBuf, BTreeMap<PathBuf, Vec<u8>>, String) {
    let (src, conv, want) = site_image(d);
    let mut site = Site::new(tag, nodes, d, mbit);
    site.start_origin();
    if mirror {
        site.start_site_mirror();
    }
    let reference = site.push(&conv, "site/app");
    (site, src, want, reference)
}

#[test]
fn a_site_of_three_nodes_fetches_each_chunk_once() {
    let test = "a_site_of_three_nodes_fetches_each_chunk_once";
    if !require(test, site_prereqs()) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (site, src, want, reference) = site_with_image(d, "a", 3, 400, false);
    let mut mounts = Mounts(Vec::new());

    // One node alone, no peers: what one node costs the uplink.
    let before = site.uplink_bytes();
    let alone = site.daemon(1, "alone", &[]);
    let mnt = d.join("mnt-alone");
    mount(&alone, &reference, &mnt, &mut mounts);
    check_tree("node alone", &read_all(&mnt), &want);
    let one_node = site.uplink_bytes() - before;
    kite_ok(&[
        "umount",
        mnt.to_str().unwrap(),
        "--socket",
        alone.socket.to_str().unwrap(),
    ]);
    mounts.0.clear();
    alone.stop();

    // Three nodes with peers, fresh caches, reading the same image at once.
    let token = write_token(d, "site-token", "site-token-5f2c9a");
    let token_s = token.to_str().unwrap().to_string();
    let list = peers_list(3);
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| {
            site.daemon(
                i,
                "peered",
                &[
                    "--peer-listen",
                    &peer_addr(i),
                    "--peers",
                    &list,
                    "--peer-token-file",
                    &token_s,
                ],
            )
        })
        .collect();
    let mnts: Vec<PathBuf> = (1..=3).map(|i| d.join(format!("mnt{i}"))).collect();
    for (n, m) in nodes.iter().zip(&mnts) {
        mount(n, &reference, m, &mut mounts);
    }
    let before = site.uplink_bytes();
    let trees = read_concurrently(&mnts);
    let three_nodes = site.uplink_bytes() - before;
    for (i, t) in trees.iter().enumerate() {
        check_tree(&format!("node {}", i + 1), t, &want);
    }
    assert_tree_matches_reference(
        "node 2 (peered)",
        &mnts[1],
        &format!("oci:{}", src.display()),
        d,
    );
    let statuses: Vec<_> = nodes.iter().map(|n| n.status()).collect();
    let sum = |f: &str| -> u64 {
        statuses
            .iter()
            .map(|s| s["health"]["peers"][f].as_u64().unwrap())
            .sum()
    };
    eprintln!(
        "uplink: one node alone {one_node} B; three peered nodes {three_nodes} B ({:.2}x); peers served {} requests, {} B; {} misses, {} failures",
        three_nodes as f64 / one_node as f64,
        sum("served"),
        sum("served_bytes"),
        sum("misses"),
        sum("failures"),
    );
    assert!(
        three_nodes as f64 <= 1.2 * one_node as f64,
        "three nodes cost the uplink {three_nodes} B, one node {one_node} B"
    );
    assert!(sum("served_bytes") > 0, "no peer served anything");
    // Bytes by source: the three nodes together got from peers what the
    // peers served, and from the registry what the uplink carried.
    let by_source = |src: &str| -> u64 {
        statuses
            .iter()
            .map(|s| s["health"]["fetched_by_source"][src].as_u64().unwrap_or(0))
            .sum()
    };
    eprintln!(
        "by source: registry {} B, peer {} B, mirror {} B",
        by_source("registry"),
        by_source("peer"),
        by_source("mirror")
    );
    assert_eq!(by_source("peer"), sum("received_bytes"));
    assert_eq!(by_source("peer"), sum("served_bytes"));
    assert!(by_source("registry") > 0 && by_source("registry") <= three_nodes);
    assert_eq!(by_source("mirror"), 0);
    assert_eq!(sum("corrupt"), 0);
    // Every blob's home is one of the three, the same on every node.
    for (b, blob) in statuses[0]["images"][0]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let homes: Vec<String> = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let h = s["images"][0]["blobs"][b]["home"]
                    .as_str()
                    .unwrap()
                    .to_string();
                if h == "self" {
                    peer_addr(i + 1)
                } else {
                    h
                }
            })
            .collect();
        assert!(
            homes.iter().all(|h| *h == homes[0]),
            "blob {}: nodes disagree on its home: {homes:?}",
            blob["digest"]
        );
    }
    drop(mounts);
    for n in nodes {
        n.stop();
    }
}

#[test]
fn killing_the_home_peer_mid_read_falls_back_to_the_registry() {
    let test = "killing_the_home_peer_mid_read_falls_back_to_the_registry";
    if !require(test, site_prereqs()) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // A slow uplink, so the reads are still going when the peer dies.
    let (site, _src, want, reference) = site_with_image(d, "b", 3, 60, false);
    let mut mounts = Mounts(Vec::new());
    let list = peers_list(3);
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| {
            site.daemon(
                i,
                "peered",
                &["--peer-listen", &peer_addr(i), "--peers", &list],
            )
        })
        .collect();
    let mnts: Vec<PathBuf> = (1..=3).map(|i| d.join(format!("mnt{i}"))).collect();
    for (n, m) in nodes.iter().zip(&mnts) {
        mount(n, &reference, m, &mut mounts);
    }
    // The home of the largest blob is the node to kill.
    let st = nodes[0].status();
    let blobs = st["images"][0]["blobs"].as_array().unwrap();
    let big = blobs
        .iter()
        .max_by_key(|b| b["compressed_size"].as_u64().unwrap())
        .unwrap();
    let home = match big["home"].as_str().unwrap() {
        "self" => 1,
        a => (1..=3)
            .find(|&i| peer_addr(i) == a)
            .expect("home is a node"),
    };
    let others: Vec<usize> = (1..=3).filter(|&i| i != home).collect();
    let (holder, worker) = (nodes[home - 1].holder_pid(), nodes[home - 1].worker_pid());
    eprintln!("home of the largest blob: node {home}; readers: {others:?}");
    // The other two read everything; once they got bytes from the home,
    // it is SIGKILLed (holder and worker).
    let readers: Vec<PathBuf> = others.iter().map(|&i| mnts[i - 1].clone()).collect();
    let reading = std::thread::spawn(move || read_concurrently(&readers));
    let t = Instant::now();
    loop {
        let got: u64 = others
            .iter()
            .map(|&i| {
                nodes[i - 1].status()["health"]["peers"]["received_bytes"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        if got > 0 {
            break;
        }
        assert!(
            !reading.is_finished(),
            "the readers finished before any peer served them"
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no peer bytes in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in [worker, holder] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        !reading.is_finished(),
        "killed the home after the reads ended"
    );
    let trees = reading.join().expect("a reader got an error");
    for (t, i) in trees.iter().zip(&others) {
        check_tree(&format!("node {i} after its home peer died"), t, &want);
    }
    let failures: u64 = others
        .iter()
        .map(|&i| {
            nodes[i - 1].status()["health"]["peers"]["failures"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(failures >= 1, "nobody noticed the home peer die");
    for &i in &others {
        let st = nodes[i - 1].status();
        let dead = st["health"]["peers"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["addr"] == peer_addr(home))
            .cloned()
            .unwrap();
        eprintln!("node {i} sees node {home}: {dead}");
        assert_eq!(st["health"]["reads_failed"], 0, "node {i}: failed reads");
    }
    drop(mounts);
    for (i, n) in nodes.into_iter().enumerate() {
        if i + 1 != home {
            n.stop();
        }
    }
}

/// An HTTP server on 127.0.0.1 that answers every request 206 with
/// garbage of the asked length; counts requests.
fn corrupt_peer() -> (String, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let h = Arc::clone(&h);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&buf).to_lowercase();
                let len = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .and_then(|(a, b)| Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?))
                    .unwrap_or(0);
                let body = vec![0x5au8; len as usize];
                let _ = write!(
                    s,
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {len}\r\ncontent-type: application/vnd.kite.blob.uncompressed\r\nconnection: close\r\n\r\n"
                );
                let _ = s.write_all(&body);
            });
        }
    });
    (addr, hits)
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[test]
fn a_peer_serving_corrupt_bytes_is_refused_and_skipped() {
    let test = "a_peer_serving_corrupt_bytes_is_refused_and_skipped";
    if !require(test, fanotify_path().and_then(|()| registry_available())) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (_reg, _conv, want, reference) = pushed_on_loopback(d);
    let (fake, hits) = corrupt_peer();
    let node = Daemon::start(&d.join("node"), &["--peers", &fake]);
    let mut mounts = Mounts(Vec::new());
    let mnt = d.join("mnt");
    mount(&node, &reference, &mnt, &mut mounts);
    check_tree("node with a corrupt peer", &read_all(&mnt), &want);
    // Nothing the peer sent reached the cache: the data on disk reads
    // right without the page cache too.
    drop_caches();
    check_tree("after drop_caches", &read_all(&mnt), &want);
    let st = node.status();
    let p = &st["health"]["peers"];
    eprintln!(
        "{p}; the fake peer got {} requests",
        hits.load(Ordering::SeqCst)
    );
    assert!(p["corrupt"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["received_bytes"], 0, "{p}");
    assert_eq!(p["members"][0]["state"], "skipped", "{p}");
    let asked = hits.load(Ordering::SeqCst);
    let backend: u64 = st["images"][0]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend_requests"].as_u64().unwrap())
        .sum();
    // Skipped after its first answers: the registry served the rest.
    assert!(
        asked >= 1 && asked * 4 <= backend,
        "the corrupt peer was asked {asked} times, the registry {backend}"
    );
    assert_eq!(node.blob_sum("peer_bytes"), 0);
    drop(mounts);
    node.stop();
}

/// One HTTP/1.1 request to `addr`; (status, headers lowercased, body).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, resp[split + 4..].to_vec())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn peers_serve_only_token_holders_and_only_what_is_on_disk() {
    let test = "peers_serve_only_token_holders_and_only_what_is_on_disk";
    if !require(test, fanotify_path().and_then(|()| registry_available())) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (_reg, conv, want, reference) = pushed_on_loopback(d);
    let secret = "kite-site-token-7d41e0b2";
    let token = write_token(d, "token", secret);
    let wrong = write_token(d, "wrong", "not-the-site-token");
    let a_addr = format!("127.0.0.1:{}", free_port());
    let a = Daemon::start(
        &d.join("a"),
        &[
            "--peer-listen",
            &a_addr,
            "--peer-token-file",
            token.to_str().unwrap(),
        ],
    );
    let mut mounts = Mounts(Vec::new());
    let mnt_a = d.join("mnt-a");
    mount(&a, &reference, &mnt_a, &mut mounts);
    // Nothing read yet on A: its first chunk is not on disk.
    let chunks = kite_ok(&[
        "inspect",
        conv.join("bootstrap").to_str().unwrap(),
        "--chunks",
    ]);
    let first: Vec<&str> = chunks.lines().next().unwrap().split_whitespace().collect();
    let (blob, chunk_digest, size) = (first[0], first[2], first[4].parse::<u64>().unwrap());
    let path = format!("/v2/site/app/blobs/sha256:{blob}");
    let bearer = format!("Bearer {secret}");
    let range = format!("bytes=0-{}", size - 1);
    let ok_headers = [
        ("authorization", bearer.as_str()),
        ("accept", "application/vnd.kite.blob.uncompressed"),
        ("range", range.as_str()),
    ];
    let (status, _, _) = http(&a_addr, "GET", &path, &ok_headers);
    assert_eq!(status, 416, "a range not on disk was served");
    check_tree("node A", &read_all(&mnt_a), &want);
    // Refused without the token, or with another one.
    let (status, head, _) = http(&a_addr, "GET", &path, &ok_headers[1..]);
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    let (status, _, _) = http(
        &a_addr,
        "GET",
        &path,
        &[
            ("authorization", "Bearer not-the-site-token"),
            ok_headers[1],
            ok_headers[2],
        ],
    );
    assert_eq!(status, 401);
    // With it: the chunk, which hashes to its digest.
    let (status, head, body) = http(&a_addr, "GET", &path, &ok_headers);
    assert_eq!(status, 206, "{head}");
    assert_eq!(body.len() as u64, size);
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
        chunk_digest
    );
    // Only decoded ranges on chunk boundaries, only named blobs, no
    // listing, read-only.
    let auth = ok_headers[0];
    let (status, _, _) = http(&a_addr, "GET", &path, &[auth, ok_headers[2]]);
    assert_eq!(status, 406, "served without the kite media type");
    let (status, _, _) = http(
        &a_addr,
        "GET",
        &path,
        &[auth, ok_headers[1], ("range", "bytes=1-100")],
    );
    assert_eq!(status, 416);
    let unknown = format!("/v2/site/app/blobs/sha256:{}", "ab".repeat(32));
    let (status, _, _) = http(&a_addr, "GET", &unknown, &ok_headers);
    assert_eq!(status, 404);
    for p in [
        "/v2/_catalog",
        "/v2/site/app/tags/list",
        "/v2/site/app/manifests/v1",
    ] {
        let (status, _, _) = http(&a_addr, "GET", p, &ok_headers);
        assert_eq!(status, 404, "{p}");
    }
    let (status, _, _) = http(&a_addr, "DELETE", &path, &ok_headers);
    assert_eq!(status, 405);
    let (status, head, _) = http(&a_addr, "HEAD", &path, &ok_headers[..2]);
    assert_eq!(status, 200);
    assert!(head.contains("kite-complete: true"), "{head}");

    // A node with the wrong token is refused and reads from the registry.
    let b = Daemon::start(
        &d.join("b"),
        &[
            "--peers",
            &a_addr,
            "--peer-token-file",
            wrong.to_str().unwrap(),
        ],
    );
    let mnt_b = d.join("mnt-b");
    mount(&b, &reference, &mnt_b, &mut mounts);
    check_tree("node B (wrong token)", &read_all(&mnt_b), &want);
    let pb = b.status()["health"]["peers"].clone();
    assert!(pb["failures"].as_u64().unwrap() >= 1, "{pb}");
    assert_eq!(pb["received_bytes"], 0, "{pb}");
    // A node with the token gets everything from A.
    let c = Daemon::start(
        &d.join("c"),
        &[
            "--peers",
            &a_addr,
            "--peer-token-file",
            token.to_str().unwrap(),
        ],
    );
    let mnt_c = d.join("mnt-c");
    mount(&c, &reference, &mnt_c, &mut mounts);
    check_tree("node C (token)", &read_all(&mnt_c), &want);
    let sc = c.status();
    assert_eq!(
        sc["health"]["peers"]["failures"], 0,
        "{}",
        sc["health"]["peers"]
    );
    assert!(c.blob_sum("peer_bytes") > 0);
    let backend_c: u64 = c.blob_sum("backend_bytes");
    assert_eq!(
        backend_c, 0,
        "node C fetched from the registry although A holds everything"
    );
    // Peers named by DNS: `localhost` resolves to A's address (and maybe
    // ::1, where nobody listens: skipped, the registry serves its blobs).
    let a_port = a_addr.rsplit(':').next().unwrap();
    let dns = Daemon::start(
        &d.join("dns"),
        &[
            "--peers",
            &format!("dns:localhost:{a_port}"),
            "--peer-token-file",
            token.to_str().unwrap(),
        ],
    );
    let mnt_dns = d.join("mnt-dns");
    mount(&dns, &reference, &mnt_dns, &mut mounts);
    check_tree("node with dns: peers", &read_all(&mnt_dns), &want);
    let pd = dns.status()["health"]["peers"].clone();
    assert!(
        pd["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["addr"] == a_addr.as_str()),
        "{pd}"
    );
    assert!(dns.blob_sum("peer_bytes") > 0, "{pd}");
    let pa = a.status()["health"]["peers"].clone();
    assert!(pa["refused"].as_u64().unwrap() >= 3, "{pa}");
    // The token is in no log.
    for (n, dmn) in [("A", &a), ("B", &b), ("C", &c), ("dns", &dns)] {
        assert!(
            !dmn.log_text().contains(secret),
            "node {n}'s log holds the token"
        );
    }
    drop(mounts);
    for n in [a, b, c, dns] {
        n.stop();
    }
}

#[test]
fn a_pull_through_cache_as_mirror_serves_the_second_node() {
    let test = "a_pull_through_cache_as_mirror_serves_the_second_node";
    if !require(test, site_prereqs()) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (site, _src, want, reference) = site_with_image(d, "c", 2, 400, true);
    let mirror = format!("{REGISTRY}=http://{SITE_MIRROR}");
    let mut mounts = Mounts(Vec::new());

    let t0 = site.uplink_bytes();
    let n1 = site.daemon(1, "m", &["--mirror", &mirror]);
    let m1 = d.join("mnt1");
    mount(&n1, &reference, &m1, &mut mounts);
    check_tree("node 1 through a cold site cache", &read_all(&m1), &want);
    let first_read = site.uplink_bytes() - t0;
    // The cache goes on copying whole blobs after node 1's reads; wait
    // until the uplink is quiet.
    let mut last = site.uplink_bytes();
    let mut quiet = Instant::now();
    let t = Instant::now();
    while quiet.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(250));
        let now = site.uplink_bytes();
        if now != last {
            last = now;
            quiet = Instant::now();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the uplink never went quiet"
        );
    }
    let node1 = last - t0;
    let s1 = n1.status();
    let compressed: u64 = s1["images"][0]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["compressed_size"].as_u64().unwrap())
        .sum();
    // The second node: everything from the site cache.
    let n2 = site.daemon(2, "m", &["--mirror", &mirror]);
    let m2 = d.join("mnt2");
    let t1 = site.uplink_bytes();
    mount(&n2, &reference, &m2, &mut mounts);
    check_tree("node 2 through a warm site cache", &read_all(&m2), &want);
    let node2 = site.uplink_bytes() - t1;
    // Backend counters are the image's (every blob shows the same).
    let backend = |n: &Daemon, f: &str| n.status()["images"][0]["blobs"][0][f].as_u64().unwrap();
    let (backend2, mirror2) = (backend(&n2, "backend_bytes"), backend(&n2, "mirror_bytes"));
    eprintln!(
        "pull-through cache: image blobs {compressed} B; node 1 (cold cache): uplink {first_read} B during its reads, {node1} B until quiet (the mirror served {} B of its {} B); node 2 (warm cache): uplink {node2} B, the mirror served {mirror2} of {backend2} B",
        backend(&n1, "mirror_bytes"),
        backend(&n1, "backend_bytes"),
    );
    assert!(
        node2 <= (compressed / 50).max(64 << 10),
        "the second node cost the uplink {node2} B"
    );
    assert_eq!(mirror2, backend2, "node 2 fetched around the site cache");
    let src2 = n2.status()["health"]["fetched_by_source"].clone();
    assert_eq!(src2["mirror"].as_u64(), Some(mirror2), "{src2}");
    assert!(src2.get("registry").is_none(), "{src2}");
    assert!(backend2 > 0);
    drop(mounts);
    n1.stop();
    n2.stop();
}

/// A CA (`NAME-ca.pem`) and, signed by it, a certificate naming
/// `kite-peer` (`NAME-cert.pem`, `NAME-key.pem`), made with openssl.
fn site_certs(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |s: &str| dir.join(format!("{name}-{s}"));
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca-key.pem"),
        p("cert.pem"),
        p("key.pem"),
        p("req.csr"),
        p("ext.cnf"),
    );
    let s = |x: &PathBuf| x.to_str().unwrap().to_string();
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} site CA"),
    ]);
    sh(&[
        "openssl",
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        "/CN=kite-peer",
    ]);
    std::fs::write(&ext, "subjectAltName=DNS:kite-peer\n").unwrap();
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&cert),
        "-days",
        "2",
        "-extfile",
        &s(&ext),
    ]);
    (ca, cert, key)
}

#[test]
fn peers_over_tls_trust_only_the_site_ca() {
    let test = "peers_over_tls_trust_only_the_site_ca";
    let openssl = run(&["sh", "-c", "command -v openssl"])
        .map(|_| ())
        .map_err(|_| "openssl not installed (ci/setup installs it)".to_string());
    if !require(
        test,
        fanotify_path()
            .and_then(|()| registry_available())
            .and(openssl),
    ) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let (ca, cert, key) = site_certs(d, "site");
    let (other_ca, _, _) = site_certs(d, "other");
    // Bad TLS files are refused at start, naming the file.
    let o = kite(&[
        "daemon",
        "--socket",
        d.join("x.sock").to_str().unwrap(),
        "--peers",
        "127.0.0.1:1",
        "--peer-tls-ca",
        cert.with_extension("missing").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--peer-tls-ca"),
        "{err}"
    );
    let (_reg, _conv, want, reference) = pushed_on_loopback(d);
    let token = write_token(d, "token", "tls-site-token-93ab");
    let token_s = token.to_str().unwrap();
    let a_addr = format!("127.0.0.1:{}", free_port());
    let a = Daemon::start(
        &d.join("a"),
        &[
            "--peer-listen",
            &a_addr,
            "--peer-token-file",
            token_s,
            "--peer-tls-cert",
            cert.to_str().unwrap(),
            "--peer-tls-key",
            key.to_str().unwrap(),
        ],
    );
    let mut mounts = Mounts(Vec::new());
    let mnt_a = d.join("mnt-a");
    mount(&a, &reference, &mnt_a, &mut mounts);
    check_tree("node A", &read_all(&mnt_a), &want);
    // Trusting the site CA: everything from A, over TLS.
    let ask = |name: &str, ca: &Path| {
        Daemon::start(
            &d.join(name),
            &[
                "--peers",
                &a_addr,
                "--peer-token-file",
                token_s,
                "--peer-tls-ca",
                ca.to_str().unwrap(),
            ],
        )
    };
    let c = ask("c", &ca);
    let mnt_c = d.join("mnt-c");
    mount(&c, &reference, &mnt_c, &mut mounts);
    check_tree("node C (site CA)", &read_all(&mnt_c), &want);
    let pc = c.status()["health"]["peers"].clone();
    assert_eq!(pc["failures"], 0, "{pc}");
    assert!(c.blob_sum("peer_bytes") > 0, "{pc}");
    // Trusting another CA: A's certificate is refused, the registry serves.
    let e = ask("e", &other_ca);
    let mnt_e = d.join("mnt-e");
    mount(&e, &reference, &mnt_e, &mut mounts);
    check_tree("node E (another CA)", &read_all(&mnt_e), &want);
    let pe = e.status()["health"]["peers"].clone();
    assert!(pe["failures"].as_u64().unwrap() >= 1, "{pe}");
    assert_eq!(pe["received_bytes"], 0, "{pe}");
    assert_eq!(pe["members"][0]["state"], "skipped", "{pe}");
    eprintln!("a node trusting another CA: {}", pe["members"][0]["why"]);
    drop(mounts);
    for n in [a, c, e] {
        n.stop();
    }
}
