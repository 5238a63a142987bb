//! Counters per registry and per repository, persisted in the index so they survive restarts,
//! plus live gauges. The request path only bumps in-memory numbers; [`Stats::persist`] writes
//! them out periodically and at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::cache::index::{now_secs, Index, IndexError};

/// The cache outcome of one request, as sent in `X-Cache` and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from cache without asking upstream for content.
    Hit,
    /// Not cached: this request started the download.
    Miss,
    /// Not cached: joined a download another request started.
    Coalesced,
    /// A tag confirmed by upstream (HEAD) and served from cache.
    Revalidated,
    /// Served from cache because upstream failed.
    Stale,
    /// Forwarded unchanged.
    Pass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Coalesced => "COALESCED",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
            Outcome::Pass => "PASS",
        }
    }

    /// Were the bytes of this response read from the cache?
    pub fn from_cache(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::Revalidated | Outcome::Stale)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub revalidated: u64,
    pub stale: u64,
    pub passes: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
    pub upstream_manifest_gets: u64,
    pub upstream_heads: u64,
    pub failed_downloads: u64,
    pub digest_mismatches: u64,
    pub ratelimit_limit: Option<String>,
    pub ratelimit_remaining: Option<String>,
    pub ratelimit_seen_at: Option<u64>,
}

impl Counters {
    fn count(&mut self, outcome: Outcome, bytes: u64) {
        self.requests += 1;
        match outcome {
            Outcome::Hit => self.hits += 1,
            Outcome::Miss => self.misses += 1,
            Outcome::Coalesced => self.coalesced += 1,
            Outcome::Revalidated => self.revalidated += 1,
            Outcome::Stale => self.stale += 1,
            Outcome::Pass => self.passes += 1,
        }
        if outcome.from_cache() {
            self.bytes_from_cache += bytes;
        }
    }
}

#[derive(Default)]
struct Tables {
    registries: HashMap<String, Counters>,
    /// Keyed by `registry/repository`.
    repos: HashMap<String, Counters>,
}

#[derive(Default)]
pub struct Stats {
    tables: Mutex<Tables>,
    pub open_connections: AtomicI64,
    pub fills_in_flight: AtomicI64,
    pub started_at: AtomicU64,
}

const REGISTRY_PREFIX: &str = "registry\0";
const REPO_PREFIX: &str = "repo\0";

impl Stats {
    pub fn new() -> Stats {
        let stats = Stats::default();
        stats.started_at.store(now_secs(), Ordering::Relaxed);
        stats
    }

    fn update(&self, registry: &str, repo: Option<&str>, f: impl Fn(&mut Counters)) {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        f(t.registries.entry(registry.to_string()).or_default());
        if let Some(repo) = repo {
            f(t.repos.entry(format!("{registry}/{repo}")).or_default());
        }
    }

    /// Counts one completed request.
    pub fn record(&self, registry: &str, repo: Option<&str>, outcome: Outcome, bytes: u64) {
        self.update(registry, repo, |c| c.count(outcome, bytes));
    }

    /// Notes an upstream answer from the registry: rate-limit headers, and whether it was a
    /// manifest GET (the requests Docker Hub counts as pulls) or a HEAD.
    pub fn upstream_response(
        &self,
        registry: &str,
        repo: &str,
        headers: &HeaderMap,
        manifest_get: bool,
    ) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let (limit, remaining) = (header("ratelimit-limit"), header("ratelimit-remaining"));
        let now = now_secs();
        self.update(registry, Some(repo), |c| {
            if manifest_get {
                c.upstream_manifest_gets += 1;
            }
            if limit.is_some() || remaining.is_some() {
                c.ratelimit_limit = limit.clone();
                c.ratelimit_remaining = remaining.clone();
                c.ratelimit_seen_at = Some(now);
            }
        });
    }

    pub fn upstream_head(&self, registry: &str, repo: &str, headers: &HeaderMap) {
        self.upstream_response(registry, repo, headers, false);
        self.update(registry, Some(repo), |c| c.upstream_heads += 1);
    }

    pub fn bytes_from_upstream(&self, registry: &str, repo: &str, n: u64) {
        self.update(registry, Some(repo), |c| c.bytes_from_upstream += n);
    }

    pub fn fill_failed(&self, registry: &str) {
        self.update(registry, None, |c| c.failed_downloads += 1);
    }

    pub fn digest_mismatch(&self, registry: &str) {
        self.update(registry, None, |c| c.digest_mismatches += 1);
    }

    pub fn fill_started(&self) {
        self.fills_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fill_finished(&self) {
        self.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn registry(&self, registry: &str) -> Counters {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.registries.get(registry).cloned().unwrap_or_default()
    }

    pub fn repo(&self, registry: &str, repo: &str) -> Counters {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.repos
            .get(&format!("{registry}/{repo}"))
            .cloned()
            .unwrap_or_default()
    }

    pub fn registries(&self) -> Vec<(String, Counters)> {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.registries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn repos(&self) -> Vec<(String, Counters)> {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.repos
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Loads persisted counters (at start-up, before any request).
    pub fn load(&self, index: &Index) {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for (key, counters) in index.counters::<Counters>() {
            if let Some(name) = key.strip_prefix(REGISTRY_PREFIX) {
                t.registries.insert(name.to_string(), counters);
            } else if let Some(name) = key.strip_prefix(REPO_PREFIX) {
                t.repos.insert(name.to_string(), counters);
            }
        }
    }

    pub fn persist(&self, index: &Index) -> Result<(), IndexError> {
        let (registries, repos) = {
            let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            (t.registries.clone(), t.repos.clone())
        };
        for (name, c) in registries {
            index.put_counters(&format!("{REGISTRY_PREFIX}{name}"), &c)?;
        }
        for (name, c) in repos {
            index.put_counters(&format!("{REPO_PREFIX}{name}"), &c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_outcome_and_only_cache_bytes_as_saved() {
        let s = Stats::new();
        s.record("r", Some("a"), Outcome::Hit, 10);
        s.record("r", Some("a"), Outcome::Miss, 5);
        s.record("r", Some("b"), Outcome::Stale, 7);
        s.record("r", None, Outcome::Pass, 3);
        let r = s.registry("r");
        assert_eq!(
            (r.requests, r.hits, r.misses, r.stale, r.passes),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(r.bytes_from_cache, 17);
        assert_eq!(s.repo("r", "a").requests, 2);
    }

    #[test]
    fn ratelimit_headers_and_manifest_gets() {
        let s = Stats::new();
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        s.upstream_response("r", "a", &h, true);
        s.upstream_head("r", "a", &HeaderMap::new());
        let r = s.registry("r");
        assert_eq!(r.upstream_manifest_gets, 1);
        assert_eq!(r.upstream_heads, 1);
        assert_eq!(r.ratelimit_remaining.as_deref(), Some("76;w=21600"));
    }

    #[test]
    fn counters_survive_a_round_trip_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (index, _) = Index::open(dir.path()).unwrap();
        let s = Stats::new();
        s.record("r", Some("a"), Outcome::Hit, 10);
        s.persist(&index).unwrap();
        let s2 = Stats::new();
        s2.load(&index);
        assert_eq!(s2.registry("r").bytes_from_cache, 10);
        assert_eq!(s2.repo("r", "a").hits, 1);
    }
}
