//! Command line and environment configuration.
//!
//! Every flag of `pullcache serve` also reads `PULLCACHE_<NAME>` from the environment. Parsing
//! goes through [`Settings::from_serve_args`], a pure function of its arguments, so tests build
//! settings without touching the process environment. Every limit is a named default that
//! carries its unit.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:3129";
pub const DEFAULT_CA_DIR: &str = "./certs";
pub const DEFAULT_CACHE_DIR: &str = "./cache";
pub const DEFAULT_INTERCEPT: &str = "registry-1.docker.io";
/// Ports CONNECT may blind-tunnel to unless configured (see `--tunnel-port`).
pub const DEFAULT_TUNNEL_PORT: &str = "443";
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_UPSTREAM_HEADER_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 15;
pub const DEFAULT_TAG_TTL: &str = "0s";
pub const DEFAULT_AUTH_TTL: &str = "5m";
/// Largest manifest pullcache accepts, in bytes (the distribution registry's own limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "pullcache",
    version,
    about = "A caching forward proxy for container image pulls"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // built once per process
pub enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Work with the certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Show what a running pullcache served and saved (asks its admin API).
    Stats(crate::cli::StatsArgs),
    /// List what a running pullcache has cached.
    Entries(crate::cli::EntriesArgs),
    /// Remove one digest from a running pullcache's cache.
    Purge(crate::cli::PurgeArgs),
    /// Print a ready-to-run recipe that makes a client environment pull through pullcache.
    Setup(crate::setup::SetupArgs),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM, never the key) to stdout.
    Print {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, env = "PULLCACHE_CA_DIR", default_value = DEFAULT_CA_DIR)]
        ca_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags of `pullcache serve`, as typed.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the proxy listener (what clients put in HTTPS_PROXY).
    #[arg(long, env = "PULLCACHE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address of the admin listener (stats, metrics, CA). Loopback by default.
    #[arg(long, env = "PULLCACHE_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` on the admin listener. Mandatory when
    /// --admin-listen is not a loopback address.
    #[arg(long, env = "PULLCACHE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory holding the generated CA (ca.crt, ca.key).
    #[arg(long, env = "PULLCACHE_CA_DIR", default_value = DEFAULT_CA_DIR)]
    pub ca_dir: PathBuf,
    /// Directory holding cached blobs and the index.
    #[arg(long, env = "PULLCACHE_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Registry host to intercept and cache, HOST[:PORT] (port 443 by default). Repeatable.
    #[arg(long = "intercept", env = "PULLCACHE_INTERCEPT", value_delimiter = ',',
          default_value = DEFAULT_INTERCEPT)]
    pub intercept: Vec<String>,
    /// Route outbound connections for HOST:PORT to ADDR:PORT, keeping HOST for SNI and
    /// certificate checks (like curl's --connect-to). Repeatable.
    #[arg(
        long = "connect-to",
        env = "PULLCACHE_CONNECT_TO",
        value_delimiter = ','
    )]
    pub connect_to: Vec<String>,
    /// Extra PEM file of roots trusted for upstream TLS, besides the system roots. Repeatable.
    #[arg(
        long = "upstream-ca",
        env = "PULLCACHE_UPSTREAM_CA",
        value_delimiter = ','
    )]
    pub upstream_ca: Vec<PathBuf>,
    /// Ports that CONNECT may blind-tunnel to (the proxy is not an open relay). Repeatable.
    #[arg(
        long = "tunnel-port",
        env = "PULLCACHE_TUNNEL_PORT",
        value_delimiter = ',',
        default_value = DEFAULT_TUNNEL_PORT
    )]
    pub tunnel_port: Vec<u16>,
    /// Serve a tag from cache without asking upstream if it was revalidated this recently
    /// (e.g. 30s, 5m; 0 = always revalidate).
    #[arg(long, env = "PULLCACHE_TAG_TTL", default_value = DEFAULT_TAG_TTL)]
    pub tag_ttl: String,
    /// How long upstream's acceptance of a credential for a repository is remembered.
    #[arg(long, env = "PULLCACHE_AUTH_TTL", default_value = DEFAULT_AUTH_TTL)]
    pub auth_ttl: String,
    /// Maximum simultaneous client connections.
    #[arg(long, env = "PULLCACHE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    #[arg(long, env = "PULLCACHE_HEADER_TIMEOUT_SECS", default_value_t = DEFAULT_HEADER_TIMEOUT_SECS)]
    pub header_timeout_secs: u64,
    /// A blind tunnel with no traffic either way for this long is closed.
    #[arg(long, env = "PULLCACHE_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Time allowed to open a TCP+TLS connection upstream.
    #[arg(long, env = "PULLCACHE_CONNECT_TIMEOUT_SECS", default_value_t = DEFAULT_CONNECT_TIMEOUT_SECS)]
    pub connect_timeout_secs: u64,
    /// Time allowed for upstream to answer with a response head.
    #[arg(long, env = "PULLCACHE_UPSTREAM_HEADER_TIMEOUT_SECS",
          default_value_t = DEFAULT_UPSTREAM_HEADER_TIMEOUT_SECS)]
    pub upstream_header_timeout_secs: u64,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "PULLCACHE_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    pub drain_timeout_secs: u64,
    /// Log format.
    #[arg(long, env = "PULLCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// A host name (lower-cased, IPv6 without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `host[:port]`, `[v6]:port`; `default_port` when none is given.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<HostPort, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or("unclosed '['")?;
            (h, after.strip_prefix(':'))
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (s, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port in {s:?}"))?,
            None => default_port.ok_or_else(|| format!("{s:?} needs a port"))?,
        };
        if port == 0 {
            return Err(format!("port 0 in {s:?}"));
        }
        if !valid_host(host) {
            return Err(format!("bad host name in {s:?}"));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl HostPort {
    /// How the registry is named in counters, logs and the admin API: the host alone on the
    /// default HTTPS port, `host:port` otherwise.
    pub fn name(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            self.to_string()
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A DNS name or IP literal: what may appear in a CONNECT target or a Host header.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        })
}

