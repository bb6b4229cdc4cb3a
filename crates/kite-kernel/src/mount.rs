//! EROFS mounts: over fscache (`fsid=`, `domain_id=`) and file-backed
//! (bootstrap file as source, `device=` per blob), and unmounting.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::KernelError;

fn errno_hint(e: nix::errno::Errno) -> &'static str {
    match e {
        nix::errno::Errno::ENODEV => " (kernel has no EROFS: CONFIG_EROFS_FS)",
        nix::errno::Errno::EINVAL => {
            " (option not supported by this kernel: fscache mode needs CONFIG_EROFS_FS_ONDEMAND, a file source needs CONFIG_EROFS_FS_BACKED_BY_FILE)"
        }
        nix::errno::Errno::EPERM => " (needs root)",
        _ => "",
    }
}

/// `mount -t erofs -o ro,fsid=FSID[,domain_id=D] none MNT` (cachefiles
/// on-demand: the daemon serves bootstrap and blobs).
pub fn mount_fscache(fsid: &str, domain_id: Option<&str>, mnt: &Path) -> Result<(), KernelError> {
    let mut data = format!("fsid={fsid}");
    if let Some(d) = domain_id {
        data.push_str(&format!(",domain_id={d}"));
    }
    mount(
        Some("none"),
        mnt,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .map_err(|e| KernelError::Mount {
        what: format!("erofs {data} on {}{}", mnt.display(), errno_hint(e)),
        source: e,
    })
}

/// File-backed EROFS: `bootstrap` as source, one `device=` per blob file.
pub fn mount_file_backed(
    bootstrap: &Path,
    devices: &[&Path],
    mnt: &Path,
) -> Result<(), KernelError> {
    let data: Vec<String> = devices
        .iter()
        .map(|d| format!("device={}", d.display()))
        .collect();
    let data = data.join(",");
    mount(
        Some(bootstrap),
        mnt,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| KernelError::Mount {
        what: format!(
            "erofs {} on {}{}",
            bootstrap.display(),
            mnt.display(),
            errno_hint(e)
        ),
        source: e,
    })
}

/// Switch a file-backed EROFS mount to direct I/O on its backing files
/// (`-o remount,directio`; EROFS takes the new option set on remount).
pub fn remount_direct_io(mnt: &Path) -> Result<(), KernelError> {
    mount(
        None::<&str>,
        mnt,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        Some("directio"),
    )
    .map_err(|e| KernelError::Mount {
        what: format!("remount,directio {}", mnt.display()),
        source: e,
    })
}

/// Unmount (lazily when `detach`).
pub fn unmount(mnt: &Path, detach: bool) -> Result<(), KernelError> {
    let flags = if detach {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    umount2(mnt, flags).map_err(|e| KernelError::Mount {
        what: format!("umount {}", mnt.display()),
        source: e,
    })
}

/// Names of the EROFS backing-dev-infos (`/sys/class/bdi/erofs-<n>`): each
/// EROFS mount (fscache or file-backed) has its own, with a sequence
/// number as name and nothing in sysfs tying it to the mount. Taken before
/// and after a mount, the difference is the new mount's.
pub fn erofs_bdis() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/sys/class/bdi")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("erofs-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A host-wide lock (`/run/lock/kite-mount.lock`, flock) held across a
/// kite mount, so the EROFS bdi that appears is that mount's. None if it
/// cannot be taken (not root): the bdi lookup then may find it ambiguous.
pub fn lock_mounts() -> Option<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/kite-mount.lock")
        .ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok()
}

/// Set the readahead of the EROFS mount made since `before` was taken to
/// `kb` KiB; returns the bdi's name. Refuses (changing nothing) when not
/// exactly one EROFS mount appeared meanwhile.
pub fn set_new_erofs_read_ahead(
    before: &std::collections::BTreeSet<String>,
    kb: u32,
) -> Result<String, KernelError> {
    let name = new_erofs_bdi(before)?;
    let path = format!("/sys/class/bdi/{name}/read_ahead_kb");
    std::fs::write(&path, kb.to_string()).map_err(|source| KernelError::Io {
        what: format!("writing {path}"),
        source,
    })?;
    Ok(name)
}

/// The bdi of the one EROFS mount made since `before` was taken.
fn new_erofs_bdi(before: &std::collections::BTreeSet<String>) -> Result<String, KernelError> {
    let new: Vec<String> = erofs_bdis().difference(before).cloned().collect();
    let [name] = new.as_slice() else {
        return Err(KernelError::Io {
            what: format!(
                "setting the mount's readahead: {} new EROFS mounts since the mount began, cannot tell which is this one",
                new.len()
            ),
            source: std::io::Error::other("ambiguous"),
        });
    };
    Ok(name.clone())
}
