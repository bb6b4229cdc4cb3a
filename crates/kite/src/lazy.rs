//! The daemon-side commands: `kite daemon`, `kite mount` (also invoked as
//! `mount.kite`), `kite umount` and `kite status`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kite_daemon::api::{BackendSpec, Client, ImageRef, RegisterRequest};
use kite_daemon::mounting::{fsid_in_use, mounted_fsid};
use kite_daemon::DaemonConfig;
use kite_kernel::features::Features;

pub const DEFAULT_SOCKET: &str = "/run/kite/kite.sock";

/// `kite daemon`'s settings besides the registry client's.
pub struct DaemonArgs {
    pub cache_dir: PathBuf,
    pub socket: PathBuf,
    pub merge_bound: u64,
    pub fetch_timeout: u64,
    pub readahead: usize,
    pub pin_metadata: u64,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub gc_grace: u64,
    pub cache_size: Option<u64>,
    pub peer: kite_daemon::peer::PeerConfig,
}

/// The peer flags of `kite daemon`, checked: the peer list parses, the
/// token file holds a token (its text, trimmed; never printed).
pub fn peer_config(
    listen: Option<std::net::SocketAddr>,
    peers: Option<&str>,
    token_file: Option<&Path>,
    timeout: f64,
    tls: kite_daemon::peer::PeerTls,
) -> Result<kite_daemon::peer::PeerConfig> {
    let peers = match peers {
        Some(p) => kite_daemon::peer::parse_peers(p).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let token = match token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("--peer-token-file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() || t.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                bail!(
                    "--peer-token-file {}: expected one token of printable ASCII without spaces",
                    f.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    if token.is_some() && listen.is_none() && peers.is_empty() {
        bail!("--peer-token-file without --peer-listen or --peers");
    }
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("--peer-timeout {timeout}: expected a positive number of seconds");
    }
    // The TLS files are loaded once here, so a bad one is an error now.
    if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
        if listen.is_none() {
            bail!("--peer-tls-cert without --peer-listen");
        }
        kite_daemon::peer::server_tls(c, k).map_err(anyhow::Error::msg)?;
    }
    if let Some(ca) = &tls.ca {
        if peers.is_empty() {
            bail!("--peer-tls-ca without --peers");
        }
        kite_daemon::peer::client_tls(ca, &tls.name).map_err(anyhow::Error::msg)?;
    }
    Ok(kite_daemon::peer::PeerConfig {
        listen,
        peers,
        token,
        timeout: Duration::from_secs_f64(timeout),
        tls,
    })
}

/// `--kernel-path`: None for `auto`.
pub fn parse_kernel_path(p: &str) -> Result<Option<kite_kernel::features::KernelPath>> {
    match p {
        "auto" => Ok(None),
        p => Ok(Some(
            kite_kernel::features::KernelPath::parse(p).with_context(|| {
                format!("--kernel-path {p}: expected auto, cachefiles or fanotify")
            })?,
        )),
    }
}

/// `kite daemon --worker`: serve the kernel interface the holder passed.
pub async fn daemon(a: DaemonArgs, registry: kite_registry::ClientConfig) -> Result<()> {
    let env = kite_holder::WorkerEnv::take()?;
    // Each attempt gets a third of a fetch's deadline, so a stalled
    // connection leaves time for a retry or the next mirror.
    let mut registry = registry;
    registry.timeout = Duration::from_secs((a.fetch_timeout / 3).max(1));
    let cfg = DaemonConfig {
        cache_dir: a.cache_dir,
        socket: a.socket,
        merge_bound: a.merge_bound,
        fetch_timeout: Duration::from_secs(a.fetch_timeout),
        readahead: a.readahead,
        registry,
        pin_metadata: a.pin_metadata,
        metrics_addr: a.metrics_addr,
        gc_grace: Duration::from_secs(a.gc_grace),
        cache_size: a.cache_size,
        peer: a.peer,
        ..Default::default()
    };
    let handoff = kite_daemon::Handoff {
        kernel: env.kernel,
        path: env.path,
        why: env.why,
        restore: env.restore,
        api: env.api,
        holder: env.holder,
        holder_pid: env.holder_pid,
        daemon_started: env.started,
        generation: env.generation,
    };
    kite_daemon::run(cfg, handoff).await?;
    Ok(())
}

