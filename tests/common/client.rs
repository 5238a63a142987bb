//! Clients that reach upstreams through pullcache the way registry clients do: TCP to the
//! proxy, `CONNECT host:443`, TLS inside the tunnel (trusting exactly one CA), then HTTP/1.1
//! with keep-alive over hyper's client connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::body::{empty, next_chunk, Body};
use super::hub::{FakeHub, Image, ACCEPT_MANIFESTS, REGISTRY};
use super::pullcache::Pullcache;
use super::tls::client_config_trusting;
use super::{within, LONG, SHORT};

// ----- raw HTTP/1 ---------------------------------------------------------------------------

/// A response head (and, where read, its body) parsed from raw bytes.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response head byte by byte, so nothing after it is consumed. `Ok(None)` if the
/// peer closed before sending anything.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<RawResponse>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "closed inside a response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.push(byte[0]);
        if buf.len() > 256 * 1024 {
            return Err(io::Error::other("response head too large"));
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::other(format!(
            "not an HTTP response: {status_line:?}"
        )));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line: {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(RawResponse {
        status,
        reason,
        headers,
        body: Vec::new(),
    }))
}

/// Reads the body of `resp` from `s`: `Content-Length` bytes, or until EOF (bounded).
async fn read_raw_body<S: AsyncRead + Unpin>(s: &mut S, resp: &mut RawResponse) {
    let limit = 1024 * 1024;
    match resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) => {
            let mut body = vec![0u8; n.min(limit)];
            if s.read_exact(&mut body).await.is_ok() {
                resp.body = body;
            }
        }
        None => {
            let mut body = Vec::new();
            let _ = tokio::time::timeout(SHORT, s.take(limit as u64).read_to_end(&mut body)).await;
            resp.body = body;
        }
    }
}

/// Opens a tunnel: `CONNECT authority` to the proxy. `Ok` with the stream after a `200`;
/// `Err` with the proxy's full answer otherwise.
pub async fn connect(proxy: SocketAddr, authority: &str) -> Result<TcpStream, RawResponse> {
    let mut tcp = TcpStream::connect(proxy).await.expect("connect to proxy");
    let _ = tcp.set_nodelay(true);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .expect("send CONNECT to proxy");
    let head = within(SHORT, "CONNECT answer", read_head(&mut tcp))
        .await
        .unwrap_or_else(|e| panic!("reading the CONNECT answer for {authority}: {e}"))
        .unwrap_or_else(|| panic!("proxy closed the connection after CONNECT {authority}"));
    if head.status == 200 {
        return Ok(tcp);
    }
    let mut head = head;
    within(
        SHORT,
        "CONNECT error body",
        read_raw_body(&mut tcp, &mut head),
    )
    .await;
    Err(head)
}

/// [`connect`], failing the test unless the proxy answers `200`.
pub async fn connect_ok(proxy: SocketAddr, authority: &str) -> TcpStream {
    match connect(proxy, authority).await {
        Ok(s) => s,
        Err(r) => panic!(
            "CONNECT {authority} answered {} {}: {}",
            r.status,
            r.reason,
            r.body_text()
        ),
    }
}

/// How the proxy reacted to bytes sent on a fresh connection.
#[derive(Debug)]
pub enum RawOutcome {
    Response(RawResponse),
    /// Closed (or reset) without a response.
    Closed,
}

/// Sends `bytes` on a new connection to the proxy and reads whatever comes back first.
pub async fn raw_exchange(proxy: SocketAddr, bytes: &[u8]) -> RawOutcome {
    let mut tcp = TcpStream::connect(proxy).await.expect("connect to proxy");
    // The proxy may close before reading everything; what it answers is what matters.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.flush().await;
    match within(SHORT, "proxy reaction to raw bytes", read_head(&mut tcp)).await {
        Ok(Some(mut r)) => {
            let _ = tokio::time::timeout(SHORT, read_raw_body(&mut tcp, &mut r)).await;
            RawOutcome::Response(r)
        }
        Ok(None) => RawOutcome::Closed,
        Err(e) if e.kind() == io::ErrorKind::Other => {
            panic!("proxy answered something that is not HTTP: {e}")
        }
        Err(_) => RawOutcome::Closed,
    }
}

// ----- TLS ----------------------------------------------------------------------------------

/// TLS over `io` for `server_name`, verified with `config`.
pub async fn tls<IO>(
    io: IO,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::other(format!("bad server name {server_name}: {e}")))?;
    within(
        SHORT,
        "TLS handshake",
        TlsConnector::from(config).connect(name, io),
    )
    .await
}

/// The certificate chain the TLS peer presented.
pub fn peer_chain<IO>(s: &TlsStream<IO>) -> Vec<CertificateDer<'static>> {
    s.get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

