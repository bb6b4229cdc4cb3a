//! The HTTP engine: one request with auth, retries, redirects and mirrors.
//!
//! Owns the policy every registry operation shares:
//! - **auth**: the first 401 of an operation reads the challenge, gets a
//!   bearer token (or switches to basic) and retries once; a second 401 is
//!   an authentication error, never a retry loop. Tokens are cached per
//!   host and scope and renewed before they expire or when refused.
//! - **retries**: connection errors, timeouts, 429 and 5xx are retried with
//!   exponential backoff up to `retries` times; other statuses are final.
//! - **redirects**: followed by hand (at most 5 hops); the Authorization
//!   header goes only to the origin it was issued for.
//! - **mirrors**: pulls try each mirror of the registry in order, then the
//!   origin; a failing mirror costs one attempt, not a backoff series.
//! - **schemes**: plain HTTP only for loopback hosts or when asked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};

use crate::auth::{self, Challenge, Credentials, Secret};
use crate::reference::is_loopback;
use crate::RegistryError;

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Use plain HTTP for every registry, not only loopback ones.
    pub plain_http: bool,
    /// Connect timeout, and the longest wait for any read.
    pub timeout: Duration,
    /// Retries after the first attempt for transient failures.
    pub retries: u32,
    /// First backoff; doubled per retry, capped at 8 s.
    pub backoff: Duration,
    /// `registry host -> mirror base URLs`, tried in order before the
    /// origin for pulls.
    pub mirrors: HashMap<String, Vec<String>>,
    /// Credentials given explicitly, per registry host.
    pub credentials: HashMap<String, Credentials>,
    /// A docker config file to read `auths` from (read when a registry
    /// first asks for credentials).
    pub docker_config: Option<PathBuf>,
    /// Blobs larger than this are uploaded in PATCH chunks of this size.
    pub upload_chunk: u64,
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            plain_http: false,
            timeout: Duration::from_secs(30),
            retries: 5,
            backoff: Duration::from_millis(250),
            mirrors: HashMap::new(),
            credentials: HashMap::new(),
            docker_config: auth::default_docker_config(),
            upload_chunk: 32 << 20,
            user_agent: format!("kite/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

struct Token {
    value: Secret,
    expires: Instant,
}

#[derive(Default)]
struct HostAuth {
    /// The last challenge this host sent.
    challenge: Option<Challenge>,
    /// Bearer tokens by scope set.
    tokens: HashMap<String, Token>,
}

/// Request counters (for status and tests).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
    pub token_fetches: std::sync::atomic::AtomicU64,
    pub mirror_fallbacks: std::sync::atomic::AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    http: reqwest::Client,
    auth: Mutex<HashMap<String, HostAuth>>,
    /// One token fetch at a time per (host, scope set): requests that
    /// need the same token wait for the one fetch instead of each making
    /// their own (after an expiry or a revocation many are in flight).
    token_fetches: Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>,
    /// Docker-config credentials looked up so far, by host.
    docker_creds: Mutex<HashMap<String, Option<Credentials>>>,
    /// Mirrors that failed recently are skipped until this instant.
    mirror_down: Mutex<HashMap<String, Instant>>,
    /// (mirror, blob path) pairs the mirror does not serve ranges of yet
    /// (a pull-through cache still caching the blob): skipped for that
    /// blob only, until this instant.
    mirror_cold: Mutex<HashMap<(String, String), Instant>>,
    pub(crate) stats: Stats,
}

/// Marks a response a mirror gave (in its extensions), so callers can
/// account bytes by source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServedByMirror;

/// How long a failed mirror is skipped.
const MIRROR_BACKOFF: Duration = Duration::from_secs(30);
/// How long a mirror is skipped for one blob after it answered a Range
/// request with the whole blob. distribution's pull-through cache does
/// that while the blob is not in its storage yet (and starts caching it);
/// asking it again at once would make it start another upstream copy of
/// the whole blob for each range.
const MIRROR_COLD: Duration = Duration::from_secs(60);
/// Longest token lifetime believed.
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);

