//! Test harness shared by the integration tests.
//!
//! Every server here binds `127.0.0.1:0`, hands back its address, and stops when its handle is
//! dropped. Tests address upstreams by host name and let pullcache map the name to a loopback
//! port with `--connect-to`, exactly as a real client behind the proxy would.
//!
//! - [`tls`]: a test CA ([`tls::TestCa`]) that issues upstream server certificates, and rustls
//!   configurations that trust exactly one CA.
//! - [`server`]: the accept loop every fake uses ([`server::TestServer`]).
//! - [`origin`]: a generic HTTPS/HTTP origin (streaming download, upload hashing, echo).
//! - [`hub`]: a fake Docker Hub: registry, token service and CDN, with counters and faults.
//! - [`pullcache`]: runs pullcache in-process against those fakes, restartable on the same dirs.
//! - [`client`]: a client that reaches upstreams through the proxy (CONNECT, TLS, HTTP/1.1) and
//!   a [`client::RegistryClient`] that does the token dance like docker does.
//! - [`body`] and [`digest`]: deterministic payloads, body plumbing, fast SHA-256.

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

pub mod body;
pub mod client;
pub mod digest;
pub mod hub;
pub mod origin;
pub mod pullcache;
pub mod server;
pub mod tls;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// Generous bound for a single small exchange.
pub const SHORT: Duration = Duration::from_secs(30);
/// Bound for a step that involves several clients' handshakes and token dances.
pub const MEDIUM: Duration = Duration::from_secs(90);
/// Bound for bulk transfers (tens of MiB through a debug build).
pub const LONG: Duration = Duration::from_secs(240);

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` until it returns true or `limit` passes. For conditions the system reaches on
/// its own after an event the test cannot observe directly (a file appearing on disk); never
/// used to order the test's own actions.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("condition not reached within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs a tracing subscriber once per test binary; `RUST_LOG=pullcache=debug` shows the
/// proxy's logs for a failing test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// All regular files below `dir`, recursively (empty if `dir` does not exist).
pub fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    out
}
