//! The JSON API under `/api/` (see `docs/admin-api.md` for every field, with examples).
//!
//! | method and path              | what                                                   |
//! |------------------------------|--------------------------------------------------------|
//! | `GET /api/stats`             | totals, per-registry counters and rate limits, cache size |
//! | `GET /api/repos`             | per-repository counters, most bytes saved first        |
//! | `GET /api/entries`           | cached objects, filtered and sorted                    |
//! | `GET /api/entries/{digest}`  | one cached object                                      |
//! | `DELETE /api/entries/{digest}` | purge it (clients streaming it finish unharmed)     |
//! | `GET /api/requests`          | the most recent completed requests, newest first       |
//! | `GET /api/history`           | requests per minute by outcome, the last hour          |

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use http::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{allow, json_response, Admin, ApiError, CacheSummary, Query};
use crate::body::Body;
use crate::cache::index::{now_secs, Entry, Kind};
use crate::config::HostPort;
use crate::route::Digest;
use crate::stats::{Completed, Counters, HISTORY_MINUTES, RECENT_REQUESTS};

pub const DEFAULT_REPOS_LIMIT: usize = 50;
pub const MAX_REPOS_LIMIT: usize = 10_000;
pub const DEFAULT_ENTRIES_LIMIT: usize = 100;
pub const MAX_ENTRIES_LIMIT: usize = 10_000;
pub const DEFAULT_REQUESTS_LIMIT: usize = 50;

pub(super) async fn route(
    admin: &Admin,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let q = Query::parse(query)?;
    let value = match path {
        "/api/stats" => {
            allow(method, &[Method::GET])?;
            q.finish()?;
            stats(admin).await?
        }
        "/api/repos" => {
            allow(method, &[Method::GET])?;
            repos(admin, q)?
        }
        "/api/entries" => {
            allow(method, &[Method::GET])?;
            entries(admin, q).await?
        }
        "/api/requests" => {
            allow(method, &[Method::GET])?;
            requests(admin, q)?
        }
        "/api/history" => {
            allow(method, &[Method::GET])?;
            history(admin, q)?
        }
        p => match p.strip_prefix("/api/entries/") {
            Some(digest) => {
                allow(method, &[Method::GET, Method::DELETE])?;
                q.finish()?;
                let digest = parse_digest(digest)?;
                if *method == Method::DELETE {
                    purge(admin, digest).await?
                } else {
                    entry(admin, digest).await?
                }
            }
            None => return Err(ApiError::not_found(format!("no such endpoint: {path}"))),
        },
    };
    Ok(json_response(StatusCode::OK, &value))
}

fn parse_digest(segment: &str) -> Result<Digest, ApiError> {
    let s = super::percent_decode(segment)?;
    Digest::parse(&s).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{s:?} is not a digest (expected sha256:<64 hex> or sha512:<128 hex>)"
        ))
    })
}

/// Docker Hub's rate-limit headers look like `100;w=21600`: a number, then parameters.
pub(super) fn ratelimit_number(header: Option<&str>) -> Option<u64> {
    header?.split(';').next()?.trim().parse().ok()
}

fn ratelimit_window(header: Option<&str>) -> Option<u64> {
    header?
        .split(';')
        .skip(1)
        .find_map(|p| p.trim().strip_prefix("w="))?
        .trim()
        .parse()
        .ok()
}

fn hit_ratio(c: &Counters) -> f64 {
    let from_cache = c.hits + c.revalidated + c.stale;
    let served = from_cache + c.misses + c.coalesced;
    if served == 0 {
        0.0
    } else {
        from_cache as f64 / served as f64
    }
}

