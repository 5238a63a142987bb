//! The admin port (loopback by default): what the cache served and saved, what it holds, and a
//! way to purge it. Documented for users in `docs/admin-api.md`.
//!
//! - [`api`]: the JSON API under `/api/`;
//! - [`metrics`]: `GET /metrics` in the Prometheus text format;
//! - [`dashboard`]: `GET /`, a page that refreshes itself from the API; its script and style
//!   are compiled into the binary, so it works without any network beyond the admin port.
//!
//! Plus `GET /healthz` (alive), `GET /readyz` (index, cache directory, CA) and `GET /ca.crt`.
//!
//! With `--admin-token`, every request needs `Authorization: Bearer <token>` except the
//! dashboard's static files, which carry no data: a browser cannot attach a header to a page
//! load, so the page's script takes the token from the URL fragment (never sent to a server)
//! and sends it with each API call.
//!
//! Every error is JSON, `{"error": "…"}`: 400 for a bad parameter, 401, 404 for an unknown
//! path or digest, 405, 500. Nothing here blocks a runtime thread: index reads run on the
//! blocking pool, and the cache-size scan is shared by requests for [`CACHE_SUMMARY_TTL`].

pub mod api;
pub mod dashboard;
pub mod metrics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::cache::index::{Index, Kind};
use crate::cache::CacheError;
use crate::config::AdminToken;
use crate::server::App;

/// Simultaneous admin connections; further ones wait in the kernel backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long one scan of the index for the cache's size is reused.
pub const CACHE_SUMMARY_TTL: Duration = Duration::from_secs(1);

/// Accepts admin connections until shutdown (at most [`MAX_ADMIN_CONNECTIONS`] at once).
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let admin = Arc::new(Admin::new(app.clone()));
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        app.tasks.spawn(async move {
            let svc_admin = admin.clone();
            let service = service_fn(move |req| {
                let admin = svc_admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            crate::listener::serve_http1(&admin.app, TokioIo::new(stream), service, "admin").await;
            drop(permit);
        });
    }
}

/// State of the admin port.
pub struct Admin {
    pub(crate) app: Arc<App>,
    /// The last cache-size scan and when it finished; the lock makes concurrent requests
    /// share one scan.
    summary: tokio::sync::Mutex<Option<(Instant, CacheSummary)>>,
}

/// How many objects the cache holds and their total size, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSummary {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub manifests: u64,
    pub manifest_bytes: u64,
}

impl CacheSummary {
    pub fn entries(&self) -> u64 {
        self.blobs + self.manifests
    }

    pub fn bytes(&self) -> u64 {
        self.blob_bytes + self.manifest_bytes
    }

    /// Walks every index entry. Blocking: call it on the blocking pool.
    fn scan(index: &Index) -> CacheSummary {
        let mut s = CacheSummary::default();
        for (_, e) in index.entries() {
            match e.kind {
                Kind::Blob => {
                    s.blobs += 1;
                    s.blob_bytes += e.size;
                }
                Kind::Manifest => {
                    s.manifests += 1;
                    s.manifest_bytes += e.size;
                }
            }
        }
        s
    }
}

impl Admin {
    pub fn new(app: Arc<App>) -> Admin {
        Admin {
            app,
            summary: tokio::sync::Mutex::new(None),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let is_read = matches!(*req.method(), Method::GET | Method::HEAD);
        let mut resp = match dashboard::asset(req.uri().path()) {
            Some(asset) if is_read => dashboard::response(asset),
            _ if !self.authorized(req.headers()) => ApiError::unauthorized().into_response(),
            _ => match self.route(req).await {
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            },
        };
        let h = resp.headers_mut();
        h.entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        resp
    }

    /// True when no token is configured, or the request carries it as a bearer token.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.app.settings.admin_token else {
            return true;
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        presented.is_some_and(|p| token_matches(token, p))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path();
        let query = req.uri().query();
        match path {
            "/healthz" => {
                allow(&method, &[Method::GET])?;
                Ok(text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"))
            }
            "/readyz" => {
                allow(&method, &[Method::GET])?;
                Ok(self.readiness().await)
            }
            "/ca.crt" => {
                allow(&method, &[Method::GET])?;
                Ok(text(
                    StatusCode::OK,
                    "application/x-pem-file",
                    self.app.ca.cert_pem().to_string(),
                ))
            }
            "/metrics" => {
                allow(&method, &[Method::GET])?;
                Query::parse(query)?.finish()?;
                let input = metrics::Input::gather(&self.app, self.cache_summary().await?);
                Ok(text(StatusCode::OK, metrics::CONTENT_TYPE, input.render()))
            }
            p if p.starts_with("/api/") => api::route(self, &method, p, query).await,
            _ => Err(ApiError::not_found(format!("no such endpoint: {path}"))),
        }
    }

    async fn readiness(&self) -> Response<Body> {
        let index_ok = self.app.cache.with_index(|i| i.challenge("")).await.is_ok();
        // A name of its own, so concurrent probes do not remove each other's file.
        let probe = self
            .app
            .settings
            .cache_dir
            .join("tmp")
            .join(format!(".readyz-{:016x}", rand::random::<u64>()));
        let writable = tokio::fs::write(&probe, b"ok").await.is_ok()
            && tokio::fs::remove_file(&probe).await.is_ok();
        let ready = index_ok && writable;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({"ready": ready, "index": index_ok, "cache_dir_writable": writable, "ca": true}),
        )
    }

