//! The registry-facing commands: the shared flags, `kite push`, and the
//! registry source of `kite convert --from docker://`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kite_convert::{LayerOpener, RemoteImage, Source};
use kite_oci::{Descriptor, Platform};
use kite_registry::{BlobReader, Client, ClientConfig, Credentials, Pushed, Reference, Repository};

/// Flags shared by the commands that talk to a registry.
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Use plain HTTP (loopback registries always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry user name; the password is read from stdin
    /// (--password-stdin). Without it, ~/.docker/config.json `auths`.
    #[arg(long)]
    pub username: Option<String>,
    /// Read the password (or token) from stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Docker config file with `auths` (default $DOCKER_CONFIG/config.json
    /// or ~/.docker/config.json).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// Registry mirror for pulls, HOST=URL (repeatable, tried in order,
    /// then HOST itself).
    #[arg(long, value_name = "HOST=URL")]
    pub mirror: Vec<String>,
    /// Seconds to wait for a connection or for any read.
    #[arg(long, default_value_t = 30)]
    pub registry_timeout: u64,
    /// Retries of a failed request (with exponential backoff).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Upload blobs above this size in PATCH chunks of it (bytes).
    #[arg(long, default_value_t = 32 << 20)]
    pub upload_chunk: u64,
}

/// `HOST=URL` pairs into the client's mirror map, in order.
pub fn parse_mirrors(specs: &[String]) -> Result<HashMap<String, Vec<String>>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for s in specs {
        let Some((host, url)) = s.split_once('=') else {
            bail!("--mirror {s:?}: expected HOST=URL, e.g. docker.io=https://mirror.example");
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--mirror {s:?}: the mirror must be an http:// or https:// URL");
        }
        m.entry(host.to_string()).or_default().push(url.to_string());
    }
    Ok(m)
}

/// The password from stdin when asked (the trailing newline dropped).
pub fn read_password(username: Option<&str>, from_stdin: bool) -> Result<Option<String>> {
    match (username, from_stdin) {
        (None, false) => Ok(None),
        (Some(_), false) => bail!(
            "--username needs --password-stdin (the password is never taken from the command line)"
        ),
        (None, true) => bail!("--password-stdin needs --username"),
        (Some(_), true) => {
            let mut p = String::new();
            std::io::stdin()
                .read_to_string(&mut p)
                .context("reading the password from stdin")?;
            let p = p.trim_end_matches(['\n', '\r']).to_string();
            if p.is_empty() {
                bail!("--password-stdin: stdin was empty");
            }
            Ok(Some(p))
        }
    }
}

impl RegistryArgs {
    /// A client for talking to `reference`'s registry.
    pub fn client(&self, reference: &Reference) -> Result<Client> {
        let mut cfg = ClientConfig {
            plain_http: self.plain_http,
            timeout: Duration::from_secs(self.registry_timeout.max(1)),
            retries: self.retries,
            mirrors: parse_mirrors(&self.mirror)?,
            upload_chunk: self.upload_chunk.max(1 << 20),
            ..Default::default()
        };
        if let Some(p) = &self.docker_config {
            cfg.docker_config = Some(p.clone());
        }
        if let Some(password) = read_password(self.username.as_deref(), self.password_stdin)? {
            let user = self.username.clone().unwrap_or_default();
            cfg.credentials.insert(
                reference.api_host().to_string(),
                Credentials::new(user, password),
            );
        }
        Ok(Client::new(cfg)?)
    }
}

/// `kite push DIR REF`: returns the pinned reference.
pub async fn push(
    dir: &Path,
    reference: &str,
    mount_from: &[String],
    args: &RegistryArgs,
) -> Result<String> {
    let target = Reference::parse(reference)?;
    let client = args.client(&target)?;
    let report = kite_registry::push_layout(
        &client,
        dir,
        &target,
        args.plain_http,
        mount_from,
        &|digest, size, how| {
            let what = match how {
                Pushed::Skipped => "already present".to_string(),
                Pushed::Mounted => "mounted".to_string(),
                Pushed::Uploaded { requests } => format!("uploaded in {requests} request(s)"),
            };
            eprintln!("  blob {digest} ({size} bytes): {what}");
        },
    )
    .await
    .with_context(|| format!("pushing {} to {target}", dir.display()))?;
    let uploaded = report
        .blobs
        .iter()
        .filter(|b| matches!(b.2, Pushed::Uploaded { .. }))
        .count();
    eprintln!(
        "pushed {} blobs ({uploaded} uploaded) and manifest {}",
        report.blobs.len(),
        report.digest
    );
    Ok(report.pinned.to_string())
}

/// Streams layers of a registry image for the converter.
struct RegistryLayers {
    rt: tokio::runtime::Handle,
    repo: Repository,
}

impl LayerOpener for RegistryLayers {
    fn open(&self, layer: &Descriptor) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(BlobReader::spawn(
            &self.rt,
            self.repo.clone(),
            layer.clone(),
        )))
    }
}

/// Resolve `docker://REF` into a converter source.
pub async fn remote_source(
    from: &str,
    platform: &Platform,
    args: &RegistryArgs,
    rt: &tokio::runtime::Handle,
    quiet: bool,
) -> Result<Source> {
    let reference = Reference::parse(from)?;
    let client = args.client(&reference)?;
    let repo = client.repository(&reference, args.plain_http)?;
    let resolved = repo
        .resolve(&reference, platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    if !quiet {
        eprintln!(
            "resolved {reference} to {} ({} layers)",
            resolved.digest,
            resolved.manifest.layers.len()
        );
    }
    // Verified against its descriptor by the client.
    let config = repo
        .fetch_blob(&resolved.manifest.config, 16 << 20)
        .await
        .with_context(|| format!("fetching image config {}", resolved.manifest.config.digest))?
        .to_vec();
    Ok(Source::Remote(Box::new(RemoteImage {
        reference: reference.to_string(),
        manifest_digest: resolved.digest,
        manifest: resolved.manifest,
        config,
        opener: Arc::new(RegistryLayers {
            rt: rt.clone(),
            repo,
        }),
    })))
}
