//! Counters per registry and per repository, persisted in the index so they survive restarts,
//! plus live gauges. The request path only bumps in-memory numbers; [`Stats::persist`] writes
//! them out periodically and at shutdown.
//!
//! For the admin port it also keeps, bounded: the last [`RECENT_REQUESTS`] completed requests,
//! request-duration histograms by outcome (since start), and outcome counts per minute for the
//! last [`HISTORY_MINUTES`] minutes (persisted with the counters).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::cache::index::{now_secs, Index, IndexError};

/// Completed requests kept for the admin API (oldest dropped first).
pub const RECENT_REQUESTS: usize = 1000;
/// Minutes of per-minute outcome counts kept for the dashboard's chart.
pub const HISTORY_MINUTES: usize = 60;
/// Upper bounds, in seconds, of the request-duration histogram buckets (`+Inf` is implied).
pub const DURATION_BUCKETS_SECS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

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

    pub const ALL: [Outcome; 6] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Revalidated,
        Outcome::Stale,
        Outcome::Pass,
    ];

    fn slot(self) -> usize {
        match self {
            Outcome::Hit => 0,
            Outcome::Miss => 1,
            Outcome::Coalesced => 2,
            Outcome::Revalidated => 3,
            Outcome::Stale => 4,
            Outcome::Pass => 5,
        }
    }
}

/// One completed request, as the admin API shows it (the same fields as its log line).
#[derive(Debug, Clone)]
pub struct Completed {
    /// When the response body ended (or the client went away).
    pub at: SystemTime,
    pub client: SocketAddr,
    pub registry: String,
    pub repo: Option<String>,
    pub kind: &'static str,
    pub reference: Option<String>,
    pub method: String,
    pub status: u16,
    pub outcome: Outcome,
    pub upstream_status: Option<u16>,
    pub bytes: u64,
    /// Did the whole body reach the client?
    pub complete: bool,
    pub duration: Duration,
}

/// Requests completed in one minute, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Minute {
    /// Unix seconds at the start of the minute.
    pub start: u64,
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub revalidated: u64,
    pub stale: u64,
    pub passes: u64,
    pub bytes_from_cache: u64,
    /// Every byte sent to clients, from cache or not.
    pub bytes_served: u64,
}

impl Minute {
    fn count(&mut self, outcome: Outcome, bytes: u64) {
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
        self.bytes_served += bytes;
    }
}

/// A Prometheus-style histogram of request durations.
#[derive(Default)]
struct Histogram {
    /// Non-cumulative: `buckets[i]` counts durations in `(bound[i-1], bound[i]]`; the last
    /// slot is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_SECS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS_SECS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS_SECS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DurationHistogram {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut total = 0;
        for b in &self.buckets {
            total += b.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        DurationHistogram {
            cumulative,
            count: total,
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A snapshot of one outcome's request durations.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationHistogram {
    /// Cumulative counts for each bound of [`DURATION_BUCKETS_SECS`], then `+Inf`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
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
    /// Newest last; at most [`RECENT_REQUESTS`].
    recent: Mutex<VecDeque<Completed>>,
    /// Oldest first, strictly increasing `start`; at most [`HISTORY_MINUTES`].
    minutes: Mutex<VecDeque<Minute>>,
    /// By [`Outcome::slot`].
    durations: [Histogram; 6],
}

const REGISTRY_PREFIX: &str = "registry\0";
const REPO_PREFIX: &str = "repo\0";
const HISTORY_KEY: &str = "history\0minutes";

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

    /// Accounts one completed request everywhere: counters ([`Stats::record`]), the duration
    /// histogram of its outcome, the per-minute history and the recent-requests ring.
    pub fn completed(&self, c: Completed) {
        self.record(&c.registry, c.repo.as_deref(), c.outcome, c.bytes);
        self.durations[c.outcome.slot()].observe(c.duration);
        let secs =
            c.at.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
        self.minute_at(secs, |m| m.count(c.outcome, c.bytes));
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(c);
    }

    /// Applies `f` to the history slot of the minute containing `secs`.
    fn minute_at(&self, secs: u64, f: impl FnOnce(&mut Minute)) {
        let start = secs - secs % 60;
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        match minutes.back_mut() {
            // A clock that stepped back counts into the latest minute.
            Some(last) if last.start >= start => f(last),
            _ => {
                let mut m = Minute {
                    start,
                    ..Minute::default()
                };
                f(&mut m);
                minutes.push_back(m);
            }
        }
        while minutes.len() > HISTORY_MINUTES {
            minutes.pop_front();
        }
    }

    /// The most recent completed requests, newest first.
    pub fn recent_requests(&self, limit: usize) -> Vec<Completed> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().rev().take(limit).cloned().collect()
    }

    /// The last `n` minutes up to the one containing `now` (unix seconds), oldest first, with
    /// a zero entry for every minute without requests.
    pub fn history(&self, now: u64, n: usize) -> Vec<Minute> {
        let current = now - now % 60;
        let minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        (0..n as u64)
            .rev()
            .filter_map(|ago| current.checked_sub(ago * 60))
            .map(|start| {
                minutes
                    .iter()
                    .find(|m| m.start == start)
                    .cloned()
                    .unwrap_or(Minute {
                        start,
                        ..Minute::default()
                    })
            })
            .collect()
    }