    /// The cache's size, from a scan at most [`CACHE_SUMMARY_TTL`] old.
    pub async fn cache_summary(&self) -> Result<CacheSummary, ApiError> {
        let mut slot = self.summary.lock().await;
        if let Some((at, s)) = &*slot {
            if at.elapsed() < CACHE_SUMMARY_TTL {
                return Ok(*s);
            }
        }
        let s = self
            .app
            .cache
            .with_index(|i| Ok(CacheSummary::scan(i)))
            .await?;
        *slot = Some((Instant::now(), s));
        Ok(s)
    }

    /// Forgets the last scan (after a purge, so the next answer shows it).
    async fn invalidate_summary(&self) {
        *self.summary.lock().await = None;
    }
}

/// Compares SHA-256 hashes of the two, so the time taken says nothing about the token.
fn token_matches(token: &AdminToken, presented: &str) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `Ok` if `method` is one of `allowed` (`HEAD` goes wherever `GET` does), else 405.
fn allow(method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
    let ok = allowed
        .iter()
        .any(|m| m == method || (*m == Method::GET && *method == Method::HEAD));
    if ok {
        return Ok(());
    }
    let mut names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    if allowed.contains(&Method::GET) {
        names.push("HEAD");
    }
    Err(ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed here"),
        allow: Some(names.join(", ")),
    })
}

/// An answer other than success: its status and a message for the JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    allow: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this admin API needs Authorization: Bearer <token> (see --admin-token)",
        )
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = json_response(self.status, &json!({ "error": self.message }));
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            resp.headers_mut().insert(header::ALLOW, allow);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pullcache-admin\""),
            );
        }
        resp
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> ApiError {
        tracing::error!(error = %e, "admin API: cache index failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cache index failed: {e}"),
        )
    }
}

/// The parameters of a query string, each taken by name; [`Query::finish`] rejects the rest.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes `a=1&b=x%20y`. Malformed escapes and repeated names are a 400.
    pub fn parse(query: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = percent_decode(k)?;
            let v = percent_decode(v)?;
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(ApiError::bad_request(format!(
                    "parameter {k:?} is given more than once"
                )));
            }
            pairs.push((k, v));
        }
        Ok(Query { pairs })
    }

    /// The value of `name`, removed from the query; `None` when absent or empty.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let i = self.pairs.iter().position(|(k, _)| k == name)?;
        let (_, v) = self.pairs.remove(i);
        (!v.is_empty()).then_some(v)
    }

    /// `name` as an integer in `1..=max`, or `default` when absent.
    pub fn take_limit(
        &mut self,
        name: &str,
        default: usize,
        max: usize,
    ) -> Result<usize, ApiError> {
        match self.take(name) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(format!(
                    "{name}: expected an integer from 1 to {max}, got {v:?}"
                ))),
            },
        }
    }

    /// `name` as one of `choices`, or `None` when absent.
    pub fn take_choice(
        &mut self,
        name: &str,
        choices: &[&'static str],
    ) -> Result<Option<&'static str>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => choices
                .iter()
                .find(|c| **c == v)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{name}: expected one of {}, got {v:?}",
                        choices.join(", ")
                    ))
                }),
        }
    }

    /// Fails on any parameter nobody took: a typo should not silently mean "no filter".
    pub fn finish(self) -> Result<(), ApiError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((k, _)) => Err(ApiError::bad_request(format!("unknown parameter {k:?}"))),
        }
    }
}

/// Decodes `%XX` escapes and `+` (a space in query strings).
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("malformed percent-encoding in {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", format!("{value:#}\n"))
}

pub(crate) fn text(
    status: StatusCode,
    ctype: &'static str,
    body_text: impl Into<bytes::Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(body::full(body_text));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded_taken_and_checked() {
        let mut q = Query::parse(Some("repo=library%2Falpine&limit=5&kind=blob&x=")).unwrap();
        assert_eq!(q.take("repo").as_deref(), Some("library/alpine"));
        assert_eq!(q.take_limit("limit", 10, 100).unwrap(), 5);
        assert_eq!(
            q.take_choice("kind", &["blob", "manifest"]).unwrap(),
            Some("blob")
        );
        assert_eq!(q.take("x"), None);
        q.finish().unwrap();

        let mut q = Query::parse(Some("limit=0")).unwrap();
        assert_eq!(
            q.take_limit("limit", 10, 100).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let mut q = Query::parse(Some("limit=101")).unwrap();
        assert!(q.take_limit("limit", 10, 100).is_err());
        let mut q = Query::parse(Some("sort=name")).unwrap();
        assert!(q.take_choice("sort", &["size"]).is_err());
        assert!(Query::parse(Some("a=1&a=2")).is_err());
        assert!(Query::parse(Some("a=%zz")).is_err());
        assert!(Query::parse(Some("a=%4")).is_err());
        assert!(Query::parse(Some("lmit=3")).unwrap().finish().is_err());
        assert_eq!(
            Query::parse(None)
                .unwrap()
                .take_limit("limit", 7, 9)
                .unwrap(),
            7
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a+b%3Ac").unwrap(), "a b:c");
        assert_eq!(percent_decode("sha256%3aab").unwrap(), "sha256:ab");
        assert!(percent_decode("%ff%fe").is_err());
    }

    #[test]
    fn tokens_compare_exactly() {
        let t = AdminToken::parse("s3cret").unwrap().unwrap();
        assert!(token_matches(&t, "s3cret"));
        assert!(!token_matches(&t, "s3cre"));
        assert!(!token_matches(&t, "s3cret2"));
    }

    #[test]
    fn get_also_allows_head_and_405_names_the_methods() {
        assert!(allow(&Method::HEAD, &[Method::GET]).is_ok());
        let e = allow(&Method::POST, &[Method::GET, Method::DELETE]).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e.allow.as_deref(), Some("GET, DELETE, HEAD"));
    }
}
