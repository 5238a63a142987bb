//! A client of pullcache's admin port for the integration tests: one plain HTTP/1.1 request per
//! connection (hyper's client), every exchange bounded by [`SHORT`].
//!
//! Paths inside use `crate::common::…`, so this file works both through `#[path]` from a test
//! file and as `common::admin` once listed in `common/mod.rs`.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::common::{within, SHORT};

/// The admin API at `addr`, optionally with a bearer token.
#[derive(Clone, Debug)]
pub struct AdminApi {
    pub addr: SocketAddr,
    token: Option<String>,
}

/// A complete admin answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails the test unless the answer says it is JSON and parses.
    pub fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "not JSON: {} {}",
            self.status,
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.text()))
    }

    /// The `error` message of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" in {}", self.text()))
            .to_string()
    }
}

impl AdminApi {
    pub fn new(addr: SocketAddr) -> AdminApi {
        AdminApi { addr, token: None }
    }

    pub fn with_token(mut self, token: &str) -> AdminApi {
        self.token = Some(token.to_string());
        self
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `method target` with this client's token plus `extra` headers.
    pub async fn send(&self, method: Method, target: &str, extra: &[(&str, &str)]) -> Answer {
        let what = format!("admin {method} {target}");
        within(SHORT, &what, async {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap_or_else(|e| panic!("{what}: handshake: {e}"));
            tokio::spawn(conn);
            let mut b = Request::builder()
                .method(method.clone())
                .uri(target)
                .header("host", self.addr.to_string());
            if let Some(t) = &self.token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in extra {
                b = b.header(*k, *v);
            }
            let resp = sender
                .send_request(b.body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{what}: body: {e}"))
                .to_bytes();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        })
        .await
    }

    pub async fn get(&self, target: &str) -> Answer {
        self.send(Method::GET, target, &[]).await
    }

    pub async fn delete(&self, target: &str) -> Answer {
        self.send(Method::DELETE, target, &[]).await
    }

    /// `GET target`, which must answer 200 with JSON.
    pub async fn json(&self, target: &str) -> Value {
        let a = self.get(target).await;
        assert_eq!(a.status, StatusCode::OK, "GET {target}: {}", a.text());
        a.json()
    }
}