// ----- HTTP/1.1 over any stream -------------------------------------------------------------

/// A hyper HTTP/1.1 client connection. Dropping it closes the connection.
pub struct Http1 {
    sender: SendRequest<Body>,
    task: JoinHandle<()>,
}

impl Drop for Http1 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Http1 {
    pub async fn handshake<IO>(io: IO) -> Http1
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = within(
            SHORT,
            "HTTP/1.1 handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(io)),
        )
        .await
        .expect("HTTP/1.1 client handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Http1 { sender, task }
    }

    /// Whether the connection can no longer carry requests.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.task.is_finished()
    }

    /// Sends `req` and returns the response with its body still streaming.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// Sends `req` and reads the whole response (bounded by [`LONG`]).
    pub async fn fetch(&mut self, req: Request<Body>) -> Resp {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = within(LONG, &what, self.send(req))
            .await
            .unwrap_or_else(|e| panic!("{what}: no response: {e:?}"));
        within(LONG, &what, Resp::read(resp)).await
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.fetch(request(Method::GET, host, path).body(empty()).unwrap())
            .await
    }
}

/// A request builder with the `Host` header set (hyper's low-level client adds none).
pub fn request(method: Method, host: &str, target: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", host)
        .header("user-agent", "pullcache-tests")
}

/// A response read to its end (or to the error that cut it).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Set when the body ended with a transport error instead of its end.
    pub body_error: Option<String>,
}

impl Resp {
    pub async fn read(resp: Response<Incoming>) -> Resp {
        let (parts, mut body) = resp.into_parts();
        let mut buf = Vec::new();
        let mut body_error = None;
        while let Some(next) = next_chunk(&mut body).await {
            match next {
                Ok(d) => buf.extend_from_slice(&d),
                Err(e) => {
                    body_error = Some(e.to_string());
                    break;
                }
            }
        }
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: Bytes::from(buf),
            body_error,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `X-Cache` header, or `""` when missing.
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// One line for failure messages.
    pub fn describe(&self) -> String {
        let mut body = self.text();
        body.truncate(300);
        format!(
            "{} x-cache={:?} len={} body_error={:?} body={:?}",
            self.status,
            self.x_cache(),
            self.body.len(),
            self.body_error,
            body
        )
    }
}

/// A tunnel to `host:443` through the proxy, with TLS trusting only pullcache's CA, carrying
/// HTTP/1.1.
pub async fn intercepted(proxy: SocketAddr, pullcache_ca_pem: &str, host: &str) -> Http1 {
    let tcp = connect_ok(proxy, &format!("{host}:443")).await;
    let tls = tls(tcp, host, client_config_trusting(pullcache_ca_pem))
        .await
        .unwrap_or_else(|e| panic!("TLS to {host} through pullcache (trusting its CA): {e}"));
    Http1::handshake(tls).await
}

/// A plain connection to the proxy itself, for origin-form and absolute-form requests.
pub async fn plain(proxy: SocketAddr) -> Http1 {
    let tcp = TcpStream::connect(proxy).await.expect("connect to proxy");
    Http1::handshake(tcp).await
}

// ----- registry client ----------------------------------------------------------------------

/// Parses `Bearer k="v",k2="v2"` into its parameters.
pub fn parse_challenge(header: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(k.trim().to_ascii_lowercase(), v.to_string());
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn pct_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a pull through the proxy answered, per request.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// `X-Cache` of `GET manifests/<tag>`.
    pub tag: String,
    /// `X-Cache` of `GET manifests/<digest>`.
    pub manifest: String,
    /// `X-Cache` of each blob GET, config first.
    pub blobs: Vec<String>,
}

/// A registry client like docker's: pings `/v2/`, follows the bearer challenge to the token
/// realm (through the proxy's blind tunnel, verifying the token host's own certificate),
/// caches one token per repository, and keeps one keep-alive connection to the registry.
pub struct RegistryClient {
    proxy: SocketAddr,
    registry_tls: Arc<ClientConfig>,
    auth_tls: Arc<ClientConfig>,
    credentials: Option<(String, String)>,
    conn: Option<Http1>,
    tokens: HashMap<String, String>,
    /// Registry connections opened so far.
    pub connections: usize,
}

impl RegistryClient {
    /// An anonymous client of `hub` behind `pc`.
    pub fn new(pc: &Pullcache, hub: &FakeHub) -> RegistryClient {
        RegistryClient {
            proxy: pc.proxy_addr(),
            registry_tls: client_config_trusting(&pc.ca_pem()),
            auth_tls: hub.ca().client_config(),
            credentials: None,
            conn: None,
            tokens: HashMap::new(),
            connections: 0,
        }
    }

