//! The client commands `pullcache stats`, `pullcache entries` and `pullcache purge`: they ask a
//! running pullcache over its admin API and print a table for people (or, with `--json`, the
//! API's JSON for scripts).
//!
//! The HTTP client is hyper's own, one plain HTTP/1.1 connection per command, with bounded
//! connect and answer times. A refused connection is reported as "pullcache is not running at
//! URL", a 401 as a missing or wrong token, any other error with the API's own message.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::route::Digest;

pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:3129";
/// Time allowed to open the TCP connection to the admin port.
pub const CONNECT_TIMEOUT_SECS: u64 = 5;
/// Time allowed for the whole answer.
pub const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest answer read, in bytes (a listing of 10,000 entries is a few MiB).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Exit status for a bad command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Where the admin API is and how to authenticate; shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// URL of pullcache's admin listener (see `serve --admin-listen`).
    #[arg(long = "admin", value_name = "URL", env = "PULLCACHE_ADMIN_URL",
          default_value = DEFAULT_ADMIN_URL)]
    pub admin: String,
    /// Bearer token, when pullcache runs with --admin-token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "PULLCACHE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the JSON of /api/stats instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EntryKind {
    Blob,
    Manifest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EntrySort {
    Hits,
    LastAccess,
    Size,
}

#[derive(Debug, Clone, Args)]
pub struct EntriesArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Only entries seen in this repository (e.g. library/alpine).
    #[arg(long)]
    pub repo: Option<String>,
    /// Only blobs or only manifests.
    #[arg(long, value_enum)]
    pub kind: Option<EntryKind>,
    /// Order, largest first.
    #[arg(long, value_enum, default_value_t = EntrySort::LastAccess)]
    pub sort: EntrySort,
    /// At most this many entries.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print the JSON of /api/entries instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The digest to remove, e.g. sha256:0123…
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "pullcache is not running at {url} (connection refused): start it with `pullcache serve`, \
         or point --admin (PULLCACHE_ADMIN_URL) at its admin listener"
    )]
    NotRunning { url: String },
    #[error("cannot reach pullcache at {url}: {source}")]
    Unreachable { url: String, source: std::io::Error },
    #[error("pullcache at {url} did not answer within {secs}s")]
    Timeout { url: String, secs: u64 },
    #[error("talking to pullcache at {url}: {message}")]
    Http { url: String, message: String },
    #[error(
        "pullcache at {url} requires its admin token: pass --admin-token or set PULLCACHE_ADMIN_TOKEN"
    )]
    NeedsToken { url: String },
    #[error("pullcache at {url} rejected the admin token")]
    WrongToken { url: String },
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("{url} did not answer like pullcache's admin API ({detail})")]
    NotAdminApi { url: String, detail: String },
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        }
    }
}

/// A client of one pullcache admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// As the user wrote it, for messages.
    url: String,
    /// `host:port` to connect to (IPv6 in brackets).
    addr: String,
    authority: String,
    /// Path prefix, when the API sits behind a reverse proxy (no trailing slash).
    prefix: String,
    token: Option<String>,
}

