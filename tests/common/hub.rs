//! A fake Docker Hub: three HTTPS hosts with certificates from one [`TestCa`].
//!
//! - `registry-1.docker.io`: the distribution API. `/v2/` and unauthorised requests answer
//!   `401` with a bearer challenge; manifests by tag or digest (GET and HEAD) carry
//!   `Docker-Content-Digest`, `Content-Type`, `Content-Length` and the rate-limit headers
//!   (every manifest GET counts one pull); blob GETs and HEADs answer `307` to a signed,
//!   single-purpose URL on the CDN host.
//! - `auth.docker.io`: `GET /token?service=…&scope=repository:NAME:pull` issues opaque tokens.
//!   Anonymous tokens grant pull on public repositories; Basic `user:pass` also grants the
//!   private repositories that user may read. Wrong credentials answer `401`.
//! - `cdn.example.test`: serves blob bytes for signed URLs (with `Range`), and answers `401`
//!   to any request that carries `Authorization` — counted, because a proxy must never
//!   forward registry credentials to a CDN.
//!
//! Every request is logged ([`Seen`]) so tests assert on what upstream saw. Faults
//! ([`FaultRule`]), a per-host down switch and per-blob gates ([`Gate`]) are set at runtime.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;

use super::body::{empty, full, pattern_bytes, Body, ChannelBody};
use super::digest::{digest_of, hex_of};
use super::server::{handler, ConnMeta, TestServer};
use super::tls::TestCa;

pub const REGISTRY: &str = "registry-1.docker.io";
pub const AUTH: &str = "auth.docker.io";
pub const CDN: &str = "cdn.example.test";
pub const REALM: &str = "https://auth.docker.io/token";
pub const SERVICE: &str = "registry.docker.io";
pub const RATELIMIT_LIMIT: i64 = 100;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header docker sends for manifests.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Registry,
    Auth,
    Cdn,
}

impl Host {
    pub fn name(self) -> &'static str {
        match self {
            Host::Registry => REGISTRY,
            Host::Auth => AUTH,
            Host::Cdn => CDN,
        }
    }
}

/// One request as a fake host saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub host: Host,
    pub method: Method,
    /// Path and query.
    pub target: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub accept: Option<String>,
    pub conn: u64,
}

/// What a matching request gets instead of the normal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Headers with the full `Content-Length`, then the connection is cut once the body has
    /// reached this offset of the resource.
    TruncateAt(usize),
    /// The full length, but the byte in the middle of the body is flipped.
    WrongBytes,
    /// This status with a registry-style JSON error body.
    Status(u16),
    /// Docker Hub's pull-limit answer: `429` with a JSON message, `ratelimit-remaining: 0`.
    TooManyRequests,
    /// No answer at all until [`FakeHub::clear_faults`] is called (or the hub stops); then the
    /// request is answered normally.
    Stall,
}

/// Where a [`Fault`] applies.
#[derive(Clone, Debug)]
pub struct FaultRule {
    pub host: Host,
    pub method: Option<Method>,
    pub path_contains: Option<String>,
    pub fault: Fault,
}

impl FaultRule {
    /// Every request to `host`.
    pub fn new(host: Host, fault: Fault) -> FaultRule {
        FaultRule {
            host,
            method: None,
            path_contains: None,
            fault,
        }
    }

    /// Only requests whose path and query contain `s`.
    pub fn path(mut self, s: &str) -> FaultRule {
        self.path_contains = Some(s.to_string());
        self
    }

    /// Only requests with this method.
    pub fn method(mut self, m: Method) -> FaultRule {
        self.method = Some(m);
        self
    }

    fn matches(&self, host: Host, method: &Method, target: &str) -> bool {
        self.host == host
            && self.method.as_ref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| target.contains(p))
    }
}

/// Holds CDN bodies of one blob at an offset until released: the CDN sends bytes up to the
/// gate, then waits. Deterministic stand-in for "a slow download".
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    at: usize,
    released: watch::Sender<bool>,
    /// How many responses have sent everything before the gate and are waiting at it.
    reached: watch::Sender<usize>,
}