/// What `kite mount` mounts.
pub enum MountSource {
    /// A `kite convert` output directory.
    Dir(PathBuf),
    /// A kite image in a registry.
    Image(ImageRef),
}

impl MountSource {
    /// A path that exists is a directory source; `docker://...` or a
    /// reference with a registry host is a registry image.
    pub fn parse(
        source: &str,
        plain_http: bool,
        username: Option<String>,
        password: Option<String>,
        platform: String,
    ) -> Result<Self> {
        let explicit = source.starts_with("docker://");
        if !explicit && Path::new(source).exists() {
            return Ok(Self::Dir(PathBuf::from(source)));
        }
        match kite_registry::Reference::parse(source) {
            Ok(r) if explicit || r.registry != kite_registry::reference::DOCKER_HUB => {
                Ok(Self::Image(ImageRef {
                    reference: r.to_string(),
                    plain_http,
                    platform: Some(platform),
                    username,
                    password,
                    no_prefetch: false,
                }))
            }
            _ => bail!(
                "{source}: no such directory, and not an image reference (HOST[:PORT]/REPO[:TAG|@DIGEST] or docker://...)"
            ),
        }
    }
}

/// Explain what this kernel lacks for lazy mounts, if anything.
pub fn check_kernel() -> Result<()> {
    let f = Features::probe();
    if let Err(why) = f.choose(None) {
        bail!("cannot mount kite images lazily: {why}");
    }
    Ok(())
}

/// What `kite mount` fetches ahead of the readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefetch {
    /// Nothing: only what readers miss (and its readahead).
    None,
    /// The image's prefetch profile, if it has one.
    Profile,
    /// The profile, then every other chunk, in the background.
    All,
}