impl AdminClient {
    /// `http://host[:port][/prefix]`, or just `host:port`.
    pub fn new(url: &str, token: Option<String>) -> Result<AdminClient, CliError> {
        let bad = |why: &str| CliError::Usage(format!("--admin {url:?}: {why}"));
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = full.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "{other}:// is not supported; the admin API speaks plain HTTP"
                )))
            }
            None => return Err(bad("no scheme")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad("no host"))?
            .as_str()
            .to_string();
        if authority.contains('@') {
            return Err(bad(
                "user information in the URL is not supported; use --admin-token",
            ));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(AdminClient {
            url: url.trim_end_matches('/').to_string(),
            addr: format!("{host}:{port}"),
            authority,
            prefix,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    fn from_args(a: &AdminArgs) -> Result<AdminClient, CliError> {
        AdminClient::new(&a.admin, a.admin_token.clone())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn get(&self, path_and_query: &str) -> Result<Value, CliError> {
        self.call(Method::GET, path_and_query).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::DELETE, path).await
    }

    /// One request on a fresh connection; the JSON body of a 2xx answer.
    async fn call(&self, method: Method, path_and_query: &str) -> Result<Value, CliError> {
        let secs = REQUEST_TIMEOUT_SECS;
        let exchange = self.exchange(method, path_and_query);
        let (status, body) = tokio::time::timeout(Duration::from_secs(secs), exchange)
            .await
            .map_err(|_| CliError::Timeout {
                url: self.url.clone(),
                secs,
            })??;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status == StatusCode::UNAUTHORIZED {
            return Err(match self.token {
                None => CliError::NeedsToken {
                    url: self.url.clone(),
                },
                Some(_) => CliError::WrongToken {
                    url: self.url.clone(),
                },
            });
        }
        match json {
            Some(v) if status.is_success() => Ok(v),
            Some(v) => match v.get("error").and_then(|e| e.as_str()) {
                Some(message) => Err(CliError::Api {
                    status,
                    message: message.to_string(),
                }),
                None => Err(self.not_admin(format!("status {status}"))),
            },
            None => Err(self.not_admin(format!("status {status}, a body that is not JSON"))),
        }
    }

    fn not_admin(&self, detail: String) -> CliError {
        CliError::NotAdminApi {
            url: self.url.clone(),
            detail,
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<(StatusCode, Bytes), CliError> {
        let http_err = |e: &dyn std::fmt::Display| CliError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let connect = tokio::net::TcpStream::connect(self.addr.as_str());
        let tcp =
            match tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS), connect).await {
                Err(_) => {
                    return Err(CliError::Timeout {
                        url: self.url.clone(),
                        secs: CONNECT_TIMEOUT_SECS,
                    })
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(CliError::NotRunning {
                        url: self.url.clone(),
                    })
                }
                Ok(Err(source)) => {
                    return Err(CliError::Unreachable {
                        url: self.url.clone(),
                        source,
                    })
                }
                Ok(Ok(tcp)) => tcp,
            };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| http_err(&e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.prefix, path_and_query))
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("pullcache-cli/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| CliError::Usage(format!("cannot build the request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    }
}

/// `pullcache stats`.
pub fn stats(args: StatsArgs) -> ExitCode {
    run(async move {
        let client = AdminClient::from_args(&args.admin)?;
        let s = client.get("/api/stats").await?;
        Ok(if args.json {
            format!("{s:#}\n")
        } else {
            render_stats(client.url(), &s)
        })
    })
}

/// `pullcache entries`.
pub fn entries(args: EntriesArgs) -> ExitCode {
    run(async move {
        let client = AdminClient::from_args(&args.admin)?;
        let v = client.get(&entries_query(&args)).await?;
        Ok(if args.json {
            format!("{v:#}\n")
        } else {
            render_entries(&v, crate::cache::index::now_secs())
        })
    })
}

/// `pullcache purge DIGEST`.
pub fn purge(args: PurgeArgs) -> ExitCode {
    run(async move {
        let digest = Digest::parse(args.digest.trim()).ok_or_else(|| {
            CliError::Usage(format!(
                "{:?} is not a digest (expected sha256:<64 hex digits>)",
                args.digest
            ))
        })?;
        let client = AdminClient::from_args(&args.admin)?;
        let v = client.delete(&format!("/api/entries/{digest}")).await?;
        Ok(render_purge(&digest, &v))
    })
}

/// Runs one command on a small runtime: prints its output, or one clear line on stderr.
fn run<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<String, CliError>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pullcache: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pullcache: {e}");
            e.exit_code()
        }
    }
}

/// The `/api/entries` request for `pullcache entries` flags.
pub fn entries_query(a: &EntriesArgs) -> String {
    let mut q = format!(
        "/api/entries?limit={}&sort={}",
        a.limit,
        match a.sort {
            EntrySort::Hits => "hits",
            EntrySort::LastAccess => "last_access",
            EntrySort::Size => "size",
        }
    );
    if let Some(kind) = a.kind {
        q.push_str(match kind {
            EntryKind::Blob => "&kind=blob",
            EntryKind::Manifest => "&kind=manifest",
        });
    }
    if let Some(repo) = &a.repo {
        let _ = write!(q, "&repo={}", query_escape(repo));
    }
    q
}

/// Escapes everything but unreserved characters (RFC 3986).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// --- rendering ---------------------------------------------------------------------------

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `2h 13m`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    // The largest unit, and the next one unless it is zero.
    let (big, big_unit, small, small_unit) = match (d, h, m) {
        (0, 0, 0) => return format!("{s}s"),
        (0, 0, _) => (m, "m", s, "s"),
        (0, _, _) => (h, "h", m, "m"),
        _ => (d, "d", h, "h"),
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit} {small}{small_unit}")
    }
}

