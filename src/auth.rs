//! Who may be served cached content: grants and public repositories.
//!
//! A *grant* records that upstream accepted a credential for (registry, repository): any
//! successful upstream answer with that credential counts. Grants are keyed by a SHA-256 of the
//! `Authorization` value (or of nothing, for anonymous clients); credentials themselves are
//! never stored or logged. A grant is *fresh* for `--auth-ttl`; an older one is still *held*
//! (for [`HELD_GRANT_SECS`]) and lets its credential be served cached content while upstream is
//! down.
//!
//! A repository is *public* when upstream serves it to an anonymous client. pullcache learns
//! this itself: after the first grant for a repository it asks upstream as an anonymous client
//! (the `/v2/` challenge → an anonymous token from the realm → a HEAD of the same path). The
//! result is kept in the index for [`PUBLIC_RECHECK_SECS`]. During an outage, public content is
//! served to everyone, private content only to credentials that held a grant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::BodyExt;

use crate::config::HostPort;
use crate::upstream::Upstream;

/// How long an expired grant still counts while upstream is unreachable.
pub const HELD_GRANT_SECS: u64 = 24 * 3600;
/// How long a repository's public/private status is trusted before it is checked again.
pub const PUBLIC_RECHECK_SECS: u64 = 3600;
/// Grants remembered at most; the oldest are dropped beyond this.
pub const MAX_GRANTS: usize = 100_000;
/// How long a request waits for another's upstream check of the same credential.
pub const CHECK_WAIT_MS: u64 = 2000;
/// Largest token response read from a realm, in bytes.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

pub type CredKey = [u8; 32];

/// (registry, repository, credential): what a grant is about.
type GrantKey = (String, String, CredKey);

/// The grant key of a request's credential (anonymous requests share one key).
pub fn cred_key(headers: &HeaderMap) -> CredKey {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            h.update(b"auth:");
            h.update(v.as_bytes());
        }
        None => h.update(b"anonymous"),
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(h.finish().as_ref());
    key
}

pub struct Grants {
    ttl: Duration,
    map: Mutex<HashMap<GrantKey, Instant>>,
    /// One upstream check at a time per key.
    checks: Mutex<HashMap<GrantKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one upstream check runs; others for the same key wait, then re-check the grant.
pub struct CheckGuard {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Grants {
    pub fn new(ttl: Duration) -> Grants {
        Grants {
            ttl,
            map: Mutex::new(HashMap::new()),
            checks: Mutex::new(HashMap::new()),
        }
    }

    pub fn grant(&self, registry: &str, repo: &str, cred: CredKey) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_GRANTS {
            let held = Duration::from_secs(HELD_GRANT_SECS);
            map.retain(|_, at| at.elapsed() < held);
            if map.len() >= MAX_GRANTS {
                map.clear();
            }
        }
        map.insert(
            (registry.to_string(), repo.to_string(), cred),
            Instant::now(),
        );
    }

    fn age(&self, registry: &str, repo: &str, cred: CredKey) -> Option<Duration> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(registry.to_string(), repo.to_string(), cred))
            .map(|at| at.elapsed())
    }

    /// Waits until no other request is checking this credential for this repository upstream,
    /// for at most [`CHECK_WAIT_MS`]: a stalled upstream must not queue every request behind
    /// one check (then they go on in parallel, unguarded).
    pub async fn check_lock(
        &self,
        registry: &str,
        repo: &str,
        cred: CredKey,
    ) -> Option<CheckGuard> {
        let lock = {
            let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
            // Forget the locks nobody holds or waits for, so the map stays small.
            checks.retain(|_, l| Arc::strong_count(l) > 1);
            checks
                .entry((registry.to_string(), repo.to_string(), cred))
                .or_default()
                .clone()
        };
        let wait = Duration::from_millis(CHECK_WAIT_MS);
        let guard = tokio::time::timeout(wait, lock.lock_owned()).await.ok()?;
        Some(CheckGuard { _guard: guard })
    }

    /// Upstream accepted this credential for this repository within `--auth-ttl`.
    pub fn fresh(&self, registry: &str, repo: &str, cred: CredKey) -> bool {
        self.age(registry, repo, cred)
            .is_some_and(|age| age < self.ttl)
    }

    /// Upstream accepted this credential for this repository at some recent point.
    pub fn held(&self, registry: &str, repo: &str, cred: CredKey) -> bool {
        self.age(registry, repo, cred)
            .is_some_and(|age| age < Duration::from_secs(HELD_GRANT_SECS))
    }
}

