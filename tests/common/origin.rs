//! A generic origin server for the proxy-core tests, over HTTPS (certificate from a
//! [`TestCa`]) or plain HTTP.
//!
//! Endpoints:
//! - `GET /bytes/N[?seed=S]`: N pattern bytes ([`super::body::fill_pattern`]), streamed in
//!   64 KiB frames with `Content-Length: N`.
//! - `POST /sha256`: hashes the request body as it streams in; answers
//!   `{"sha256": "<hex>", "length": N}`.
//! - `/echo...` (any method): answers JSON with the method, request target and headers seen.
//! - `GET /`: `hello from <name>`.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;

use super::body::{full, Body, PatternBody};
use super::digest::Sha256;
use super::server::{handler, ConnMeta, TestServer};
use super::tls::TestCa;

/// A request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub conn: u64,
}

pub struct Origin {
    pub server: TestServer,
    pub name: String,
    /// The leaf certificate the origin presents (HTTPS only).
    pub cert: Option<CertificateDer<'static>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    /// An HTTPS origin for `name` whose certificate is issued by `ca`.
    pub async fn https(ca: &TestCa, name: &str) -> Origin {
        let issued = ca.issue(&[name]);
        let cert = issued.leaf().clone();
        let mut o = Origin::start(Some(issued.server_config()), name).await;
        o.cert = Some(cert);
        o
    }

    /// A plain-HTTP origin for `name`.
    pub async fn plain(name: &str) -> Origin {
        Origin::start(None, name).await
    }

    async fn start(tls: Option<Arc<rustls::ServerConfig>>, name: &str) -> Origin {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let name_owned = name.to_string();
        let seen2 = seen.clone();
        let server = TestServer::start(
            tls,
            handler(move |req, meta| handle(req, meta, name_owned.clone(), seen2.clone())),
        )
        .await;
        Origin {
            server,
            name: name.to_string(),
            cert: None,
            seen,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }

    /// `--connect-to` value mapping `name:port` to this origin.
    pub fn connect_to(&self, port: u16) -> String {
        format!("{}:{}={}", self.name, port, self.server.addr)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    req: Request<Incoming>,
    meta: ConnMeta,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.uri().to_string());
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        target: target.clone(),
        host: host.clone(),
        conn: meta.conn,
    });
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();

    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return text(StatusCode::BAD_REQUEST, "bad length\n");
        };
        let seed = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("seed="))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-length", n)
            .body(PatternBody::new(seed, n).boxed())
            .unwrap();
    }
    if path == "/sha256" && req.method() == hyper::Method::POST {
        let mut body = req.into_body();
        let mut h = Sha256::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        h.update(&d);
                    }
                }
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body error: {e}\n")),
            }
        }
        let len = h.len();
        let json = serde_json::json!({ "sha256": h.finish_hex(), "length": len });
        return Response::builder()
            .header("content-type", "application/json")
            .body(full(json.to_string()))
            .unwrap();
    }
    if path.starts_with("/echo") {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let json = serde_json::json!({
            "origin": name,
            "method": req.method().as_str(),
            "target": target,
            "headers": headers,
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(full(json.to_string()))
            .unwrap();
    }
    if path == "/" {
        return text(StatusCode::OK, &format!("hello from {name}\n"));
    }
    text(StatusCode::NOT_FOUND, "not found\n")
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(full(body.to_string()))
        .unwrap()
}