impl Gate {
    fn new(at: usize) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                at,
                released: watch::channel(false).0,
                reached: watch::channel(0).0,
            }),
        }
    }

    /// Lets every held and future response continue.
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    pub fn is_released(&self) -> bool {
        *self.inner.released.borrow()
    }

    /// Responses that reached the gate so far.
    pub fn reached_count(&self) -> usize {
        *self.inner.reached.borrow()
    }

    /// Waits until `n` responses have reached the gate.
    pub async fn reached(&self, n: usize) {
        let mut rx = self.inner.reached.subscribe();
        let _ = rx.wait_for(|r| *r >= n).await;
    }

    async fn pass(&self) {
        self.inner.reached.send_modify(|r| *r += 1);
        let mut rx = self.inner.released.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// An image added with [`FakeHub::add_image`], with all its bytes for assertions.
#[derive(Clone, Debug)]
pub struct Image {
    pub repo: String,
    pub tag: String,
    pub media_type: String,
    pub manifest_digest: String,
    pub manifest: Bytes,
    pub config_digest: String,
    pub config: Bytes,
    pub layer_digests: Vec<String>,
    pub layers: Vec<Bytes>,
}

impl Image {
    /// Config then layers, as (digest, bytes).
    pub fn blobs(&self) -> Vec<(String, Bytes)> {
        let mut v = vec![(self.config_digest.clone(), self.config.clone())];
        v.extend(
            self.layer_digests
                .iter()
                .cloned()
                .zip(self.layers.iter().cloned()),
        );
        v
    }
}

#[derive(Clone)]
struct StoredManifest {
    media_type: String,
    digest: String,
    bytes: Bytes,
}

struct Grant {
    subject: String,
    repos: HashSet<String>,
}

#[derive(Default)]
struct Data {
    blobs: HashMap<String, Bytes>,
    repo_blobs: HashMap<String, HashSet<String>>,
    /// repo → reference (tag or digest) → manifest
    manifests: HashMap<String, HashMap<String, StoredManifest>>,
    users: HashMap<String, String>,
    /// private repo → users allowed to pull it
    private: HashMap<String, HashSet<String>>,
    tokens: HashMap<String, Grant>,
    /// CDN signature → blob hex it was issued for
    signatures: HashMap<String, String>,
    faults: Vec<FaultRule>,
    /// blob hex → gate
    gates: HashMap<String, Gate>,
}

struct State {
    data: Mutex<Data>,
    log: Mutex<Vec<Seen>>,
    ratelimit_remaining: AtomicI64,
    cdn_authorization_seen: AtomicUsize,
    /// blob hex → CDN GET bodies sent to their end
    completions: Mutex<HashMap<String, usize>>,
    completions_changed: watch::Sender<u64>,
    /// Bumped by `clear_faults`; stalled requests wait for it.
    faults_cleared: watch::Sender<u64>,
    next_id: AtomicU64,
}

pub struct FakeHub {
    ca: TestCa,
    state: Arc<State>,
    registry: TestServer,
    auth: TestServer,
    cdn: TestServer,
}

impl FakeHub {
    /// Starts the three hosts, with certificates from a fresh [`TestCa`].
    pub async fn start() -> FakeHub {
        let ca = TestCa::new("pullcache tests web PKI");
        let state = Arc::new(State {
            data: Mutex::new(Data::default()),
            log: Mutex::new(Vec::new()),
            ratelimit_remaining: AtomicI64::new(RATELIMIT_LIMIT),
            cdn_authorization_seen: AtomicUsize::new(0),
            completions: Mutex::new(HashMap::new()),
            completions_changed: watch::channel(0).0,
            faults_cleared: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        });
        let s = state.clone();
        let registry = TestServer::start(
            Some(ca.issue(&[REGISTRY]).server_config()),
            handler(move |req, meta| registry_handle(s.clone(), req, meta)),
        )
        .await;
        let s = state.clone();
        let auth = TestServer::start(
            Some(ca.issue(&[AUTH]).server_config()),
            handler(move |req, meta| auth_handle(s.clone(), req, meta)),
        )
        .await;
        let s = state.clone();
        let cdn = TestServer::start(
            Some(ca.issue(&[CDN]).server_config()),
            handler(move |req, meta| cdn_handle(s.clone(), req, meta)),
        )
        .await;
        FakeHub {
            ca,
            state,
            registry,
            auth,
            cdn,
        }
    }

    /// The CA that issued the hub's certificates (pass its PEM as `--upstream-ca`).
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    pub fn addr(&self, host: Host) -> SocketAddr {
        self.server(host).addr
    }

    fn server(&self, host: Host) -> &TestServer {
        match host {
            Host::Registry => &self.registry,
            Host::Auth => &self.auth,
            Host::Cdn => &self.cdn,
        }
    }

    /// `--connect-to` values mapping the three host names (port 443) to the fakes.
    pub fn connect_to(&self) -> Vec<String> {
        [Host::Registry, Host::Auth, Host::Cdn]
            .iter()
            .map(|h| format!("{}:443={}", h.name(), self.addr(*h)))
            .collect()
    }

    /// The challenge `/v2/` answers.
    pub fn ping_challenge(&self) -> String {
        ping_challenge()
    }

    /// The challenge an unauthorised request for `repo` answers.
    pub fn repo_challenge(&self, repo: &str) -> String {
        repo_challenge(repo)
    }

    fn next_id(&self) -> u64 {
        self.state.next_id.fetch_add(1, Ordering::SeqCst)
    }

    // ----- content ---------------------------------------------------------------------------

    /// Stores `data` as a blob of `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = digest_of(&data);
        let mut d = self.state.data.lock().unwrap();
        d.blobs.insert(digest.clone(), data);
        d.repo_blobs
            .entry(repo.to_string())
            .or_default()
            .insert(digest.clone());
        digest
    }

    /// Stores `len` deterministic pseudo-random bytes, unique to this call, as a blob of
    /// `repo`; returns the digest and the bytes.
    pub fn add_random_blob(&self, repo: &str, len: usize) -> (String, Bytes) {
        let data = pattern_bytes(0xB10B_0000 + self.next_id(), len);
        (self.add_blob(repo, data.clone()), data)
    }

    /// Makes a blob already stored (e.g. under another repository) also part of `repo`.
    pub fn link_blob(&self, repo: &str, digest: &str) {
        let mut d = self.state.data.lock().unwrap();
        assert!(d.blobs.contains_key(digest), "unknown blob {digest}");
        d.repo_blobs
            .entry(repo.to_string())
            .or_default()
            .insert(digest.to_string());
    }

    /// Stores a manifest in `repo`, reachable by its digest and, unless `tag` is empty, by
    /// `tag` (re-pointing the tag if it existed). Returns its digest.
    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: Bytes) -> String {
        let digest = digest_of(&bytes);
        let m = StoredManifest {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            bytes,
        };
        let mut d = self.state.data.lock().unwrap();
        let refs = d.manifests.entry(repo.to_string()).or_default();
        refs.insert(digest.clone(), m.clone());
        if !tag.is_empty() {
            refs.insert(tag.to_string(), m);
        }
        digest
    }

    /// Builds and stores a valid OCI image: a config blob, one layer blob per entry of
    /// `layer_sizes` (deterministic bytes unique to this image), and the manifest, tagged.
    pub fn add_image(&self, repo: &str, tag: &str, layer_sizes: &[usize]) -> Image {
        let id = self.next_id();
        let mut layers = Vec::new();
        let mut layer_digests = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let data = pattern_bytes((id << 16) + i as u64, size);
            layer_digests.push(self.add_blob(repo, data.clone()));
            layers.push(data);
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "test.image": format!("{repo}:{tag}#{id}") } },
            "rootfs": { "type": "layers", "diff_ids": layer_digests },
            "history": [],
        });
        let config = Bytes::from(serde_json::to_vec(&config).unwrap());
        let config_digest = self.add_blob(repo, config.clone());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_digests.iter().zip(&layers).map(|(d, l)| serde_json::json!({
                "mediaType": OCI_LAYER,
                "digest": d,
                "size": l.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
        let manifest_digest = self.add_manifest(repo, tag, OCI_MANIFEST, manifest.clone());
        Image {
            repo: repo.to_string(),
            tag: tag.to_string(),
            media_type: OCI_MANIFEST.to_string(),
            manifest_digest,
            manifest,
            config_digest,
            config,
            layer_digests,
            layers,
        }
    }

    /// The bytes of a stored blob.
    pub fn blob(&self, digest: &str) -> Bytes {
        self.state.data.lock().unwrap().blobs[digest].clone()
    }

    // ----- accounts --------------------------------------------------------------------------

    pub fn add_user(&self, user: &str, password: &str) {
        self.state
            .data
            .lock()
            .unwrap()
            .users
            .insert(user.to_string(), password.to_string());
    }

    /// Makes `repo` private: only tokens issued to one of `users` grant pull on it.
    pub fn make_private(&self, repo: &str, users: &[&str]) {
        self.state.data.lock().unwrap().private.insert(
            repo.to_string(),
            users.iter().map(|u| u.to_string()).collect(),
        );
    }

    /// Forgets every issued token: all of them are refused from now on.
    pub fn expire_tokens(&self) {
        self.state.data.lock().unwrap().tokens.clear();
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.count_on(Host::Auth, "GET", "/token")
    }

    // ----- observation -----------------------------------------------------------------------

    /// Every request seen by any host, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests with `method` whose path contains `path_contains`, on the registry and the CDN.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.count_on(Host::Registry, method, path_contains)
            + self.count_on(Host::Cdn, method, path_contains)
    }

    /// Requests with `method` whose path contains `path_contains`, on `host`.
    pub fn count_on(&self, host: Host, method: &str, path_contains: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s.host == host && s.method.as_str() == method && s.target.contains(path_contains)
            })
            .count()
    }

    /// Every request (any method) to the registry and the CDN.
    pub fn total(&self) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.host != Host::Auth)
            .count()
    }

    /// Upstream GETs of a blob: registry GETs of `/blobs/<digest>` plus CDN GETs of its bytes.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count("GET", hex_of(digest))
    }

    /// Manifest GETs on the registry (the requests Docker Hub counts as pulls).
    pub fn manifest_gets(&self) -> usize {
        self.count_on(Host::Registry, "GET", "/manifests/")
    }

    /// Requests that reached the CDN carrying an `Authorization` header.
    pub fn cdn_authorization_seen(&self) -> usize {
        self.state.cdn_authorization_seen.load(Ordering::SeqCst)
    }

    pub fn ratelimit_remaining(&self) -> i64 {
        self.state.ratelimit_remaining.load(Ordering::SeqCst)
    }

    /// A compact listing of the requests seen, for failure messages.
    pub fn describe_requests(&self) -> String {
        self.requests()
            .iter()
            .map(|s| format!("{:?} {} {}", s.host, s.method, s.target))
            .collect::<Vec<_>>()
            .join("\n")
    }

    // ----- faults ----------------------------------------------------------------------------

    pub fn add_fault(&self, rule: FaultRule) {
        self.state.data.lock().unwrap().faults.push(rule);
    }

    /// Removes every fault rule and lets stalled requests proceed.
    pub fn clear_faults(&self) {
        self.state.data.lock().unwrap().faults.clear();
        self.state.faults_cleared.send_modify(|g| *g += 1);
    }

    /// Closes every open connection of `host` and every new one at once, while `down`.
    pub fn set_down(&self, host: Host, down: bool) {
        self.server(host).set_down(down);
    }

    /// Gates CDN bodies of `digest` at offset `at` (see [`Gate`]).
    pub fn gate_blob(&self, digest: &str, at: usize) -> Gate {
        let gate = Gate::new(at);
        self.state
            .data
            .lock()
            .unwrap()
            .gates
            .insert(hex_of(digest).to_string(), gate.clone());
        gate
    }

    /// CDN GET bodies of `digest` that were sent to their end.
    pub fn cdn_completions(&self, digest: &str) -> usize {
        completions(&self.state, hex_of(digest))
    }

    /// Waits until `n` CDN GET bodies of `digest` were sent to their end.
    pub async fn wait_cdn_completions(&self, digest: &str, n: usize) {
        let mut rx = self.state.completions_changed.subscribe();
        while completions(&self.state, hex_of(digest)) < n {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn completions(state: &State, hex: &str) -> usize {
    state
        .completions
        .lock()
        .unwrap()
        .get(hex)
        .copied()
        .unwrap_or(0)
}

fn ping_challenge() -> String {
    format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\"")
}

fn repo_challenge(repo: &str) -> String {
    format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\",scope=\"repository:{repo}:pull\"")
}