/// The counters every level (total, registry, repository) shows.
fn counters_json(c: &Counters) -> Map<String, Value> {
    let v = json!({
        "requests": c.requests,
        "hits": c.hits,
        "misses": c.misses,
        "coalesced": c.coalesced,
        "revalidated": c.revalidated,
        "stale": c.stale,
        "passes": c.passes,
        "hit_ratio": hit_ratio(c),
        "bytes_from_cache": c.bytes_from_cache,
        "bytes_from_upstream": c.bytes_from_upstream,
        "upstream_manifest_gets": c.upstream_manifest_gets,
        "upstream_heads": c.upstream_heads,
        "failed_downloads": c.failed_downloads,
        "digest_mismatches": c.digest_mismatches,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn ratelimit_json(c: &Counters) -> Value {
    json!({
        "limit": ratelimit_number(c.ratelimit_limit.as_deref()),
        "remaining": ratelimit_number(c.ratelimit_remaining.as_deref()),
        "window_s": ratelimit_window(c.ratelimit_limit.as_deref())
            .or_else(|| ratelimit_window(c.ratelimit_remaining.as_deref())),
        "seen_at": c.ratelimit_seen_at,
    })
}

fn add(total: &mut Counters, c: &Counters) {
    total.requests += c.requests;
    total.hits += c.hits;
    total.misses += c.misses;
    total.coalesced += c.coalesced;
    total.revalidated += c.revalidated;
    total.stale += c.stale;
    total.passes += c.passes;
    total.bytes_from_cache += c.bytes_from_cache;
    total.bytes_from_upstream += c.bytes_from_upstream;
    total.upstream_manifest_gets += c.upstream_manifest_gets;
    total.upstream_heads += c.upstream_heads;
    total.failed_downloads += c.failed_downloads;
    total.digest_mismatches += c.digest_mismatches;
}

pub(super) fn cache_json(s: &CacheSummary) -> Value {
    json!({
        "entries": s.entries(),
        "bytes": s.bytes(),
        // No size bound exists yet; a number here once one does.
        "max_bytes": Value::Null,
        "blobs": {"entries": s.blobs, "bytes": s.blob_bytes},
        "manifests": {"entries": s.manifests, "bytes": s.manifest_bytes},
    })
}

async fn stats(admin: &Admin) -> Result<Value, ApiError> {
    let app = &admin.app;
    let summary = admin.cache_summary().await?;
    let mut registries = app.stats.registries();
    registries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total = Counters::default();
    let mut per_registry = Map::new();
    for (name, c) in &registries {
        add(&mut total, c);
        let mut m = counters_json(c);
        m.insert("ratelimit".into(), ratelimit_json(c));
        per_registry.insert(name.clone(), Value::Object(m));
    }
    let started_at = app.stats.started_at.load(Ordering::Relaxed);
    let mut out = Map::new();
    out.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    out.insert("started_at".into(), json!(started_at));
    out.insert(
        "uptime_s".into(),
        json!(now_secs().saturating_sub(started_at)),
    );
    out.extend(counters_json(&total));
    out.insert("cache".into(), cache_json(&summary));
    out.insert(
        "downloads_in_flight".into(),
        json!(app.stats.fills_in_flight.load(Ordering::Relaxed).max(0)),
    );
    out.insert(
        "open_connections".into(),
        json!(app.stats.open_connections.load(Ordering::Relaxed).max(0)),
    );
    out.insert("registries".into(), Value::Object(per_registry));
    Ok(Value::Object(out))
}

/// `registry=` as pullcache names registries ([`HostPort::name`]: `host`, or `host:port` off
/// 443); `host:443` is accepted too.
fn take_registry(q: &mut Query) -> Result<Option<String>, ApiError> {
    q.take("registry")
        .map(|r| {
            HostPort::parse(&r, Some(443))
                .map(|hp| hp.name())
                .map_err(|e| ApiError::bad_request(format!("registry: {e}")))
        })
        .transpose()
}

fn repos(admin: &Admin, mut q: Query) -> Result<Value, ApiError> {
    let registry = take_registry(&mut q)?;
    let limit = q.take_limit("limit", DEFAULT_REPOS_LIMIT, MAX_REPOS_LIMIT)?;
    q.finish()?;
    let mut rows: Vec<(String, String, Counters)> = admin
        .app
        .stats
        .repos()
        .into_iter()
        .filter_map(|(key, c)| {
            // Keys are `host:port/repository`; a host never contains '/'.
            let (reg, repo) = key.split_once('/')?;
            Some((reg.to_string(), repo.to_string(), c))
        })
        .filter(|(reg, _, _)| registry.as_ref().is_none_or(|r| r == reg))
        .collect();
    let total = rows.len();
    rows.sort_by(|a, b| {
        (b.2.bytes_from_cache, b.2.requests)
            .cmp(&(a.2.bytes_from_cache, a.2.requests))
            .then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1)))
    });
    rows.truncate(limit);
    let repos: Vec<Value> = rows
        .into_iter()
        .map(|(reg, repo, c)| {
            let mut m = Map::new();
            m.insert("registry".into(), json!(reg));
            m.insert("repo".into(), json!(repo));
            m.extend(counters_json(&c));
            Value::Object(m)
        })
        .collect();
    Ok(json!({"total": total, "repos": repos}))
}