/// The admin API's bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Printable ASCII without spaces (what fits a `Bearer` header); empty means "no token".
    pub fn parse(s: &str) -> Result<Option<AdminToken>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Some(AdminToken(s.to_string())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<AdminToken>,
    pub ca_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub intercept: Vec<HostPort>,
    pub connect_to: HashMap<HostPort, SocketAddr>,
    pub upstream_ca: Vec<PathBuf>,
    pub tunnel_ports: Vec<u16>,
    pub tag_ttl: Duration,
    pub auth_ttl: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub upstream_header_timeout: Duration,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
}

impl Settings {
    /// Parses the flags of `pullcache serve` (without program name and subcommand).
    pub fn from_serve_args<I, T>(args: I) -> Result<Settings, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let argv = std::iter::once(OsString::from("pullcache-serve"))
            .chain(args.into_iter().map(Into::into));
        let serve = Serve::try_parse_from(argv)?;
        Settings::try_from(serve.args)
    }

    /// Is `hp` a host this instance intercepts?
    pub fn intercepts(&self, hp: &HostPort) -> bool {
        self.intercept.contains(hp)
    }
}

impl TryFrom<ServeArgs> for Settings {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Settings, ConfigError> {
        let intercept = a
            .intercept
            .iter()
            .map(|s| {
                HostPort::parse(s, Some(443)).map_err(|e| invalid(format!("--intercept: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut connect_to = HashMap::new();
        for spec in &a.connect_to {
            let (from, to) = spec.split_once('=').ok_or_else(|| {
                invalid(format!(
                    "--connect-to {spec:?}: expected HOST:PORT=ADDR:PORT"
                ))
            })?;
            let from =
                HostPort::parse(from, None).map_err(|e| invalid(format!("--connect-to: {e}")))?;
            let to: SocketAddr = to
                .parse()
                .map_err(|_| invalid(format!("--connect-to {spec:?}: {to:?} is not an IP:PORT")))?;
            connect_to.insert(from, to);
        }
        for path in &a.upstream_ca {
            if !path.is_file() {
                return Err(invalid(format!(
                    "--upstream-ca {}: no such file",
                    path.display()
                )));
            }
        }
        if a.max_connections == 0 {
            return Err(invalid("--max-connections must be at least 1"));
        }
        let admin_token = AdminToken::parse(a.admin_token.as_deref().unwrap_or(""))
            .map_err(|e| invalid(format!("--admin-token: {e}")))?;
        if admin_token.is_none() && !a.admin_listen.ip().is_loopback() {
            return Err(invalid(format!(
                "--admin-listen {} is not a loopback address, so the admin API (which can purge \
                 the cache) needs a token: set --admin-token or PULLCACHE_ADMIN_TOKEN",
                a.admin_listen
            )));
        }
        if a.tunnel_port.contains(&0) {
            return Err(invalid("--tunnel-port 0 is not a port"));
        }
        let tag_ttl = parse_duration(&a.tag_ttl).map_err(|e| invalid(format!("--tag-ttl: {e}")))?;
        let auth_ttl =
            parse_duration(&a.auth_ttl).map_err(|e| invalid(format!("--auth-ttl: {e}")))?;
        let secs = |name: &str, v: u64| {
            if v == 0 {
                Err(invalid(format!("--{name} must be at least 1 second")))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        Ok(Settings {
            listen: a.listen,
            admin_listen: a.admin_listen,
            admin_token,
            ca_dir: a.ca_dir,
            cache_dir: a.cache_dir,
            intercept,
            connect_to,
            upstream_ca: a.upstream_ca,
            tunnel_ports: a.tunnel_port,
            tag_ttl,
            auth_ttl,
            max_connections: a.max_connections,
            header_timeout: secs("header-timeout-secs", a.header_timeout_secs)?,
            idle_timeout: secs("idle-timeout-secs", a.idle_timeout_secs)?,
            connect_timeout: secs("connect-timeout-secs", a.connect_timeout_secs)?,
            upstream_header_timeout: secs(
                "upstream-header-timeout-secs",
                a.upstream_header_timeout_secs,
            )?,
            drain_timeout: secs("drain-timeout-secs", a.drain_timeout_secs)?,
            log_format: a.log_format,
        })
    }
}

/// Parses `0`, `90s`, `5m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 1h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sensible() {
        let s = Settings::from_serve_args(Vec::<String>::new()).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert!(s.admin_listen.ip().is_loopback());
        assert_eq!(
            s.intercept,
            vec![HostPort {
                host: "registry-1.docker.io".into(),
                port: 443
            }]
        );
        assert_eq!(s.tunnel_ports, vec![443]);
        assert_eq!(s.tag_ttl, Duration::ZERO);
        assert_eq!(s.auth_ttl, Duration::from_secs(300));
    }

    #[test]
    fn connect_to_and_intercept_parse() {
        let s = Settings::from_serve_args([
            "--intercept",
            "Registry.Example:5000",
            "--intercept",
            "ghcr.io",
            "--connect-to",
            "registry.example:5000=127.0.0.1:4000",
            "--connect-to",
            "[::1]:443=[::1]:8443",
        ])
        .unwrap();
        assert!(s.intercepts(&HostPort::parse("registry.example:5000", None).unwrap()));
        assert!(s.intercepts(&HostPort::parse("ghcr.io", Some(443)).unwrap()));
        let key = HostPort::parse("registry.example:5000", None).unwrap();
        assert_eq!(s.connect_to[&key].to_string(), "127.0.0.1:4000");
        assert_eq!(
            s.connect_to[&HostPort::parse("[::1]:443", None).unwrap()].port(),
            8443
        );
    }

    #[test]
    fn invalid_values_are_one_clear_error() {
        for args in [
            vec!["--connect-to", "nohost"],
            vec!["--connect-to", "a:443=notanaddr"],
            vec!["--intercept", "bad host:443"],
            vec!["--intercept", "host:99999"],
            vec!["--tag-ttl", "5 parsecs"],
            vec!["--upstream-ca", "/nonexistent/ca.pem"],
            vec!["--max-connections", "0"],
        ] {
            let err = Settings::from_serve_args(args.clone()).unwrap_err();
            assert!(!err.to_string().is_empty(), "{args:?}");
        }
    }

    #[test]
    fn a_non_loopback_admin_address_needs_a_token() {
        let err = Settings::from_serve_args(["--admin-listen", "0.0.0.0:3129"]).unwrap_err();
        assert!(err.to_string().contains("--admin-token"), "{err}");
        let s = Settings::from_serve_args([
            "--admin-listen",
            "0.0.0.0:3129",
            "--admin-token",
            "s3cret",
        ])
        .unwrap();
        assert_eq!(s.admin_token.as_ref().map(|t| t.expose()), Some("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
        let loopback = Settings::from_serve_args(["--admin-listen", "[::1]:0"]).unwrap();
        assert!(loopback.admin_token.is_none());
        assert!(Settings::from_serve_args(["--admin-token", "two words"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(HostPort::parse("a.b", Some(443)).unwrap().port, 443);
        assert!(HostPort::parse("a.b", None).is_err());
        assert_eq!(HostPort::parse("[::1]:80", None).unwrap().host, "::1");
        assert!(HostPort::parse("a..b:1", None).is_err());
        assert!(HostPort::parse("a.b:0", None).is_err());
    }
}
