//! Credentials and authentication challenges.
//!
//! Owns: where credentials come from (explicit, or `auths` in a docker
//! `config.json`), parsing `WWW-Authenticate` challenges, and the secret
//! wrapper that keeps passwords and tokens out of logs and errors: a
//! [`Secret`] prints as `<redacted>` and is only read to build a header.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for building a header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A user name and password (or identity token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    /// `Basic base64(user:password)`.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The default docker config: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Normalise a config key (`https://host/v1/`, `host`) to `host[:port]`.
fn auth_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => crate::reference::DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

/// Credentials for `registry` from the `auths` section of a docker config
/// file. A missing file means no credentials; a present but unreadable or
/// malformed one is an error naming the file (never its contents).
pub fn docker_config_credentials(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, String> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    let cfg: Config = serde_json::from_slice(&data)
        .map_err(|e| format!("{}: not a docker config file: {e}", path.display()))?;
    let want = auth_key(registry);
    let Some(entry) = cfg
        .auths
        .iter()
        .find(|(k, _)| auth_key(k) == want)
        .map(|e| e.1)
    else {
        return Ok(None);
    };
    if let Some(a) = &entry.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| {
                format!(
                    "{}: the auth entry for {want} is not base64",
                    path.display()
                )
            })?;
        let text = String::from_utf8(raw)
            .map_err(|_| format!("{}: the auth entry for {want} is not UTF-8", path.display()))?;
        let (u, p) = text.split_once(':').ok_or_else(|| {
            format!(
                "{}: the auth entry for {want} is not user:password",
                path.display()
            )
        })?;
        return Ok(Some(Credentials::new(u, p)));
    }
    if let Some(t) = &entry.identitytoken {
        // Identity tokens go to the token endpoint as a refresh token;
        // registries that accept them also accept them as a password.
        return Ok(Some(Credentials::new("<token>", t.clone())));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::new(u.clone(), p.clone()))),
        _ => Ok(None),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        /// Space-separated scopes the registry asked for, if any.
        scope: Option<String>,
    },
}

/// Parse a challenge header: `Basic realm="..."` or
/// `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k="v", k2=v2` (quoted values may contain commas and escaped quotes).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        let key = s[ks..i].trim().to_ascii_lowercase();
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch = s[i..].chars().next().unwrap_or(' ');
                val.push(ch);
                i += ch.len_utf8();
            }
            i += 1;
        } else {
            let vs = i.min(b.len());
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i.min(b.len())].trim().to_string();
        }
        if !key.is_empty() {
            out.insert(key, val);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push repository:c:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push repository:c:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer realm=http://x/t, service=s"),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Credentials::new("alice", "hunter2");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
        assert_eq!(c.basic_header(), "Basic YWxpY2U6aHVudGVyMg==");
    }

    #[test]
    fn docker_config_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        assert_eq!(docker_config_credentials(&p, "x.io").unwrap(), None);
        std::fs::write(
            &p,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dTE6cDE="},
                "127.0.0.1:5000":{"auth":"dTI6cDI6d2l0aDpjb2xvbnM="},
                "http://reg.example/v2/":{"username":"u3","password":"p3"},
                "bad.example":{"auth":"!!!"}
            }}"#,
        )
        .unwrap();
        let get = |r: &str| docker_config_credentials(&p, r);
        assert_eq!(
            get("docker.io").unwrap(),
            Some(Credentials::new("u1", "p1"))
        );
        assert_eq!(
            get("127.0.0.1:5000").unwrap(),
            Some(Credentials::new("u2", "p2:with:colons"))
        );
        assert_eq!(
            get("reg.example").unwrap(),
            Some(Credentials::new("u3", "p3"))
        );
        assert_eq!(get("other.example").unwrap(), None);
        let e = get("bad.example").unwrap_err();
        assert!(e.contains("not base64") && !e.contains("!!!"), "{e}");
        std::fs::write(&p, "{not json").unwrap();
        assert!(get("x").unwrap_err().contains("not a docker config"));
    }
}
