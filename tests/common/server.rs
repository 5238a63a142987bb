//! The accept loop behind every fake server: binds `127.0.0.1:0`, optionally terminates TLS,
//! serves HTTP/1.1 with keep-alive, and stops (closing every connection) when its
//! [`TestServer`] handle is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::Body;

/// What a handler knows about the connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub struct ConnMeta {
    pub peer: SocketAddr,
    /// Sequence number of the connection on this server, from 1.
    pub conn: u64,
}

pub type Handler =
    Arc<dyn Fn(Request<Incoming>, ConnMeta) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// A running test server. Dropping it stops accepting and closes all its connections.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
    active: Arc<AtomicUsize>,
    down: watch::Sender<bool>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestServer {
    /// Binds `127.0.0.1:0` and serves `handler`, over TLS when `tls` is given.
    pub async fn start(tls: Option<Arc<ServerConfig>>, handler: Handler) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicU64::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let (down, _) = watch::channel(false);
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            handler,
            stop.clone(),
            accepted.clone(),
            active.clone(),
            down.clone(),
        ));
        TestServer {
            addr,
            stop,
            accepted,
            active,
            down,
        }
    }

    /// Connections accepted so far (including those closed at once while down).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently being served.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// While down, every new connection is closed as soon as it is accepted (the peer sees
    /// EOF or a reset before any TLS or HTTP byte) and open connections are closed too.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    pub fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// Stops the server now.
    pub fn stop(self) {}
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    handler: Handler,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
    active: Arc<AtomicUsize>,
    down: watch::Sender<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let conn = accepted.fetch_add(1, Ordering::SeqCst) + 1;
        if *down.borrow() {
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let meta = ConnMeta { peer, conn };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let stop = stop.clone();
        let active = active.clone();
        let mut down = down.subscribe();
        tokio::spawn(async move {
            active.fetch_add(1, Ordering::SeqCst);
            let serve = serve_connection(tcp, acceptor, handler, meta);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = down.wait_for(|d| *d) => {}
                _ = serve => {}
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: Option<TlsAcceptor>,
    handler: Handler,
    meta: ConnMeta,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let fut = handler(req, meta);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
    match acceptor {
        None => {
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        }
        Some(acceptor) => {
            let tls =
                match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        }
    }
}

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>, ConnMeta) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |req, meta| Box::pin(f(req, meta)))
}