fn entry_json(digest: &Digest, e: &Entry) -> Value {
    json!({
        "digest": digest.as_str(),
        "kind": e.kind,
        "size": e.size,
        "media_type": e.media_type,
        "created": e.created,
        "last_access": e.last_access,
        "hits": e.hits,
        "registries": e.registries,
        "repos": e.repos,
    })
}

#[derive(Clone, Copy)]
enum SortBy {
    Hits,
    LastAccess,
    Size,
}

/// Sort key, largest first; ties broken by digest so pages are stable.
fn sort_key(by: SortBy, e: &Entry) -> (u64, u64) {
    match by {
        SortBy::Hits => (e.hits, e.last_access),
        SortBy::LastAccess => (e.last_access, e.hits),
        SortBy::Size => (e.size, e.last_access),
    }
}

async fn entries(admin: &Admin, mut q: Query) -> Result<Value, ApiError> {
    let kind = match q.take_choice("kind", &["blob", "manifest"])? {
        Some("blob") => Some(Kind::Blob),
        Some(_) => Some(Kind::Manifest),
        None => None,
    };
    let repo = q.take("repo");
    if let Some(r) = &repo {
        if !crate::route::valid_repo(r) {
            return Err(ApiError::bad_request(format!(
                "repo: {r:?} is not a repository name"
            )));
        }
    }
    let sort = match q.take_choice("sort", &["hits", "last_access", "size"])? {
        Some("hits") => SortBy::Hits,
        Some("size") => SortBy::Size,
        _ => SortBy::LastAccess,
    };
    let limit = q.take_limit("limit", DEFAULT_ENTRIES_LIMIT, MAX_ENTRIES_LIMIT)?;
    q.finish()?;
    let (total, rows) = admin
        .app
        .cache
        .with_index(move |index| {
            let mut rows: Vec<(Digest, Entry)> = index
                .entries()
                .filter(|(_, e)| kind.is_none_or(|k| e.kind == k))
                .filter(|(_, e)| repo.as_ref().is_none_or(|r| e.repos.contains(r)))
                .collect();
            let total = rows.len();
            let cmp = |a: &(Digest, Entry), b: &(Digest, Entry)| {
                sort_key(sort, &b.1)
                    .cmp(&sort_key(sort, &a.1))
                    .then_with(|| a.0.cmp(&b.0))
            };
            if rows.len() > limit {
                rows.select_nth_unstable_by(limit - 1, cmp);
                rows.truncate(limit);
            }
            rows.sort_by(cmp);
            Ok((total, rows))
        })
        .await?;
    let entries: Vec<Value> = rows.iter().map(|(d, e)| entry_json(d, e)).collect();
    Ok(json!({"total": total, "entries": entries}))
}

async fn entry(admin: &Admin, digest: Digest) -> Result<Value, ApiError> {
    let d = digest.clone();
    match admin.app.cache.with_index(move |i| i.get(&d)).await? {
        Some(e) => Ok(entry_json(&digest, &e)),
        None => Err(ApiError::not_found(format!("{digest} is not cached"))),
    }
}

