//! Everything pullcache sends outward: TCP dialing (honouring `--connect-to`), verified TLS to
//! upstream registries and CDNs, a pooled HTTP/1.1 client, and redirect following.
//!
//! Invariants: a `--connect-to` mapping changes only the address dialed, never the name used for
//! SNI and certificate checks; `Authorization` is never sent to a host other than the one it was
//! given for (redirects to CDNs drop it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::body::{self, Body};
use crate::config::{HostPort, Settings};
use crate::error::ProxyError;

/// How many redirects a blob fetch may follow (Docker Hub uses one, to its CDN).
pub const MAX_REDIRECTS: usize = 5;
/// Idle upstream connections kept per host.
pub const POOL_MAX_IDLE_PER_HOST: usize = 32;
pub const POOL_IDLE_TIMEOUT_SECS: u64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamInitError {
    #[error("cannot read upstream CA {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
}

/// Dials upstream hosts, the same way for proxied requests and for blind tunnels.
#[derive(Clone)]
pub struct Dialer {
    connect_to: Arc<HashMap<HostPort, SocketAddr>>,
    timeout: Duration,
}

impl Dialer {
    pub fn new(settings: &Settings) -> Dialer {
        Dialer {
            connect_to: Arc::new(settings.connect_to.clone()),
            timeout: settings.connect_timeout,
        }
    }

    /// Opens a TCP connection to `target`, through its `--connect-to` mapping if it has one.
    pub async fn dial(&self, target: &HostPort) -> Result<TcpStream, ProxyError> {
        let unreachable = |reason: String| ProxyError::Unreachable {
            host: target.to_string(),
            reason,
        };
        let work = async {
            let addrs: Vec<SocketAddr> = match self.connect_to.get(target) {
                Some(addr) => vec![*addr],
                None => tokio::net::lookup_host((target.host.as_str(), target.port))
                    .await
                    .map_err(|e| unreachable(format!("name lookup failed: {e}")))?
                    .collect(),
            };
            let mut last = String::from("no addresses");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            Err(unreachable(last))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| unreachable(format!("connect timed out after {:?}", self.timeout)))?
    }
}

/// The hyper connector: TCP via [`Dialer`], then TLS for `https` URIs.
#[derive(Clone)]
pub struct Connector {
    dialer: Dialer,
    tls: TlsConnector,
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Our connector errors carry a [`ProxyError`] so the client error can be mapped back.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct ConnectError(ProxyError);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (target, tls) = target_of(&uri).map_err(ConnectError)?;
            let tcp = this.dialer.dial(&target).await.map_err(ConnectError)?;
            if !tls {
                return Ok(TokioIo::new(UpstreamStream::Plain(tcp)));
            }
            let name = ServerName::try_from(target.host.clone()).map_err(|e| {
                ConnectError(ProxyError::UpstreamTls {
                    host: target.to_string(),
                    reason: e.to_string(),
                })
            })?;
            let handshake = this.tls.connect(name, tcp);
            let stream = tokio::time::timeout(this.dialer.timeout, handshake)
                .await
                .map_err(|_| {
                    ConnectError(ProxyError::UpstreamTimeout {
                        host: target.to_string(),
                    })
                })?
                .map_err(|e| {
                    ConnectError(ProxyError::UpstreamTls {
                        host: target.to_string(),
                        reason: e.to_string(),
                    })
                })?;
            Ok(TokioIo::new(UpstreamStream::Tls(Box::new(stream))))
        })
    }
}

/// The host:port a URI points at, and whether it wants TLS.
fn target_of(uri: &Uri) -> Result<(HostPort, bool), ProxyError> {
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported scheme {other:?}"
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| ProxyError::BadRequest(format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((HostPort { host, port }, tls))
}

/// Builds the rustls client config: system roots plus every `--upstream-ca`.
fn client_tls(extra: &[PathBuf]) -> Result<rustls::ClientConfig, UpstreamInitError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(error = %err, "skipping an unreadable system root");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "loaded system roots");
    for path in extra {
        let err = |reason: String| UpstreamInitError::Ca {
            path: path.clone(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificates in file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamInitError::Ca {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The pooled upstream client shared by every request.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Body>,
    pub dialer: Dialer,
    header_timeout: Duration,
}

impl Upstream {
    pub fn new(settings: &Settings) -> Result<Upstream, UpstreamInitError> {
        let dialer = Dialer::new(settings);
        let connector = Connector {
            dialer: dialer.clone(),
            tls: TlsConnector::from(Arc::new(client_tls(&settings.upstream_ca)?)),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(POOL_IDLE_TIMEOUT_SECS))
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        Ok(Upstream {
            client,
            dialer,
            header_timeout: settings.upstream_header_timeout,
        })
    }

    /// Sends one request and waits (bounded) for the response head. The URI must be absolute.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let host = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match tokio::time::timeout(self.header_timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout { host }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(map_client_error(&host, e)),
        }
    }

    /// GET/HEAD `uri`, following redirects inside pullcache. `Authorization` is sent only to the
    /// original host. Returns the final response and the URI that produced it.
    pub async fn fetch_following(
        &self,
        method: Method,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, ProxyError> {
        let origin = uri.authority().cloned();
        let mut uri = uri;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(body::empty())
                .map_err(|e| ProxyError::Internal(e.to_string()))?;
            let same_origin = uri.authority() == origin.as_ref();
            for (name, value) in headers {
                if name == header::AUTHORIZATION && !same_origin {
                    continue;
                }
                req.headers_mut().append(name.clone(), value.clone());
            }
            set_host(&mut req);
            let resp = self.send(req).await?;
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| bad_upstream(&uri, "redirect without Location"))?;
            uri = resolve_location(&uri, next).ok_or_else(|| bad_upstream(&uri, "bad Location"))?;
            tracing::debug!(to = %redact(&uri), "following redirect");
        }
        Err(bad_upstream(&uri, "too many redirects"))
    }
}

