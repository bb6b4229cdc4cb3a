//! Image references: `[docker://]host[:port]/repo[:tag][@sha256:hex]`.
//!
//! The first path component names the registry when it looks like a host
//! (has a `.` or a `:`, or is `localhost`); otherwise the registry is Docker
//! Hub and one-component names get the `library/` prefix, as docker does.

use std::fmt;

use crate::RegistryError;

/// Docker Hub's name in references and its API host.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]` as written (Docker Hub is `docker.io`).
    pub registry: String,
    /// Repository path, e.g. `library/debian` or `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::BadReference {
            reference: s.to_string(),
            why: why.to_string(),
        };
        let text = s.strip_prefix("docker://").unwrap_or(s);
        if text.is_empty() {
            return Err(bad("empty"));
        }
        let (name_tag, digest) = match text.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("the digest is not sha256:<64 hex digits>"));
                }
                (n, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
            }
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/'.
        let slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[slash..].rfind(':') {
            Some(i) => (
                &name_tag[..slash + i],
                Some(name_tag[slash + i + 1..].to_string()),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("the tag has characters outside [A-Za-z0-9._-]"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if name.contains('/') => (DOCKER_HUB.to_string(), name.to_string()),
            _ => (DOCKER_HUB.to_string(), format!("library/{name}")),
        };
        // `docker.io/debian` is `docker.io/library/debian`, as for docker.
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lowercase path components of [a-z0-9._-]",
            ));
        }
        if registry.is_empty() {
            return Err(bad("empty registry host"));
        }
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest if pinned, else the tag,
    /// else `latest`.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository pinned to `digest` (tag dropped).
    pub fn pinned(&self, digest: &str) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }

    /// The host the API is served on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `host` without the port.
    pub fn hostname(&self) -> &str {
        host_without_port(self.api_host())
    }
}

pub(crate) fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Loopback hosts get plain HTTP without being asked.
pub fn is_loopback(host: &str) -> bool {
    let h = host_without_port(host);
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let r = Reference::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_ref(), "v1");
        assert!(is_loopback(&r.registry));

        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("docker://localhost/app@{d}")).unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.to_string(), format!("localhost/app@{d}"));

        let r = Reference::parse("debian").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert!(!is_loopback(r.api_host()));

        let r = Reference::parse("docker.io/debian:12").unwrap();
        assert_eq!(r.repository, "library/debian");

        let r = Reference::parse("ghcr.io/org/img:1.2-rc.3").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "org/img")
        );
        assert_eq!(r.pinned(&d).to_string(), format!("ghcr.io/org/img@{d}"));
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "host.io/Upper/case",
            "host.io/app:bad*tag",
            "host.io/app@sha256:abc",
            "host.io/app@md5:0123",
            "host.io//app",
        ] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains("bad image reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("localhost:80"));
        assert!(!is_loopback("10.77.0.2:5000"));
        assert!(!is_loopback("registry.example.com"));
    }
}