/// Asks upstream, as an anonymous client, whether `path` (of `repo`) is readable.
/// `None` when the answer could not be had (network trouble, an odd challenge).
pub async fn probe_public(
    upstream: &Upstream,
    registry: &HostPort,
    repo: &str,
    path: &str,
) -> Option<bool> {
    let uri: Uri = format!("https://{registry}{path}").parse().ok()?;
    let first = head(upstream, &uri, None).await?;
    if first.0.is_success() || first.0.is_redirection() {
        return Some(true);
    }
    if first.0 != StatusCode::UNAUTHORIZED {
        return Some(false);
    }
    let challenge = first.1.get(header::WWW_AUTHENTICATE)?.to_str().ok()?;
    let params = parse_bearer_challenge(challenge)?;
    let realm = params.get("realm")?;
    if !realm.starts_with("https://") {
        return None;
    }
    let mut token_url = format!(
        "{realm}?scope={}",
        url_escape(&format!("repository:{repo}:pull"))
    );
    if let Some(service) = params.get("service") {
        token_url.push_str(&format!("&service={}", url_escape(service)));
    }
    let token = fetch_token(upstream, token_url.parse().ok()?).await?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    let second = head(upstream, &uri, Some(bearer)).await?;
    Some(second.0.is_success() || second.0.is_redirection())
}

async fn head(
    upstream: &Upstream,
    uri: &Uri,
    auth: Option<HeaderValue>,
) -> Option<(StatusCode, HeaderMap)> {
    let mut headers = HeaderMap::new();
    if let Some(v) = auth {
        headers.insert(header::AUTHORIZATION, v);
    }
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(crate::registry::MANIFEST_ACCEPT_ALL),
    );
    let resp = upstream
        .fetch_following(Method::HEAD, uri.clone(), &headers)
        .await
        .ok()?;
    Some((resp.status(), resp.headers().clone()))
}

async fn fetch_token(upstream: &Upstream, uri: Uri) -> Option<String> {
    let resp = upstream
        .fetch_following(Method::GET, uri, &HeaderMap::new())
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE_BYTES);
    let bytes = limited.collect().await.ok()?.to_bytes();
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
    }
    let t: TokenResponse = serde_json::from_slice(&bytes).ok()?;
    t.token.or(t.access_token)
}

/// Parses `Bearer realm="…",service="…",scope="…"`.
pub fn parse_bearer_challenge(value: &str) -> Option<HashMap<String, String>> {
    let rest = value
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| value.trim().strip_prefix("bearer "))?;
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        out.insert(key, val.to_string());
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_keys_differ_and_never_contain_the_secret() {
        let mut a = HeaderMap::new();
        a.insert(header::AUTHORIZATION, "Bearer secret-a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert(header::AUTHORIZATION, "Bearer secret-b".parse().unwrap());
        let anon = cred_key(&HeaderMap::new());
        assert_ne!(cred_key(&a), cred_key(&b));
        assert_ne!(cred_key(&a), anon);
        assert!(!hex::encode(cred_key(&a)).contains("secret"));
    }

    #[test]
    fn grants_expire_but_are_held() {
        let g = Grants::new(Duration::ZERO);
        let k = cred_key(&HeaderMap::new());
        assert!(!g.held("r", "a", k));
        g.grant("r", "a", k);
        assert!(!g.fresh("r", "a", k));
        assert!(g.held("r", "a", k));
        assert!(!g.held("r", "b", k));
        let g = Grants::new(Duration::from_secs(60));
        g.grant("r", "a", k);
        assert!(g.fresh("r", "a", k));
    }

    #[test]
    fn challenges_parse() {
        let p = parse_bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/alpine:pull");
        assert!(parse_bearer_challenge(r#"Basic realm="x""#).is_none());
        assert_eq!(
            url_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
