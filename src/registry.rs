//! The request path for intercepted registries: a fixed sequence of steps over one [`Ctx`].
//!
//! ```text
//! classify ─┬─ blob / manifest by digest ─ authorize ─ lookup ─┬─ hit:  serve from cache
//!           │                                                  └─ miss: fill + tee
//!           ├─ manifest by tag ─ HEAD upstream (uncounted) ─ digest cached? ─ serve / fill
//!           │                     └─ 429, 5xx, unreachable ─ stale-if-error
//!           ├─ /v2/ ping ─ forward (replay the last challenge while upstream is down)
//!           └─ anything else ─ forward unchanged
//! record: X-Cache header, counters, one log line when the body is done
//! ```
//!
//! Invariants: nothing from cache is served for repository R unless upstream accepted the
//! client's credential for R ([`crate::auth`]); a `HEAD` from a client never becomes an upstream
//! `GET`; a tag is answered from cache after an upstream `HEAD`, which Docker Hub does not count.

// An `Answer` (a response) travels by value once per request through `Result`s; boxing it
// would add an allocation to every refusal for no gain.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use hyper::body::Incoming;

use crate::auth::{cred_key, CredKey};
use crate::body::{self, Body};
use crate::cache::fill::{file_body, Fill, FillRequest, FillState};
use crate::cache::index::{now_secs, Challenge, Kind, TagEntry};
use crate::cache::Hit;
use crate::config::HostPort;
use crate::error::ProxyError;
use crate::route::{classify, Digest, Route};
use crate::server::App;
use crate::stats::Outcome;
use crate::upstream::strip_hop_by_hop;

/// What pullcache asks for when it has no client `Accept` to go by.
pub const MANIFEST_ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// One request on an intercepted registry.
struct Ctx {
    app: Arc<App>,
    peer: SocketAddr,
    registry: Arc<HostPort>,
    reg: String,
    route: Route,
    method: Method,
    headers: HeaderMap,
    cred: CredKey,
    start: Instant,
    upstream_status: Option<u16>,
}

/// Either a response to send, or upstream's refusal to pass on.
type Step<T> = Result<T, Answer>;

/// A finished answer: the response and its cache outcome.
struct Answer {
    response: Response<Body>,
    outcome: Outcome,
}

impl From<ProxyError> for Answer {
    fn from(e: ProxyError) -> Answer {
        Answer {
            response: crate::listener::error_response(&e),
            outcome: Outcome::Pass,
        }
    }
}

pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    registry: Arc<HostPort>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, incoming) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let route = classify(&parts.method, parts.uri.path(), parts.uri.query());
    let mut ctx = Ctx {
        reg: registry.name(),
        app,
        peer,
        registry,
        route: route.clone(),
        method: parts.method.clone(),
        cred: cred_key(&parts.headers),
        headers: parts.headers.clone(),
        start: Instant::now(),
        upstream_status: None,
    };
    let answer = match &route {
        Route::Blob { repo, digest } => by_digest(&mut ctx, repo, digest, Kind::Blob).await,
        Route::ManifestByDigest { repo, digest } => {
            by_digest(&mut ctx, repo, digest, Kind::Manifest).await
        }
        Route::ManifestByTag { repo, tag } => by_tag(&mut ctx, repo, tag).await,
        Route::Ping => ping(&mut ctx).await,
        Route::Pass { .. } => {
            let req = Request::from_parts(parts, body::incoming(incoming));
            pass(&mut ctx, req).await
        }
    };
    let answer = answer.unwrap_or_else(|a| a);
    record(ctx, answer)
}

// ---------------------------------------------------------------------------------------------
// By digest: blobs and manifests.

