//! `CONNECT host:port`: either intercept (terminate TLS with a leaf minted by [`crate::ca`] and
//! serve the inner HTTP/1.1 requests through [`crate::registry`]) or tunnel blindly.
//!
//! Policy: intercepted hosts are named by `--intercept`; blind tunnels go only to ports listed
//! by `--tunnel-port` (443 by default), so the proxy is not an open relay. The upstream is
//! dialed *before* a tunnel is answered `200`, so an unreachable destination is a clean `502`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::body::{self, Body};
use crate::config::HostPort;
use crate::error::ProxyError;
use crate::server::App;

pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let target = connect_target(&req)?;
    if app.settings.intercepts(&target) {
        let app2 = app.clone();
        let span = tracing::info_span!("intercept", client.addr = %peer, connect.host = %target);
        app.tasks.spawn(
            async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => intercept(app2, peer, target, TokioIo::new(upgraded)).await,
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            }
            .instrument(span),
        );
        return Ok(ok_connected());
    }
    if !app.settings.tunnel_ports.contains(&target.port) {
        return Err(ProxyError::Forbidden(format!(
            "CONNECT to port {} is not allowed (allowed: {:?})",
            target.port, app.settings.tunnel_ports
        )));
    }
    let upstream = app.upstream.dialer.dial(&target).await?;
    let app2 = app.clone();
    let span = tracing::info_span!("tunnel", client.addr = %peer, connect.host = %target);
    app.tasks.spawn(
        async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
            };
            let start = Instant::now();
            let (up, down) =
                tunnel(TokioIo::new(upgraded), upstream, app2.settings.idle_timeout).await;
            tracing::info!(
                cache = "PASS",
                bytes_up = up,
                bytes_down = down,
                dur_ms = start.elapsed().as_millis() as u64,
                "tunnel closed"
            );
        }
        .instrument(span),
    );
    Ok(ok_connected())
}

fn ok_connected() -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// The `host:port` of a CONNECT request, validated.
fn connect_target(req: &Request<Incoming>) -> Result<HostPort, ProxyError> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    if req.uri().scheme().is_some()
        || req
            .uri()
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/")
    {
        return Err(ProxyError::BadRequest(
            "CONNECT needs a bare host:port".into(),
        ));
    }
    HostPort::parse(authority.as_str(), None).map_err(ProxyError::BadRequest)
}

/// Terminates TLS as `target` and serves the inner requests.
async fn intercept<IO>(app: Arc<App>, peer: SocketAddr, target: HostPort, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = match app.ca.server_config(&target.host) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot mint a certificate"),
    };
    let handshake = TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(app.settings.header_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "client TLS handshake failed"),
        Err(_) => return tracing::debug!("client TLS handshake timed out"),
    };
    let target = Arc::new(target);
    let svc_app = app.clone();
    let service = service_fn(move |req| {
        let (app, target) = (svc_app.clone(), target.clone());
        async move { Ok::<_, Infallible>(crate::registry::handle(app, peer, target, req).await) }
    });
    crate::listener::serve_http1(&app, TokioIo::new(tls), service, "intercepted").await;
}

/// Copies bytes both ways until both sides close or the tunnel is idle for `idle` (no bytes in
/// either direction). A blind tunnel has no request boundary to drain at, so shutdown ends it
/// at the drain deadline. Returns bytes (client→upstream, upstream→client).
async fn tunnel<A, B>(client: A, upstream: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity {
        inner: client,
        last: last.clone(),
        epoch,
    };
    let mut upstream = Activity {
        inner: upstream,
        last: last.clone(),
        epoch,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let check_every = (idle / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut copy => {
                return r.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                    (0, 0)
                });
            }
            _ = tokio::time::sleep(check_every) => {
                let since = epoch.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                if since >= idle.as_millis() as u64 {
                    tracing::debug!("tunnel idle, closing");
                    return (0, 0);
                }
            }
        }
    }
}

/// Records the time of the last byte moved, for the tunnel idle timeout.
struct Activity<S> {
    inner: S,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Activity<S> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
