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
