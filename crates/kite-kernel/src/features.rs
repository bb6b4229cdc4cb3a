//! What the running kernel offers: which of kite's kernel paths can work
//! here, which one to use, and if none, which options are missing.

use std::path::Path;

/// A way for the kernel to ask kite for missing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// cachefiles on-demand + EROFS over fscache (Linux 5.19 .. 7.1).
    Cachefiles,
    /// fanotify pre-content events + file-backed EROFS (Linux >= 6.14).
    Fanotify,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Cachefiles => "cachefiles",
            KernelPath::Fanotify => "fanotify",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cachefiles" => Some(KernelPath::Cachefiles),
            "fanotify" => Some(KernelPath::Fanotify),
            _ => None,
        }
    }
}

/// Kernel capabilities relevant to kite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    pub release: String,
    /// (major, minor) parsed from the release.
    pub version: (u32, u32),
    pub erofs: bool,
    /// `/dev/cachefiles` exists (CONFIG_CACHEFILES).
    pub cachefiles: bool,
    /// A `FAN_CLASS_PRE_CONTENT` group can be created.
    pub fanotify_precontent: bool,
}

fn parse_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

impl Features {
    /// Probe /proc, /dev and fanotify.
    pub fn probe() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let erofs = std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().last() == Some("erofs"));
        Features {
            version: parse_version(&release),
            release,
            erofs,
            cachefiles: Path::new("/dev/cachefiles").exists(),
            fanotify_precontent: crate::fanotify::Group::supported(),
        }
    }

    /// Why the cachefiles path cannot work here (empty = it can).
    pub fn cachefiles_missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.erofs {
            m.push("CONFIG_EROFS_FS");
        }
        if !self.cachefiles {
            m.push("CONFIG_CACHEFILES + CONFIG_CACHEFILES_ONDEMAND + CONFIG_EROFS_FS_ONDEMAND (Linux >= 5.19)");
        }
        m
    }

    /// Why the fanotify path cannot work here (empty = it can).
    pub fn fanotify_missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.erofs {
            m.push("CONFIG_EROFS_FS");
        }
        if self.version < (6, 14) || !self.fanotify_precontent {
            m.push("CONFIG_FANOTIFY_ACCESS_PERMISSIONS with pre-content events (Linux >= 6.14)");
        }
        if self.version < (6, 12) {
            m.push("CONFIG_EROFS_FS_BACKED_BY_FILE (Linux >= 6.12)");
        }
        m
    }

    /// Choose a path: the requested one if it works, else cachefiles (the
    /// primary path) if available, else fanotify. The reason is for logs.
    pub fn choose(&self, wanted: Option<KernelPath>) -> Result<(KernelPath, String), String> {
        let cf = self.cachefiles_missing();
        let fa = self.fanotify_missing();
        match wanted {
            Some(KernelPath::Cachefiles) if cf.is_empty() => Ok((KernelPath::Cachefiles, "requested".into())),
            Some(KernelPath::Cachefiles) => Err(format!(
                "the cachefiles path was requested but kernel {} lacks {}",
                self.release,
                cf.join(", ")
            )),
            Some(KernelPath::Fanotify) if fa.is_empty() => Ok((KernelPath::Fanotify, "requested".into())),
            Some(KernelPath::Fanotify) => Err(format!(
                "the fanotify path was requested but kernel {} lacks {}",
                self.release,
                fa.join(", ")
            )),
            None if cf.is_empty() => Ok((
                KernelPath::Cachefiles,
                format!("kernel {} has /dev/cachefiles and EROFS", self.release),
            )),
            None if fa.is_empty() => Ok((
                KernelPath::Fanotify,
                format!(
                    "kernel {} has no cachefiles but has fanotify pre-content events and file-backed EROFS",
                    self.release
                ),
            )),
            None => Err(format!(
                "kernel {} can serve kite images through neither path: cachefiles needs {}; fanotify needs {}",
                self.release,
                cf.join(", "),
                fa.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_prefers_cachefiles_and_names_what_is_missing() {
        let both = Features {
            release: "6.15.0".into(),
            version: (6, 15),
            erofs: true,
            cachefiles: true,
            fanotify_precontent: true,
        };
        assert_eq!(both.choose(None).unwrap().0, KernelPath::Cachefiles);
        assert_eq!(
            both.choose(Some(KernelPath::Fanotify)).unwrap().0,
            KernelPath::Fanotify
        );
        let host = Features {
            cachefiles: false,
            release: "6.18.44".into(),
            version: (6, 18),
            ..both.clone()
        };
        assert_eq!(host.choose(None).unwrap().0, KernelPath::Fanotify);
        let e = host.choose(Some(KernelPath::Cachefiles)).unwrap_err();
        assert!(e.contains("CACHEFILES_ONDEMAND"), "{e}");
        let old = Features {
            release: "6.1.0".into(),
            version: (6, 1),
            erofs: true,
            cachefiles: false,
            fanotify_precontent: false,
        };
        let e = old.choose(None).unwrap_err();
        assert!(e.contains("6.14") && e.contains("5.19"), "{e}");
        assert_eq!(parse_version("6.12.117-1~deb12u1"), (6, 12));
    }
}