fn bad_upstream(uri: &Uri, reason: &str) -> ProxyError {
    ProxyError::BadUpstream {
        host: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
        reason: reason.into(),
    }
}

pub fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Resolves a `Location` against the URI it came from. Only http(s) targets are followed.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("https://") || location.starts_with("http://") {
        return location.parse().ok();
    }
    if location.starts_with("//") {
        return format!("{}:{location}", base.scheme_str()?).parse().ok();
    }
    if location.starts_with('/') {
        return format!("{}://{}{location}", base.scheme_str()?, base.authority()?)
            .parse()
            .ok();
    }
    None
}

/// A URI safe to log: presigned CDN URLs carry credentials in their query.
pub fn redact(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map(|a| a.as_str()).unwrap_or("?"),
        uri.path()
    )
}

/// Sets `Host` from the request URI's authority (without a default port).
pub fn set_host(req: &mut Request<Body>) {
    if let Some(authority) = req.uri().authority() {
        let default = matches!(
            (req.uri().scheme_str(), authority.port_u16()),
            (Some("https"), Some(443)) | (Some("http"), Some(80))
        );
        let value = if default {
            authority.host().to_string()
        } else {
            authority.to_string()
        };
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

fn map_client_error(host: &str, err: hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(ConnectError(inner)) = e.downcast_ref::<ConnectError>() {
            return match inner {
                ProxyError::Unreachable { host, reason } => ProxyError::Unreachable {
                    host: host.clone(),
                    reason: reason.clone(),
                },
                ProxyError::UpstreamTls { host, reason } => ProxyError::UpstreamTls {
                    host: host.clone(),
                    reason: reason.clone(),
                },
                ProxyError::UpstreamTimeout { host } => {
                    ProxyError::UpstreamTimeout { host: host.clone() }
                }
                other => ProxyError::BadUpstream {
                    host: host.to_string(),
                    reason: other.to_string(),
                },
            };
        }
        source = e.source();
    }
    let reason = match std::error::Error::source(&err) {
        Some(s) => format!("{err}: {s}"),
        None => err.to_string(),
    };
    ProxyError::BadUpstream {
        host: host.to_string(),
        reason,
    }
}

/// Headers that describe one connection hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The comma-separated tokens of every `name` header, trimmed and lower-cased.
pub fn header_tokens(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Removes hop-by-hop headers, including every header named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = header_tokens(headers, header::CONNECTION);
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_named_ones_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic abc".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn locations_resolve_against_their_origin() {
        let base: Uri = "https://reg.example/v2/a/blobs/sha256:1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "https://cdn.example/x?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            resolve_location(&base, "/other").unwrap().to_string(),
            "https://reg.example/other"
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/y")
                .unwrap()
                .to_string(),
            "https://cdn.example/y"
        );
        assert!(resolve_location(&base, "ftp://x/y").is_none());
        assert!(resolve_location(&base, "relative").is_none());
    }

    #[test]
    fn redact_drops_the_query() {
        let uri: Uri = "https://cdn.example/blob?X-Amz-Signature=secret"
            .parse()
            .unwrap();
        assert_eq!(redact(&uri), "https://cdn.example/blob");
    }

    #[test]
    fn targets() {
        let (t, tls) = target_of(&"https://Reg.Example/v2/".parse().unwrap()).unwrap();
        assert_eq!((t.host.as_str(), t.port, tls), ("reg.example", 443, true));
        let (t, tls) = target_of(&"http://[::1]:8080/".parse().unwrap()).unwrap();
        assert_eq!((t.host.as_str(), t.port, tls), ("::1", 8080, false));
    }
}