// ----- request plumbing ----------------------------------------------------------------------

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn record(state: &State, host: Host, req: &Request<Incoming>, meta: ConnMeta) -> Seen {
    let seen = Seen {
        host,
        method: req.method().clone(),
        target: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        authorization: header(req, "authorization"),
        range: header(req, "range"),
        accept: header(req, "accept"),
        conn: meta.conn,
    };
    state.log.lock().unwrap().push(seen.clone());
    seen
}

/// The first fault rule matching the request, if any.
fn fault_for(state: &State, seen: &Seen) -> Option<Fault> {
    state
        .data
        .lock()
        .unwrap()
        .faults
        .iter()
        .find(|r| r.matches(seen.host, &seen.method, &seen.target))
        .map(|r| r.fault.clone())
}

/// Applies a fault that replaces the whole answer. Returns the replacement response, or the
/// fault if it only shapes the body (truncation, wrong bytes).
async fn early_fault(state: &State, seen: &Seen) -> Result<Option<Fault>, Response<Body>> {
    let Some(fault) = fault_for(state, seen) else {
        return Ok(None);
    };
    match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Err(error_response(status, "UNKNOWN", "injected fault", &[]))
        }
        Fault::TooManyRequests => Err(error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            "You have reached your unauthenticated pull rate limit. \
             https://www.docker.com/increase-rate-limit",
            &[
                ("ratelimit-limit", format!("{RATELIMIT_LIMIT};w=21600")),
                ("ratelimit-remaining", "0;w=21600".to_string()),
            ],
        )),
        Fault::Stall => {
            let mut rx = state.faults_cleared.subscribe();
            let _ = rx.changed().await;
            Ok(None)
        }
        other => Ok(Some(other)),
    }
}

fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    headers: &[(&str, String)],
) -> Response<Body> {
    let body =
        serde_json::json!({ "errors": [ { "code": code, "message": message } ] }).to_string();
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("docker-distribution-api-version", "registry/2.0");
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(full(body)).unwrap()
}

fn unauthorized(challenge: String, repo: Option<&str>) -> Response<Body> {
    let body = match repo {
        Some(r) => serde_json::json!({ "errors": [ {
            "code": "UNAUTHORIZED",
            "message": "authentication required",
            "detail": [ { "Type": "repository", "Class": "", "Name": r, "Action": "pull" } ],
        } ] }),
        None => serde_json::json!({ "errors": [ {
            "code": "UNAUTHORIZED", "message": "authentication required", "detail": null,
        } ] }),
    }
    .to_string();
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("docker-distribution-api-version", "registry/2.0")
        .header("www-authenticate", challenge)
        .body(full(body))
        .unwrap()
}

fn bearer(seen: &Seen) -> Option<&str> {
    seen.authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Streams `data[start..end]` into `tx`, honouring a gate and a body fault. Stops quietly if
/// the receiver goes away (the peer closed).
async fn stream_slice(
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    data: Bytes,
    start: usize,
    end: usize,
    gate: Option<Gate>,
    fault: Option<Fault>,
) {
    let flip_at = matches!(fault, Some(Fault::WrongBytes)).then(|| start + (end - start) / 2);
    let truncate_at = match fault {
        Some(Fault::TruncateAt(at)) => Some(at.max(start)),
        _ => None,
    };
    let mut gate = gate.filter(|g| g.inner.at >= start && g.inner.at < end);
    let mut pos = start;
    while pos < end {
        if let Some(g) = &gate {
            if pos >= g.inner.at {
                g.pass().await;
                gate = None;
            }
        }
        let mut next = (pos + CHUNK).min(end);
        if let Some(g) = &gate {
            next = next.min(g.inner.at);
        }
        if let Some(t) = truncate_at {
            if pos >= t {
                let _ = tx.send(Err(io::Error::other("injected truncation"))).await;
                return;
            }
            next = next.min(t);
        }
        let mut chunk = data.slice(pos..next);
        if let Some(f) = flip_at {
            if (pos..next).contains(&f) {
                let mut v = chunk.to_vec();
                v[f - pos] ^= 0xff;
                chunk = Bytes::from(v);
            }
        }
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
        pos = next;
    }
}

/// Parses `bytes=N-` / `bytes=N-M` against a length; `Err(())` when unsatisfiable.
fn parse_range(range: &str, len: usize) -> Result<(usize, usize), ()> {
    let spec = range.trim().strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let start: usize = a.trim().parse().map_err(|_| ())?;
    let end = if b.trim().is_empty() {
        len
    } else {
        (b.trim().parse::<usize>().map_err(|_| ())? + 1).min(len)
    };
    if start >= len || start >= end {
        return Err(());
    }
    Ok((start, end))
}

// ----- registry ------------------------------------------------------------------------------

async fn registry_handle(
    state: Arc<State>,
    req: Request<Incoming>,
    meta: ConnMeta,
) -> Response<Body> {
    let seen = record(&state, Host::Registry, &req, meta);
    let body_fault = match early_fault(&state, &seen).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let path = req.uri().path().to_string();
    if path == "/v2/" || path == "/v2" {
        let ok = bearer(&seen)
            .map(|t| state.data.lock().unwrap().tokens.contains_key(t))
            .unwrap_or(false);
        if !ok {
            return unauthorized(ping_challenge(), None);
        }
        return Response::builder()
            .header("content-type", "application/json")
            .header("content-length", 2)
            .header("docker-distribution-api-version", "registry/2.0")
            .body(full("{}"))
            .unwrap();
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "not found", &[]);
    };
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        if let Some(resp) = authorize(&state, &seen, repo) {
            return resp;
        }
        return manifest(&state, &req, &seen, repo, reference, body_fault);
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        if let Some(resp) = authorize(&state, &seen, repo) {
            return resp;
        }
        return blob_redirect(&state, &seen, repo, digest);
    }
    error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "not found", &[])
}