/// A registry client; cheap to clone, shared by all operations.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// One request to make: everything but the host it goes to.
pub(crate) struct Op<'a> {
    pub method: Method,
    /// Path and query after the base URL, e.g. `/v2/a/b/manifests/v1`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Token scopes the operation needs.
    pub scopes: Vec<String>,
    /// What the request is for, in errors: e.g. `manifest 127.0.0.1:5000/a:v1`.
    pub what: &'a str,
    /// Try mirrors first (reads only).
    pub pull: bool,
    /// Safe to send again after a transport error (false for upload
    /// PATCH/PUT: the caller restarts the upload instead).
    pub idempotent: bool,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(cfg.user_agent.clone())
            .build()
            .map_err(|e| RegistryError::Transport {
                what: "building the HTTP client".into(),
                why: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                http,
                auth: Mutex::new(HashMap::new()),
                token_fetches: Mutex::new(HashMap::new()),
                docker_creds: Mutex::new(HashMap::new()),
                mirror_down: Mutex::new(HashMap::new()),
                mirror_cold: Mutex::new(HashMap::new()),
                stats: Stats::default(),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The base URL of a registry host: `https://host`, or `http://host`
    /// for loopback hosts and when plain HTTP was asked for.
    pub fn origin(&self, host: &str, plain_http: bool) -> Result<Url, RegistryError> {
        let scheme = if plain_http || self.inner.cfg.plain_http || is_loopback(host) {
            "http"
        } else {
            "https"
        };
        Url::parse(&format!("{scheme}://{host}/")).map_err(|e| RegistryError::BadReference {
            reference: host.to_string(),
            why: format!("not a usable host: {e}"),
        })
    }

    /// The bases to try for `registry`: its mirrors (pulls only), then
    /// the origin.
    fn bases(&self, registry: &str, origin: &Url, pull: bool, path: &str) -> Vec<(Url, bool)> {
        let mut v = Vec::new();
        if pull {
            let now = Instant::now();
            let down = self
                .inner
                .mirror_down
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default();
            let cold = self.inner.mirror_cold.lock().ok();
            for m in self.inner.cfg.mirrors.get(registry).into_iter().flatten() {
                if down.get(m).is_some_and(|until| *until > now) {
                    continue;
                }
                if cold.as_ref().is_some_and(|c| {
                    c.get(&(m.clone(), path.to_string()))
                        .is_some_and(|until| *until > now)
                }) {
                    continue;
                }
                match Url::parse(m.trim_end_matches('/')) {
                    Ok(u) => v.push((u, true)),
                    Err(e) => {
                        tracing::warn!(mirror = %redact(m), "ignoring a mirror that is not a URL: {e}")
                    }
                }
            }
        }
        v.push((origin.clone(), false));
        v
    }

    /// Run `op` against `registry` (mirrors first for pulls). Returns the
    /// final response, whatever its status, after auth, redirects and
    /// retries; the caller judges the status.
    pub(crate) async fn execute(
        &self,
        registry: &str,
        origin: &Url,
        op: &Op<'_>,
    ) -> Result<reqwest::Response, RegistryError> {
        let bases = self.bases(registry, origin, op.pull, &op.path);
        let ranged = op.headers.contains_key(reqwest::header::RANGE);
        let last = bases.len() - 1;
        let mut errors = Vec::new();
        for (i, (base, mirror)) in bases.into_iter().enumerate() {
            let retries = if mirror || !op.idempotent {
                0
            } else {
                self.inner.cfg.retries
            };
            let res = self.execute_on(&base, op, retries).await;
            if !mirror || i == last {
                return res;
            }
            // A mirror that lacks something, refuses us or fails: skip it
            // for a while and try the next source (the origin is last).
            let configured = |base: &Url| {
                let key = base.as_str().trim_end_matches('/').to_string();
                self.inner
                    .cfg
                    .mirrors
                    .get(registry)
                    .into_iter()
                    .flatten()
                    .find(|m| m.trim_end_matches('/') == key)
                    .cloned()
                    .unwrap_or(key)
            };
            let why = match res {
                // The whole blob to a Range request: a pull-through cache
                // that has not cached it yet. Not read (it may be GBs);
                // the next source serves this blob for a while, and the
                // mirror stays in use for the others.
                Ok(r) if ranged && r.status() == StatusCode::OK => {
                    tracing::info!(mirror = %redact(base.as_str()), what = op.what, "mirror answered a Range request with the whole blob (a pull-through cache still caching it?); the next source serves this blob's ranges for {} s", MIRROR_COLD.as_secs());
                    if let Ok(mut c) = self.inner.mirror_cold.lock() {
                        let now = Instant::now();
                        c.retain(|_, until| *until > now);
                        c.insert((configured(&base), op.path.clone()), now + MIRROR_COLD);
                    }
                    self.count_fallback();
                    errors.push(format!(
                        "mirror {}: whole blob to a Range request",
                        redact(base.as_str())
                    ));
                    continue;
                }
                Ok(mut r)
                    if r.status().is_success() || r.status() == StatusCode::PARTIAL_CONTENT =>
                {
                    r.extensions_mut().insert(ServedByMirror);
                    return Ok(r);
                }
                Ok(r) => format!("status {}", r.status()),
                Err(e) => e.to_string(),
            };
            tracing::info!(mirror = %redact(base.as_str()), what = op.what, "mirror failed ({why}); trying the next source");
            errors.push(format!("mirror {}: {why}", redact(base.as_str())));
            if let Ok(mut d) = self.inner.mirror_down.lock() {
                d.insert(configured(&base), Instant::now() + MIRROR_BACKOFF);
            }
            self.count_fallback();
        }
        Err(RegistryError::Transport {
            what: op.what.to_string(),
            why: errors.join("; "),
        })
    }

    fn count_fallback(&self) {
        self.inner
            .stats
            .mirror_fallbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn execute_on(
        &self,
        base: &Url,
        op: &Op<'_>,
        retries: u32,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = join(base, &op.path)?;
        let host = host_key(&url);
        let mut attempt = 0u32;
        let mut reauthed = false;
        loop {
            let auth = self.auth_header(&host, &op.scopes, op.what).await?;
            let res = self.send_following(&url, op, auth.as_ref()).await;
            let retryable_wait = match &res {
                Err(e) => Some((None, e.clone())),
                Ok(r)
                    if r.status() == StatusCode::UNAUTHORIZED
                        && r.url().origin() != url.origin() =>
                {
                    // A redirect target (blob storage) refused us: its
                    // challenge is not the registry's, and our credentials
                    // must not go to it.
                    return Err(RegistryError::Status {
                        what: op.what.to_string(),
                        status: 401,
                        detail: format!(
                            " (from redirect target {})",
                            r.url().origin().ascii_serialization()
                        ),
                    });
                }
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                    let challenge = r
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(auth::parse_challenge);
                    let sent = auth.is_some();
                    if reauthed {
                        return Err(self.auth_failed(&host, op.what, sent, true));
                    }
                    let Some(ch) = challenge else {
                        return Err(self.auth_failed(&host, op.what, sent, false));
                    };
                    let had_creds = self.credentials(&host).is_some();
                    if matches!(ch, Challenge::Basic) && (!had_creds || sent) {
                        return Err(self.auth_failed(&host, op.what, sent, false));
                    }
                    self.remember_challenge(&host, ch, &op.scopes, auth.as_ref());
                    reauthed = true;
                    continue;
                }
                Ok(r) if r.status().as_u16() == 429 || is_retryable_5xx(r.status()) => {
                    let after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(30)));
                    Some((after, format!("status {}", r.status())))
                }
                Ok(_) => None,
            };
            match retryable_wait {
                None => {
                    return res.map_err(|why| RegistryError::Transport {
                        what: op.what.to_string(),
                        why,
                    })
                }
                Some((after, why)) => {
                    if attempt >= retries {
                        return match res {
                            Ok(r) => Ok(r),
                            Err(_) => Err(RegistryError::Transport {
                                what: op.what.to_string(),
                                why: format!(
                                    "{why} (gave up after {} attempt{})",
                                    attempt + 1,
                                    if attempt == 0 { "" } else { "s" }
                                ),
                            }),
                        };
                    }
                    let wait = after.unwrap_or_else(|| self.backoff(attempt));
                    tracing::debug!(what = op.what, attempt, ?wait, "retrying: {why}");
                    self.inner
                        .stats
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Backoff before retry `attempt` (0-based), with a little jitter.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let base = self.inner.cfg.backoff.saturating_mul(1 << attempt.min(6));
        let capped = base.min(Duration::from_secs(8));
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            % 100;
        capped + capped * jitter / 400
    }

    /// Send, following redirects by hand. Authorization goes only to the
    /// origin of the first URL. Errors are text without URLs (a redirect
    /// URL may carry a signature).
    async fn send_following(
        &self,
        url: &Url,
        op: &Op<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, String> {
        let mut url = url.clone();
        let mut method = op.method.clone();
        let mut body = op.body.clone();
        let first_origin = url.origin();
        for _hop in 0..6 {
            let mut req = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .headers(op.headers.clone());
            if let (Some(a), true) = (auth, url.origin() == first_origin) {
                req = req.header(AUTHORIZATION, a.clone());
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            self.inner
                .stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let resp = req.send().await.map_err(describe_reqwest)?;
            let s = resp.status();
            if !s.is_redirection() || s == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Ok(resp);
            };
            if s == StatusCode::SEE_OTHER {
                method = Method::GET;
                body = None;
            }
            tracing::debug!(to = %format!("{}{}", next.origin().ascii_serialization(), next.path()), "following redirect");
            url = next;
        }
        Err("more than 5 redirects".into())
    }

    /// Explicit credentials for `host`, else the docker config's (read
    /// once per host; an unreadable or malformed config is logged and
    /// treated as having none, so anonymous pulls still work).
    fn credentials(&self, host: &str) -> Option<Credentials> {
        if let Some(c) = self.inner.cfg.credentials.get(host) {
            return Some(c.clone());
        }
        let path = self.inner.cfg.docker_config.as_ref()?;
        if let Some(c) = self.inner.docker_creds.lock().ok()?.get(host) {
            return c.clone();
        }
        let found = match auth::docker_config_credentials(path, host) {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!("ignoring the docker config: {why}");
                None
            }
        };
        if let Ok(mut m) = self.inner.docker_creds.lock() {
            m.insert(host.to_string(), found.clone());
        }
        found
    }

    fn auth_failed(
        &self,
        host: &str,
        what: &str,
        sent: bool,
        after_renewal: bool,
    ) -> RegistryError {
        let user = self
            .credentials(host)
            .map(|c| c.username)
            .filter(|u| !u.starts_with('<'));
        let why = match (sent, user) {
            (true, Some(u)) if !after_renewal => {
                format!("the registry rejected the credentials of user {u:?} for {what}")
            }
            (true, Some(u)) => format!(
                "access to {what} denied with fresh credentials of user {u:?} (wrong password, or no permission)"
            ),
            (true, None) => format!("access to {what} denied even with a fresh anonymous token"),
            (false, _) => format!(
                "{what} needs credentials: use --username/--password-stdin or `auths` in a docker config.json"
            ),
        };
        RegistryError::Auth {
            registry: host.to_string(),
            why,
        }
    }

    /// A 401 with challenge `ch` for a request that carried `refused`.
    fn remember_challenge(
        &self,
        host: &str,
        ch: Challenge,
        scopes: &[String],
        refused: Option<&HeaderValue>,
    ) {
        if let Ok(mut m) = self.inner.auth.lock() {
            let e = m.entry(host.to_string()).or_default();
            // The refused token is dropped; a newer one that another
            // request fetched meanwhile is kept.
            let key = scope_key(scopes);
            if e.tokens
                .get(&key)
                .is_some_and(|t| refused.is_none_or(|r| *r == bearer(&t.value)))
            {
                e.tokens.remove(&key);
            }
            e.challenge = Some(ch);
        }
    }

    /// The cached bearer token for `host` and scope set `key`, if it is
    /// good for a few more seconds.
    fn cached_token(&self, host: &str, key: &str) -> Option<HeaderValue> {
        let m = self.inner.auth.lock().ok()?;
        let t = m.get(host)?.tokens.get(key)?;
        (t.expires > Instant::now() + Duration::from_secs(5)).then(|| bearer(&t.value))
    }

    /// The Authorization header for a request to `host` needing `scopes`,
    /// fetching a bearer token first if the host wants one.
    async fn auth_header(
        &self,
        host: &str,
        scopes: &[String],
        what: &str,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let key = scope_key(scopes);
        let challenge = {
            let m = self
                .inner
                .auth
                .lock()
                .map_err(|_| RegistryError::Transport {
                    what: what.to_string(),
                    why: "auth state lock poisoned".into(),
                })?;
            let Some(h) = m.get(host) else {
                return Ok(None);
            };
            if let Some(t) = h.tokens.get(&key) {
                if t.expires > Instant::now() + Duration::from_secs(5) {
                    return Ok(Some(bearer(&t.value)));
                }
            }
            h.challenge.clone()
        };
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self
                .credentials(host)
                .and_then(|c| HeaderValue::from_str(&c.basic_header()).ok())
                .map(sensitive)),
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let flight =
                    self.inner.token_fetches.lock().ok().map(|mut f| {
                        Arc::clone(f.entry((host.to_string(), key.clone())).or_default())
                    });
                let _turn = match &flight {
                    Some(f) => Some(f.lock().await),
                    None => None,
                };
                // Whoever held the turn before us may have fetched it.
                if let Some(hv) = self.cached_token(host, &key) {
                    return Ok(Some(hv));
                }
                let token = self
                    .fetch_token(host, &realm, service.as_deref(), scope.as_deref(), scopes)
                    .await?;
                let hv = bearer(&token.value);
                if let Ok(mut m) = self.inner.auth.lock() {
                    m.entry(host.to_string())
                        .or_default()
                        .tokens
                        .insert(key, token);
                }
                Ok(Some(hv))
            }
        }
    }

    async fn fetch_token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        challenge_scope: Option<&str>,
        scopes: &[String],
    ) -> Result<Token, RegistryError> {
        let fail = |why: String| RegistryError::Auth {
            registry: host.to_string(),
            why,
        };
        let mut url = Url::parse(realm)
            .map_err(|_| fail(format!("the token realm {realm:?} is not a URL")))?;
        let realm_host = url.host_str().unwrap_or("");
        let plain_ok = self.inner.cfg.plain_http
            || is_loopback(realm_host)
            || url.origin()
                == Url::parse(&format!("http://{host}/"))
                    .map(|u| u.origin())
                    .unwrap_or(url.origin());
        if url.scheme() != "https" && !(url.scheme() == "http" && plain_ok) {
            return Err(fail(format!(
                "refusing the token realm {}: credentials go only over https (or plain HTTP to loopback, or when asked)",
                url.origin().ascii_serialization()
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            let mut all: Vec<&str> = scopes.iter().map(String::as_str).collect();
            for s in challenge_scope
                .unwrap_or("")
                .split(' ')
                .filter(|s| !s.is_empty())
            {
                if !all.contains(&s) {
                    all.push(s);
                }
            }
            for s in all {
                q.append_pair("scope", s);
            }
        }
        let creds = self.credentials(host);
        self.inner
            .stats
            .token_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut attempt = 0;
        let resp = loop {
            let mut req = self.inner.http.get(url.clone());
            if let Some(c) = &creds {
                req = req.header(AUTHORIZATION, c.basic_header());
            }
            match req.send().await {
                Ok(r) if is_retryable_5xx(r.status()) && attempt < self.inner.cfg.retries => {}
                Ok(r) => break r,
                Err(e) if attempt < self.inner.cfg.retries => {
                    tracing::debug!("token endpoint: {e}; retrying");
                }
                Err(e) => {
                    return Err(fail(format!(
                        "token endpoint {}: {}",
                        url.origin().ascii_serialization(),
                        describe_reqwest(e)
                    )))
                }
            }
            tokio::time::sleep(self.backoff(attempt)).await;
            attempt += 1;
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(fail(match &creds {
                Some(c) => format!(
                    "the token endpoint refused the credentials of user {:?} (status {status})",
                    c.username
                ),
                None => format!(
                    "the token endpoint refused an anonymous token (status {status}); credentials needed"
                ),
            }));
        }
        if !status.is_success() {
            return Err(fail(format!("the token endpoint answered status {status}")));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = resp.bytes().await.map_err(|e| {
            fail(format!(
                "reading the token response: {}",
                describe_reqwest(e)
            ))
        })?;
        let tr: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| fail("the token endpoint's answer is not a token response".into()))?;
        let value = tr
            .token
            .or(tr.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("the token endpoint's answer has no token".into()))?;
        // The distribution spec's default lifetime is 60 s.
        let life = Duration::from_secs(tr.expires_in.unwrap_or(60).max(1)).min(MAX_TOKEN_LIFE);
        Ok(Token {
            value: Secret::new(value),
            expires: Instant::now() + life,
        })
    }
}

fn is_retryable_5xx(s: StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

fn bearer(t: &Secret) -> HeaderValue {
    sensitive(
        HeaderValue::from_str(&format!("Bearer {}", t.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid")),
    )
}

fn sensitive(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

fn scope_key(scopes: &[String]) -> String {
    let mut s = scopes.to_vec();
    s.sort();
    s.join(" ")
}

/// `host[:port]` of a URL: the key for auth state and credentials.
fn host_key(url: &Url) -> String {
    let h = url.host_str().unwrap_or("");
    match url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    }
}

/// `base` + `path` (which starts with `/v2/`), keeping any path prefix a
/// mirror URL has.
fn join(base: &Url, path: &str) -> Result<Url, RegistryError> {
    let s = format!("{}{}", base.as_str().trim_end_matches('/'), path);
    Url::parse(&s).map_err(|e| RegistryError::Transport {
        what: s.clone(),
        why: format!("bad URL: {e}"),
    })
}

/// Headers helper.
pub(crate) fn header(map: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        map.insert(HeaderName::from_static(name), v);
    }
}

/// A reqwest error as text without its URL, with the underlying cause
/// (e.g. "connection refused").
pub(crate) fn describe_reqwest(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(cause) = src {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        src = cause.source();
    }
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

/// A URL for logs: no user info, no query.
pub(crate) fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => format!(
            "{}{}",
            u.origin().ascii_serialization(),
            u.path().trim_end_matches('/')
        ),
        Err(_) => "<unparsable URL>".into(),
    }
}
