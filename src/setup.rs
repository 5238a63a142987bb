//! Client setup recipes: one short shell script per environment that makes a daemon pull
//! through this pullcache instance — proxy variables, `NO_PROXY`, the CA installed where that
//! daemon reads it, and the restart that makes it take effect.
//!
//! The same text is printed by `pullcache setup <target>` and served at `GET /setup/<target>`
//! on the proxy port, so a host can run `curl -fsS http://PROXY:3128/setup/dockerd-systemd | sh`.
//!
//! Invariants:
//! - A recipe embeds the CA certificate (never the key) and states its SHA-256 fingerprint, so
//!   it works where the proxy's `/ca.crt` is not reachable and pins the CA it was made for.
//! - Everything interpolated into a script is validated first: the proxy URL is
//!   `http://HOST:PORT` with a host made of `[A-Za-z0-9.-_:]` only (an IPv6 literal in
//!   brackets), the CA is base64 PEM. A hostile `Host` header cannot inject shell.
//! - The traps of REGISTRY-FACTS §5 are handled in the text, not left to the reader: classic
//!   dockerd ignores `/etc/docker/certs.d` for Docker Hub (so the CA goes into the system
//!   store), Go loads its roots once per process (so daemons are restarted), and the GitLab
//!   job's docker CLI must reach the `docker` service directly (so `docker` is in `NO_PROXY`).

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::config::{HostPort, DEFAULT_INTERCEPT};

/// The POSIX-sh CA installer every recipe runs (also shipped as `scripts/install-ca.sh`).
pub const INSTALL_CA_SH: &str = include_str!("../scripts/install-ca.sh");

/// `NO_PROXY` for a daemon on a host: loopback only; Go never proxies loopback anyway, but
/// other programs that read the same variables may.
pub const DEFAULT_NO_PROXY: &str = "localhost,127.0.0.0/8,::1";
/// `NO_PROXY` in a GitLab CI job: the job's docker CLI talks to the `docker` service alias.
pub const GITLAB_NO_PROXY: &str = "docker,localhost,127.0.0.0/8,::1";

/// Port assumed when a proxy address is given without one.
pub const DEFAULT_PROXY_PORT: u16 = 3128;

/// File name of the CA wherever a recipe places it next to other files.
const CA_FILE_NAME: &str = "pullcache-ca.crt";

/// An environment a recipe is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// dockerd under systemd: service drop-in, CA in the system store, restart.
    DockerdSystemd,
    /// dockerd ≥ 23 configured through `/etc/docker/daemon.json` "proxies".
    DaemonJson,
    /// GitLab CI with the `docker:dind` service: runner config.toml and .gitlab-ci.yml.
    GitlabDind,
    /// containerd (and ctr, nerdctl, Kubernetes nodes): systemd env, hosts.toml, CA.
    Containerd,
    /// kind clusters: CA mounted into the nodes, proxy variables passed by kind.
    Kind,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::DockerdSystemd,
        Target::DaemonJson,
        Target::GitlabDind,
        Target::Containerd,
        Target::Kind,
    ];

    /// The name used on the command line and in `/setup/<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Target::DockerdSystemd => "dockerd-systemd",
            Target::DaemonJson => "daemon-json",
            Target::GitlabDind => "gitlab-dind",
            Target::Containerd => "containerd",
            Target::Kind => "kind",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// One line saying what the recipe sets up.
    pub fn summary(self) -> &'static str {
        match self {
            Target::DockerdSystemd => {
                "dockerd under systemd: CA in the system store, service drop-in, restart"
            }
            Target::DaemonJson => {
                "dockerd >= 23: CA in the system store, \"proxies\" in /etc/docker/daemon.json"
            }
            Target::GitlabDind => {
                "GitLab CI docker:dind: CA for the runner, config.toml and .gitlab-ci.yml snippets"
            }
            Target::Containerd => {
                "containerd / ctr / nerdctl / Kubernetes nodes: CA, hosts.toml, service env"
            }
            Target::Kind => "kind: CA mounted into the nodes, proxy variables passed by kind",
        }
    }
}

/// A validated proxy address as clients write it: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl(HostPort);

impl ProxyUrl {
    /// Accepts `host`, `host:port`, `http://host:port` (a trailing `/` is fine). The port
    /// defaults to 3128. `https://` is refused: clients speak plain HTTP to a proxy and do TLS
    /// inside the CONNECT tunnel.
    pub fn parse(s: &str) -> Result<ProxyUrl, String> {
        let s = s.trim();
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.contains("://") {
            return Err(format!(
                "{s:?}: the proxy URL must be http://HOST:PORT (clients speak plain HTTP to the \
                 proxy and do TLS inside the tunnel)"
            ));
        } else {
            s
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "{s:?}: expected http://HOST:PORT without a path or credentials"
            ));
        }
        HostPort::parse(rest, Some(DEFAULT_PROXY_PORT))
            .map(ProxyUrl)
            .map_err(|e| format!("proxy URL: {e}"))
    }

    /// From the `Host` header of a request to the proxy port, else the listen address. A
    /// `Host` without a port means port 80, as HTTP says.
    pub fn from_request(host_header: Option<&str>, listen: SocketAddr) -> ProxyUrl {
        host_header
            .and_then(|h| HostPort::parse(h, Some(80)).ok())
            .map(ProxyUrl)
            .unwrap_or_else(|| {
                ProxyUrl(HostPort {
                    host: listen.ip().to_string(),
                    port: listen.port(),
                })
            })
    }

    pub fn host(&self) -> &str {
        &self.0.host
    }

    /// Is the host a loopback address or `localhost` (unreachable from containers)?
    pub fn is_loopback(&self) -> bool {
        self.0.host == "localhost"
            || self
                .0
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.0)
    }
}