/// `None` if the request's token grants pull on `repo`, else the 401 to answer.
fn authorize(state: &State, seen: &Seen, repo: &str) -> Option<Response<Body>> {
    let granted = bearer(seen).is_some_and(|t| {
        state
            .data
            .lock()
            .unwrap()
            .tokens
            .get(t)
            .is_some_and(|g| g.repos.contains(repo))
    });
    if granted {
        None
    } else {
        Some(unauthorized(repo_challenge(repo), Some(repo)))
    }
}

fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    accept
        .split(',')
        .map(|p| p.split(';').next().unwrap_or("").trim())
        .any(|t| t == media_type || t == "*/*")
}

fn manifest(
    state: &State,
    req: &Request<Incoming>,
    seen: &Seen,
    repo: &str,
    reference: &str,
    body_fault: Option<Fault>,
) -> Response<Body> {
    let found = state
        .data
        .lock()
        .unwrap()
        .manifests
        .get(repo)
        .and_then(|refs| refs.get(reference))
        .cloned();
    let Some(m) = found else {
        return error_response(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
            &[],
        );
    };
    if !accepts(seen.accept.as_deref(), &m.media_type) {
        return error_response(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest of this media type not accepted by the client",
            &[],
        );
    }
    let is_get = req.method() == Method::GET;
    let remaining = if is_get {
        let before =
            state
                .ratelimit_remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                    (r > 0).then_some(r - 1)
                });
        match before {
            Ok(r) => r - 1,
            Err(_) => {
                return early_fault_429();
            }
        }
    } else {
        state.ratelimit_remaining.load(Ordering::SeqCst)
    };
    let builder = Response::builder()
        .header("content-type", &m.media_type)
        .header("content-length", m.bytes.len())
        .header("docker-content-digest", &m.digest)
        .header("etag", format!("\"{}\"", m.digest))
        .header("docker-distribution-api-version", "registry/2.0")
        .header("ratelimit-limit", format!("{RATELIMIT_LIMIT};w=21600"))
        .header("ratelimit-remaining", format!("{remaining};w=21600"))
        .header("docker-ratelimit-source", "127.0.0.1");
    if !is_get {
        return builder.body(empty()).unwrap();
    }
    if body_fault.is_none() {
        return builder.body(full(m.bytes)).unwrap();
    }
    let len = m.bytes.len();
    let (tx, body) = ChannelBody::channel(len as u64, None);
    tokio::spawn(stream_slice(tx, m.bytes, 0, len, None, body_fault));
    builder.body(body).unwrap()
}

