//! The `kite` command: parses flags into typed options and calls the
//! libraries. No pipeline logic lives here.
//!
//! Exit codes: 0 success; 1 the operation failed (bad input, corrupt image,
//! I/O error; the message names the culprit); 2 usage error; 130 or 143 a
//! conversion stopped by SIGINT or SIGTERM (nothing left under `--to`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kite_convert::{convert, ConvertOptions, Source};
use kite_format::ChunkSize;
use kite_oci::Platform;

mod lazy;
mod progress;
mod registry;
mod signals;

#[derive(Parser)]
#[command(
    name = "kite",
    version,
    about = "Lazy-loading container images: convert, push, mount, inspect, check"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert an OCI image (or a directory) into a kite image.
    Convert {
        /// oci:PATH[:TAG], dir:PATH, or docker://HOST[:PORT]/REPO[:TAG|@DIGEST]
        /// (streamed from the registry, layers never stored whole).
        #[arg(long)]
        from: String,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        to: PathBuf,
        /// Chunk size: a power of two from 4K to 16M.
        #[arg(long, default_value = "1M")]
        chunk_size: String,
        /// Chunk size of ELF files (executables, shared libraries), which
        /// programs map and read in scattered pages: a power of two below
        /// --chunk-size (else it does not apply), or `off` to cut them
        /// like every other file.
        #[arg(long, default_value = "64K")]
        elf_chunk_size: String,
        /// zstd level for chunks.
        #[arg(long, default_value_t = kite_format::DEFAULT_LEVEL)]
        level: i32,
        /// Platform to pick from a multi-platform image (os/arch[/variant]).
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Store files up to this many bytes inside the bootstrap.
        #[arg(long, default_value_t = 0)]
        inline_max: u64,
        /// Compression threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Publish a converted image (or any one-image OCI layout) to a
    /// registry; prints the reference pinned to the manifest digest.
    Push {
        /// The directory `kite convert --to` wrote.
        dir: PathBuf,
        /// HOST[:PORT]/REPO[:TAG]
        reference: String,
        /// Repositories of the same registry to mount blobs from before
        /// uploading them (repeatable).
        #[arg(long = "mount-from", value_name = "REPO")]
        mount_from: Vec<String>,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Show a bootstrap's tree, blobs and dedup statistics.
    Inspect {
        bootstrap: PathBuf,
        /// Print only the blob digests, one a line, in device-table order.
        #[arg(long)]
        blobs_only: bool,
        /// Skip the tree listing.
        #[arg(long)]
        summary: bool,
        /// Print every chunk record instead, one a line: blob digest
        /// (hex), chunk index, chunk sha256 (hex), stored bytes,
        /// uncompressed bytes.
        #[arg(long, conflicts_with_all = ["blobs_only", "summary"])]
        chunks: bool,
    },
    /// Verify a bootstrap and every chunk of its blobs; with --metadata,
    /// validate the bootstrap alone, as the daemon does at registration.
    Check {
        bootstrap: PathBuf,
        /// Directory holding the blobs (as <hex> or blobs/sha256/<hex>).
        #[arg(long, required_unless_present = "metadata")]
        blobs: Option<PathBuf>,
        /// Validate the bootstrap's metadata only (every inode, directory,
        /// xattr and chunk index; no blob needed).
        #[arg(long, conflicts_with = "blobs")]
        metadata: bool,
    },
    /// Run the on-demand daemon (root): serve cache misses through
    /// /dev/cachefiles.
    Daemon {
        /// cachefiles cache directory (ext4 or similar; not tmpfs).
        #[arg(long, default_value = "/var/cache/kite/cachefiles")]
        cache_dir: PathBuf,
        /// Control API socket.
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Largest merged backend request, in bytes of stored data.
        #[arg(long, default_value_t = 4 << 20)]
        merge_bound: u64,
        /// Seconds before a backend fetch is given up (readers get EIO).
        #[arg(long, default_value_t = 30)]
        fetch_timeout: u64,
        /// auto, cachefiles or fanotify.
        #[arg(long, default_value = "auto")]
        kernel_path: String,
        /// Chunks to fetch ahead of a sequential reader (0 disables).
        #[arg(long, default_value_t = 4)]
        readahead: usize,
        /// Registry mirror, HOST=URL (repeatable; tried in order before
        /// HOST itself).
        #[arg(long, value_name = "HOST=URL")]
        mirror: Vec<String>,
        /// Allow plain HTTP to every registry (loopback ones always may).
        #[arg(long)]
        plain_http: bool,
        /// Docker config with `auths` (default $DOCKER_CONFIG/config.json
        /// or ~/.docker/config.json).
        #[arg(long)]
        docker_config: Option<PathBuf>,
        /// Retries of a failed registry request.
        #[arg(long, default_value_t = 3)]
        registry_retries: u32,
        /// fanotify path: MiB of bootstraps (image metadata) to keep locked
        /// in memory, so metadata never waits for the disk (0 disables).
        #[arg(long, default_value_t = 256)]
        pin_metadata_mib: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9464). Off by default.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Collect cache data that no registered image has referenced for
        /// this many seconds (checked every minute; 0: only `kite gc`).
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        gc_grace: u64,
        /// Keep the cache's files under SIZE (e.g. 50G, 512M): unreferenced
        /// data goes first, then unmounted images, least recently used
        /// first; mounted images are never evicted. Unbounded if unset.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        cache_size: Option<u64>,
        /// Serve this node's chunks to the site's other nodes at ADDR (e.g.
        /// 0.0.0.0:7070): OCI blob routes, read-only, verified.
        #[arg(long, value_name = "ADDR")]
        peer_listen: Option<std::net::SocketAddr>,
        /// The site's nodes, asked before the registry: HOST:PORT,... or
        /// dns:NAME[:PORT] (every address of NAME, e.g. a headless
        /// service). Each blob's home is chosen by rendezvous hashing.
        #[arg(long, value_name = "LIST")]
        peers: Option<String>,
        /// Bearer token peers must present, and this node presents (a file
        /// holding it; never logged).
        #[arg(long, value_name = "FILE")]
        peer_token_file: Option<PathBuf>,
        /// Serve peers over TLS with this certificate chain (PEM; with
        /// --peer-tls-key).
        #[arg(long, value_name = "FILE", requires = "peer_tls_key")]
        peer_tls_cert: Option<PathBuf>,
        /// The key of --peer-tls-cert (PEM).
        #[arg(long, value_name = "FILE", requires = "peer_tls_cert")]
        peer_tls_key: Option<PathBuf>,
        /// Ask peers over TLS, trusting only this CA (PEM).
        #[arg(long, value_name = "FILE")]
        peer_tls_ca: Option<PathBuf>,
        /// The name peer certificates must carry (a DNS SAN), whatever
        /// address a peer is dialled at.
        #[arg(long, value_name = "NAME", default_value = kite_daemon::peer::DEFAULT_TLS_NAME)]
        peer_tls_name: String,
        /// Seconds a peer has to answer one request before the registry
        /// serves it (and the peer is skipped for 30 s).
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        peer_timeout: f64,
        /// Replace a running daemon on the same socket (e.g. with a new
        /// binary): it answers what it holds and hands the kernel
        /// interface over; no request is dropped.
        #[arg(long)]
        takeover: bool,
        /// Internal: run as the worker of a holder (`kite daemon` starts it).
        #[arg(long, hide = true)]
        worker: bool,
        /// Internal: keep the kernel interface after a stop while mounts
        /// still need it (the holder starts it).
        #[arg(long, hide = true, conflicts_with = "worker")]
        keeper: bool,
    },
    /// Mount an image lazily through the daemon (root): a converted image
    /// directory, or a kite image in a registry (HOST[:PORT]/REPO[:TAG|@DIGEST],
    /// optionally docker://).
    Mount {
        source: String,
        mountpoint: PathBuf,
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Fetch blobs from this base URL (<url>/blobs/sha256/<hex>)
        /// instead of the source directory.
        #[arg(long)]
        backend_url: Option<String>,
        /// mount(8) compatibility: options (ignored except for validation).
        #[arg(short = 'o', hide = true)]
        options: Option<String>,
        /// Registry images: allow plain HTTP to a non-loopback registry.
        #[arg(long)]
        plain_http: bool,
        /// Registry images: user name (password from --password-stdin);
        /// else the daemon's docker config is used.
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        /// Registry images: platform to pick from an index.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// What to fetch ahead of the readers: `profile` (the image's
        /// prefetch profile, if it has one; see `kite profile`), `all`
        /// (the profile first, then every other chunk of the image in the
        /// background, while readers' fetches go first; resumed after a
        /// daemon restart), or `none`.
        #[arg(long, value_enum, default_value_t = lazy::Prefetch::Profile)]
        prefetch: lazy::Prefetch,
        /// The same as `--prefetch none` (kept for older scripts).
        #[arg(long, hide = true)]
        no_prefetch: bool,
        /// Readahead of the mount in KiB (default: the image's chunk size,
        /// or 128 if its ELF files are cut finer; 0 leaves the kernel's
        /// default, 128; 4 is one page, i.e. none).
        #[arg(long)]
        read_ahead_kb: Option<u32>,
    },
    /// Save what the readers of a mounted image read, in order, as the
    /// image's prefetch profile: the chunks go into IMAGE_DIR (and into its
    /// manifest, for `kite push`), and later mounts fetch them ahead of the
    /// readers. Record on a cold cache, running the workload to profile.
    Profile {
        /// A kite mount of the image (its daemon recorded the reads).
        mountpoint: PathBuf,
        /// The image's `kite convert` directory.
        image_dir: PathBuf,
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Unmount a kite mount and forget the image if nothing else uses it.
    Umount {
        mountpoint: PathBuf,
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List the daemon's registered images: reference, fsid, size,
    /// fetched bytes, last miss, mounts.
    Images {
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Forget a registered image that is not mounted (by reference, as
    /// `kite images` shows it, or by fsid or a prefix of it). Its cache
    /// data goes at the next collection (`kite gc`, or the daemon's
    /// sweep after --gc-grace).
    Rm {
        image: String,
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Fetch a whole registry image into the node's cache and keep it
    /// registered, so it mounts and runs without the registry later.
    /// Resumable (run it again) and verified chunk by chunk.
    Pull {
        /// HOST[:PORT]/REPO[:TAG|@DIGEST]
        image: String,
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Allow plain HTTP to a registry that is not on loopback.
        #[arg(long)]
        plain_http: bool,
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
    },
    /// Delete cache data that no registered image references, now.
    Gc {
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show the daemon's images, fetched bytes and backend requests.
    Status {
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Serve containerd as a remote snapshotter (root): kite images start
    /// lazily, one EROFS mount per image; other images as overlayfs.
    Snapshotter {
        /// State directory: snapshot metadata, directories, image mounts.
        #[arg(long, default_value = kite_snapshotter::DEFAULT_ROOT)]
        root: PathBuf,
        /// The gRPC socket (containerd's `proxy_plugins.kite.address`).
        #[arg(long, default_value = kite_snapshotter::DEFAULT_ADDRESS)]
        address: PathBuf,
        /// The kite daemon's control socket.
        #[arg(long, env = "KITE_SOCKET", default_value = lazy::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Write a blob's uncompressed layout (usable as an EROFS `device=`).
    Unpack {
        #[arg(long)]
        bootstrap: PathBuf,
        blob: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    // Installed as mount.kite, mount(8) calls: mount.kite SOURCE DIR [-o OPTS].
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    if invoked_as.as_deref() == Some("mount.kite") {
        args.insert(1, "mount".into());
    }
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Print the cause chain, skipping causes a message already quotes.
            let mut msg = String::new();
            for cause in e.chain() {
                let t = cause.to_string();
                if !msg.contains(&t) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&t);
                }
            }
            eprintln!("kite: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A size: bytes, or a number with K, M, G or T (powers of 1024; an
/// optional trailing B or iB).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 50G, 512M, 1073741824)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?}: a size must be positive"));
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

/// Bytes for people: B, KiB, MiB or GiB.
fn mib(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One tokio runtime for the commands that need one, made here and nowhere else.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Warnings only (retries and resumptions show at info with KITE_LOG=info).
fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KITE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KITE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Daemon {
            cache_dir,
            socket,
            merge_bound,
            fetch_timeout,
            kernel_path,
            readahead,
            mirror,
            plain_http,
            docker_config,
            registry_retries,
            pin_metadata_mib,
            metrics_addr,
            gc_grace,
            cache_size,
            peer_listen,
            peers,
            peer_token_file,
            peer_timeout,
            peer_tls_cert,
            peer_tls_key,
            peer_tls_ca,
            peer_tls_name,
            takeover,
            worker,
            keeper,
        } => {
            init_logging();
            // Checked before the holder starts, so a bad flag is an error
            // here rather than a worker that keeps failing.
            let peer = lazy::peer_config(
                peer_listen,
                peers.as_deref(),
                peer_token_file.as_deref(),
                peer_timeout,
                kite_daemon::peer::PeerTls {
                    cert: peer_tls_cert,
                    key: peer_tls_key,
                    ca: peer_tls_ca,
                    name: peer_tls_name,
                },
            )?;
            if keeper {
                kite_holder::run_keeper(&socket, &cache_dir)?;
                return Ok(());
            }
            if !worker {
                // The holder: keeps the kernel interface, runs workers
                // (this binary with the same flags plus --worker).
                let mut worker_args: Vec<std::ffi::OsString> = std::env::args_os()
                    .skip(1)
                    .filter(|a| a != "--takeover")
                    .collect();
                let at = worker_args
                    .iter()
                    .position(|a| a == "daemon")
                    .map_or(worker_args.len(), |i| i + 1);
                worker_args.insert(at, "--worker".into());
                let kernel_path = lazy::parse_kernel_path(&kernel_path)?;
                kite_holder::run(kite_holder::Config {
                    cache_dir,
                    tag: "kite".into(),
                    kernel_path,
                    api_socket: socket,
                    worker_args,
                    takeover,
                })?;
                return Ok(());
            }
            let mut reg = kite_registry::ClientConfig {
                plain_http,
                retries: registry_retries,
                mirrors: registry::parse_mirrors(&mirror)?,
                ..Default::default()
            };
            if docker_config.is_some() {
                reg.docker_config = docker_config;
            }
            runtime()?.block_on(lazy::daemon(
                lazy::DaemonArgs {
                    cache_dir,
                    socket,
                    merge_bound,
                    fetch_timeout,
                    readahead,
                    pin_metadata: pin_metadata_mib << 20,
                    metrics_addr,
                    gc_grace,
                    cache_size,
                    peer,
                },
                reg,
            ))?;
        }
        Cmd::Mount {
            source,
            mountpoint,
            socket,
            backend_url,
            options: _,
            plain_http,
            username,
            password_stdin,
            platform,
            prefetch,
            no_prefetch,
            read_ahead_kb,
        } => {
            let password = registry::read_password(username.as_deref(), password_stdin)?;
            let image =
                lazy::MountSource::parse(&source, plain_http, username, password, platform)?;
            runtime()?.block_on(lazy::mount(
                image,
                &mountpoint,
                &socket,
                backend_url,
                if no_prefetch {
                    lazy::Prefetch::None
                } else {
                    prefetch
                },
                read_ahead_kb,
            ))?
        }
        Cmd::Profile {
            mountpoint,
            image_dir,
            socket,
        } => runtime()?.block_on(lazy::save_profile(&mountpoint, &image_dir, &socket))?,
        Cmd::Push {
            dir,
            reference,
            mount_from,
            registry,
        } => {
            init_logging_quiet();
            let pinned =
                runtime()?.block_on(registry::push(&dir, &reference, &mount_from, &registry))?;
            println!("{pinned}");
        }
        Cmd::Snapshotter {
            root,
            address,
            socket,
        } => {
            init_logging();
            lazy::check_kernel()?;
            runtime()?.block_on(kite_snapshotter::serve(kite_snapshotter::Config {
                root,
                address,
                daemon_socket: socket,
            }))?
        }
        Cmd::Images { socket, json } => runtime()?.block_on(lazy::images(&socket, json))?,
        Cmd::Rm { image, socket } => runtime()?.block_on(lazy::rm(&image, &socket))?,
        Cmd::Gc { socket } => runtime()?.block_on(lazy::gc(&socket))?,
        Cmd::Pull {
            image,
            socket,
            plain_http,
            platform,
        } => runtime()?.block_on(lazy::pull(&image, &socket, plain_http, platform))?,
        Cmd::Umount { mountpoint, socket } => {
            runtime()?.block_on(lazy::umount(&mountpoint, &socket))?
        }
        Cmd::Status { socket, json } => runtime()?.block_on(lazy::status(&socket, json))?,
        Cmd::Convert {
            from,
            to,
            chunk_size,
            elf_chunk_size,
            level,
            platform,
            inline_max,
            threads,
            quiet,
            registry,
        } => {
            // Registry sources stream layers through tasks on this runtime.
            let rt = runtime()?;
            let source = if from.starts_with("docker://") {
                init_logging_quiet();
                let plat = Platform::parse(&platform)?;
                rt.block_on(registry::remote_source(
                    &from,
                    &plat,
                    &registry,
                    rt.handle(),
                    quiet,
                ))?
            } else {
                Source::parse(&from)?
            };
            let mut opts = ConvertOptions {
                chunk_size: ChunkSize::parse(&chunk_size)?,
                elf_chunk_size: match elf_chunk_size.as_str() {
                    "off" => None,
                    s => Some(ChunkSize::parse(s)?),
                },
                level,
                platform: Platform::parse(&platform)?,
                inline_max,
                ..Default::default()
            };
            if let Some(t) = threads {
                opts.threads = t.max(1);
            }
            let bar = progress::Bar::new(!quiet);
            let start = Instant::now();
            let watch = signals::watch(&rt, opts.interrupt.clone())?;
            let rep = convert(&source, &to, &opts, &bar).map_err(|e| {
                bar.done();
                watch.exit_if_interrupted(e)
            })?;
            bar.done();
            let secs = start.elapsed().as_secs_f64();
            println!("converted {from} -> {}", to.display());
            if let Some(m) = &rep.source_manifest_digest {
                println!("  source manifest   {m}");
            }
            println!("  kite manifest     {}", rep.manifest_digest);
            println!(
                "  bootstrap         {} ({} bytes, {:.3}% of {} file data)",
                rep.bootstrap_digest,
                rep.bootstrap_size,
                100.0 * rep.bootstrap_size as f64 / rep.file_bytes.max(1) as f64,
                mib(rep.file_bytes)
            );
            for b in &rep.blobs {
                println!(
                    "  blob              {} {} stored, {} chunks",
                    b.digest,
                    mib(b.compressed_size),
                    b.chunks
                );
            }
            for l in &rep.empty_layers {
                println!("  layer {l}: no new data (all chunks deduplicated or empty)");
            }
            println!(
                "  {} files, {} chunk refs, {} deduplicated ({} saved); {} in {:.2}s = {:.0} MB/s",
                rep.files,
                rep.chunks_referenced,
                rep.chunks_deduplicated,
                mib(rep.dedup_bytes),
                mib(rep.input_bytes),
                secs,
                rep.input_bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
        Cmd::Inspect {
            bootstrap,
            blobs_only,
            summary,
            chunks,
        } => {
            let data = std::fs::read(&bootstrap)
                .with_context(|| format!("reading {}", bootstrap.display()))?;
            let out = std::io::stdout();
            let mut out = out.lock();
            if chunks {
                let bs = kite_format::Bootstrap::parse(&data)?;
                for b in bs.index.blobs() {
                    let hex = b.record.digest.hex();
                    for c in 0..b.chunk_count {
                        let r = bs.index.chunk(&b, c);
                        writeln!(
                            out,
                            "{hex} {c} {} {} {}",
                            r.digest.hex(),
                            r.compressed_size,
                            r.uncompressed_size
                        )?;
                    }
                }
                return Ok(());
            }
            if blobs_only {
                let bs = kite_format::Bootstrap::parse(&data)?;
                for b in bs.index.blobs() {
                    writeln!(out, "{}", b.record.digest.hex())?;
                }
                return Ok(());
            }
            let mut lines = Vec::new();
            let mut cb = |e: kite_convert::inspect::ListEntry| lines.push(e);
            let st =
                kite_convert::inspect::inspect(&data, if summary { None } else { Some(&mut cb) })?;
            for e in &lines {
                let link = e
                    .symlink
                    .as_ref()
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{} {:>6} {:>6} {:>12} {}{}",
                    mode_string(e.mode),
                    e.uid,
                    e.gid,
                    e.size,
                    e.path,
                    link
                )?;
            }
            let image = st.file_bytes.max(1) as f64;
            writeln!(
                out,
                "bootstrap: {} bytes (EROFS {} + index {}), {:.3}% of the image's {} of file data",
                st.bootstrap_size,
                st.erofs_size,
                st.index_size,
                100.0 * st.bootstrap_size as f64 / image,
                mib(st.file_bytes)
            )?;
            writeln!(
                out,
                "inodes: {} ({} paths), regular files: {}, chunk size: {}{}",
                st.inodes,
                st.paths,
                st.files,
                st.chunk_size,
                match st.fine_chunk_size {
                    0 => String::new(),
                    n => format!(" (ELF files: {n})"),
                }
            )?;
            writeln!(out, "blobs (device-table order):")?;
            for (i, b) in st.blobs.iter().enumerate() {
                writeln!(
                    out,
                    "  {:>3} {}  chunks {:>7} ({} raw)  stored {:>12}  uncompressed {:>12}{}",
                    i + 1,
                    b.digest,
                    b.chunks,
                    b.raw_chunks,
                    mib(b.compressed_size),
                    mib(b.uncompressed_size),
                    b.source_layer
                        .map(|l| format!("  from layer {l}"))
                        .unwrap_or_default()
                )?;
            }
            writeln!(
                out,
                "dedup: {} referenced, {} stored, ratio {:.3}; compressed {} ({:.1}% of stored)",
                mib(st.referenced_bytes),
                mib(st.stored_bytes),
                st.dedup_ratio(),
                mib(st.compressed_bytes),
                100.0 * st.compressed_bytes as f64 / st.stored_bytes.max(1) as f64
            )?;
        }
        Cmd::Check {
            bootstrap,
            blobs,
            metadata,
        } => {
            let data = std::fs::read(&bootstrap)
                .with_context(|| format!("reading {}", bootstrap.display()))?;
            let Some(blobs) = blobs.filter(|_| !metadata) else {
                let rep = kite_format::Bootstrap::parse(&data)
                    .and_then(|b| b.validate())
                    .with_context(|| format!("{} is not a valid bootstrap", bootstrap.display()))?;
                println!(
                    "ok: {} inodes, {} directories, {} entries, {} chunked files with {} chunk indexes, {} xattrs",
                    rep.inodes,
                    rep.directories,
                    rep.entries,
                    rep.chunk_files,
                    rep.chunk_indexes,
                    rep.xattrs
                );
                return Ok(());
            };
            let rep = kite_convert::inspect::check(&data, &blobs)
                .with_context(|| format!("check of {} failed", bootstrap.display()))?;
            println!(
                "ok: {} inodes, {} chunk references, {} chunks ({}) verified",
                rep.inodes,
                rep.chunk_refs,
                rep.chunks_verified,
                mib(rep.bytes_verified)
            );
        }
        Cmd::Unpack {
            bootstrap,
            blob,
            output,
        } => {
            let data = std::fs::read(&bootstrap)
                .with_context(|| format!("reading {}", bootstrap.display()))?;
            let d = kite_convert::inspect::unpack(&data, &blob, &output)?;
            println!("unpacked {d} -> {}", output.display());
        }
    }
    Ok(())
}

fn mode_string(mode: u16) -> String {
    let t = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut s = String::from(t);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let mut ch = if mode & bit != 0 { *c } else { '-' };
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        if special {
            ch = match (i, ch) {
                (8, 'x') => 't',
                (8, _) => 'T',
                (_, 'x') => 's',
                _ => 'S',
            };
        }
        s.push(ch);
    }
    s
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_powers_of_1024_and_nonsense_is_refused() {
        assert_eq!(parse_size("50G"), Ok(50 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        for bad in ["", "G", "-1G", "0", "ten", "1.5.2M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