/// What a recipe is filled in with.
#[derive(Debug, Clone)]
pub struct Params {
    pub proxy_url: ProxyUrl,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The registries this instance intercepts (their certs.d / hosts.toml entries).
    pub intercept: Vec<HostPort>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the CA is not one PEM certificate: {0}")]
    BadCa(String),
    #[error("unknown setup target {0:?}; known: dockerd-systemd, daemon-json, gitlab-dind, containerd, kind")]
    UnknownTarget(String),
}

impl Params {
    /// Validates the CA PEM (exactly one certificate, base64 body, no key).
    pub fn new(
        proxy_url: ProxyUrl,
        ca_pem: &str,
        intercept: Vec<HostPort>,
    ) -> Result<Params, SetupError> {
        let ca_pem = normalize_pem(ca_pem)?;
        let intercept = if intercept.is_empty() {
            vec![HostPort {
                host: DEFAULT_INTERCEPT.into(),
                port: 443,
            }]
        } else {
            intercept
        };
        Ok(Params {
            proxy_url,
            ca_pem,
            intercept,
        })
    }

    /// SHA-256 over the certificate's DER, `AB:CD:…` (what `openssl x509 -fingerprint
    /// -sha256` prints).
    pub fn ca_fingerprint(&self) -> String {
        crate::ca::fingerprint(&pem_body_der(&self.ca_pem).unwrap_or_default())
    }

    /// The intercepted registries as `(certs.d directory name, server URL)`: the directory
    /// under `/etc/docker/certs.d` and `/etc/containerd/certs.d` (Docker Hub's is `docker.io`,
    /// others `host` or `host:port`) and the `https://` URL containerd's hosts.toml names.
    pub fn registries(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for hp in &self.intercept {
            let entry = match (hp.host.as_str(), hp.port) {
                ("registry-1.docker.io" | "index.docker.io" | "docker.io", 443) => (
                    "docker.io".to_string(),
                    "https://registry-1.docker.io".to_string(),
                ),
                (_, 443) => (hp.host.clone(), format!("https://{}", hp.host)),
                _ => (hp.to_string(), format!("https://{hp}")),
            };
            if !out.iter().any(|(n, _)| *n == entry.0) {
                out.push(entry);
            }
        }
        out
    }
}

fn pem_body_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Re-encodes one PEM certificate canonically (64-column base64, `\n` line ends), refusing
/// anything else: the result is pasted verbatim into shell heredocs and YAML.
fn normalize_pem(pem: &str) -> Result<String, SetupError> {
    use base64::Engine as _;
    let begins = pem.matches("-----BEGIN CERTIFICATE-----").count();
    if begins != 1 {
        return Err(SetupError::BadCa(format!(
            "expected one certificate, found {begins}"
        )));
    }
    if pem.contains("PRIVATE KEY") {
        return Err(SetupError::BadCa("contains a private key".into()));
    }
    let inner = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|s| s.split("-----END CERTIFICATE-----").next())
        .ok_or_else(|| SetupError::BadCa("no END CERTIFICATE line".into()))?;
    let body: String = inner.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .map_err(|e| SetupError::BadCa(format!("bad base64: {e}")))?;
    if x509_parser::parse_x509_certificate(&der).is_err() {
        return Err(SetupError::BadCa("not an X.509 certificate".into()));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    Ok(out)
}

/// Exit status for bad arguments (EX_USAGE), as `serve` uses.
const EXIT_USAGE: u8 = 64;

/// `pullcache setup [TARGET]`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// The environment to configure; without one, the recipes are listed.
    #[arg(value_enum)]
    pub target: Option<Target>,
    /// The proxy as clients reach it, http://HOST:PORT (default: this host's name, port 3128).
    #[arg(long, env = "PULLCACHE_PROXY_URL")]
    pub proxy_url: Option<String>,
    /// Directory holding the CA (ca.crt is read; nothing is created).
    #[arg(long, env = "PULLCACHE_CA_DIR", default_value = crate::config::DEFAULT_CA_DIR)]
    pub ca_dir: std::path::PathBuf,
    /// Registries the instance intercepts, HOST[:PORT], as given to `serve`. Repeatable.
    #[arg(long = "intercept", env = "PULLCACHE_INTERCEPT", value_delimiter = ',',
          default_value = DEFAULT_INTERCEPT)]
    pub intercept: Vec<String>,
}

