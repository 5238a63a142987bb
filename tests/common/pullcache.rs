//! Runs pullcache in-process, the way `pullcache serve` would, on temporary directories that
//! outlive restarts.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pullcache::config::Settings;
use pullcache::server::Running;
use tempfile::TempDir;

use super::hub::{FakeHub, REGISTRY};
use super::init_tracing;

/// The flags pullcache is started with, besides the directories and listen addresses.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub intercept: Vec<String>,
    pub connect_to: Vec<String>,
    pub upstream_ca: Option<PathBuf>,
    pub tunnel_ports: Vec<u16>,
    pub extra: Vec<String>,
}

impl Flags {
    pub fn new() -> Flags {
        Flags::default()
    }

    pub fn intercept(mut self, host: &str) -> Flags {
        self.intercept.push(host.to_string());
        self
    }

    /// `host:port=addr:port`.
    pub fn connect_to(mut self, mapping: impl Into<String>) -> Flags {
        self.connect_to.push(mapping.into());
        self
    }

    pub fn upstream_ca(mut self, pem: &Path) -> Flags {
        self.upstream_ca = Some(pem.to_path_buf());
        self
    }

    pub fn tunnel_port(mut self, port: u16) -> Flags {
        self.tunnel_ports.push(port);
        self
    }

    pub fn arg(mut self, a: &str) -> Flags {
        self.extra.push(a.to_string());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Flags {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// Flags that wire pullcache to `hub`: intercept the registry, map the three hosts to the
    /// fakes, trust the hub's CA.
    pub fn for_hub(hub: &FakeHub) -> Flags {
        let mut f = Flags::new()
            .intercept(REGISTRY)
            .upstream_ca(hub.ca().pem_path());
        for m in hub.connect_to() {
            f = f.connect_to(m);
        }
        f
    }
}

/// A pullcache instance plus the directories it keeps across restarts.
pub struct Pullcache {
    running: Option<Running>,
    flags: Flags,
    ca_dir: TempDir,
    cache_dir: TempDir,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    ca_pem: String,
}

impl Pullcache {
    /// Starts pullcache with `flags` on fresh temporary directories.
    pub async fn start(flags: Flags) -> Pullcache {
        init_tracing();
        let ca_dir = tempfile::tempdir().expect("temp ca dir");
        let cache_dir = tempfile::tempdir().expect("temp cache dir");
        let running = start_running(&flags, ca_dir.path(), cache_dir.path()).await;
        Pullcache {
            proxy_addr: running.proxy_addr,
            admin_addr: running.admin_addr,
            ca_pem: running.ca_pem(),
            running: Some(running),
            flags,
            ca_dir,
            cache_dir,
        }
    }

    /// Starts pullcache wired to `hub` (see [`Flags::for_hub`]) plus `extra` flags.
    pub async fn for_hub(hub: &FakeHub, extra: &[&str]) -> Pullcache {
        Pullcache::start(Flags::for_hub(hub).args(extra)).await
    }

    /// The proxy listener (changes on restart).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// pullcache's CA certificate, as `Running::ca_pem` returned it at the last start.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn ca_dir(&self) -> &Path {
        self.ca_dir.path()
    }

    pub fn cache_dir(&self) -> &Path {
        self.cache_dir.path()
    }

    /// Where a verified blob lives on disk: `<cache-dir>/blobs/sha256/<2hex>/<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = super::digest::hex_of(digest);
        self.cache_dir()
            .join("blobs")
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Shuts pullcache down, keeping its directories.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            super::within(super::SHORT, "pullcache shutdown", r.shutdown()).await;
        }
    }

    /// Starts pullcache again on the same directories with the same flags.
    pub async fn start_again(&mut self) {
        assert!(self.running.is_none(), "pullcache is still running");
        let running = start_running(&self.flags, self.ca_dir.path(), self.cache_dir.path()).await;
        self.proxy_addr = running.proxy_addr;
        self.admin_addr = running.admin_addr;
        self.ca_pem = running.ca_pem();
        self.running = Some(running);
    }

    /// Stops and starts again on the same directories.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    pub async fn shutdown(mut self) {
        self.stop().await;
    }
}

/// The argument list of `pullcache serve` for `flags` and the two directories.
pub fn serve_args(flags: &Flags, ca_dir: &Path, cache_dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--ca-dir".into(),
        ca_dir.into(),
        "--cache-dir".into(),
        cache_dir.into(),
    ];
    for h in &flags.intercept {
        args.push("--intercept".into());
        args.push(h.into());
    }
    for m in &flags.connect_to {
        args.push("--connect-to".into());
        args.push(m.into());
    }
    if let Some(ca) = &flags.upstream_ca {
        args.push("--upstream-ca".into());
        args.push(ca.into());
    }
    for p in &flags.tunnel_ports {
        args.push("--tunnel-port".into());
        args.push(p.to_string().into());
    }
    args.extend(flags.extra.iter().map(OsString::from));
    args
}

async fn start_running(flags: &Flags, ca_dir: &Path, cache_dir: &Path) -> Running {
    let args = serve_args(flags, ca_dir, cache_dir);
    let settings = Settings::from_serve_args(args.clone())
        .unwrap_or_else(|e| panic!("pullcache rejected {args:?}: {e}"));
    super::within(
        super::SHORT,
        "pullcache start",
        pullcache::server::start(settings),
    )
    .await
    .unwrap_or_else(|e| panic!("pullcache failed to start with {args:?}: {e}"))
}