fn early_fault_429() -> Response<Body> {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "You have reached your pull rate limit.",
        &[
            ("ratelimit-limit", format!("{RATELIMIT_LIMIT};w=21600")),
            ("ratelimit-remaining", "0;w=21600".to_string()),
        ],
    )
}

fn blob_redirect(state: &State, _seen: &Seen, repo: &str, digest: &str) -> Response<Body> {
    let known = {
        let d = state.data.lock().unwrap();
        d.repo_blobs
            .get(repo)
            .is_some_and(|set| set.contains(digest))
    };
    if !known {
        return error_response(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown", &[]);
    }
    let hex = hex_of(digest).to_string();
    let sig = format!(
        "{:016x}{:016x}",
        state.next_id.fetch_add(1, Ordering::SeqCst),
        rand::random::<u64>()
    );
    state
        .data
        .lock()
        .unwrap()
        .signatures
        .insert(sig.clone(), hex.clone());
    let location = format!(
        "https://{CDN}/registry-v2/docker/registry/v2/blobs/sha256/{}/{hex}/data?sig={sig}&expires=1700000000",
        &hex[..2.min(hex.len())]
    );
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header("location", location)
        .header("content-length", 0)
        .header("docker-distribution-api-version", "registry/2.0")
        .body(empty())
        .unwrap()
}

// ----- CDN -----------------------------------------------------------------------------------

async fn cdn_handle(state: Arc<State>, req: Request<Incoming>, meta: ConnMeta) -> Response<Body> {
    let seen = record(&state, Host::Cdn, &req, meta);
    if seen.authorization.is_some() {
        state.cdn_authorization_seen.fetch_add(1, Ordering::SeqCst);
        return plain(
            StatusCode::UNAUTHORIZED,
            "this host does not accept Authorization headers\n",
        );
    }
    let body_fault = match early_fault(&state, &seen).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let path = req.uri().path();
    let hex = path
        .strip_prefix("/registry-v2/docker/registry/v2/blobs/sha256/")
        .and_then(|r| r.strip_suffix("/data"))
        .and_then(|r| r.split_once('/'))
        .map(|(_, hex)| hex.to_string());
    let sig = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .map(str::to_string);
    let (data, gate) = {
        let d = state.data.lock().unwrap();
        let valid = match (&hex, &sig) {
            (Some(h), Some(s)) => d.signatures.get(s) == Some(h),
            _ => false,
        };
        if !valid {
            return plain(StatusCode::FORBIDDEN, "AccessDenied: bad signature\n");
        }
        let hex = hex.clone().unwrap();
        let Some(data) = d.blobs.get(&format!("sha256:{hex}")).cloned() else {
            return plain(StatusCode::NOT_FOUND, "NoSuchKey\n");
        };
        (data, d.gates.get(&hex).cloned())
    };
    let hex = hex.unwrap();
    let len = data.len();
    let (start, end, status) = match &seen.range {
        None => (0, len, StatusCode::OK),
        Some(r) => match parse_range(r, len) {
            Ok((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            Err(()) => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header("content-range", format!("bytes */{len}"))
                    .header("content-length", 0)
                    .body(empty())
                    .unwrap();
            }
        },
    };
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("content-length", end - start)
        .header("accept-ranges", "bytes")
        .header("etag", format!("\"{hex}\""));
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header("content-range", format!("bytes {start}-{}/{len}", end - 1));
    }
    if req.method() == Method::HEAD {
        return builder.body(empty()).unwrap();
    }
    if req.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let done_state = state.clone();
    let done_hex = hex.clone();
    let on_end: Box<dyn FnOnce() + Send + Sync> = Box::new(move || {
        *done_state
            .completions
            .lock()
            .unwrap()
            .entry(done_hex)
            .or_default() += 1;
        done_state.completions_changed.send_modify(|g| *g += 1);
    });
    let (tx, body) = ChannelBody::channel((end - start) as u64, Some(on_end));
    tokio::spawn(stream_slice(tx, data, start, end, gate, body_fault));
    builder.body(body).unwrap()
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("content-length", text.len())
        .body(full(text.to_string()))
        .unwrap()
}

// ----- token service -------------------------------------------------------------------------

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(b)) => {
                    out.push(b);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
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
    String::from_utf8_lossy(&out).into_owned()
}