/// `kite mount SOURCE MOUNTPOINT`.
pub async fn mount(
    source: MountSource,
    mountpoint: &Path,
    socket: &Path,
    backend_url: Option<String>,
    mode: Prefetch,
    read_ahead_kb: Option<u32>,
) -> Result<()> {
    let prefetch = mode != Prefetch::None;
    check_kernel()?;
    let (req, label) = match source {
        MountSource::Dir(dir) => {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("image source {}", dir.display()))?;
            let bootstrap = dir.join(kite_convert::BOOTSTRAP_NAME);
            if !bootstrap.is_file() {
                bail!(
                    "{} is not a converted kite image directory (no {} in it)",
                    dir.display(),
                    kite_convert::BOOTSTRAP_NAME
                );
            }
            let backend = match backend_url {
                Some(url) => BackendSpec::Http { url },
                None => BackendSpec::Local { dir: dir.clone() },
            };
            let profile = dir.join(kite_convert::profile::PREFETCH_NAME);
            // The daemon checks the bootstrap it reads against this.
            let named = kite_oci::Layout::open(&dir)
                .and_then(|l| l.kite_bootstrap())
                .with_context(|| format!("{}: the image's manifest", dir.display()))?;
            let req = RegisterRequest {
                bootstrap: Some(bootstrap),
                backend: Some(backend),
                image: None,
                prefetch: (prefetch && profile.is_file()).then_some(profile),
                bootstrap_digest: Some(named.digest),
            };
            (req, dir.display().to_string())
        }
        MountSource::Image(mut image) => {
            image.no_prefetch = !prefetch;
            if backend_url.is_some() {
                bail!("--backend-url is for image directories; a registry image is fetched from its registry");
            }
            let label = image.reference.clone();
            let req = RegisterRequest {
                image: Some(image),
                ..Default::default()
            };
            (req, label)
        }
    };
    let client = Client::new(socket);
    let reg = client
        .register(&req)
        .await
        .context("registering the image with the daemon")?;
    let done =
        kite_daemon::mounting::mount_registered(&client, &reg, mountpoint, read_ahead_kb).await?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let background = if mode == Prefetch::All {
        match client.prefetch_all(&reg.fsid).await {
            Ok(n) => format!("; fetching the other {n} missing chunks in the background"),
            Err(e) => {
                eprintln!("warning: background prefetch not started: {e}");
                String::new()
            }
        }
    } else {
        String::new()
    };
    let ra_note = match &done.read_ahead {
        Some((ra, bdi)) => format!(", readahead {ra} KiB ({bdi})"),
        None => String::new(),
    };
    let label = reg.pinned.clone().unwrap_or(label);
    println!(
        "mounted {} (fsid {}, {} path{ra_note}) on {}{}{background}",
        label,
        reg.fsid,
        reg.kernel_path,
        mountpoint.display(),
        if reg.prefetch_chunks > 0 {
            format!(
                "; prefetching {} chunks from its profile",
                reg.prefetch_chunks
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `kite profile MOUNTPOINT IMAGE_DIR`.
pub async fn save_profile(mountpoint: &Path, image_dir: &Path, socket: &Path) -> Result<()> {
    let fsid = mounted_fsid(mountpoint)
        .with_context(|| format!("{} is not a kite mount", mountpoint.display()))?;
    let recorded = Client::new(socket)
        .profile(&fsid)
        .await
        .context("asking the daemon for what was read")?;
    if !recorded.sees_hits {
        eprintln!(
            "warning: on the cachefiles path reads of chunks already in the cache never reach the daemon; record with `kite daemon --readahead 0` so chunks it fetched ahead are not left out"
        );
    }
    if recorded.shared_blobs > 0 {
        eprintln!(
            "warning: {} blob(s) of this image are used by other mounted images; their reads are in the profile too",
            recorded.shared_blobs
        );
    }
    if recorded.entries.is_empty() {
        bail!(
            "nothing was read from {} through the daemon yet: run the workload on a cold cache first",
            mountpoint.display()
        );
    }
    let profile = kite_format::prefetch::Profile {
        bootstrap: kite_format::Digest::parse(&fsid)
            .with_context(|| format!("fsid {fsid} is not a sha256"))?,
        entries: recorded
            .entries
            .iter()
            .map(|&(blob, chunk)| kite_format::prefetch::Entry { blob, chunk })
            .collect(),
    };
    let attached = kite_convert::profile::attach_profile(image_dir, &profile)
        .with_context(|| format!("saving the profile into {}", image_dir.display()))?;
    println!(
        "profile of {} chunks ({} stored, {} uncompressed) saved in {}; kite manifest now {}",
        profile.entries.len(),
        crate::mib(attached.footprint.stored_bytes),
        crate::mib(attached.footprint.uncompressed_bytes),
        image_dir.display(),
        attached.manifest
    );
    Ok(())
}

/// `kite umount MOUNTPOINT`: unmount, and forget the image when no other
/// mount uses it.
pub async fn umount(mountpoint: &Path, socket: &Path) -> Result<()> {
    let fsid = mounted_fsid(mountpoint);
    kite_kernel::mount::unmount(mountpoint, false)?;
    if let Some(fsid) = fsid {
        if !fsid_in_use(&fsid) {
            if let Err(e) = Client::new(socket).unregister(&fsid).await {
                eprintln!(
                    "kite: warning: unmounted, but the daemon did not forget image {fsid}: {e}"
                );
            }
        }
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Mountpoints of image `fsid` on this host.
fn mountpoints_of(fsid: &str) -> Vec<PathBuf> {
    kite_kernel::mount::erofs_mounts()
        .into_iter()
        .filter(|m| m.fsid == fsid)
        .map(|m| m.mountpoint)
        .collect()
}

fn ago(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(unix);
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

/// `kite images`.
pub async fn images(socket: &Path, json: bool) -> Result<()> {
    let images = Client::new(socket).images().await?;
    let rows: Vec<serde_json::Value> = images
        .iter()
        .map(|i| {
            let size: u64 = i.blobs.iter().map(|b| b.uncompressed_size).sum();
            let stored: u64 = i.blobs.iter().map(|b| b.compressed_size).sum();
            let fetched: u64 = i.blobs.iter().map(|b| b.fetched_bytes).sum();
            serde_json::json!({
                "fsid": i.fsid,
                "reference": i.source,
                "size": size,
                "stored_size": stored,
                "bootstrap_size": i.bootstrap_size,
                "fetched": fetched,
                "registered_at": i.registered_at,
                "last_miss": i.last_miss,
                "kept": i.kept,
                "mounts": mountpoints_of(&i.fsid),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>10} {:>10} {:>6} {:<14} {:<6} REFERENCE",
        "FSID", "SIZE", "FETCHED", "", "LAST MISS", "MOUNTS"
    );
    for (i, r) in images.iter().zip(&rows) {
        let size = r["size"].as_u64().unwrap_or(0);
        let fetched = r["fetched"].as_u64().unwrap_or(0);
        println!(
            "{:<14} {:>10} {:>10} {:>5.1}% {:<14} {:<6} {}",
            &i.fsid[..12.min(i.fsid.len())],
            crate::mib(size),
            crate::mib(fetched),
            100.0 * fetched as f64 / size.max(1) as f64,
            ago(i.last_miss),
            mountpoints_of(&i.fsid).len(),
            if i.kept {
                format!("{} (pulled)", i.source)
            } else {
                i.source.clone()
            }
        );
    }
    Ok(())
}

/// `kite rm IMAGE`: forget a registered image that nothing mounts.
pub async fn rm(image: &str, socket: &Path) -> Result<()> {
    let client = Client::new(socket);
    let images = client.images().await?;
    let want = image.strip_prefix("sha256:").unwrap_or(image);
    let matches: Vec<_> = images
        .iter()
        .filter(|i| {
            i.source == image
                || (want.len() >= 8 && i.fsid.starts_with(want))
                || i.source.rsplit_once('@').is_some_and(|(_, d)| d == image)
        })
        .collect();
    let img = match matches.as_slice() {
        [one] => one,
        [] => bail!(
            "no registered image is {image} (`kite images` lists them: a reference, an fsid or at least 8 hex digits of one)"
        ),
        more => bail!(
            "{image} names {} images ({}): give more of the fsid",
            more.len(),
            more.iter()
                .map(|i| &i.fsid[..12.min(i.fsid.len())])
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mounts = mountpoints_of(&img.fsid);
    if !mounts.is_empty() {
        bail!(
            "image {} ({}) is mounted at {}: unmount it first (`kite umount`, or remove its containers)",
            &img.fsid[..12.min(img.fsid.len())],
            img.source,
            mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    client.remove(&img.fsid).await?;
    println!(
        "removed {} (fsid {}); its cache data goes at the next collection (`kite gc` now)",
        img.source, img.fsid
    );
    Ok(())
}

/// `kite pull REF`: register the image and fetch every chunk it can read;
/// waits until the image is complete on this node.
pub async fn pull(image: &str, socket: &Path, plain_http: bool, platform: String) -> Result<()> {
    let MountSource::Image(image) = MountSource::parse(image, plain_http, None, None, platform)?
    else {
        bail!("{image}: kite pull takes a registry reference (HOST[:PORT]/REPO[:TAG|@DIGEST])");
    };
    let client = Client::new(socket);
    let reg = client
        .register(&RegisterRequest {
            image: Some(image.clone()),
            ..Default::default()
        })
        .await
        .context("registering the image with the daemon")?;
    let label = reg.pinned.clone().unwrap_or(image.reference.clone());
    let state = |images: &[kite_daemon::api::ImageStatus]| -> Option<(u64, u64, u64)> {
        let img = images.iter().find(|i| i.fsid == reg.fsid)?;
        Some((
            img.blobs.iter().map(|b| b.missing_chunks).sum(),
            img.blobs.iter().map(|b| b.fetched_bytes).sum(),
            img.blobs.iter().map(|b| b.uncompressed_size).sum(),
        ))
    };
    let queued = client.pull(&reg.fsid).await?;
    eprintln!("pulling {label}: {queued} chunks to fetch");
    let mut last = (u64::MAX, std::time::Instant::now());
    let mut retries = 0;
    loop {
        let Some((missing, fetched, total)) = state(&client.images().await?) else {
            bail!(
                "the daemon no longer has image {} (removed while pulling?)",
                reg.fsid
            );
        };
        if missing == 0 {
            println!(
                "pulled {label} (fsid {}): {} of {} on this node, complete",
                reg.fsid,
                crate::mib(fetched),
                crate::mib(total)
            );
            return Ok(());
        }
        if missing < last.0 {
            last = (missing, std::time::Instant::now());
            retries = 0;
        } else if last.1.elapsed() > Duration::from_secs(30) {
            // Failed fetches are not retried by the prefetcher: queue
            // what is missing again, a few times, then give up.
            retries += 1;
            if retries > 3 {
                bail!(
                    "pull of {label} stalled with {missing} chunks missing (is the registry reachable? `kite daemon` logs say why); run `kite pull` again to resume"
                );
            }
            client.pull(&reg.fsid).await?;
            last.1 = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kite gc`.
pub async fn gc(socket: &Path) -> Result<()> {
    let r = Client::new(socket).gc(0).await?;
    println!(
        "collected {} blob files, {} bootstraps, {} state files, {} manifests, {} kernel cache files: {} freed{}",
        r.blobs,
        r.bootstraps,
        r.state_files,
        r.manifests,
        r.cache_objects,
        crate::mib(r.freed_bytes),
        if r.waiting > 0 {
            format!(" ({} left for later: in use or within the grace period)", r.waiting)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `kite status`.
pub async fn status(socket: &Path, json: bool) -> Result<()> {
    let client = Client::new(socket);
    let health = client.health().await?;
    let images = client.images().await?;
    if json {
        let v = serde_json::json!({ "health": health, "images": images });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "kite daemon: worker pid {} (generation {}, started {}), holder pid {}, daemon started {}; {} images adopted at start",
        health.pid,
        health.worker_generation,
        health.worker_started,
        health.holder_pid,
        health.daemon_started,
        health.adopted_images
    );
    println!(
        "kite daemon: {} path, cache {}, domain {}, {} open objects, {} READs ({} failed, {} in flight), {} opens refused, writes via {}",
        health.kernel_path,
        health.cache_dir.display(),
        health.domain_id,
        health.open_objects,
        health.reads,
        health.reads_failed,
        health.reads_inflight,
        health.opens_refused,
        health.writer
    );
    if !health.fetched_by_source.is_empty() {
        println!(
            "fetched since the worker started: {}",
            health
                .fetched_by_source
                .iter()
                .map(|(s, n)| format!("{s} {}", crate::mib(*n)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(p) = &health.peers {
        println!(
            "peers: {} (serving at {}); asked {} times: {} received, {} misses, {} failures, {} corrupt answers refused; served {} requests ({}), {} misses, {} refused (token)",
            p.members
                .iter()
                .map(|m| match &m.why {
                    Some(w) => format!("{} {} ({w})", m.addr, m.state),
                    None => format!("{} {}", m.addr, m.state),
                })
                .collect::<Vec<_>>()
                .join(", "),
            p.listen.as_deref().unwrap_or("nowhere"),
            p.asked,
            crate::mib(p.received_bytes),
            p.misses,
            p.failures,
            p.corrupt,
            p.served,
            crate::mib(p.served_bytes),
            p.served_misses,
            p.refused
        );
    }
    for img in images {
        let fetched: u64 = img.blobs.iter().map(|b| b.fetched_bytes).sum();
        let total: u64 = img.blobs.iter().map(|b| b.uncompressed_size).sum();
        println!(
            "image {} ({}): fetched {} of {} ({:.1}%)",
            &img.fsid[..16],
            img.source,
            crate::mib(fetched),
            crate::mib(total),
            100.0 * fetched as f64 / total.max(1) as f64
        );
        // A backend belongs to the image that registered a blob first;
        // list each backend once.
        let mut seen = std::collections::BTreeSet::new();
        for b in &img.blobs {
            if seen.insert(b.backend.clone()) {
                println!(
                    "  backend {}: {} requests, {}{}",
                    b.backend,
                    b.backend_requests,
                    crate::mib(b.backend_bytes),
                    if b.mirror_bytes > 0 {
                        format!(" ({} from mirrors)", crate::mib(b.mirror_bytes))
                    } else {
                        String::new()
                    }
                );
            }
        }
        for b in img.blobs {
            println!(
                "  blob {}  chunks {}/{}  fetched {}{}{}{}{}{}",
                &b.digest[..19],
                b.fetched_chunks,
                b.chunks,
                crate::mib(b.fetched_bytes),
                if b.prefetched_chunks > 0 {
                    format!(" ({} chunks prefetched)", b.prefetched_chunks)
                } else {
                    String::new()
                },
                if b.copied_chunks > 0 {
                    format!(
                        ", {} chunks ({}) copied from other blobs on this node",
                        b.copied_chunks,
                        crate::mib(b.copied_bytes)
                    )
                } else {
                    String::new()
                },
                match (&b.home, b.peer_chunks) {
                    (Some(h), n) => format!(
                        ", home {h}: {n} chunks ({}) from peers",
                        crate::mib(b.peer_bytes)
                    ),
                    (None, _) => String::new(),
                },
                if health.kernel_path == "fanotify" {
                    format!(", {} events", b.events)
                } else {
                    String::new()
                },
                if b.corrupt_chunks > 0 {
                    format!(", {} corrupt chunks refused", b.corrupt_chunks)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
