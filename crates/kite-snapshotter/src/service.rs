//! The Snapshots v1 service: containerd's calls, answered from the store.
//!
//! Each RPC runs on the blocking pool ([`Core`] is synchronous: redb,
//! mkdir, mount(2), a directory walk for usage); the daemon's control API
//! is async and is called through the runtime handle from there.
//!
//! Snapshot kinds and what kite does with them:
//! - **kite layer** (a Prepare labelled `containerd.io/snapshot.ref` and
//!   `containerd.io/snapshot/kite.layer`): the bootstrap layer registers
//!   the image with the daemon (which fetches and verifies the bootstrap);
//!   every kite layer is then committed under the chain ID containerd asked
//!   for, with no directory, and the Prepare answers `AlreadyExists`, so
//!   containerd downloads nothing.
//! - **ordinary layer** (`snapshot.ref` without kite's label): an overlay
//!   snapshot containerd unpacks into; logged as a pull that is not lazy.
//! - **container or view** (no `snapshot.ref`): an overlay whose lower
//!   layers are the parents' directories, down to a kite top layer, which
//!   stands for the whole image: its EROFS mount, made once per image at
//!   `<root>/images/<fsid>` and shared by every container.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Usage};
use kite_daemon::api::{Client, ImageRef, RegisterRequest, RegisterResponse};

use crate::filter::{Fields, Filters};
use crate::labels::{self, KiteLayer as LayerKind};
use crate::store::{Kind, KiteLayer, Record, Store};
use crate::{Config, Error};

/// The synchronous core of the snapshotter.
pub struct Core {
    root: PathBuf,
    store: Store,
    daemon: Client,
    socket: PathBuf,
    rt: tokio::runtime::Handle,
    /// Serializes mounting and unmounting of images.
    images: Mutex<()>,
    /// Images whose pull was already logged as not lazy.
    not_lazy: Mutex<HashSet<String>>,
    /// Registrations made by this process, by fsid: mounting uses them
    /// instead of registering again (which would fetch the bootstrap
    /// again).
    registered: Mutex<HashMap<String, RegisterResponse>>,
    /// Whether overlayfs has an `index` parameter (then `index=off`, as
    /// containerd's overlay snapshotter does).
    overlay_index: bool,
}

