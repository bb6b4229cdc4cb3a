//! EROFS mounts: over fscache (`fsid=`, `domain_id=`) and file-backed
//! (bootstrap file as source, `device=` per blob), and unmounting.
//!
//! Every image mount is `ro,nosuid,nodev` ([`IMAGE_MOUNT_FLAGS`]): image
//! bytes are untrusted, so a setuid binary or a device node in an image
//! must not grant anything to a host user who can reach the mountpoint.
//! A container runtime's overlayfs on top applies its own mount's flags,
//! so setuid binaries still work inside containers (kernel-notes).

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::KernelError;

/// Flags of every image mount (and remount: a remount replaces them).
pub const IMAGE_MOUNT_FLAGS: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV);

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

/// `mount -t erofs -o ro,nosuid,nodev,fsid=FSID[,domain_id=D] none MNT` (cachefiles
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
        IMAGE_MOUNT_FLAGS,
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
        IMAGE_MOUNT_FLAGS,
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
        MsFlags::MS_REMOUNT | IMAGE_MOUNT_FLAGS,
        Some("directio"),
    )
    .map_err(|e| KernelError::Mount {
        what: format!("remount,directio {}", mnt.display()),
        source: e,
    })
}

/// Create `dir` (and missing parents) readable by root only: cache,
/// socket and mount-parent directories.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
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

/// An EROFS mount as listed in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsMount {
    pub mountpoint: std::path::PathBuf,
    /// The image's fsid: the `fsid=` option (fscache mode), else the file
    /// name of the source (file-backed: `<cache>/bootstraps/<fsid>`).
    pub fsid: String,
    /// The mount source (`none` in fscache mode).
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every EROFS mount in this mount namespace.
pub fn erofs_mounts() -> Vec<ErofsMount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_erofs_mounts(&info)
}

/// [`erofs_mounts`] over a mountinfo text.
pub fn parse_erofs_mounts(info: &str) -> Vec<ErofsMount> {
    let mut out = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mnt), Some(fstype), Some(src), Some(opts)) =
            (f.get(4), f.get(sep + 1), f.get(sep + 2), f.get(sep + 3))
        else {
            continue;
        };
        if *fstype != "erofs" {
            continue;
        }
        let source = unescape_mountinfo(src);
        let fsid = opts
            .split(',')
            .find_map(|o| o.strip_prefix("fsid=").map(String::from))
            .unwrap_or_else(|| {
                Path::new(&source)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        out.push(ErofsMount {
            mountpoint: unescape_mountinfo(mnt).into(),
            fsid,
            source,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erofs_mounts_name_their_fsid() {
        let info = "\
36 25 0:32 / /mnt/a\\040b ro,nosuid,nodev,relatime - erofs none ro,fsid=abc,domain_id=kite
37 25 0:33 / /mnt/c ro,nosuid,nodev - erofs /var/cache/kite/bootstraps/def ro,user_xattr,device=/x
38 25 0:34 / /mnt/d rw - ext4 /dev/vda rw
";
        let m = parse_erofs_mounts(info);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, Path::new("/mnt/a b"));
        assert_eq!(m[0].fsid, "abc");
        assert_eq!(m[1].fsid, "def");
        assert_eq!(m[1].source, "/var/cache/kite/bootstraps/def");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/a\\134b"), "/a\\b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }
}