async fn by_digest(ctx: &mut Ctx, repo: &str, digest: &Digest, kind: Kind) -> Step<Answer> {
    let cache = ctx.app.cache.clone();
    let hit = cache.lookup(digest).await.map_err(internal)?;
    // Content is the same in every repository, but a registry answers a digest only in the
    // repositories that hold it (a push relies on that HEAD's 404; a private digest must not
    // be readable through a public repository). Until upstream has confirmed this one, ask.
    let home = crate::cache::index::home(&ctx.reg, repo);
    let known_here = match &hit {
        Some(hit) => hit.entry.is_known_in(&ctx.reg, repo),
        None => cache
            .fill_origin(digest)
            .is_none_or(|origin| origin == home),
    };
    let outage = match authorize(ctx, repo, known_here).await? {
        // Upstream is down and nothing confirms that this repository holds the digest.
        Some(refusal) if !known_here => return Err(refusal),
        outage => outage,
    };
    if let Some(hit) = hit {
        if let Some(answer) = serve_hit(ctx, digest, hit, Outcome::Hit).await? {
            return Ok(answer);
        }
    }
    if let Some(refusal) = outage {
        // Upstream is down and we do not have it: say what upstream said.
        return Err(refusal);
    }
    if ctx.method == Method::HEAD {
        return pass_following(ctx, repo, digest).await;
    }
    let uri = upstream_uri(&ctx.registry, &route_path(&ctx.route, repo))?;
    fill(ctx, repo, digest, kind, uri).await
}

/// Confirms that upstream would serve this path of `repo` to this client: a fresh grant is
/// enough when the object is known to live in `repo` (`known_here`), otherwise upstream is
/// asked with a HEAD. `Ok(None)`: go ahead. `Ok(Some(refusal))`: upstream is unavailable but
/// the client may still get cached content (public repository, or a credential that held a
/// grant); the refusal is what to answer when that is not possible. `Err`: upstream refused,
/// pass that on.
async fn authorize(ctx: &mut Ctx, repo: &str, known_here: bool) -> Step<Option<Answer>> {
    let app = ctx.app.clone();
    if known_here && app.grants.fresh(&ctx.reg, repo, ctx.cred) {
        return Ok(None);
    }
    // Concurrent first requests of one client (a pull fetching its layers in parallel) wait
    // for one check instead of each sending its own HEAD.
    let _one_check = app.grants.check_lock(&ctx.reg, repo, ctx.cred).await;
    if known_here && app.grants.fresh(&ctx.reg, repo, ctx.cred) {
        return Ok(None);
    }
    let path = route_path(&ctx.route, repo);
    let uri = upstream_uri(&ctx.registry, &path)?;
    let head = send_head(ctx, uri, repo).await;
    match head {
        Ok((status, _)) if status.is_success() || status.is_redirection() => {
            app.grant(&ctx.registry, repo, ctx.cred, &path);
            Ok(None)
        }
        Ok((status, headers)) if !is_unavailable(status) => Err(refusal(ctx, status, &headers)),
        failed => {
            let refusal = match failed {
                Ok((status, headers)) => refusal(ctx, status, &headers),
                Err(e) => Answer::from(e),
            };
            if app.grants.held(&ctx.reg, repo, ctx.cred) || app.is_public(&ctx.reg, repo).await {
                tracing::info!(registry = %ctx.reg, repo, "upstream unavailable; serving cached content under the outage policy");
                Ok(Some(refusal))
            } else {
                Err(refusal)
            }
        }
    }
}

/// The request path of a by-digest or by-tag route, rebuilt from validated parts.
fn route_path(route: &Route, repo: &str) -> String {
    match route {
        Route::Blob { digest, .. } => format!("/v2/{repo}/blobs/{digest}"),
        Route::ManifestByDigest { digest, .. } => format!("/v2/{repo}/manifests/{digest}"),
        Route::ManifestByTag { tag, .. } => format!("/v2/{repo}/manifests/{tag}"),
        _ => "/v2/".to_string(),
    }
}

fn is_unavailable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// HEAD upstream with the client's `Accept`, `Authorization` and `User-Agent`. Redirects are
/// not followed: a 3xx already says the client may have the object.
async fn send_head(
    ctx: &mut Ctx,
    uri: Uri,
    repo: &str,
) -> Result<(StatusCode, HeaderMap), ProxyError> {
    let mut req = Request::builder()
        .method(Method::HEAD)
        .uri(uri)
        .body(body::empty())
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
    *req.headers_mut() = forwarded_headers(&ctx.headers);
    crate::upstream::set_host(&mut req);
    let resp = ctx.app.upstream.send(req).await?;
    ctx.upstream_status = Some(resp.status().as_u16());
    ctx.app.stats.upstream_head(&ctx.reg, repo, resp.headers());
    let (parts, _) = resp.into_parts();
    Ok((parts.status, parts.headers))
}