impl Core {
    pub fn open(cfg: &Config, rt: tokio::runtime::Handle) -> Result<Self, Error> {
        for d in [cfg.root.join("snapshots"), cfg.root.join("images")] {
            std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        kite_kernel::mount::private_dir(&cfg.root).map_err(|e| io(&cfg.root, e))?;
        let store = Store::open(&cfg.root.join("metadata.redb"))?;
        let core = Self {
            root: cfg.root.clone(),
            store,
            daemon: Client::new(&cfg.daemon_socket),
            socket: cfg.daemon_socket.clone(),
            rt,
            images: Mutex::new(()),
            not_lazy: Mutex::new(HashSet::new()),
            registered: Mutex::new(HashMap::new()),
            overlay_index: Path::new("/sys/module/overlay/parameters/index").exists(),
        };
        core.sweep(true)?;
        Ok(core)
    }

    fn snap_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn image_dir(&self, fsid: &str) -> PathBuf {
        self.root.join("images").join(fsid)
    }

    fn daemon_err(&self, what: &str, e: kite_daemon::DaemonError) -> Error {
        match e {
            kite_daemon::DaemonError::Io { .. } => Error::Unavailable(format!(
                "{what}: kite daemon at {}: {e}",
                self.socket.display()
            )),
            e => Error::FailedPrecondition(format!("{what}: {e}")),
        }
    }

    /// Register the image `reference` names with the daemon (which
    /// fetches and verifies its bootstrap); `what` prefixes errors.
    fn register(&self, reference: &str, what: &str) -> Result<RegisterResponse, Error> {
        let req = RegisterRequest {
            image: Some(ImageRef {
                reference: reference.to_string(),
                plain_http: false,
                platform: None,
                username: None,
                password: None,
                no_prefetch: false,
            }),
            ..Default::default()
        };
        self.rt
            .block_on(self.daemon.register(&req))
            .map_err(|e| self.daemon_err(what, e))
    }

    // ---- RPCs -------------------------------------------------------

    pub fn prepare(
        &self,
        key: String,
        parent: String,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Error> {
        if kind == Kind::Active {
            if let Some(target) = labels.get(labels::TARGET_REF) {
                match LayerKind::of(&labels).map_err(Error::InvalidArgument)? {
                    Some(layer) => return Err(self.kite_layer(target, &parent, layer, &labels)),
                    None => self.log_not_lazy(&labels),
                }
            }
        }
        let now = SystemTime::now();
        let rec = self.store.update(|tx| {
            if tx.get(&key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key}")));
            }
            if !parent.is_empty() {
                match tx.get(&parent)? {
                    None => return Err(Error::NotFound(format!("parent snapshot {parent}"))),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(Error::FailedPrecondition(format!(
                            "parent snapshot {parent} is not committed"
                        )))
                    }
                    Some(_) => {}
                }
            }
            let id = tx.next_id()?;
            let dir = self.snap_dir(id);
            // A fresh id: anything there was left by a crash before the
            // commit that would have named it.
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed a directory a crashed prepare left")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&dir, e)),
            }
            let mut dirs = vec![dir.join("fs")];
            if kind == Kind::Active {
                dirs.push(dir.join("work"));
            }
            for d in dirs {
                std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
            }
            let rec = Record {
                id,
                kind,
                parent: parent.clone(),
                labels: labels.clone(),
                created: now,
                updated: now,
                kite: None,
                usage: None,
            };
            tx.put(&key, &rec)?;
            Ok(rec)
        })?;
        let mounted = self.lowers_of(&rec).and_then(|lowers| {
            if kind == Kind::Active {
                if let Some(lowest) = lowers.first() {
                    copy_root_attributes(Path::new(lowest), &self.snap_dir(rec.id).join("fs"))?;
                }
            }
            self.mounts_with(&rec, lowers)
        });
        match mounted {
            Ok(m) => Ok(m),
            Err(e) => {
                // A snapshot that cannot be mounted is not left behind.
                tracing::warn!(%key, error = %e, "prepare failed; removing the snapshot");
                if let Err(e2) = self.remove(key.clone()) {
                    tracing::warn!(%key, error = %e2, "removing the failed snapshot");
                }
                Err(e)
            }
        }
    }

    pub fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        let rec = self
            .store
            .get(&key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if rec.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: only active snapshots and views have mounts"
            )));
        }
        self.mounts_of(&rec)
    }

    pub fn commit(
        &self,
        name: String,
        key: String,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let r = self
            .store
            .get(&key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        // Measured before the transaction: the directory no longer
        // changes (containerd commits what it finished writing).
        let usage = if r.kind == Kind::Active {
            Some(disk_usage(&self.snap_dir(r.id).join("fs")))
        } else {
            None
        };
        let now = SystemTime::now();
        self.store.update(|tx| {
            let r = tx
                .get(&key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
            if r.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is {:?}: only an active snapshot can be committed",
                    r.kind
                )));
            }
            if tx.get(&name)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {name}")));
            }
            let c = Record {
                kind: Kind::Committed,
                labels: labels.clone(),
                created: now,
                updated: now,
                usage,
                ..r
            };
            tx.delete(&key)?;
            tx.put(&name, &c)
        })?;
        // The work directory is overlayfs scratch space; a committed
        // layer keeps only its files.
        let work = self.snap_dir(r.id).join("work");
        let _ = std::fs::remove_dir_all(work);
        Ok(())
    }

    pub fn remove(&self, key: String) -> Result<(), Error> {
        let (rec, last_of_image) = self.store.update(|tx| {
            let r = tx
                .get(&key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
            if tx.has_children(&key)? {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} has children: remove them first"
                )));
            }
            tx.delete(&key)?;
            let last = match &r.kite {
                Some(k) => !tx
                    .all()?
                    .iter()
                    .any(|(_, o)| o.kite.as_ref().is_some_and(|ok| ok.fsid == k.fsid)),
                None => false,
            };
            Ok((r, last))
        })?;
        match &rec.kite {
            None => {
                let dir = self.snap_dir(rec.id);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        // Cleanup retries what is left.
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot directory");
                    }
                }
            }
            Some(k) if last_of_image => self.release_image(&k.fsid),
            Some(_) => {}
        }
        tracing::debug!(%key, "removed snapshot");
        Ok(())
    }

    pub fn stat(&self, key: String) -> Result<Info, Error> {
        let r = self
            .store
            .get(&key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        Ok(info_of(key, r))
    }

    pub fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        let name = info.name.clone();
        let now = SystemTime::now();
        let r = self.store.update(|tx| {
            let mut r = tx
                .get(&name)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {name}")))?;
            let given: BTreeMap<String, String> = info.labels.clone().into_iter().collect();
            match fieldpaths.as_deref() {
                None | Some([]) => r.labels = given,
                Some(paths) => {
                    for p in paths {
                        if p == "labels" {
                            r.labels = given.clone();
                        } else if let Some(k) = p.strip_prefix("labels.") {
                            match given.get(k) {
                                Some(v) => r.labels.insert(k.to_string(), v.clone()),
                                None => r.labels.remove(k),
                            };
                        } else {
                            return Err(Error::InvalidArgument(format!(
                                "cannot update field {p:?} of snapshot {name}: only labels change"
                            )));
                        }
                    }
                }
            }
            r.updated = now;
            tx.put(&name, &r)?;
            Ok(r)
        })?;
        Ok(info_of(name, r))
    }

    pub fn usage(&self, key: String) -> Result<Usage, Error> {
        let r = self
            .store
            .get(&key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        // A kite layer has no directory: its data is the daemon's cache,
        // accounted there. An active snapshot is measured now; a
        // committed one was measured at commit.
        let (size, inodes) = match (&r.kite, r.usage) {
            (Some(_), _) => (0, 0),
            (None, Some(u)) => u,
            (None, None) => disk_usage(&self.snap_dir(r.id).join("fs")),
        };
        Ok(Usage { size, inodes })
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, Error> {
        let f = Filters::parse(filters).map_err(Error::InvalidArgument)?;
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter(|(name, r)| {
                f.matches(&Fields {
                    kind: kind_name(r.kind),
                    name,
                    parent: &r.parent,
                    labels: &r.labels,
                })
            })
            .map(|(name, r)| info_of(name, r))
            .collect())
    }

    /// Remove what no snapshot names: directories under `snapshots/` and
    /// image mounts under `images/` (containerd calls this after its GC).
    pub fn cleanup(&self) -> Result<(), Error> {
        self.sweep(false)
    }

    /// Cleanup's work. While serving, ids from the next id on belong to
    /// snapshots being prepared after the read: their directories are
    /// left alone. At start nothing is being prepared: every directory
    /// no record names goes (a crash between mkdir and commit).
    fn sweep(&self, at_start: bool) -> Result<(), Error> {
        let (all, next) = self
            .store
            .update(|tx| Ok((tx.all()?, tx.peek_next_id()?)))?;
        let next = if at_start { u64::MAX } else { next };
        let ids: HashSet<String> = all.iter().map(|(_, r)| r.id.to_string()).collect();
        let fsids: HashSet<&str> = all
            .iter()
            .filter_map(|(_, r)| r.kite.as_ref().map(|k| k.fsid.as_str()))
            .collect();
        let snaps = self.root.join("snapshots");
        for e in std::fs::read_dir(&snaps)
            .map_err(|e| io(&snaps, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let newer = name.parse::<u64>().is_ok_and(|id| id >= next);
            if !ids.contains(&name) && !newer {
                tracing::info!(dir = %e.path().display(), "removing a directory no snapshot names");
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cleanup");
                }
            }
        }
        let images = self.root.join("images");
        for e in std::fs::read_dir(&images)
            .map_err(|e| io(&images, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !fsids.contains(name.as_str()) {
                self.release_image(&name);
            }
        }
        Ok(())
    }

    // ---- kite layers and images --------------------------------------

    /// Handle a kite layer's Prepare: commit the layer under `target` and
    /// answer AlreadyExists (containerd then skips it), or fail naming
    /// the layer. Always returns the error to send.
    fn kite_layer(
        &self,
        target: &str,
        parent: &str,
        kind: LayerKind,
        labels: &BTreeMap<String, String>,
    ) -> Error {
        match self.kite_layer_inner(target, parent, kind, labels) {
            Ok(()) => Error::AlreadyExists(format!("snapshot {target}")),
            Err(e) => e,
        }
    }

    fn kite_layer_inner(
        &self,
        target: &str,
        parent: &str,
        kind: LayerKind,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        if let Some(r) = self.store.get(target)? {
            if r.kind == Kind::Committed {
                return Ok(());
            }
        }
        let layer = labels::layer_digest(labels).unwrap_or(target).to_string();
        let what = |why: String| format!("kite {kind:?} layer {layer}: {why}").to_lowercase();
        let image = labels
            .get(labels::kite::IMAGE)
            .and_then(|d| kite_oci::digest_hex(d).ok())
            .ok_or_else(|| {
                Error::InvalidArgument(what(format!("no valid {} label", labels::kite::IMAGE)))
            })?
            .to_string();
        let layers: u32 = labels
            .get(labels::kite::LAYERS)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(what(format!("no valid {} label", labels::kite::LAYERS)))
            })?;
        let (kite, registration) = match kind {
            LayerKind::Bootstrap => {
                if !parent.is_empty() {
                    return Err(Error::FailedPrecondition(what(
                        "a kite bootstrap layer must be the image's first layer".into(),
                    )));
                }
                let reference = labels::image_reference(labels)
                    .map_err(|e| Error::FailedPrecondition(what(e)))?;
                tracing::info!(%reference, %layer, "registering kite image with the daemon");
                let reg = self.register(&reference, &what(format!("image {reference}")))?;
                if reg.fsid != image {
                    // The daemon registered what the reference names now;
                    // not the image whose layer this is. Let it go unless
                    // something here uses that image.
                    let known = self
                        .store
                        .all()?
                        .iter()
                        .any(|(_, r)| r.kite.as_ref().is_some_and(|k| k.fsid == reg.fsid));
                    if !known && !kite_daemon::mounting::fsid_in_use(&reg.fsid) {
                        let _ = self.rt.block_on(self.daemon.unregister(&reg.fsid));
                    }
                    return Err(Error::FailedPrecondition(what(format!(
                        "{reference} has bootstrap sha256:{}, the layer's label says sha256:{image} (was the tag moved during the pull?)",
                        reg.fsid
                    ))));
                }
                let pinned = reg.pinned.clone().unwrap_or(reference);
                (
                    KiteLayer {
                        fsid: image,
                        reference: pinned,
                        index: 0,
                        layers,
                    },
                    Some(reg),
                )
            }
            LayerKind::Blob | LayerKind::Prefetch => {
                let p = self
                    .store
                    .get(parent)?
                    .ok_or_else(|| Error::NotFound(what(format!("parent snapshot {parent}"))))?;
                let pk = p.kite.filter(|k| k.fsid == image).ok_or_else(|| {
                    Error::FailedPrecondition(what(format!(
                        "its parent {parent} is not a layer of kite image sha256:{image}"
                    )))
                })?;
                (
                    KiteLayer {
                        index: pk.index + 1,
                        layers,
                        ..pk
                    },
                    None,
                )
            }
        };
        let now = SystemTime::now();
        let mut committed_labels = labels.clone();
        committed_labels.insert(labels::KITE_REMOTE.into(), "true".into());
        let fsid = kite.fsid.clone();
        let reference = kite.reference.clone();
        let index = kite.index;
        self.store.update(|tx| {
            if tx.get(target)?.is_some() {
                return Ok(());
            }
            let id = tx.next_id()?;
            tx.put(
                target,
                &Record {
                    id,
                    kind: Kind::Committed,
                    parent: parent.to_string(),
                    labels: committed_labels,
                    created: now,
                    updated: now,
                    kite: Some(kite),
                    usage: None,
                },
            )
        })?;
        if let Some(reg) = registration {
            lock(&self.registered).insert(fsid.clone(), reg);
        }
        tracing::info!(%target, %layer, %reference, fsid = %fsid, index, "kite layer committed without download");
        Ok(())
    }

    fn log_not_lazy(&self, labels: &BTreeMap<String, String>) {
        let image = labels
            .get(labels::CRI_IMAGE_REF)
            .or_else(|| labels.get(labels::STARGZ_REFERENCE))
            .cloned();
        let key = image.clone().unwrap_or_default();
        if !lock(&self.not_lazy).insert(key) {
            return;
        }
        let layer = labels::layer_digest(labels).unwrap_or("?");
        match image {
            Some(image) => tracing::info!(
                %image, %layer,
                "pull is not lazy: layer {layer} of {image} is not a kite layer, so containerd downloads and unpacks it (convert the image with `kite convert` and push it with `kite push` for a lazy pull)"
            ),
            None => tracing::info!(
                %layer,
                "pull is not lazy: a layer without kite or image labels is being unpacked (`ctr images pull` never pulls lazily; through CRI, set disable_snapshot_annotations = false)"
            ),
        }
    }

    /// The mounts of an active snapshot or view.
    fn mounts_of(&self, rec: &Record) -> Result<Vec<Mount>, Error> {
        let lowers = self.lowers_of(rec)?;
        self.mounts_with(rec, lowers)
    }

    /// The lower directories of a snapshot, nearest first: its ancestors'
    /// directories down to a kite image's mount (made if needed).
    fn lowers_of(&self, rec: &Record) -> Result<Vec<String>, Error> {
        let mut lowers: Vec<String> = Vec::new();
        let mut p = rec.parent.clone();
        while !p.is_empty() {
            let pr = self
                .store
                .get(&p)?
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {p}")))?;
            if let Some(k) = &pr.kite {
                // Any kite layer stands for the whole image: its one
                // EROFS mount holds every file (the image with and
                // without a profile layer share their first chain IDs).
                lowers.push(path_str(&self.ensure_image_mounted(k)?)?);
                break;
            }
            lowers.push(path_str(&self.snap_dir(pr.id).join("fs"))?);
            p = pr.parent;
        }
        Ok(lowers)
    }

    fn mounts_with(&self, rec: &Record, mut lowers: Vec<String>) -> Result<Vec<Mount>, Error> {
        let dir = self.snap_dir(rec.id);
        let fs = path_str(&dir.join("fs"))?;
        let bind = |source: String, mode: &str| Mount {
            r#type: "bind".into(),
            source,
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        let mut overlay_opts = Vec::new();
        if self.overlay_index {
            overlay_opts.push("index=off".to_string());
        }
        Ok(match (rec.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(fs, "rw")],
            (Kind::View, 0) => vec![bind(fs, "ro")],
            (Kind::View, 1) => vec![bind(lowers.remove(0), "ro")],
            (kind, _) => {
                if kind == Kind::Active {
                    overlay_opts.push(format!("workdir={}", path_str(&dir.join("work"))?));
                    overlay_opts.push(format!("upperdir={fs}"));
                }
                overlay_opts.push(format!("lowerdir={}", lowers.join(":")));
                vec![Mount {
                    r#type: "overlay".into(),
                    source: "overlay".into(),
                    target: String::new(),
                    options: overlay_opts,
                }]
            }
        })
    }

    /// The image's EROFS mount, made if it is not there (first container,
    /// or after a reboot). The daemon is asked to register the image
    /// again if it no longer knows it.
    fn ensure_image_mounted(&self, k: &KiteLayer) -> Result<PathBuf, Error> {
        let _serial = lock(&self.images);
        let mp = self.image_dir(&k.fsid);
        if kite_kernel::mount::erofs_mounts()
            .iter()
            .any(|m| m.mountpoint == mp)
        {
            return Ok(mp);
        }
        std::fs::create_dir_all(&mp).map_err(|e| io(&mp, e))?;
        let what = format!("mounting kite image {}", k.reference);
        let known = self
            .rt
            .block_on(self.daemon.images())
            .map_err(|e| self.daemon_err(&what, e))?
            .iter()
            .any(|i| i.fsid == k.fsid);
        let kept = lock(&self.registered).get(&k.fsid).cloned();
        let reg = match kept {
            Some(r) if known => r,
            _ => {
                let reg = self.register(&k.reference, &what)?;
                if reg.fsid != k.fsid {
                    return Err(Error::FailedPrecondition(format!(
                        "{what}: the daemon registered bootstrap sha256:{}, the snapshot was made for sha256:{}",
                        reg.fsid, k.fsid
                    )));
                }
                lock(&self.registered).insert(k.fsid.clone(), reg.clone());
                reg
            }
        };
        let done = self
            .rt
            .block_on(kite_daemon::mounting::mount_registered(
                &self.daemon,
                &reg,
                &mp,
                None,
            ))
            .map_err(|e| Error::Internal(format!("{what} on {}: {e}", mp.display())))?;
        for w in done.warnings {
            tracing::warn!(image = %k.reference, "{w}");
        }
        tracing::info!(image = %k.reference, fsid = %k.fsid, mountpoint = %mp.display(), path = %reg.kernel_path, "mounted kite image");
        Ok(mp)
    }

    /// No snapshot uses image `fsid` any more: unmount it and tell the
    /// daemon, unless another mount on the host (`kite mount`) still
    /// uses it.
    fn release_image(&self, fsid: &str) {
        let _serial = lock(&self.images);
        // Pulled again meanwhile: its new snapshots use the mount.
        match self.store.all() {
            Ok(all)
                if all
                    .iter()
                    .any(|(_, r)| r.kite.as_ref().is_some_and(|k| k.fsid == fsid)) =>
            {
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%fsid, error = %e, "releasing an image: the store cannot be read; left as is");
                return;
            }
        }
        let mp = self.image_dir(fsid);
        if kite_kernel::mount::erofs_mounts()
            .iter()
            .any(|m| m.mountpoint == mp)
        {
            if let Err(e) = kite_kernel::mount::unmount(&mp, false) {
                tracing::warn!(%fsid, mountpoint = %mp.display(), error = %e, "unmounting an image no snapshot uses; left mounted");
                return;
            }
        }
        let _ = std::fs::remove_dir(&mp);
        lock(&self.registered).remove(fsid);
        if kite_daemon::mounting::fsid_in_use(fsid) {
            return;
        }
        match self.rt.block_on(self.daemon.unregister(fsid)) {
            Ok(()) => {
                tracing::info!(%fsid, "image no longer used: told the daemon");
                // Its cache data goes now, not after the daemon's grace.
                match self.rt.block_on(self.daemon.gc(0)) {
                    Ok(r) => tracing::info!(
                        blobs = r.blobs,
                        freed_bytes = r.freed_bytes,
                        "cache data collected"
                    ),
                    Err(e) => tracing::warn!(error = %e, "asking the daemon to collect"),
                }
            }
            Err(kite_daemon::DaemonError::Api(e)) if e.contains("no image") => {}
            Err(e) => {
                tracing::warn!(%fsid, error = %e, "telling the daemon an image is no longer used")
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic (sets and maps
    // updated in one call), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

fn path_str(p: &Path) -> Result<String, Error> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Internal(format!("{} is not UTF-8", p.display())))
}

/// Give a new upper directory the owner, mode and times of the image's
/// root (`lower`): overlayfs shows the upper root as the container's `/`,
/// which should look like the image's, not like a directory made now.
fn copy_root_attributes(lower: &Path, upper: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata(lower).map_err(|e| io(lower, e))?;
    std::os::unix::fs::chown(upper, Some(md.uid()), Some(md.gid())).map_err(|e| io(upper, e))?;
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(|e| io(upper, e))?;
    let t = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
    nix::sys::stat::utimensat(
        None,
        upper,
        &t(md.atime(), md.atime_nsec()),
        &t(md.mtime(), md.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io(upper, e.into()))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::View => "View",
        Kind::Active => "Active",
        Kind::Committed => "Committed",
    }
}

fn info_of(name: String, r: Record) -> Info {
    Info {
        kind: match r.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name,
        parent: r.parent,
        labels: r.labels.into_iter().collect(),
        created_at: r.created,
        updated_at: r.updated,
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted
/// once; what cannot be read is skipped.
pub fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if seen.insert((md.dev(), md.ino())) {
            inodes += 1;
            bytes += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    stack.push(e.path());
                }
            }
        }
    }
    (bytes, inodes)
}

