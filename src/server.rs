//! Wiring: builds the shared [`App`] state, binds the listeners, and runs until shutdown.
//!
//! [`start`] binds every port before it returns, so an address in use is a start-up error, and
//! callers (main, tests) learn the real addresses of `:0` listeners from [`Running`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{CredKey, Grants, PUBLIC_RECHECK_SECS};
use crate::ca::{CaError, CertificateAuthority};
use crate::cache::{Cache, CacheError};
use crate::config::{HostPort, Settings};
use crate::stats::Stats;
use crate::upstream::{Upstream, UpstreamInitError};

/// How often counters and the index are flushed to disk.
pub const FLUSH_INTERVAL_SECS: u64 = 5;
/// Warn at start-up when the CA expires within this many days.
pub const CA_EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("upstream TLS: {0}")]
    Upstream(#[from] UpstreamInitError),
    #[error("cache {dir}: {source}")]
    Cache { dir: String, source: CacheError },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every connection and request.
pub struct App {
    pub settings: Settings,
    pub ca: CertificateAuthority,
    pub upstream: Upstream,
    pub cache: Arc<Cache>,
    pub grants: Grants,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// When each repository's public status was last probed (in memory; positives persist).
    probes: Mutex<HashMap<String, Instant>>,
}

impl App {
    /// Records that upstream accepted `cred` for `repo`, and learns (once in a while, in the
    /// background) whether the repository is public.
    pub fn grant(self: &Arc<Self>, registry: &HostPort, repo: &str, cred: CredKey, path: &str) {
        let reg = registry.name();
        self.grants.grant(&reg, repo, cred);
        let key = public_key(&reg, repo);
        {
            let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            let recent = probes
                .get(&key)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(PUBLIC_RECHECK_SECS));
            if recent {
                return;
            }
            probes.insert(key.clone(), Instant::now());
        }
        let (app, registry, repo, path) = (
            self.clone(),
            registry.clone(),
            repo.to_string(),
            path.to_string(),
        );
        self.tasks.spawn(async move {
            let public = crate::auth::probe_public(&app.upstream, &registry, &repo, &path).await;
            tracing::debug!(registry = %registry, repo, ?public, "probed whether the repository is public");
            if let Some(public) = public {
                let stored = app.cache.with_index(move |i| i.set_public(&key, public)).await;
                if let Err(e) = stored {
                    tracing::warn!(error = %e, "cannot record a repository's public status");
                }
            }
        });
    }

    /// Has upstream served this repository to an anonymous client (recently enough)?
    pub async fn is_public(&self, registry: &str, repo: &str) -> bool {
        let key = public_key(registry, repo);
        match self.cache.with_index(move |i| i.public_since(&key)).await {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a repository's public status");
                false
            }
        }
    }
}

fn public_key(registry: &str, repo: &str) -> String {
    format!("{registry}\0{repo}")
}

/// A started pullcache.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    app: Arc<App>,
}

/// Loads the CA, opens the cache, binds both listeners and starts serving.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let ca_dir = settings.ca_dir.clone();
    let ca = tokio::task::spawn_blocking(move || CertificateAuthority::load_or_create(&ca_dir))
        .await
        .map_err(|e| StartError::Cache {
            dir: String::new(),
            source: e.into(),
        })??;
    log_ca(&ca, &settings);

    let upstream = Upstream::new(&settings)?;
    let stats = Arc::new(Stats::new());
    let tasks = TaskTracker::new();
    let cache = Cache::open(
        &settings.cache_dir,
        upstream.clone(),
        stats.clone(),
        tasks.clone(),
    )
    .await
    .map_err(|source| StartError::Cache {
        dir: settings.cache_dir.display().to_string(),
        source,
    })?;

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let proxy = bind(settings.listen).await?;
    let admin = bind(settings.admin_listen).await?;
    let local = |l: &TcpListener, addr| {
        l.local_addr()
            .map_err(|source| StartError::Bind { addr, source })
    };
    let proxy_addr = local(&proxy, settings.listen)?;
    let admin_addr = local(&admin, settings.admin_listen)?;

    let app = Arc::new(App {
        grants: Grants::new(settings.auth_ttl),
        settings,
        ca,
        upstream,
        cache,
        stats,
        shutdown: CancellationToken::new(),
        tasks,
        probes: Mutex::new(HashMap::new()),
    });
    app.tasks.spawn(crate::listener::serve(proxy, app.clone()));
    app.tasks.spawn(crate::admin::serve(admin, app.clone()));
    app.tasks.spawn(flush_periodically(app.clone()));
    tracing::info!(proxy_addr = %proxy_addr, admin_addr = %admin_addr,
        intercept = ?app.settings.intercept.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        cache_dir = %app.settings.cache_dir.display(), "listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        app,
    })
}

fn log_ca(ca: &CertificateAuthority, settings: &Settings) {
    let expires = ca.not_after();
    tracing::info!(
        created = ca.created(),
        fingerprint_sha256 = %ca.fingerprint_sha256(),
        expires = %expires,
        cert = %settings.ca_dir.join(crate::ca::CA_CERT_FILE).display(),
        "certificate authority ready"
    );
    let left = expires - time::OffsetDateTime::now_utc();
    if left < time::Duration::days(CA_EXPIRY_WARNING_DAYS) {
        tracing::warn!(expires = %expires, "the CA expires within {CA_EXPIRY_WARNING_DAYS} days: \
            move ca.crt and ca.key aside to generate a new one, then re-distribute ca.crt");
    }
}

async fn flush_periodically(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(FLUSH_INTERVAL_SECS));
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = app.cache.flush().await {
                    tracing::warn!(error = %e, "cannot flush counters and index");
                }
            }
        }
    }
}

impl Running {
    pub fn ca_pem(&self) -> String {
        self.app.ca.cert_pem().to_string()
    }

    /// Stops accepting, lets in-flight requests and downloads finish (up to the drain
    /// deadline), then flushes counters and the index and releases it.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        self.app.tasks.close();
        let drain = self.app.settings.drain_timeout;
        if tokio::time::timeout(drain, self.app.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain,
                "drain deadline passed; closing the remaining connections"
            );
        }
        if let Err(e) = self.app.cache.close().await {
            tracing::error!(error = %e, "cannot flush the index at shutdown");
        }
        // Dropping the last handle releases the index's lock for the next start.
        drop(self.app);
    }
}