    /// The same client logging in as `user` (Basic credentials at the token realm).
    pub fn with_credentials(mut self, user: &str, password: &str) -> RegistryClient {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    async fn open(&self) -> Http1 {
        let tcp = connect_ok(self.proxy, &format!("{REGISTRY}:443")).await;
        let tls = tls(tcp, REGISTRY, self.registry_tls.clone())
            .await
            .unwrap_or_else(|e| panic!("TLS to {REGISTRY} through pullcache: {e}"));
        Http1::handshake(tls).await
    }

    /// Sends a request on the keep-alive connection, reconnecting if the proxy closed it.
    async fn send(&mut self, method: Method, target: &str, headers: &[(&str, String)]) -> Resp {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.open().await);
            self.connections += 1;
        }
        let mut b = request(method.clone(), REGISTRY, target);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let req = b.body(empty()).unwrap();
        let what = format!("{method} {target}");
        let conn = self.conn.as_mut().unwrap();
        let resp = match within(LONG, &what, conn.send(req)).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                panic!("{what}: no response from pullcache: {e:?}");
            }
        };
        let resp = within(LONG, &what, Resp::read(resp)).await;
        if resp.body_error.is_some() {
            self.conn = None;
        }
        resp
    }

    /// `GET /v2/` without credentials.
    pub async fn ping(&mut self) -> Resp {
        self.send(Method::GET, "/v2/", &[]).await
    }

    /// The bearer token for pulling `repo`, fetched as docker does on first use.
    pub async fn token(&mut self, repo: &str) -> Option<String> {
        if let Some(t) = self.tokens.get(repo) {
            return Some(t.clone());
        }
        let ping = self.ping().await;
        if ping.status == StatusCode::OK {
            return None;
        }
        assert_eq!(
            ping.status,
            StatusCode::UNAUTHORIZED,
            "GET /v2/ through the proxy: {}",
            ping.describe()
        );
        let challenge = ping
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("401 without WWW-Authenticate: {}", ping.describe()))
            .to_string();
        let params = parse_challenge(&challenge)
            .unwrap_or_else(|| panic!("not a bearer challenge: {challenge}"));
        let token = self
            .fetch_token(&params["realm"], &params["service"], repo)
            .await;
        self.tokens.insert(repo.to_string(), token.clone());
        Some(token)
    }

    /// Fetches a pull token for `repo` from `realm` through the proxy's blind tunnel.
    pub async fn fetch_token(&self, realm: &str, service: &str, repo: &str) -> String {
        let rest = realm
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("realm is not https: {realm}"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.to_string()),
            None => (authority.to_string(), "443".to_string()),
        };
        let tcp = connect_ok(self.proxy, &format!("{host}:{port}")).await;
        let tls = tls(tcp, &host, self.auth_tls.clone())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "TLS to the token host {host} through the tunnel (trusting the test CA): {e}"
                )
            });
        let mut conn = Http1::handshake(tls).await;
        let target = format!(
            "{}?service={}&scope={}",
            if path.is_empty() { "/" } else { path },
            pct_encode(service),
            pct_encode(&format!("repository:{repo}:pull"))
        );
        let mut b = request(Method::GET, &host, &target);
        if let Some((u, p)) = &self.credentials {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            b = b.header("authorization", format!("Basic {basic}"));
        }
        let resp = conn.fetch(b.body(empty()).unwrap()).await;
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "token request {target}: {}",
            resp.describe()
        );
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("token JSON");
        json.get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .expect("token in token response")
            .to_string()
    }

    async fn auth_headers(&mut self, repo: &str) -> Vec<(&'static str, String)> {
        match self.token(repo).await {
            Some(t) => vec![("authorization", format!("Bearer {t}"))],
            None => vec![],
        }
    }

    /// A request for `/v2/<repo>/<rest>` with this client's token for `repo`.
    pub async fn repo_request(
        &mut self,
        method: Method,
        repo: &str,
        rest: &str,
        extra: &[(&'static str, String)],
    ) -> Resp {
        let mut headers = self.auth_headers(repo).await;
        headers.extend(extra.iter().cloned());
        self.send(method, &format!("/v2/{repo}/{rest}"), &headers)
            .await
    }

    pub async fn get_manifest(&mut self, repo: &str, reference: &str, accept: &str) -> Resp {
        self.repo_request(
            Method::GET,
            repo,
            &format!("manifests/{reference}"),
            &[("accept", accept.to_string())],
        )
        .await
    }

    pub async fn head_manifest(&mut self, repo: &str, reference: &str, accept: &str) -> Resp {
        self.repo_request(
            Method::HEAD,
            repo,
            &format!("manifests/{reference}"),
            &[("accept", accept.to_string())],
        )
        .await
    }

    pub async fn get_blob(&mut self, repo: &str, digest: &str, range: Option<&str>) -> Resp {
        let extra: Vec<(&'static str, String)> = range
            .map(|r| ("range", r.to_string()))
            .into_iter()
            .collect();
        self.repo_request(Method::GET, repo, &format!("blobs/{digest}"), &extra)
            .await
    }

    pub async fn head_blob(&mut self, repo: &str, digest: &str) -> Resp {
        self.repo_request(Method::HEAD, repo, &format!("blobs/{digest}"), &[])
            .await
    }

    /// A blob GET on a connection of its own, returning as soon as the response head is in:
    /// the test reads the body at its own pace, and dropping the stream closes the connection.
    pub async fn get_blob_stream(
        &mut self,
        repo: &str,
        digest: &str,
        range: Option<&str>,
    ) -> BlobStream {
        let headers = self.auth_headers(repo).await;
        let mut conn = self.open().await;
        let mut b = request(Method::GET, REGISTRY, &format!("/v2/{repo}/blobs/{digest}"));
        for (k, v) in headers {
            b = b.header(k, v);
        }
        if let Some(r) = range {
            b = b.header("range", r);
        }
        let resp = within(
            SHORT,
            "blob response head",
            conn.send(b.body(empty()).unwrap()),
        )
        .await
        .unwrap_or_else(|e| panic!("GET blob {digest}: no response: {e:?}"));
        let (parts, body) = resp.into_parts();
        BlobStream {
            status: parts.status,
            headers: parts.headers,
            body,
            _conn: conn,
        }
    }

    /// Pulls `img` like crane does: manifest by tag, manifest by digest, config, layers.
    /// Fails the test unless every answer is 200 with the exact bytes.
    pub async fn pull(&mut self, img: &Image) -> PullReport {
        let tag = self
            .get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS)
            .await;
        assert_manifest(&tag, img, &format!("{}:{}", img.repo, img.tag));
        let by_digest = self
            .get_manifest(&img.repo, &img.manifest_digest, ACCEPT_MANIFESTS)
            .await;
        assert_manifest(
            &by_digest,
            img,
            &format!("{}@{}", img.repo, img.manifest_digest),
        );
        let mut blobs = Vec::new();
        for (digest, data) in img.blobs() {
            let r = self.get_blob(&img.repo, &digest, None).await;
            assert_eq!(r.status, StatusCode::OK, "blob {digest}: {}", r.describe());
            assert!(
                r.body_error.is_none() && r.body.len() == data.len() && r.body == data,
                "blob {digest}: wrong bytes: {}",
                r.describe()
            );
            assert!(
                r.header("x-cache").is_some(),
                "blob {digest} without X-Cache"
            );
            blobs.push(r.x_cache().to_string());
        }
        PullReport {
            tag: tag.x_cache().to_string(),
            manifest: by_digest.x_cache().to_string(),
            blobs,
        }
    }
}

/// Fails the test unless `r` is `img`'s manifest, complete, with its digest and media type.
pub fn assert_manifest(r: &Resp, img: &Image, what: &str) {
    assert_eq!(
        r.status,
        StatusCode::OK,
        "manifest {what}: {}",
        r.describe()
    );
    assert!(
        r.body_error.is_none() && r.body == img.manifest,
        "manifest {what}: wrong bytes: {}",
        r.describe()
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest_digest.as_str()),
        "manifest {what}: Docker-Content-Digest"
    );
    assert_eq!(
        r.header("content-type"),
        Some(img.media_type.as_str()),
        "manifest {what}: Content-Type"
    );
    assert!(
        r.header("x-cache").is_some(),
        "manifest {what}: no X-Cache header"
    );
}

/// A blob response whose body the test reads itself.
pub struct BlobStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Incoming,
    _conn: Http1,
}

impl BlobStream {
    pub fn x_cache(&self) -> String {
        self.headers
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// The next data chunk; `None` at the end of the body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, hyper::Error>> {
        next_chunk(&mut self.body).await
    }

    /// Reads what remains of the body.
    pub async fn rest(&mut self) -> Result<Bytes, String> {
        let mut out = Vec::new();
        loop {
            match self.body.frame().await {
                None => return Ok(Bytes::from(out)),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        out.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
    }
}

/// HTTPS straight to a test server at `addr` (no proxy), verifying `name` with `config`.
pub async fn direct(addr: SocketAddr, name: &str, config: Arc<ClientConfig>) -> Http1 {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to test server");
    let s = tls(tcp, name, config)
        .await
        .unwrap_or_else(|e| panic!("TLS to {name} at {addr}: {e}"));
    Http1::handshake(s).await
}