async fn auth_handle(state: Arc<State>, req: Request<Incoming>, meta: ConnMeta) -> Response<Body> {
    let seen = record(&state, Host::Auth, &req, meta);
    if let Err(resp) = early_fault(&state, &seen).await {
        return resp;
    }
    if req.uri().path() != "/token" || req.method() != Method::GET {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    let params: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect();
    let service_ok = params.iter().any(|(k, v)| k == "service" && v == SERVICE);
    if !service_ok {
        return plain(StatusCode::BAD_REQUEST, "unknown or missing service\n");
    }
    let subject = match seen.authorization.as_deref() {
        None => "anonymous".to_string(),
        Some(a) => {
            let creds = a
                .strip_prefix("Basic ")
                .and_then(|b| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .ok()
                })
                .and_then(|b| String::from_utf8(b).ok());
            let Some((user, pass)) = creds.as_deref().and_then(|c| c.split_once(':')) else {
                return plain(StatusCode::UNAUTHORIZED, "malformed credentials\n");
            };
            let ok = state
                .data
                .lock()
                .unwrap()
                .users
                .get(user)
                .map(String::as_str)
                == Some(pass);
            if !ok {
                return error_response(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "incorrect username or password",
                    &[],
                );
            }
            user.to_string()
        }
    };
    let mut repos = HashSet::new();
    {
        let d = state.data.lock().unwrap();
        for (_, scope) in params.iter().filter(|(k, _)| k == "scope") {
            for one in scope.split(' ') {
                let mut parts = one.splitn(3, ':');
                let (Some("repository"), Some(repo), Some(actions)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if !actions.split(',').any(|a| a == "pull") {
                    continue;
                }
                let allowed = match d.private.get(repo) {
                    None => true,
                    Some(users) => users.contains(&subject),
                };
                if allowed {
                    repos.insert(repo.to_string());
                }
            }
        }
    }
    let token = format!(
        "tok-{}-{:016x}",
        state.next_id.fetch_add(1, Ordering::SeqCst),
        rand::random::<u64>()
    );
    state
        .data
        .lock()
        .unwrap()
        .tokens
        .insert(token.clone(), Grant { subject, repos });
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": 300,
        "issued_at": "2026-01-01T00:00:00Z",
    })
    .to_string();
    Response::builder()
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full(body))
        .unwrap()
}
