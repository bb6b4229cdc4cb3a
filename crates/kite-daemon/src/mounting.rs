//! The client side of a mount: putting a registered image on a mountpoint.
//!
//! `kite mount` and the containerd snapshotter both register an image with
//! the daemon ([`crate::api::Client::register`]) and then mount the answer
//! here, in the caller's process: the mount belongs to whoever asked for
//! it, never to the daemon, so a daemon restart leaves every mount alone.

use std::path::{Path, PathBuf};

use crate::api::{Client, MountNotice, RegisterResponse};
use crate::DaemonError;

/// What [`mount_registered`] did besides the mount itself.
#[derive(Debug, Default)]
pub struct Mounted {
    /// The readahead set on the mount (KiB) and its bdi, if one was set.
    pub read_ahead: Option<(u32, String)>,
    /// Things that did not work but leave a usable mount.
    pub warnings: Vec<String>,
}

/// Mount the image `reg` describes on `mountpoint` (an existing
/// directory), set its readahead (`read_ahead_kb`, else the image's chunk
/// size; 0 leaves the kernel's) and tell the daemon about the mount. If
/// the mount fails and no other mount uses the image, the registration is
/// dropped, so nothing stays registered that nothing mounts.
pub async fn mount_registered(
    client: &Client,
    reg: &RegisterResponse,
    mountpoint: &Path,
    read_ahead_kb: Option<u32>,
) -> Result<Mounted, DaemonError> {
    let mut done = Mounted::default();
    // Which EROFS bdi is this mount's: the one that appears across
    // mount(2). Other kite mounts are kept out of that window by a lock.
    let serial = kite_kernel::mount::lock_mounts();
    let bdis = kite_kernel::mount::erofs_bdis();
    let mounted = match &reg.bootstrap_path {
        Some(boot) => {
            let devs: Vec<&Path> = reg.devices.iter().map(PathBuf::as_path).collect();
            kite_kernel::mount::mount_file_backed(boot, &devs, mountpoint)
        }
        None => kite_kernel::mount::mount_fscache(&reg.fsid, Some(&reg.domain_id), mountpoint),
    };
    if let Err(e) = mounted {
        drop(serial);
        if !fsid_in_use(&reg.fsid) {
            let _ = client.unregister(&reg.fsid).await;
        }
        return Err(e.into());
    }
    // EROFS mounts start with the kernel's 128 KiB readahead; the image's
    // chunk size suits it better. Not fatal if it cannot be set.
    let ra = read_ahead_kb.unwrap_or(reg.read_ahead_kb);
    if ra != 0 {
        match kite_kernel::mount::set_new_erofs_read_ahead(&bdis, ra) {
            Ok(bdi) => done.read_ahead = Some((ra, bdi)),
            Err(e) => done
                .warnings
                .push(format!("{e}; the mount keeps the kernel's readahead")),
        }
    }
    drop(serial);
    if reg.bootstrap_path.is_some() {
        // File-backed: the daemon switches the mount to direct I/O once
        // the image is complete on disk.
        let notice = MountNotice {
            mountpoint: mountpoint
                .canonicalize()
                .unwrap_or_else(|_| mountpoint.to_path_buf()),
        };
        if let Err(e) = client.mounted(&reg.fsid, &notice).await {
            done.warnings
                .push(format!("telling the daemon about the mount: {e}"));
        }
    }
    Ok(done)
}

/// Whether any EROFS mount on this host uses image `fsid`.
pub fn fsid_in_use(fsid: &str) -> bool {
    kite_kernel::mount::erofs_mounts()
        .iter()
        .any(|m| m.fsid == fsid)
}

/// The fsid of the kite mount at `mountpoint`, if it is one.
pub fn mounted_fsid(mountpoint: &Path) -> Option<String> {
    let want = mountpoint.canonicalize().ok()?;
    kite_kernel::mount::erofs_mounts()
        .into_iter()
        .find(|m| m.mountpoint == want)
        .map(|m| m.fsid)
}
