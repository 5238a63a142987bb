//! The proxy port: accepts client connections (bounded), speaks HTTP/1.1 with a header-read
//! timeout, and dispatches each request by its form:
//!
//! - `CONNECT host:port` → [`crate::connect`] (intercept or blind tunnel);
//! - absolute-form `GET http://host/...` → forwarded as plain HTTP;
//! - origin-form requests are for pullcache itself: `/ca.crt` and a help page at `/`.
//!
//! Every connection is tracked, so shutdown can drain them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::config::HostPort;
use crate::error::ProxyError;
use crate::server::App;
use crate::upstream::strip_hop_by_hop;

/// Largest request head a client may send, in bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Accepts connections until shutdown. A permit is taken before `accept`, so at most
/// `max_connections` clients are served at once; the rest wait in the kernel backlog.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(app.settings.max_connections));
    loop {
        let permit = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE; back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app2 = app.clone();
        app.tasks.spawn(async move {
            app2.stats.connection_opened();
            serve_connection(app2.clone(), TokioIo::new(stream), peer).await;
            app2.stats.connection_closed();
            drop(permit);
        });
    }
}

async fn serve_connection(app: Arc<App>, io: TokioIo<tokio::net::TcpStream>, peer: SocketAddr) {
    let svc_app = app.clone();
    let service = service_fn(move |req| {
        let app = svc_app.clone();
        async move { Ok::<_, Infallible>(dispatch(app, peer, req).await) }
    });
    serve_http1(&app, io, service, "client").await;
}

/// Serves HTTP/1.1 on one connection (proxy, intercepted or admin) with the header-read
/// timeout and size limit, until the peer closes or shutdown asks for a graceful close.
pub async fn serve_http1<I, S>(app: &App, io: I, service: S, what: &'static str)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.settings.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Resets and half-finished requests are the peer's business, not an error of ours.
        tracing::debug!(error = %e, "{what} connection ended with an error");
    }
}

async fn dispatch(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let result = if req.method() == Method::CONNECT {
        crate::connect::handle(app, peer, req).await
    } else if req.uri().scheme().is_some() {
        forward_plain(&app, peer, req).await
    } else {
        Ok(local_page(&app, &req))
    };
    result.unwrap_or_else(|e| error_response(&e))
}

/// The one place a [`ProxyError`] becomes a response (and a log line at its fault's level).
pub fn error_response(e: &ProxyError) -> Response<Body> {
    e.log();
    let mut resp = Response::new(body::full(format!("pullcache: {e}\n")));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Absolute-form request: forward as plain HTTP, to allowed ports only.
async fn forward_plain(
    app: &App,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let start = std::time::Instant::now();
    if req.uri().scheme_str() != Some("http") {
        return Err(ProxyError::BadRequest(
            "only http:// may be forwarded; use CONNECT for https".into(),
        ));
    }
    let host = req
        .uri()
        .host()
        .ok_or_else(|| ProxyError::BadRequest("no host in request target".into()))?;
    let port = req.uri().port_u16().unwrap_or(80);
    let target = HostPort::parse(host, Some(port)).map_err(ProxyError::BadRequest)?;
    if target.port != 80 && !app.settings.tunnel_ports.contains(&target.port) {
        return Err(ProxyError::Forbidden(format!(
            "port {} is not allowed",
            target.port
        )));
    }
    let (mut parts, incoming) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut up = Request::from_parts(parts, body::incoming(incoming));
    crate::upstream::set_host(&mut up);
    let resp = app.upstream.send(up).await?;
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    tracing::info!(client = %peer, host = %target, status = parts.status.as_u16(),
        cache = "PASS", dur_ms = start.elapsed().as_millis() as u64, "http forward");
    Ok(Response::from_parts(parts, body::incoming(incoming)))
}

/// Requests addressed to the proxy itself.
fn local_page(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let (status, ctype, text) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ca.crt") => (
            StatusCode::OK,
            "application/x-pem-file",
            app.ca.cert_pem().to_string(),
        ),
        (&Method::GET | &Method::HEAD, "/") => {
            (StatusCode::OK, "text/plain; charset=utf-8", help_text(app))
        }
        (&Method::GET | &Method::HEAD, path) if path == "/setup" || path.starts_with("/setup/") => {
            setup_page(app, req)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "pullcache: not found; this is a proxy, see / for how to use it\n".to_string(),
        ),
    };
    let mut resp = Response::new(if req.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(text)
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    resp
}

/// `GET /setup` lists the client recipes, `GET /setup/<target>` serves one (a shell script),
/// filled in with this proxy's address as the client reached it (`Host`, else `--listen`).
fn setup_page(app: &App, req: &Request<Incoming>) -> (StatusCode, &'static str, String) {
    use crate::setup::{index, render_named, Params, ProxyUrl};
    const TEXT: &str = "text/plain; charset=utf-8";
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let url = ProxyUrl::from_request(host, app.settings.listen);
    let params = match Params::new(url, app.ca.cert_pem(), app.settings.intercept.clone()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot render setup recipes");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("pullcache: {e}\n"),
            );
        }
    };
    let path = req.uri().path().trim_end_matches('/');
    match path.strip_prefix("/setup/") {
        None => (StatusCode::OK, TEXT, index(&params)),
        Some(name) => match render_named(name, &params) {
            Ok(script) => (StatusCode::OK, "text/x-shellscript; charset=utf-8", script),
            Err(e) => (StatusCode::NOT_FOUND, TEXT, format!("pullcache: {e}\n")),
        },
    }
}

fn help_text(app: &App) -> String {
    let intercepted: Vec<String> = app
        .settings
        .intercept
        .iter()
        .map(|h| h.to_string())
        .collect();
    format!(
        "pullcache: a caching proxy for container image pulls\n\n\
         Intercepted (cached) registries: {}\n\n\
         Configure a client:\n\
         1. Trust this proxy's CA:\n\
         \x20  curl -fsS http://THIS-HOST:PORT/ca.crt -o /usr/local/share/ca-certificates/pullcache.crt\n\
         \x20  update-ca-certificates   (then restart dockerd / containerd)\n\
         2. Send HTTPS through the proxy:\n\
         \x20  HTTPS_PROXY=http://THIS-HOST:PORT   (NO_PROXY for your own hosts)\n\n\
         Ready-to-run recipes (dockerd, GitLab dind, containerd, kind): GET /setup\n\n\
         CA fingerprint (SHA-256): {}\n",
        intercepted.join(", "),
        app.ca.fingerprint_sha256()
    )
}