/// Builds the parameters from the command line: the CA from `ca_dir/ca.crt` (never generated
/// here: a recipe for a CA no proxy uses would be worse than an error).
pub fn params_from_args(args: &SetupArgs) -> Result<Params, String> {
    let proxy_url = match &args.proxy_url {
        Some(u) => ProxyUrl::parse(u)?,
        None => ProxyUrl::parse(&this_host_name())?,
    };
    let intercept = args
        .intercept
        .iter()
        .map(|s| HostPort::parse(s, Some(443)).map_err(|e| format!("--intercept: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let path = args.ca_dir.join("ca.crt");
    let pem = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (start 'pullcache serve' once, or pass --ca-dir)",
            path.display()
        )
    })?;
    Params::new(proxy_url, &pem, intercept).map_err(|e| format!("{}: {e}", path.display()))
}

/// The kernel's host name (what other machines most likely call this one), else localhost.
fn this_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| crate::config::valid_host(s))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Runs `pullcache setup`: the recipe on stdout, problems on stderr.
pub fn run(args: SetupArgs) -> std::process::ExitCode {
    let params = match params_from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pullcache setup: {e}");
            return std::process::ExitCode::from(EXIT_USAGE);
        }
    };
    if args.proxy_url.is_none() {
        eprintln!(
            "pullcache setup: using {} as the proxy address; pass --proxy-url if clients reach \
             it under another name",
            params.proxy_url
        );
    }
    match args.target {
        Some(t) => print!("{}", render(t, &params)),
        None => print!("{}", index(&params)),
    }
    std::process::ExitCode::SUCCESS
}

/// The recipe for `target`, a shell script.
pub fn render(target: Target, p: &Params) -> String {
    match target {
        Target::DockerdSystemd => dockerd_systemd(p),
        Target::DaemonJson => daemon_json(p),
        Target::GitlabDind => gitlab_dind(p),
        Target::Containerd => containerd(p),
        Target::Kind => kind(p),
    }
}

/// Renders by name (for `GET /setup/<name>`).
pub fn render_named(name: &str, p: &Params) -> Result<String, SetupError> {
    Target::from_name(name)
        .map(|t| render(t, p))
        .ok_or_else(|| SetupError::UnknownTarget(name.to_string()))
}

/// The list of recipes, with the command that fetches each from this proxy.
pub fn index(p: &Params) -> String {
    let mut s = format!(
        "pullcache setup recipes for the proxy at {url}\n\
         CA fingerprint (SHA-256): {fp}\n\n\
         Run on the machine to configure, as root (read it first: curl -fsS URL | less):\n\n",
        url = p.proxy_url,
        fp = p.ca_fingerprint()
    );
    for t in Target::ALL {
        let _ = writeln!(s, "  {:<16} {}", t.name(), t.summary());
        let _ = writeln!(
            s,
            "  {:<16} curl -fsS {}/setup/{} | sh\n",
            "",
            p.proxy_url,
            t.name()
        );
    }
    s.push_str(
        "Every recipe embeds the CA; set PULLCACHE_NO_PROXY to replace the NO_PROXY list and\n\
         PULLCACHE_NO_RESTART=1 to skip restarting the daemon. Undo steps are at the top of each.\n",
    );
    s
}

// --- building blocks -----------------------------------------------------------------------

/// `#!/bin/sh`, what it is for, how to run and undo it, and the variables every recipe has.
fn header(p: &Params, target: Target, usage: &str, undo: &str, no_proxy: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # pullcache setup {name}: {summary}\n\
         # Generated by pullcache {version} for the proxy at {url}\n\
         # CA fingerprint (SHA-256): {fp}\n\
         #\n\
         {usage}\
         #\n\
         # Undo:\n\
         {undo}\
         set -eu\n\
         \n\
         PROXY_URL='{url}'\n\
         # Hosts the daemon reaches directly (comma-separated; Go also takes CIDRs).\n\
         NO_PROXY_LIST=\"${{PULLCACHE_NO_PROXY:-{no_proxy}}}\"\n\
         \n\
         say() {{ printf '==> %s\\n' \"$*\"; }}\n\
         die() {{ printf 'pullcache setup: %s\\n' \"$*\" >&2; exit 1; }}\n\
         \n\
         # write_ca FILE: this proxy's CA certificate (public; the key never leaves pullcache).\n\
         write_ca() {{\n\
         \x20   mkdir -p \"$(dirname \"$1\")\"\n\
         \x20   cat >\"$1\" <<'PULLCACHE_CA'\n\
         {pem}PULLCACHE_CA\n\
         \x20   chmod 0644 \"$1\"\n\
         }}\n\n",
        name = target.name(),
        summary = target.summary(),
        version = env!("CARGO_PKG_VERSION"),
        url = p.proxy_url,
        fp = p.ca_fingerprint(),
        pem = p.ca_pem,
    )
}

/// `install_ca FILE` (and `install_ca --remove`): scripts/install-ca.sh, embedded.
fn install_ca_fn() -> String {
    format!(
        "# install_ca FILE | --remove: the system trust store (Debian/Ubuntu, Alpine, RHEL/Fedora);\n\
         # the same as scripts/install-ca.sh in pullcache's source.\n\
         install_ca() {{\n\
         \x20   sh -s -- --name pullcache \"$@\" <<'PULLCACHE_INSTALL_CA'\n\
         {INSTALL_CA_SH}PULLCACHE_INSTALL_CA\n\
         }}\n\n"
    )
}