/// Removes the entry and its file. A client streaming it keeps its open file and finishes;
/// a download of it that is still running will cache it again when it completes.
async fn purge(admin: &Admin, digest: Digest) -> Result<Value, ApiError> {
    let d = digest.clone();
    let before = admin.app.cache.with_index(move |i| i.get(&d)).await?;
    let purged = admin.app.cache.purge(&digest).await?;
    admin.invalidate_summary().await;
    match (purged, before) {
        (true, Some(e)) => {
            tracing::info!(digest = %digest, size = e.size, "purged from the cache (admin API)");
            Ok(json!({"purged": true, "entry": entry_json(&digest, &e)}))
        }
        (true, None) => Ok(json!({"purged": true, "entry": Value::Null})),
        (false, _) => Err(ApiError::not_found(format!("{digest} is not cached"))),
    }
}

/// `2024-05-01T12:34:56.789Z`.
pub(super) fn rfc3339_millis(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

fn request_json(c: &Completed) -> Value {
    json!({
        "time": rfc3339_millis(c.at),
        "client": c.client.to_string(),
        "registry": c.registry,
        "repo": c.repo,
        "kind": c.kind,
        "reference": c.reference,
        "method": c.method,
        "status": c.status,
        "cache": c.outcome.as_str(),
        "upstream_status": c.upstream_status,
        "bytes": c.bytes,
        "complete": c.complete,
        "dur_ms": c.duration.as_micros() as f64 / 1000.0,
    })
}

fn requests(admin: &Admin, mut q: Query) -> Result<Value, ApiError> {
    let limit = q.take_limit("limit", DEFAULT_REQUESTS_LIMIT, RECENT_REQUESTS)?;
    let repo = q.take("repo");
    let cache = q.take_choice(
        "cache",
        &["HIT", "MISS", "COALESCED", "REVALIDATED", "STALE", "PASS"],
    )?;
    q.finish()?;
    let all = admin.app.stats.recent_requests(RECENT_REQUESTS);
    let requests: Vec<Value> = all
        .iter()
        .filter(|c| repo.is_none() || c.repo == repo)
        .filter(|c| cache.is_none_or(|o| c.outcome.as_str() == o))
        .take(limit)
        .map(request_json)
        .collect();
    Ok(json!({"capacity": RECENT_REQUESTS, "requests": requests}))
}

fn history(admin: &Admin, mut q: Query) -> Result<Value, ApiError> {
    let minutes = q.take_limit("minutes", HISTORY_MINUTES, HISTORY_MINUTES)?;
    q.finish()?;
    let rows = admin.app.stats.history(now_secs(), minutes);
    Ok(json!({"minutes": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_ratelimit_headers() {
        assert_eq!(ratelimit_number(Some("100;w=21600")), Some(100));
        assert_eq!(ratelimit_number(Some("76")), Some(76));
        assert_eq!(ratelimit_number(Some("lots")), None);
        assert_eq!(ratelimit_number(None), None);
        assert_eq!(ratelimit_window(Some("100;w=21600")), Some(21600));
        assert_eq!(ratelimit_window(Some("100")), None);
    }

    #[test]
    fn hit_ratio_counts_only_cacheable_answers() {
        let c = Counters {
            hits: 3,
            revalidated: 1,
            misses: 3,
            coalesced: 1,
            passes: 100,
            ..Counters::default()
        };
        assert!((hit_ratio(&c) - 0.5).abs() < 1e-12);
        assert_eq!(hit_ratio(&Counters::default()), 0.0);
    }

    #[test]
    fn times_are_rfc3339_utc_with_millis() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_714_566_896_789);
        assert_eq!(rfc3339_millis(t), "2024-05-01T12:34:56.789Z");
    }

    #[test]
    fn digests_in_paths_may_be_percent_encoded() {
        let hex = "a".repeat(64);
        assert!(parse_digest(&format!("sha256:{hex}")).is_ok());
        assert!(parse_digest(&format!("sha256%3A{hex}")).is_ok());
        assert_eq!(
            parse_digest("sha256:xyz").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