/// The client headers that travel with pullcache's own upstream requests.
fn forwarded_headers(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [header::ACCEPT, header::AUTHORIZATION, header::USER_AGENT] {
        for v in client.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    if !out.contains_key(header::ACCEPT) {
        out.insert(
            header::ACCEPT,
            HeaderValue::from_static(MANIFEST_ACCEPT_ALL),
        );
    }
    out
}

/// Upstream's refusal, passed on: its status and auth headers, and a distribution-style body.
fn refusal(ctx: &Ctx, status: StatusCode, headers: &HeaderMap) -> Answer {
    let mut response = Response::new(if ctx.method == Method::HEAD {
        body::empty()
    } else {
        let code = match status {
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "DENIED",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
            _ => "UNAVAILABLE",
        };
        body::full(format!(
            "{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"upstream answered {status}\"}}]}}\n"
        ))
    });
    *response.status_mut() = status;
    for name in [header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        for v in headers.get_all(&name) {
            response.headers_mut().append(name.clone(), v.clone());
        }
    }
    for (name, v) in headers {
        if name.as_str().starts_with("ratelimit-") || name.as_str() == "docker-ratelimit-source" {
            response.headers_mut().append(name.clone(), v.clone());
        }
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Answer {
        response,
        outcome: Outcome::Pass,
    }
}

/// Serves a cached object. `Ok(None)` when the index pointed at a file that is gone (the entry
/// is dropped and the caller fetches it again).
async fn serve_hit(ctx: &Ctx, digest: &Digest, hit: Hit, outcome: Outcome) -> Step<Option<Answer>> {
    let size = hit.entry.size;
    let range = match parse_range(ctx.headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => return Ok(Some(unsatisfiable(size, outcome))),
    };
    let (start, end) = range.unwrap_or((0, size));
    let body = if ctx.method == Method::HEAD {
        body::empty()
    } else if let Some(bytes) = hit.inline {
        body::full(bytes.slice(start as usize..end as usize))
    } else {
        match ctx.app.cache.open_file(digest).await {
            Ok(file) => file_body(file, start, end),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(%digest, "indexed file is missing; fetching it again");
                ctx.app.cache.forget(digest).await.map_err(internal)?;
                return Ok(None);
            }
            Err(e) => return Err(internal(e)),
        }
    };
    if let Some(repo) = ctx.route.repo() {
        ctx.app.cache.touch(digest, &ctx.reg, repo);
    }
    let mut response = Response::new(body);
    content_headers(&mut response, digest, &hit.entry.media_type, size, range);
    Ok(Some(Answer { response, outcome }))
}

fn content_headers(
    response: &mut Response<Body>,
    digest: &Digest,
    media_type: &str,
    size: u64,
    range: Option<(u64, u64)>,
) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let (start, end) = range.unwrap_or((0, size));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if range.is_some() {
        if let Ok(v) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end.saturating_sub(1)))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
}

fn unsatisfiable(size: u64, outcome: Outcome) -> Answer {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        response.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    Answer { response, outcome }
}

/// A single byte range `bytes=N-`, `bytes=N-M` or `bytes=-S` as `start..end` (end exclusive).
/// `Ok(None)`: no range, or one we answer with the whole object (several ranges, other units).
/// `Err`: a range that cannot be satisfied.
fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let suffix: u64 = b.parse().map_err(|_| ())?;
        if suffix == 0 {
            return Err(());
        }
        (size.saturating_sub(suffix), size)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Starts or joins the download of `digest` and streams it to this client.