fn need_root() -> &'static str {
    "[ \"$(id -u)\" = 0 ] || die \"run as root (e.g. curl -fsS URL | sudo sh)\"\n\n"
}

/// A temporary file holding the CA, removed on exit.
fn ca_tmp() -> &'static str {
    "CA_TMP=$(mktemp)\n\
     trap 'rm -f \"$CA_TMP\"' EXIT\n\
     write_ca \"$CA_TMP\"\n\n"
}

/// `restart_service NAME`: systemd, OpenRC or SysV, unless PULLCACHE_NO_RESTART=1.
fn restart_fn() -> &'static str {
    "# restart_service NAME: Go daemons read proxy variables and CA roots once, at start.\n\
     restart_service() {\n\
     \x20   if [ \"${PULLCACHE_NO_RESTART:-0}\" = 1 ]; then\n\
     \x20       say \"not restarting $1 (PULLCACHE_NO_RESTART=1): restart it before relying on the proxy\"\n\
     \x20   elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then\n\
     \x20       systemctl daemon-reload\n\
     \x20       systemctl restart \"$1\"\n\
     \x20   elif command -v rc-service >/dev/null 2>&1; then\n\
     \x20       rc-service \"$1\" restart\n\
     \x20   elif command -v service >/dev/null 2>&1; then\n\
     \x20       service \"$1\" restart\n\
     \x20   else\n\
     \x20       say \"restart $1 yourself: it reads the proxy settings and the CA only when it starts\"\n\
     \x20   fi\n\
     }\n\n"
}

/// Steps 1/4 and 2/4 of both dockerd recipes: the CA where each Docker image store reads it.
fn docker_trust_steps(p: &Params) -> String {
    let mut s = String::from(ca_tmp());
    s.push_str(
        "say \"1/4 trusting pullcache's CA in the system store\"\n\
         # Classic dockerd verifies Docker Hub against the system roots only: it never reads\n\
         # /etc/docker/certs.d for Docker Hub.\n\
         install_ca \"$CA_TMP\"\n\n\
         say \"2/4 /etc/docker/certs.d (read by the containerd image store, Docker >= 29 default)\"\n",
    );
    s.push_str(&certs_d(p, "/etc/docker/certs.d"));
    s
}

/// Copies the CA into `<root>/<name>/pullcache-ca.crt` for every intercepted registry.
fn certs_d(p: &Params, root: &str) -> String {
    let mut s = String::new();
    for (name, _) in p.registries() {
        let _ = writeln!(
            s,
            "mkdir -p '{root}/{name}'\n\
             cp \"$CA_TMP\" '{root}/{name}/{CA_FILE_NAME}'\n\
             chmod 0644 '{root}/{name}/{CA_FILE_NAME}'"
        );
    }
    s.push('\n');
    s
}

fn undo_certs_d(p: &Params, root: &str) -> String {
    p.registries()
        .iter()
        .map(|(n, _)| format!("#   rm -f {root}/{n}/{CA_FILE_NAME}\n"))
        .collect()
}

// --- the recipes -----------------------------------------------------------------------------

fn dockerd_systemd(p: &Params) -> String {
    let t = Target::DockerdSystemd;
    let usage = format!(
        "# Run as root on the Docker host:\n\
         #   curl -fsS {url}/setup/{name} | sh\n\
         # Restarting dockerd stops running containers unless daemon.json has \"live-restore\": true;\n\
         # PULLCACHE_NO_RESTART=1 skips the restart (nothing changes until dockerd restarts).\n",
        url = p.proxy_url,
        name = t.name()
    );
    let undo = format!(
        "#   rm -f /etc/systemd/system/docker.service.d/pullcache.conf\n\
         {certs}\
         #   (the install_ca function below with --remove, or scripts/install-ca.sh --remove)\n\
         #   systemctl daemon-reload && systemctl restart docker\n",
        certs = undo_certs_d(p, "/etc/docker/certs.d")
    );
    let mut s = header(p, t, &usage, &undo, DEFAULT_NO_PROXY);
    s.push_str(&install_ca_fn());
    s.push_str(need_root());
    s.push_str(&docker_trust_steps(p));
    s.push_str(
        "say \"3/4 systemd drop-in /etc/systemd/system/docker.service.d/pullcache.conf\"\n\
         # Named pullcache.conf, so it sorts after (and overrides) an existing http-proxy.conf.\n\
         mkdir -p /etc/systemd/system/docker.service.d\n\
         cat >/etc/systemd/system/docker.service.d/pullcache.conf <<EOF\n\
         # Written by 'pullcache setup dockerd-systemd': pull images through pullcache.\n\
         [Service]\n\
         Environment=\"HTTPS_PROXY=$PROXY_URL\"\n\
         Environment=\"NO_PROXY=$NO_PROXY_LIST\"\n\
         EOF\n\n\
         say \"4/4 restarting dockerd (Go reads proxy variables and CA roots once per process)\"\n\
         if [ \"${PULLCACHE_NO_RESTART:-0}\" = 1 ]; then\n\
         \x20   say \"not restarting (PULLCACHE_NO_RESTART=1): run 'systemctl daemon-reload && systemctl restart docker'\"\n\
         else\n\
         \x20   systemctl daemon-reload\n\
         \x20   systemctl restart docker\n\
         \x20   systemctl show docker --property=Environment\n\
         fi\n\n",
    );
    s.push_str(&check_hint("docker pull"));
    s
}