/// Columns padded to their widest cell; `right[i]` right-aligns column i.
fn table(head: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                line.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                let _ = write!(line, "{c:>w$}");
            } else {
                let _ = write!(line, "{c:<w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn counter_row(name: &str, c: &Value, quota: String) -> Vec<String> {
    let ratio = c.get("hit_ratio").and_then(Value::as_f64).unwrap_or(0.0);
    vec![
        name.to_string(),
        num(c, "requests").to_string(),
        num(c, "hits").to_string(),
        num(c, "misses").to_string(),
        num(c, "coalesced").to_string(),
        num(c, "stale").to_string(),
        format!("{:.1}%", ratio * 100.0),
        human_bytes(num(c, "bytes_from_cache")),
        human_bytes(num(c, "bytes_from_upstream")),
        num(c, "upstream_manifest_gets").to_string(),
        quota,
    ]
}

fn quota(rl: Option<&Value>) -> String {
    let Some(rl) = rl else { return String::new() };
    let remaining = rl.get("remaining").and_then(Value::as_u64);
    let limit = rl.get("limit").and_then(Value::as_u64);
    let window = rl
        .get("window_s")
        .and_then(Value::as_u64)
        .map(|w| format!(" per {}", human_duration(w)))
        .unwrap_or_default();
    match (remaining, limit) {
        (Some(r), Some(l)) => format!("{r}/{l}{window}"),
        (Some(r), None) => r.to_string(),
        _ => "-".to_string(),
    }
}

/// The `pullcache stats` table for an `/api/stats` answer.
pub fn render_stats(url: &str, s: &Value) -> String {
    let mut out = String::new();
    let version = s.get("version").and_then(Value::as_str).unwrap_or("?");
    let _ = writeln!(
        out,
        "pullcache {version} at {url}, up {}\n",
        human_duration(num(s, "uptime_s"))
    );
    let head = [
        "REGISTRY",
        "REQUESTS",
        "HITS",
        "MISSES",
        "COALESCED",
        "STALE",
        "HIT RATIO",
        "FROM CACHE",
        "FROM UPSTREAM",
        "MANIFEST GETS",
        "PULLS LEFT",
    ];
    let right = [
        false, true, true, true, true, true, true, true, true, true, true,
    ];
    let mut rows = Vec::new();
    if let Some(regs) = s.get("registries").and_then(Value::as_object) {
        for (name, c) in regs {
            rows.push(counter_row(name, c, quota(c.get("ratelimit"))));
        }
    }
    rows.push(counter_row("total", s, String::new()));
    out.push_str(&table(&head, &right, &rows));
    let cache = s.get("cache").cloned().unwrap_or(Value::Null);
    let part = |kind: &str| cache.get(kind).map(|k| num(k, "entries")).unwrap_or(0);
    let limit = match cache.get("max_bytes").and_then(Value::as_u64) {
        Some(max) => format!("of {}", human_bytes(max)),
        None => "no size limit".to_string(),
    };
    let _ = writeln!(
        out,
        "\ncache:  {} entries ({} blobs, {} manifests), {}, {limit}",
        num(&cache, "entries"),
        part("blobs"),
        part("manifests"),
        human_bytes(num(&cache, "bytes")),
    );
    let conns = num(s, "open_connections");
    let _ = writeln!(
        out,
        "now:    {} downloads in flight, {conns} open connection{}",
        num(s, "downloads_in_flight"),
        if conns == 1 { "" } else { "s" }
    );
    out
}

/// The `pullcache entries` table for an `/api/entries` answer.
pub fn render_entries(v: &Value, now: u64) -> String {
    let list = v
        .get("entries")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = num(v, "total");
    if list.is_empty() {
        return "no cached entries match\n".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            let repos: Vec<&str> = e
                .get("repos")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let last = num(e, "last_access");
            vec![
                e.get("digest")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                e.get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                human_bytes(num(e, "size")),
                num(e, "hits").to_string(),
                format!("{} ago", human_duration(now.saturating_sub(last))),
                repos.join(","),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "DIGEST",
            "KIND",
            "SIZE",
            "HITS",
            "LAST ACCESS",
            "REPOSITORIES",
        ],
        &[false, false, true, true, true, false],
        &rows,
    );
    let _ = writeln!(out, "{} of {total} matching entries", rows.len());
    out
}

fn render_purge(digest: &Digest, v: &Value) -> String {
    match v.get("entry").filter(|e| !e.is_null()) {
        Some(e) => format!(
            "purged {digest} ({}, {})\n",
            e.get("kind").and_then(Value::as_str).unwrap_or("?"),
            human_bytes(num(e, "size"))
        ),
        None => format!("purged {digest}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admin_urls() {
        let c = AdminClient::new("http://127.0.0.1:3129/", None).unwrap();
        assert_eq!((c.addr.as_str(), c.prefix.as_str()), ("127.0.0.1:3129", ""));
        let c = AdminClient::new("localhost:9000", Some(String::new())).unwrap();
        assert_eq!(c.addr, "localhost:9000");
        assert!(c.token.is_none());
        let c = AdminClient::new("http://[::1]:3129/pullcache", None).unwrap();
        assert_eq!(
            (c.addr.as_str(), c.prefix.as_str()),
            ("[::1]:3129", "/pullcache")
        );
        assert_eq!(AdminClient::new("http://h", None).unwrap().addr, "h:80");
        for bad in ["https://h:1", "http://", "ftp://x", "http://u:p@h:1"] {
            assert!(
                matches!(AdminClient::new(bad, None), Err(CliError::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn entries_flags_become_a_query() {
        let a = EntriesArgs {
            admin: AdminArgs {
                admin: DEFAULT_ADMIN_URL.into(),
                admin_token: None,
            },
            repo: Some("library/alpine".into()),
            kind: Some(EntryKind::Blob),
            sort: EntrySort::Size,
            limit: 5,
            json: false,
        };
        assert_eq!(
            entries_query(&a),
            "/api/entries?limit=5&sort=size&kind=blob&repo=library%2Falpine"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m 1s");
        assert_eq!(human_duration(7980), "2h 13m");
        assert_eq!(human_duration(21600), "6h");
        assert_eq!(human_duration(120), "2m");
        assert_eq!(human_duration(90000), "1d 1h");
    }

    #[test]
    fn stats_table() {
        let s = json!({
            "version": "0.1.0", "uptime_s": 75, "requests": 4, "hits": 2, "misses": 2,
            "coalesced": 0, "stale": 0, "hit_ratio": 0.5, "bytes_from_cache": 2048,
            "bytes_from_upstream": 4096, "upstream_manifest_gets": 1,
            "cache": {"entries": 3, "bytes": 4096, "max_bytes": null,
                      "blobs": {"entries": 2}, "manifests": {"entries": 1}},
            "downloads_in_flight": 0, "open_connections": 1,
            "registries": {"registry-1.docker.io": {
                "requests": 4, "hits": 2, "misses": 2, "hit_ratio": 0.5,
                "bytes_from_cache": 2048, "bytes_from_upstream": 4096,
                "upstream_manifest_gets": 1,
                "ratelimit": {"limit": 100, "remaining": 99, "window_s": 21600, "seen_at": 1}}}
        });
        let text = render_stats("http://127.0.0.1:3129", &s);
        assert!(text.starts_with("pullcache 0.1.0 at http://127.0.0.1:3129, up 1m 15s\n"));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("REGISTRY "), "{text}");
        assert!(lines[3].starts_with("registry-1.docker.io"), "{text}");
        assert!(lines[3].ends_with("99/100 per 6h"), "{text}");
        assert!(lines[4].starts_with("total "), "{text}");
        assert!(
            lines[4].contains("50.0%") && lines[4].contains("2.0 KiB"),
            "{text}"
        );
        assert!(text.contains("cache:  3 entries (2 blobs, 1 manifests), 4.0 KiB, no size limit"));
        assert!(text.contains("1 open connection\n"));
        // Columns line up: every row is as wide as the header up to the last column.
        let col = lines[2].find("HIT RATIO").unwrap() + "HIT RATIO".len();
        assert_eq!(&lines[4][col - 5..col], "50.0%");
    }

    #[test]
    fn entries_table() {
        let v = json!({"total": 7, "entries": [{
            "digest": "sha256:abc", "kind": "blob", "size": 1048576, "hits": 3,
            "last_access": 940, "repos": ["library/alpine", "x/y"]}]});
        let text = render_entries(&v, 1000);
        assert!(text.lines().next().unwrap().starts_with("DIGEST"));
        assert!(text.contains("sha256:abc  blob  1.0 MiB     3"), "{text}");
        assert!(text.contains("1m ago  library/alpine,x/y"), "{text}");
        assert!(text.ends_with("1 of 7 matching entries\n"));
        assert_eq!(
            render_entries(&json!({"total": 0, "entries": []}), 0),
            "no cached entries match\n"
        );
    }
}