async fn fill(ctx: &mut Ctx, repo: &str, digest: &Digest, kind: Kind, uri: Uri) -> Step<Answer> {
    let request = FillRequest {
        digest: digest.clone(),
        kind,
        registry: ctx.reg.clone(),
        repo: repo.to_string(),
        uri,
        headers: forwarded_headers(&ctx.headers),
    };
    let (fill, started) = ctx.app.cache.join_or_start(request);
    let outcome = if started {
        Outcome::Miss
    } else {
        Outcome::Coalesced
    };
    serve_fill(ctx, fill, outcome).await
}

async fn serve_fill(ctx: &mut Ctx, fill: Arc<Fill>, outcome: Outcome) -> Step<Answer> {
    let (len, media_type) = match fill.head().await {
        FillState::Streaming {
            len, media_type, ..
        } => (len, media_type),
        FillState::Done { size, media_type } => (Some(size), media_type),
        FillState::Failed {
            upstream: Some((status, headers)),
            ..
        } => {
            ctx.upstream_status = Some(status.as_u16());
            return Err(Answer {
                outcome,
                ..refusal(ctx, status, &headers)
            });
        }
        FillState::Failed {
            upstream: None,
            reason,
        } => {
            return Err(ProxyError::BadUpstream {
                host: ctx.reg.clone(),
                reason,
            }
            .into());
        }
        FillState::Unstorable { .. } => {
            let repo = ctx.route.repo().unwrap_or_default().to_string();
            return pass_following(ctx, &repo, &fill.digest).await;
        }
        FillState::Pending => return Err(internal("download never started")),
    };
    ctx.upstream_status.get_or_insert(200);
    let range = match len {
        Some(size) => match parse_range(ctx.headers.get(header::RANGE), size) {
            Ok(r) => r,
            Err(()) => return Ok(unsatisfiable(size, outcome)),
        },
        None => None,
    };
    let (start, end) = range.unwrap_or((0, len.unwrap_or(u64::MAX)));
    let mut response = Response::new(fill.reader(start, end));
    match len {
        Some(size) => content_headers(&mut response, &fill.digest, &media_type, size, range),
        None => {
            let h = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&media_type) {
                h.insert(header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(fill.digest.as_str()) {
                h.insert(DOCKER_CONTENT_DIGEST, v);
            }
        }
    }
    Ok(Answer { response, outcome })
}

// ---------------------------------------------------------------------------------------------
// Manifests by tag.

async fn by_tag(ctx: &mut Ctx, repo: &str, tag: &str) -> Step<Answer> {
    let app = ctx.app.clone();
    let key = tag_key(&ctx.reg, repo, tag, &ctx.headers);
    let k = key.clone();
    let known = app
        .cache
        .with_index(move |i| i.tag(&k))
        .await
        .map_err(internal)?;
    let known = known.and_then(|t| Digest::parse(&t.digest).map(|d| (d, t)));

    // Recently revalidated and this credential is known good: no upstream request at all.
    if let Some((digest, t)) = &known {
        let ttl = app.settings.tag_ttl.as_secs();
        let fresh = ttl > 0 && now_secs().saturating_sub(t.validated_at) < ttl;
        if fresh && app.grants.fresh(&ctx.reg, repo, ctx.cred) {
            if let Some(answer) = cached(ctx, digest, Outcome::Hit).await? {
                return Ok(answer);
            }
        }
    }

    let path = format!("/v2/{repo}/manifests/{tag}");
    let uri = upstream_uri(&ctx.registry, &path)?;
    match send_head(ctx, uri, repo).await {
        Ok((status, headers)) if status.is_success() => {
            app.grant(&ctx.registry, repo, ctx.cred, &path);
            let digest = headers
                .get(&DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(Digest::parse);
            let Some(digest) = digest else {
                // A registry that does not name the digest: nothing we can cache safely.
                return pass_bodyless(ctx).await;
            };
            let media_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let entry = TagEntry {
                digest: digest.to_string(),
                media_type,
                validated_at: now_secs(),
            };
            if let Err(e) = app.cache.with_index(move |i| i.put_tag(&key, &entry)).await {
                tracing::warn!(error = %e, "cannot remember a tag");
            }
            if let Some(answer) = cached(ctx, &digest, Outcome::Revalidated).await? {
                return Ok(answer);
            }
            if ctx.method == Method::HEAD {
                let mut response = Response::new(body::empty());
                for (name, v) in &headers {
                    response.headers_mut().append(name.clone(), v.clone());
                }
                strip_hop_by_hop(response.headers_mut());
                return Ok(Answer {
                    response,
                    outcome: Outcome::Pass,
                });
            }
            let uri = upstream_uri(&ctx.registry, &format!("/v2/{repo}/manifests/{digest}"))?;
            fill(ctx, repo, &digest, Kind::Manifest, uri).await
        }
        Ok((status, headers)) if !is_unavailable(status) => Err(refusal(ctx, status, &headers)),
        failed => {
            let reason = match &failed {
                Ok((status, _)) => format!("upstream answered {status}"),
                Err(e) => e.to_string(),
            };
            if let Some((digest, _)) = &known {
                let allowed = app.grants.held(&ctx.reg, repo, ctx.cred)
                    || app.is_public(&ctx.reg, repo).await;
                if allowed {
                    if let Some(mut answer) = cached(ctx, digest, Outcome::Stale).await? {
                        tracing::warn!(registry = %ctx.reg, repo, tag, %reason, "serving a stale tag");
                        let warning =
                            format!("110 pullcache \"stale: {}\"", reason.replace('"', "'"));
                        if let Ok(v) = HeaderValue::from_str(&warning) {
                            answer.response.headers_mut().insert(header::WARNING, v);
                        }
                        return Ok(answer);
                    }
                }
            }
            Err(match failed {
                Ok((status, headers)) => refusal(ctx, status, &headers),
                Err(e) => e.into(),
            })
        }
    }
}

/// Serves `digest` from cache if it is there.
async fn cached(ctx: &Ctx, digest: &Digest, outcome: Outcome) -> Step<Option<Answer>> {
    match ctx.app.cache.lookup(digest).await.map_err(internal)? {
        Some(hit) => serve_hit(ctx, digest, hit, outcome).await,
        None => Ok(None),
    }
}

/// Tags resolve differently per `Accept` (old clients get schema 2, new ones an OCI index).
fn tag_key(registry: &str, repo: &str, tag: &str, headers: &HeaderMap) -> String {
    let mut accept = crate::upstream::header_tokens(headers, header::ACCEPT);
    accept.sort();
    accept.dedup();
    format!("{registry}\0{repo}\0{tag}\0{}", accept.join(","))
}

// ---------------------------------------------------------------------------------------------
// The /v2/ ping and everything else.

async fn ping(ctx: &mut Ctx) -> Step<Answer> {
    let uri = upstream_uri(&ctx.registry, "/v2/")?;
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(body::empty())
        .map_err(|e| internal(e.to_string()))?;
    *req.headers_mut() = ctx.headers.clone();
    crate::upstream::set_host(&mut req);
    let app = ctx.app.clone();
    let reg = ctx.reg.clone();
    match app.upstream.send(req).await {
        Ok(resp) if !is_unavailable(resp.status()) => {
            ctx.upstream_status = Some(resp.status().as_u16());
            if matches!(resp.status().as_u16(), 200 | 401) {
                let challenge = Challenge {
                    status: resp.status().as_u16(),
                    www_authenticate: resp
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from),
                };
                let r = reg.clone();
                if let Err(e) = app
                    .cache
                    .with_index(move |i| i.put_challenge(&r, &challenge))
                    .await
                {
                    tracing::warn!(error = %e, "cannot remember the registry's challenge");
                }
            }
            Ok(forwarded(resp))
        }
        failed => {
            let r = reg.clone();
            let last = app
                .cache
                .with_index(move |i| i.challenge(&r))
                .await
                .map_err(internal)?;
            match (last, failed) {
                (Some(c), _) => {
                    let mut response = Response::new(body::full(Bytes::from_static(b"{}\n")));
                    *response.status_mut() =
                        StatusCode::from_u16(c.status).unwrap_or(StatusCode::UNAUTHORIZED);
                    let h = response.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    h.insert(
                        "docker-distribution-api-version",
                        HeaderValue::from_static("registry/2.0"),
                    );
                    if let Some(v) = c
                        .www_authenticate
                        .and_then(|v| HeaderValue::from_str(&v).ok())
                    {
                        h.insert(header::WWW_AUTHENTICATE, v);
                    }
                    Ok(Answer {
                        response,
                        outcome: Outcome::Stale,
                    })
                }
                (None, Ok(resp)) => Ok(forwarded(resp)),
                (None, Err(e)) => Err(e.into()),
            }
        }
    }
}

/// Forwards the request unchanged (uploads, tag lists, catalog, referrers, DELETE, …).
async fn pass(ctx: &mut Ctx, mut req: Request<Body>) -> Step<Answer> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    *req.uri_mut() = upstream_uri(&ctx.registry, &pq)?;
    crate::upstream::set_host(&mut req);
    let is_manifest_get = req.method() == Method::GET && req.uri().path().contains("/manifests/");
    let resp = ctx.app.upstream.send(req).await?;
    ctx.upstream_status = Some(resp.status().as_u16());
    if let Some(repo) = ctx.route.repo() {
        ctx.app
            .stats
            .upstream_response(&ctx.reg, repo, resp.headers(), is_manifest_get);
        if resp.status().is_success() {
            ctx.app.grants.grant(&ctx.reg, repo, ctx.cred);
        }
    }
    Ok(forwarded(resp))
}