fn daemon_json(p: &Params) -> String {
    let t = Target::DaemonJson;
    let usage = format!(
        "# Run as root on the Docker host (Docker Engine 23 or newer):\n\
         #   curl -fsS {url}/setup/{name} | sh\n\
         # Merges \"proxies\" into /etc/docker/daemon.json with python3 or jq (a copy of the old file\n\
         # is kept as daemon.json.pullcache-backup). Older engines refuse to start with \"proxies\";\n\
         # for them use: pullcache setup dockerd-systemd\n",
        url = p.proxy_url,
        name = t.name()
    );
    let undo = format!(
        "#   remove \"proxies\" from /etc/docker/daemon.json (or restore daemon.json.pullcache-backup)\n\
         {certs}\
         #   (the install_ca function below with --remove, or scripts/install-ca.sh --remove)\n\
         #   then restart dockerd\n",
        certs = undo_certs_d(p, "/etc/docker/certs.d")
    );
    let mut s = header(p, t, &usage, &undo, DEFAULT_NO_PROXY);
    s.push_str(&install_ca_fn());
    s.push_str(restart_fn());
    s.push_str(need_root());
    s.push_str(
        "# Engine >= 23 reads \"proxies\"; 20.10 refuses to start with an unknown key in daemon.json.\n\
         if command -v docker >/dev/null 2>&1; then\n\
         \x20   v=$(docker version --format '{{.Server.Version}}' 2>/dev/null || true)\n\
         \x20   major=${v%%.*}\n\
         \x20   case \"$major\" in\n\
         \x20       '' | *[!0-9]*) say \"cannot tell the Docker Engine version; it must be 23 or newer\" ;;\n\
         \x20       *) [ \"$major\" -ge 23 ] || die \"Docker Engine $v does not read \\\"proxies\\\" from daemon.json (23 or newer does); use the dockerd-systemd recipe\" ;;\n\
         \x20   esac\n\
         fi\n\n",
    );
    s.push_str(&docker_trust_steps(p));
    s.push_str(
        "say \"3/4 \\\"proxies\\\" in /etc/docker/daemon.json\"\n\
         DJ=/etc/docker/daemon.json\n\
         mkdir -p /etc/docker\n\
         if [ -s \"$DJ\" ] && [ ! -e \"$DJ.pullcache-backup\" ]; then cp \"$DJ\" \"$DJ.pullcache-backup\"; fi\n\
         if [ ! -s \"$DJ\" ]; then\n\
         \x20   printf '{\\n  \"proxies\": {\\n    \"https-proxy\": \"%s\",\\n    \"no-proxy\": \"%s\"\\n  }\\n}\\n' \\\n\
         \x20       \"$PROXY_URL\" \"$NO_PROXY_LIST\" >\"$DJ.tmp\"\n\
         elif command -v python3 >/dev/null 2>&1; then\n\
         \x20   python3 - \"$DJ\" \"$PROXY_URL\" \"$NO_PROXY_LIST\" >\"$DJ.tmp\" <<'PY'\n\
         import json, sys\n\
         cfg = json.load(open(sys.argv[1]))\n\
         proxies = cfg.setdefault(\"proxies\", {})\n\
         proxies[\"https-proxy\"] = sys.argv[2]\n\
         proxies[\"no-proxy\"] = sys.argv[3]\n\
         print(json.dumps(cfg, indent=2))\n\
         PY\n\
         elif command -v jq >/dev/null 2>&1; then\n\
         \x20   jq --arg p \"$PROXY_URL\" --arg n \"$NO_PROXY_LIST\" \\\n\
         \x20       '.proxies[\"https-proxy\"] = $p | .proxies[\"no-proxy\"] = $n' \"$DJ\" >\"$DJ.tmp\"\n\
         else\n\
         \x20   die \"$DJ exists and neither python3 nor jq is here to merge it; add: \\\"proxies\\\": {\\\"https-proxy\\\": \\\"$PROXY_URL\\\", \\\"no-proxy\\\": \\\"$NO_PROXY_LIST\\\"}\"\n\
         fi\n\
         mv \"$DJ.tmp\" \"$DJ\"\n\
         cat \"$DJ\"\n\n\
         say \"4/4 restarting dockerd (Go reads proxy settings and CA roots once per process)\"\n\
         restart_service docker\n\n",
    );
    s.push_str(&check_hint("docker pull"));
    s
}