/// The gRPC face: each call runs [`Core`] on the blocking pool.
pub struct Snapshotter {
    core: Arc<Core>,
}

impl Snapshotter {
    pub fn new(core: Core) -> Self {
        Self {
            core: Arc::new(core),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| Error::Internal(format!("snapshotter task: {e}")))?
    }
}

fn labels_of(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

type InfoStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Info, Error>> + Send + 'static>>;

#[containerd_snapshots::tonic::async_trait]
impl containerd_snapshots::Snapshotter for Snapshotter {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.run(move |c| c.stat(key)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        self.run(move |c| c.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        self.run(move |c| c.usage(key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.run(move |c| c.mounts(key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        tracing::debug!(%key, %parent, ?labels, "prepare");
        let r = self
            .run(move |c| c.prepare(key, parent, labels_of(labels), Kind::Active))
            .await;
        if let Err(e) = &r {
            if !matches!(e, Error::AlreadyExists(_)) {
                tracing::warn!(error = %e, "prepare failed");
            }
        }
        r
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        tracing::debug!(%key, %parent, "view");
        self.run(move |c| c.prepare(key, parent, labels_of(labels), Kind::View))
            .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        tracing::debug!(%name, %key, "commit");
        self.run(move |c| c.commit(name, key, labels_of(labels)))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        tracing::debug!(%key, "remove");
        self.run(move |c| c.remove(key)).await
    }

    async fn clear(&self) -> Result<(), Error> {
        self.run(|c| c.cleanup()).await
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Error> {
        let infos = self.run(move |c| c.list(&filters)).await?;
        Ok(Box::pin(futures::stream::iter(infos.into_iter().map(Ok))))
    }
}

#[cfg(test)]
mod tests {
    //! The RPCs' semantics on ordinary snapshots (no daemon, no mounts:
    //! the mounts are returned, not made). The kite paths are tested end
    //! to end with containerd (crates/kite/tests/containerd.rs).

    use super::*;

    fn core(dir: &Path) -> (tokio::runtime::Runtime, Core) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = Config {
            root: dir.join("root"),
            address: dir.join("s.sock"),
            daemon_socket: dir.join("no-daemon.sock"),
        };
        let core = Core::open(&cfg, rt.handle().clone()).unwrap();
        (rt, core)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn opt<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
        m.options.iter().find_map(|o| o.strip_prefix(prefix))
    }

    #[test]
    fn active_commit_view_and_children() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, c) = core(dir.path());
        // A first layer: an active snapshot with no parent is a bind mount.
        let m = c
            .prepare("ns/1/a".into(), String::new(), labels(&[]), Kind::Active)
            .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        std::fs::write(Path::new(&m[0].source).join("f"), vec![7u8; 10_000]).unwrap();
        assert_eq!(
            c.stat("ns/1/a".into()).unwrap().kind,
            containerd_snapshots::Kind::Active
        );
        // Only committed snapshots can be parents.
        let e = c
            .prepare("ns/2/b".into(), "ns/1/a".into(), labels(&[]), Kind::Active)
            .unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        c.commit("layer-a".into(), "ns/1/a".into(), labels(&[("x", "1")]))
            .unwrap();
        assert!(matches!(c.stat("ns/1/a".into()), Err(Error::NotFound(_))));
        let a = c.stat("layer-a".into()).unwrap();
        assert_eq!(a.kind, containerd_snapshots::Kind::Committed);
        assert_eq!(a.labels.get("x").map(String::as_str), Some("1"));
        let u = c.usage("layer-a".into()).unwrap();
        assert!(u.size >= 10_000 && u.inodes == 2, "{u:?}");
        // Committed snapshots have no mounts; committing twice fails.
        assert!(matches!(
            c.mounts("layer-a".into()),
            Err(Error::FailedPrecondition(_))
        ));
        // A view of one layer: a read-only bind of it.
        let v = c
            .prepare("view".into(), "layer-a".into(), labels(&[]), Kind::View)
            .unwrap();
        assert_eq!(v[0].r#type, "bind");
        assert!(v[0].options.contains(&"ro".to_string()));
        assert!(v[0].source.ends_with("/fs"));
        assert!(Path::new(&v[0].source).join("f").exists());
        // A container on top: overlay, upper and work of its own.
        let o = c
            .prepare("ctr".into(), "layer-a".into(), labels(&[]), Kind::Active)
            .unwrap();
        assert_eq!(o[0].r#type, "overlay");
        assert_eq!(opt(&o[0], "lowerdir="), Some(v[0].source.as_str()));
        assert!(opt(&o[0], "upperdir=").is_some() && opt(&o[0], "workdir=").is_some());
        assert_eq!(c.mounts("ctr".into()).unwrap(), o);
        // A parent with children cannot go; children first.
        assert!(matches!(
            c.remove("layer-a".into()),
            Err(Error::FailedPrecondition(_))
        ));
        c.remove("ctr".into()).unwrap();
        c.remove("view".into()).unwrap();
        c.remove("layer-a".into()).unwrap();
        assert!(c.list(&[]).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("root/snapshots"))
                .unwrap()
                .count(),
            0,
            "directories left behind"
        );
    }

    #[test]
    fn two_lowers_stack_nearest_first_and_keys_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, c) = core(dir.path());
        c.prepare("k1".into(), String::new(), labels(&[]), Kind::Active)
            .unwrap();
        c.commit("l1".into(), "k1".into(), labels(&[])).unwrap();
        c.prepare("k2".into(), "l1".into(), labels(&[]), Kind::Active)
            .unwrap();
        c.commit("l2".into(), "k2".into(), labels(&[])).unwrap();
        let v = c
            .prepare("v".into(), "l2".into(), labels(&[]), Kind::View)
            .unwrap();
        assert_eq!(v[0].r#type, "overlay");
        let lowers: Vec<&str> = opt(&v[0], "lowerdir=").unwrap().split(':').collect();
        assert_eq!(lowers.len(), 2);
        let l2 = c.mounts("v".into()).unwrap();
        assert_eq!(l2, v);
        assert!(opt(&v[0], "upperdir=").is_none(), "a view has no upper");
        let e = c
            .prepare("v".into(), "l2".into(), labels(&[]), Kind::View)
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
        let e = c
            .prepare("w".into(), "nope".into(), labels(&[]), Kind::View)
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        // The nearest lower (l2's directory) comes first.
        let infos = c.list(&["name==l2".into()]).unwrap();
        assert_eq!(infos.len(), 1);
        assert!(lowers[0] != lowers[1]);
    }

    #[test]
    fn update_changes_labels_only_and_list_filters() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, c) = core(dir.path());
        c.prepare(
            "k".into(),
            String::new(),
            labels(&[("a", "1"), ("b", "2")]),
            Kind::Active,
        )
        .unwrap();
        let mut info = c.stat("k".into()).unwrap();
        info.labels = [("a".to_string(), "9".to_string())].into_iter().collect();
        // One path: a changes, b stays.
        let got = c.update(info, Some(vec!["labels.a".into()])).unwrap();
        assert_eq!(got.labels.get("a").map(String::as_str), Some("9"));
        assert_eq!(got.labels.get("b").map(String::as_str), Some("2"));
        // A path naming b with no value for it removes b.
        let info = c.stat("k".into()).unwrap();
        let mut info2 = info;
        info2.labels.remove("b");
        let got = c.update(info2, Some(vec!["labels.b".into()])).unwrap();
        assert!(!got.labels.contains_key("b"));
        // Anything but labels is refused.
        let info = c.stat("k".into()).unwrap();
        let e = c.update(info, Some(vec!["parent".into()])).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(c.list(&["labels.a==9".into()]).unwrap().len(), 1);
        assert_eq!(c.list(&["labels.a==1".into()]).unwrap().len(), 0);
        assert_eq!(c.list(&["kind==Active".into()]).unwrap().len(), 1);
        assert!(matches!(
            c.list(&["name~=k".into()]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_restart_reads_the_store_and_sweeps_orphan_directories() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_rt, c) = core(dir.path());
            c.prepare("k".into(), String::new(), labels(&[]), Kind::Active)
                .unwrap();
            c.commit("l".into(), "k".into(), labels(&[])).unwrap();
        }
        // What a crash between mkdir and commit leaves.
        std::fs::create_dir_all(dir.path().join("root/snapshots/999/fs")).unwrap();
        let (_rt, c) = core(dir.path());
        assert_eq!(
            c.stat("l".into()).unwrap().kind,
            containerd_snapshots::Kind::Committed
        );
        assert!(!dir.path().join("root/snapshots/999").exists());
        // A crash between mkdir and commit while serving leaves the next
        // id's directory: the next prepare starts it afresh.
        let stale = dir.path().join("root/snapshots/2/fs/stale");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, b"left over").unwrap();
        c.cleanup().unwrap();
        assert!(
            stale.exists(),
            "cleanup while serving removed a next id's directory"
        );
        let m = c
            .prepare("n".into(), String::new(), labels(&[]), Kind::Active)
            .unwrap();
        assert!(m[0].source.ends_with("snapshots/2/fs"), "{}", m[0].source);
        assert!(
            !stale.exists(),
            "a new snapshot got a crashed prepare's files"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("root/snapshots"))
                .unwrap()
                .count(),
            2,
            "l's directory and n's"
        );
    }
}