/// Forwards this GET or HEAD upstream without caching, following redirects (a blob on a CDN)
/// inside pullcache so the client sees the object's own headers, never the redirect. Used for
/// a HEAD that missed the cache (it stays a HEAD: never a counted GET) and for GETs the cache
/// cannot store (disk full).
async fn pass_following(ctx: &mut Ctx, repo: &str, digest: &Digest) -> Step<Answer> {
    let uri = upstream_uri(&ctx.registry, &route_path(&ctx.route, repo))?;
    let mut headers = forwarded_headers(&ctx.headers);
    if let Some(range) = ctx.headers.get(header::RANGE) {
        headers.insert(header::RANGE, range.clone());
    }
    let resp = ctx
        .app
        .upstream
        .fetch_following(ctx.method.clone(), uri, &headers)
        .await?;
    ctx.upstream_status = Some(resp.status().as_u16());
    if ctx.method == Method::HEAD {
        ctx.app.stats.upstream_head(&ctx.reg, repo, resp.headers());
    } else {
        let manifest = !matches!(ctx.route, Route::Blob { .. });
        ctx.app
            .stats
            .upstream_response(&ctx.reg, repo, resp.headers(), manifest);
    }
    let mut answer = forwarded(resp);
    if answer.response.status().is_success() {
        if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
            answer
                .response
                .headers_mut()
                .insert(DOCKER_CONTENT_DIGEST, v);
        }
    }
    Ok(answer)
}