fn containerd(p: &Params) -> String {
    let t = Target::Containerd;
    let usage = format!(
        "# Run as root on the containerd host (also a Kubernetes node: kubelet pulls through\n\
         # containerd's CRI plugin, which reads the service environment set here):\n\
         #   curl -fsS {url}/setup/{name} | sh\n\
         # Restarting containerd does not stop running containers (their shims keep running).\n\
         # On a Kubernetes node add the pod and service CIDRs and .svc,.cluster.local to\n\
         # PULLCACHE_NO_PROXY if in-cluster registries must be reached directly.\n\
         # ctr and nerdctl pull in their own process: run them with HTTPS_PROXY='{url}'\n\
         # (ctr: add --hosts-dir /etc/containerd/certs.d to use the hosts.toml written here).\n",
        url = p.proxy_url,
        name = t.name()
    );
    let mut undo =
        String::from("#   rm -f /etc/systemd/system/containerd.service.d/pullcache.conf\n");
    for (n, _) in p.registries() {
        let _ = writeln!(
            undo,
            "#   rm -f /etc/containerd/certs.d/{n}/{CA_FILE_NAME} (and hosts.toml if it has the pullcache marker)"
        );
    }
    undo.push_str(
        "#   (the install_ca function below with --remove, or scripts/install-ca.sh --remove)\n\
         #   systemctl daemon-reload && systemctl restart containerd\n",
    );
    let mut s = header(p, t, &usage, &undo, DEFAULT_NO_PROXY);
    s.push_str(&install_ca_fn());
    s.push_str(restart_fn());
    s.push_str(need_root());
    s.push_str(ca_tmp());
    s.push_str(
        "say \"1/4 trusting pullcache's CA in the system store (CRI pulls, ctr and nerdctl read it)\"\n\
         install_ca \"$CA_TMP\"\n\n\
         say \"2/4 /etc/containerd/certs.d hosts.toml (used where config_path points there)\"\n",
    );
    for (name, server) in p.registries() {
        let dir = format!("/etc/containerd/certs.d/{name}");
        let _ = write!(
            s,
            "mkdir -p '{dir}'\n\
             cp \"$CA_TMP\" '{dir}/{CA_FILE_NAME}'\n\
             chmod 0644 '{dir}/{CA_FILE_NAME}'\n\
             if [ ! -e '{dir}/hosts.toml' ] || grep -q 'pullcache setup' '{dir}/hosts.toml'; then\n\
             \x20   cat >'{dir}/hosts.toml' <<'EOF'\n\
             # Written by 'pullcache setup containerd'. The proxy comes from HTTPS_PROXY.\n\
             server = \"{server}\"\n\
             \n\
             [host.\"{server}\"]\n\
             \x20 capabilities = [\"pull\", \"resolve\", \"push\"]\n\
             \x20 ca = \"{dir}/{CA_FILE_NAME}\"\n\
             EOF\n\
             else\n\
             \x20   say \"{dir}/hosts.toml exists and is not ours: add ca = \\\"{dir}/{CA_FILE_NAME}\\\" to its [host] sections\"\n\
             fi\n"
        );
    }
    s.push_str(
        "if [ -f /etc/containerd/config.toml ] && ! grep -q 'config_path *= *\"/etc/containerd/certs.d\"' /etc/containerd/config.toml; then\n\
         \x20   say \"note: /etc/containerd/config.toml does not set config_path = \\\"/etc/containerd/certs.d\\\"; the system store (step 1) suffices\"\n\
         fi\n\n\
         say \"3/4 systemd drop-in /etc/systemd/system/containerd.service.d/pullcache.conf\"\n\
         mkdir -p /etc/systemd/system/containerd.service.d\n\
         cat >/etc/systemd/system/containerd.service.d/pullcache.conf <<EOF\n\
         # Written by 'pullcache setup containerd': pull images through pullcache.\n\
         [Service]\n\
         Environment=\"HTTPS_PROXY=$PROXY_URL\"\n\
         Environment=\"NO_PROXY=$NO_PROXY_LIST\"\n\
         EOF\n\n\
         say \"4/4 restarting containerd (Go reads proxy variables and CA roots once per process)\"\n\
         restart_service containerd\n\n",
    );
    s.push_str(&check_hint(
        "ctr image pull (with HTTPS_PROXY set) or crictl pull",
    ));
    s
}