    /// Request durations of `outcome` since start.
    pub fn durations(&self, outcome: Outcome) -> DurationHistogram {
        self.durations[outcome.slot()].snapshot()
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
        drop(t);
        // Every counter is tried as a history; only the history key parses as one.
        let histories = index.counters::<Vec<Minute>>();
        if let Some((_, mut saved)) = histories.into_iter().find(|(k, _)| k == HISTORY_KEY) {
            saved.sort_by_key(|m| m.start);
            saved.dedup_by_key(|m| m.start);
            let skip = saved.len().saturating_sub(HISTORY_MINUTES);
            *self.minutes.lock().unwrap_or_else(|p| p.into_inner()) =
                saved.into_iter().skip(skip).collect();
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
        let minutes: Vec<Minute> = {
            let m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
            m.iter().cloned().collect()
        };
        index.put_counters(HISTORY_KEY, &minutes)?;
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

    fn completed(outcome: Outcome, at_secs: u64, bytes: u64, ms: u64) -> Completed {
        Completed {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(at_secs),
            client: "127.0.0.1:5000".parse().unwrap(),
            registry: "r".into(),
            repo: Some("a".into()),
            kind: "blob",
            reference: None,
            method: "GET".into(),
            status: 200,
            outcome,
            upstream_status: None,
            bytes,
            complete: true,
            duration: Duration::from_millis(ms),
        }
    }

    #[test]
    fn recent_requests_are_bounded_and_newest_first() {
        let s = Stats::new();
        for i in 0..(RECENT_REQUESTS as u64 + 5) {
            s.completed(completed(Outcome::Hit, 1_000, i, 1));
        }
        let recent = s.recent_requests(usize::MAX);
        assert_eq!(recent.len(), RECENT_REQUESTS);
        assert_eq!(recent[0].bytes, RECENT_REQUESTS as u64 + 4);
        assert_eq!(s.recent_requests(3).len(), 3);
        assert_eq!(s.registry("r").requests, RECENT_REQUESTS as u64 + 5);
    }

    #[test]
    fn durations_land_in_cumulative_buckets_by_outcome() {
        let s = Stats::new();
        s.completed(completed(Outcome::Hit, 0, 1, 3));
        s.completed(completed(Outcome::Hit, 0, 1, 200));
        s.completed(completed(Outcome::Miss, 0, 1, 400_000));
        let hits = s.durations(Outcome::Hit);
        assert_eq!(hits.count, 2);
        assert_eq!(hits.cumulative[0], 1); // <= 5ms
        assert_eq!(hits.cumulative[5], 2); // <= 250ms
        assert!((hits.sum_secs - 0.203).abs() < 1e-9);
        let misses = s.durations(Outcome::Miss);
        assert_eq!(misses.cumulative[DURATION_BUCKETS_SECS.len() - 1], 0);
        assert_eq!(*misses.cumulative.last().unwrap(), 1); // +Inf
    }

    #[test]
    fn history_is_dense_per_minute_and_bounded() {
        let s = Stats::new();
        let t0 = 1_700_000_000 - 1_700_000_000 % 60;
        s.completed(completed(Outcome::Hit, t0 + 5, 10, 1));
        s.completed(completed(Outcome::Miss, t0 + 59, 7, 1));
        s.completed(completed(Outcome::Hit, t0 + 120, 1, 1));
        let h = s.history(t0 + 130, 4);
        let starts: Vec<u64> = h.iter().map(|m| m.start).collect();
        assert_eq!(starts, vec![t0 - 60, t0, t0 + 60, t0 + 120]);
        assert_eq!((h[1].hits, h[1].misses, h[1].bytes_from_cache), (1, 1, 10));
        assert_eq!(h[1].bytes_served, 17);
        assert_eq!(
            h[2],
            Minute {
                start: t0 + 60,
                ..Minute::default()
            }
        );
        for i in 0..(HISTORY_MINUTES as u64 + 10) {
            s.completed(completed(Outcome::Hit, t0 + 180 + i * 60, 1, 1));
        }
        assert_eq!(s.minutes.lock().unwrap().len(), HISTORY_MINUTES);
    }

    #[test]
    fn counters_survive_a_round_trip_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (index, _) = Index::open(dir.path()).unwrap();
        let s = Stats::new();
        s.record("r", Some("a"), Outcome::Hit, 10);
        s.persist(&index).unwrap();
        s.completed(completed(Outcome::Miss, 6_000, 3, 1));
        s.persist(&index).unwrap();
        let s2 = Stats::new();
        s2.load(&index);
        assert_eq!(s2.registry("r").bytes_from_cache, 10);
        assert_eq!(s2.repo("r", "a").hits, 1);
        assert_eq!(s2.history(6_000, 1)[0].misses, 1);
    }
}