/// Forwards this GET/HEAD (no request body) unchanged.
async fn pass_bodyless(ctx: &mut Ctx) -> Step<Answer> {
    let repo = ctx.route.repo().unwrap_or_default().to_string();
    let path = route_path(&ctx.route, &repo);
    let mut req = Request::builder()
        .method(ctx.method.clone())
        .uri(upstream_uri(&ctx.registry, &path)?)
        .body(body::empty())
        .map_err(|e| internal(e.to_string()))?;
    *req.headers_mut() = ctx.headers.clone();
    pass(ctx, req).await
}

fn forwarded(resp: Response<Incoming>) -> Answer {
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Answer {
        response: Response::from_parts(parts, body::incoming(incoming)),
        outcome: Outcome::Pass,
    }
}

fn upstream_uri(registry: &HostPort, path_and_query: &str) -> Result<Uri, Answer> {
    format!("https://{registry}{path_and_query}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| ProxyError::BadRequest(e.to_string()).into())
}

fn internal(e: impl std::fmt::Display) -> Answer {
    ProxyError::Internal(e.to_string()).into()
}

// ---------------------------------------------------------------------------------------------
// Record: X-Cache, counters, the per-request log line.

fn record(ctx: Ctx, answer: Answer) -> Response<Body> {
    let Answer {
        mut response,
        outcome,
    } = answer;
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    let status = response.status().as_u16();
    // hyper stops polling a body once Content-Length bytes are out, so "ended" alone
    // under-reports complete responses.
    let expected = match ctx.method {
        Method::HEAD => Some(0),
        _ => response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
    };
    let (parts, inner) = response.into_parts();
    let recorder = Recorder {
        app: ctx.app,
        client: ctx.peer,
        registry: ctx.reg,
        repo: ctx.route.repo().map(String::from),
        kind: ctx.route.kind(),
        reference: ctx.route.reference().map(String::from),
        method: ctx.method,
        status,
        upstream_status: ctx.upstream_status,
        outcome,
        start: ctx.start,
    };
    Response::from_parts(
        parts,
        crate::body::metered(inner, move |bytes, ended| {
            let complete = ended || expected == Some(bytes);
            recorder.done(bytes, complete)
        }),
    )
}

struct Recorder {
    app: Arc<App>,
    client: SocketAddr,
    registry: String,
    repo: Option<String>,
    kind: &'static str,
    reference: Option<String>,
    method: Method,
    status: u16,
    upstream_status: Option<u16>,
    outcome: Outcome,
    start: Instant,
}

impl Recorder {
    fn done(self, bytes: u64, complete: bool) {
        let duration = self.start.elapsed();
        tracing::info!(
            client = %self.client,
            registry = %self.registry,
            repo = self.repo.as_deref().unwrap_or("-"),
            kind = self.kind,
            reference = self.reference.as_deref().unwrap_or("-"),
            method = %self.method,
            status = self.status,
            cache = self.outcome.as_str(),
            bytes,
            complete,
            dur_ms = duration.as_millis() as u64,
            upstream_status = self.upstream_status.unwrap_or(0),
            "request"
        );
        // Counters, duration histogram, per-minute history and the recent-requests ring.
        self.app.stats.completed(crate::stats::Completed {
            at: std::time::SystemTime::now(),
            client: self.client,
            registry: self.registry,
            repo: self.repo,
            kind: self.kind,
            reference: self.reference,
            method: self.method.to_string(),
            status: self.status,
            outcome: self.outcome,
            upstream_status: self.upstream_status,
            bytes,
            complete,
            duration,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("bytes=0-")), 10), Ok(Some((0, 10))));
        assert_eq!(parse_range(Some(&hv("bytes=4-")), 10), Ok(Some((4, 10))));
        assert_eq!(parse_range(Some(&hv("bytes=2-5")), 10), Ok(Some((2, 6))));
        assert_eq!(parse_range(Some(&hv("bytes=2-500")), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some(&hv("bytes=-3")), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some(&hv("bytes=0-1,4-5")), 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("items=0-1")), 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("bytes=10-")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=5-2")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=x-")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=-0")), 10), Err(()));
    }

    #[test]
    fn tag_keys_normalise_accept() {
        let mut a = HeaderMap::new();
        a.append(header::ACCEPT, hv("application/b, application/a"));
        let mut b = HeaderMap::new();
        b.append(header::ACCEPT, hv("application/a"));
        b.append(header::ACCEPT, hv("Application/B"));
        assert_eq!(tag_key("r", "x", "t", &a), tag_key("r", "x", "t", &b));
        assert_ne!(tag_key("r", "x", "t", &a), tag_key("r", "x", "u", &a));
    }

    #[test]
    fn forwarded_headers_keep_credentials_and_default_accept() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, hv("Bearer t"));
        h.insert(header::RANGE, hv("bytes=1-"));
        h.insert(header::COOKIE, hv("c=1"));
        let out = forwarded_headers(&h);
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer t");
        assert!(out.get(header::RANGE).is_none());
        assert!(out.get(header::COOKIE).is_none());
        assert!(out.get(header::ACCEPT).is_some());
    }
}