fn gitlab_dind(p: &Params) -> String {
    let t = Target::GitlabDind;
    let usage = format!(
        "# Run as root on the GitLab Runner host (docker executor):\n\
         #   curl -fsS {url}/setup/{name} | sh\n\
         # It writes the CA to $PULLCACHE_CA_PATH (default /etc/gitlab-runner/{CA_FILE_NAME}) and prints\n\
         # what to add to config.toml and .gitlab-ci.yml. The proxy address must be reachable from\n\
         # job containers (not 127.0.0.1).\n",
        url = p.proxy_url,
        name = t.name()
    );
    let undo = "#   remove the lines below from config.toml and .gitlab-ci.yml;\n\
                #   rm -f /etc/gitlab-runner/pullcache-ca.crt\n";
    let mut s = header(p, t, &usage, undo, GITLAB_NO_PROXY);
    s.push_str(
        "CA_PATH=\"${PULLCACHE_CA_PATH:-/etc/gitlab-runner/pullcache-ca.crt}\"\n\
         write_ca \"$CA_PATH\"\n\
         say \"wrote $CA_PATH\" >&2\n\n",
    );
    if p.proxy_url.is_loopback() {
        s.push_str(
            "say \"warning: $PROXY_URL is a loopback address: job containers cannot reach it; \
             regenerate with the host's LAN address\" >&2\n\n",
        );
    }
    // Volumes: one PEM in /etc/ssl/certs (Go reads every file there; no
    // update-ca-certificates needed) and one per intercepted registry in certs.d.
    let mut volumes = String::from("      \"$CA_PATH:/etc/ssl/certs/pullcache-ca.pem:ro\",\n");
    let mut certs_d_lines = String::new();
    for (n, _) in p.registries() {
        let _ = writeln!(
            volumes,
            "      \"$CA_PATH:/etc/docker/certs.d/{n}/{CA_FILE_NAME}:ro\","
        );
        let _ = writeln!(
            certs_d_lines,
            "          mkdir -p /etc/docker/certs.d/{n}\n\
             \x20         cp /etc/ssl/certs/pullcache-ca.pem /etc/docker/certs.d/{n}/{CA_FILE_NAME}"
        );
    }
    // Inside a YAML block scalar: every line indented alike (10 spaces), which YAML strips,
    // leaving the heredoc terminator at column 0.
    let block_pem: String = p
        .ca_pem
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let _ = write!(
        s,
        "cat <<EOF\n\
         # ===== A. Runner config.toml (preferred): the CA for every job and service =====\n\
         # In /etc/gitlab-runner/config.toml, the [runners.docker] section of your runner (keep\n\
         # your existing volumes; the runner reloads config.toml by itself). Services get these\n\
         # volumes too. The dind daemon's Go TLS reads every PEM file in /etc/ssl/certs, so no\n\
         # update-ca-certificates is needed; certs.d is what the containerd image store (the\n\
         # default of a fresh docker:dind >= 29) reads.\n\
         \n\
         \x20 [runners.docker]\n\
         \x20   volumes = [\"/certs/client\", \"/cache\",\n\
         {volumes}\
         \x20   ]\n\
         \n\
         # ===== .gitlab-ci.yml: the proxy for the dind daemon, never for the job's docker CLI =====\n\
         # Variables reach the job and its services. The dind daemon pulls through pullcache; the\n\
         # job's docker CLI talks to the service alias 'docker', which must be in NO_PROXY or the\n\
         # CLI would send its daemon traffic to the proxy. Add your GitLab host to NO_PROXY too if\n\
         # git should not be tunnelled through pullcache.\n\
         \n\
         variables:\n\
         \x20 HTTPS_PROXY: \"$PROXY_URL\"\n\
         \x20 NO_PROXY: \"$NO_PROXY_LIST\"\n\
         \x20 DOCKER_HOST: \"tcp://docker:2376\"\n\
         \x20 DOCKER_TLS_CERTDIR: \"/certs\"\n\
         \n\
         build:\n\
         \x20 image: docker:cli\n\
         \x20 services:\n\
         \x20   - name: docker:dind\n\
         \x20     alias: docker\n\
         \x20 script:\n\
         \x20   - docker pull alpine:3     # the next pipeline gets it from pullcache's cache\n\
         \n\
         # ===== B. No access to the runner's config.toml: the CA from .gitlab-ci.yml =====\n\
         # The same variables as above; the service writes the CA before dockerd starts.\n\
         \n\
         build:\n\
         \x20 image: docker:cli\n\
         \x20 services:\n\
         \x20   - name: docker:dind\n\
         \x20     alias: docker\n\
         \x20     entrypoint:\n\
         \x20       - /bin/sh\n\
         \x20       - -c\n\
         \x20       - |\n\
         \x20         cat >/etc/ssl/certs/pullcache-ca.pem <<'PEM'\n\
         {block_pem}\
         \x20         PEM\n\
         {certs_d_lines}\
         \x20         exec dockerd-entrypoint.sh \"\\$@\"\n\
         \x20       - dockerd-entrypoint.sh\n\
         \x20 script:\n\
         \x20   - docker pull alpine:3\n\
         EOF\n"
    );
    s
}

fn kind(p: &Params) -> String {
    let t = Target::Kind;
    let usage = format!(
        "# Run as the user who runs kind (no root needed), on the Docker host:\n\
         #   curl -fsS {url}/setup/{name} | sh            (extra args go to 'kind create cluster')\n\
         # Writes the CA and a cluster config to $PULLCACHE_KIND_DIR (default ~/.config/pullcache)\n\
         # and creates the cluster with HTTPS_PROXY/NO_PROXY set: kind passes them to every node's\n\
         # containerd (adding the node subnet and .svc names to NO_PROXY). The CA is mounted at\n\
         # /etc/ssl/certs/pullcache-ca.pem in each node, where containerd's Go TLS reads it.\n\
         # PULLCACHE_KIND_CREATE=0 writes the files without creating a cluster.\n",
        url = p.proxy_url,
        name = t.name()
    );
    let undo = "#   kind delete cluster [--name NAME]; rm -rf ~/.config/pullcache\n";
    let mut s = header(p, t, &usage, undo, DEFAULT_NO_PROXY);
    if p.proxy_url.is_loopback() {
        s.push_str(
            "die \"$PROXY_URL is a loopback address: kind nodes cannot reach it; regenerate the recipe \
             with an address they can reach (the host's LAN IP, or the docker bridge gateway)\"\n\n",
        );
    }
    s.push_str(
        "DIR=\"${PULLCACHE_KIND_DIR:-$HOME/.config/pullcache}\"\n\
         write_ca \"$DIR/ca.crt\"\n\
         cat >\"$DIR/kind-config.yaml\" <<EOF\n\
         # Written by 'pullcache setup kind'. Give every node (workers too) the same extraMounts.\n\
         kind: Cluster\n\
         apiVersion: kind.x-k8s.io/v1alpha4\n\
         nodes:\n\
         \x20 - role: control-plane\n\
         \x20   extraMounts:\n\
         \x20     - hostPath: $DIR/ca.crt\n\
         \x20       containerPath: /etc/ssl/certs/pullcache-ca.pem\n\
         \x20       readOnly: true\n\
         EOF\n\
         say \"wrote $DIR/ca.crt and $DIR/kind-config.yaml\"\n\n\
         if [ \"${PULLCACHE_KIND_CREATE:-1}\" = 0 ]; then\n\
         \x20   say \"create the cluster with:\"\n\
         \x20   echo \"  HTTPS_PROXY='$PROXY_URL' NO_PROXY='$NO_PROXY_LIST' kind create cluster --config '$DIR/kind-config.yaml'\"\n\
         \x20   exit 0\n\
         fi\n\
         command -v kind >/dev/null 2>&1 || die \"kind is not installed\"\n\
         HTTPS_PROXY=\"$PROXY_URL\" NO_PROXY=\"$NO_PROXY_LIST\" kind create cluster --config \"$DIR/kind-config.yaml\" \"$@\"\n\n",
    );
    s.push_str(&check_hint("a pod's image pull"));
    s
}

/// How to see that pulls go through the cache.
fn check_hint(what: &str) -> String {
    format!(
        "say \"done. Check: {what} the same image twice, then on the pullcache host\"\n\
         say \"  'pullcache stats' (or curl -s http://127.0.0.1:3129/api/stats) counts the second as hits\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    mod proxy_url {
        use super::*;

        #[test]
        fn accepts_the_usual_forms() {
            for (input, want) in [
                ("proxy.lan", "http://proxy.lan:3128"),
                ("proxy.lan:8080", "http://proxy.lan:8080"),
                ("http://Proxy.LAN:3128/", "http://proxy.lan:3128"),
                ("10.0.0.5:3128", "http://10.0.0.5:3128"),
                ("[fd00::1]:3128", "http://[fd00::1]:3128"),
            ] {
                assert_eq!(ProxyUrl::parse(input).unwrap().to_string(), want, "{input}");
            }
        }

        #[test]
        fn refuses_what_clients_cannot_use_or_what_could_inject_shell() {
            for input in [
                "https://proxy:3128",
                "socks5://proxy:1080",
                "http://user:pw@proxy:3128",
                "http://proxy:3128/path",
                "proxy';reboot;':3128",
                "$(reboot):3128",
                "proxy:0",
                "",
            ] {
                assert!(ProxyUrl::parse(input).is_err(), "{input:?} accepted");
            }
        }

        #[test]
        fn from_request_uses_a_valid_host_header_else_the_listen_address() {
            let listen: SocketAddr = "0.0.0.0:3128".parse().unwrap();
            let u = ProxyUrl::from_request(Some("cache.ci:3128"), listen);
            assert_eq!(u.to_string(), "http://cache.ci:3128");
            let u = ProxyUrl::from_request(Some("cache.ci"), listen);
            assert_eq!(u.to_string(), "http://cache.ci:80");
            let u = ProxyUrl::from_request(Some("evil`id`:3128"), listen);
            assert_eq!(u.to_string(), "http://0.0.0.0:3128");
            let u = ProxyUrl::from_request(None, "127.0.0.1:9".parse().unwrap());
            assert_eq!(u.to_string(), "http://127.0.0.1:9");
            assert!(u.is_loopback());
        }
    }

    mod registries {
        use super::*;

        #[test]
        fn docker_hub_is_docker_io_and_ports_are_kept() {
            let p = Params {
                proxy_url: ProxyUrl::parse("p:1").unwrap(),
                ca_pem: String::new(),
                intercept: vec![
                    HostPort::parse("registry-1.docker.io", Some(443)).unwrap(),
                    HostPort::parse("ghcr.io", Some(443)).unwrap(),
                    HostPort::parse("reg.example:5000", None).unwrap(),
                ],
            };
            let names: Vec<String> = p.registries().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, vec!["docker.io", "ghcr.io", "reg.example:5000"]);
            assert_eq!(p.registries()[0].1, "https://registry-1.docker.io");
            assert_eq!(p.registries()[2].1, "https://reg.example:5000");
        }
    }

    mod normalize_pem {
        use super::*;

        #[test]
        fn refuses_keys_garbage_and_bundles() {
            assert!(normalize_pem("hello").is_err());
            assert!(
                normalize_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
                    .is_err()
            );
            assert!(normalize_pem(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                 -----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            )
            .is_err());
            assert!(normalize_pem(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                 -----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err());
        }
    }
}
