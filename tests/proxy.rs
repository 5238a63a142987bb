//! Proxy core: pullcache as an intercepting forward proxy.
//!
//! Intercepted hosts get TLS with a leaf from pullcache's CA and their HTTP/1.1 forwarded
//! (streaming, keep-alive) to the real upstream; other hosts are tunnelled blind on allowed
//! ports; the proxy serves its CA at `/ca.crt`; garbage never takes it down.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use common::body::{next_chunk, pattern_sha256, PatternBody};
use common::client::{
    connect, connect_ok, intercepted, peer_chain, plain, raw_exchange, request, tls, RawOutcome,
};
use common::digest::Sha256;
use common::origin::Origin;
use common::pullcache::{Flags, Pullcache};
use common::tls::{certs_from_pem, client_config_trusting, TestCa};
use common::{within, LONG, MIB, SHORT};

const ORIGIN: &str = "origin.test";
const TUNNELLED: &str = "tunnel.test";

/// An HTTPS origin for `origin.test` (certificate from a test CA standing in for the web PKI)
/// and a tunnel-only HTTPS origin for `tunnel.test`, behind a pullcache that intercepts
/// `origin.test` only.
struct World {
    web_pki: TestCa,
    origin: Origin,
    tunnelled: Origin,
    pc: Pullcache,
}

impl World {
    async fn start() -> World {
        World::start_with(Flags::new()).await
    }

    async fn start_with(extra: Flags) -> World {
        let web_pki = TestCa::new("web PKI");
        let origin = Origin::https(&web_pki, ORIGIN).await;
        let tunnelled = Origin::https(&web_pki, TUNNELLED).await;
        let flags = extra
            .intercept(ORIGIN)
            .connect_to(origin.connect_to(443))
            .connect_to(tunnelled.connect_to(443))
            .connect_to(tunnelled.connect_to(8443))
            .upstream_ca(web_pki.pem_path());
        let pc = Pullcache::start(flags).await;
        World {
            web_pki,
            origin,
            tunnelled,
            pc,
        }
    }

    fn proxy(&self) -> SocketAddr {
        self.pc.proxy_addr()
    }

    async fn intercepted(&self) -> common::client::Http1 {
        intercepted(self.proxy(), &self.pc.ca_pem(), ORIGIN).await
    }
}

/// The proxy still does its job: serves its CA and forwards an intercepted request.
async fn assert_still_serving(w: &World) {
    let mut c = plain(w.proxy()).await;
    let ca = c.get(&w.proxy().to_string(), "/ca.crt").await;
    assert_eq!(ca.status, StatusCode::OK, "GET /ca.crt: {}", ca.describe());
    let mut c = w.intercepted().await;
    let hello = c.get(ORIGIN, "/").await;
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.describe());
    assert_eq!(hello.text(), format!("hello from {ORIGIN}\n"));
}

fn assert_rejected(outcome: &RawOutcome, what: &str) {
    match outcome {
        RawOutcome::Closed => {}
        RawOutcome::Response(r) => assert!(
            (400..500).contains(&r.status),
            "{what}: expected a 4xx or a closed connection, got {} {}",
            r.status,
            r.reason
        ),
    }
}

// ----- streaming through an intercepted host --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn download_of_64_mib_streams_intact_through_an_intercepted_host() {
    let w = World::start().await;
    let len = 64 * MIB as u64;
    let mut c = w.intercepted().await;

    let resp = within(
        SHORT,
        "response head",
        c.send(
            request(Method::GET, ORIGIN, &format!("/bytes/{len}?seed=7"))
                .body(common::body::empty())
                .unwrap(),
        ),
    )
    .await
    .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut hash = Sha256::new();
    within(LONG, "64 MiB download", async {
        while let Some(chunk) = next_chunk(&mut body).await {
            hash.update(&chunk.expect("download body"));
        }
    })
    .await;

    assert_eq!(hash.len(), len, "downloaded length");
    assert_eq!(
        hash.finish_hex(),
        pattern_sha256(7, len),
        "downloaded bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_of_64_mib_streams_intact_through_an_intercepted_host() {
    let w = World::start().await;
    let len = 64 * MIB as u64;
    let mut c = w.intercepted().await;

    let req = request(Method::POST, ORIGIN, "/sha256")
        .header("content-length", len)
        .header("content-type", "application/octet-stream")
        .body(PatternBody::new(9, len).boxed())
        .unwrap();
    let resp = within(LONG, "64 MiB upload", c.fetch(req)).await;

    assert_eq!(resp.status, StatusCode::OK, "{}", resp.describe());
    let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("origin JSON");
    assert_eq!(json["length"], len, "length the origin received");
    assert_eq!(
        json["sha256"].as_str().unwrap(),
        pattern_sha256(9, len),
        "bytes the origin received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connect_tunnel_carries_several_keep_alive_requests() {
    let w = World::start().await;
    let mut c = w.intercepted().await;

    let hello = c.get(ORIGIN, "/").await;
    assert_eq!(hello.text(), format!("hello from {ORIGIN}\n"));
    let bytes = c.get(ORIGIN, "/bytes/1048576?seed=3").await;
    assert_eq!(bytes.body.len(), MIB);
    assert_eq!(
        common::digest::sha256_hex(&bytes.body),
        pattern_sha256(3, MIB as u64)
    );
    let upload = c
        .fetch(
            request(Method::POST, ORIGIN, "/sha256")
                .body(common::body::full("hello"))
                .unwrap(),
        )
        .await;
    let json: serde_json::Value = serde_json::from_slice(&upload.body).unwrap();
    assert_eq!(json["length"], 5);
    for i in 0..5 {
        let echo = c.get(ORIGIN, &format!("/echo/{i}")).await;
        assert_eq!(echo.status, StatusCode::OK, "{}", echo.describe());
        let json: serde_json::Value = serde_json::from_slice(&echo.body).unwrap();
        assert_eq!(json["target"], format!("/echo/{i}"));
        assert_eq!(json["headers"]["host"], ORIGIN, "Host seen upstream");
    }

    assert!(!c.is_closed(), "the tunnel stays open after 8 requests");
    assert_eq!(w.origin.seen().len(), 8, "the origin saw every request");
}

// ----- blind tunnels --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_hosts_are_tunnelled_blind_with_their_own_certificate() {
    let w = World::start().await;

    // Trusting only the destination's CA works, and the peer is the destination itself.
    let tcp = connect_ok(w.proxy(), &format!("{TUNNELLED}:443")).await;
    let tls_stream = tls(tcp, TUNNELLED, w.web_pki.client_config())
        .await
        .expect("TLS to the tunnelled host, verified against its own CA");
    let chain = peer_chain(&tls_stream);
    assert_eq!(
        Some(&chain[0]),
        w.tunnelled.cert.as_ref(),
        "the client sees the destination's own certificate"
    );
    let pullcache_ca = certs_from_pem(&w.pc.ca_pem());
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let (_, ca) = X509Certificate::from_der(&pullcache_ca[0]).unwrap();
    assert_ne!(
        leaf.issuer().to_string(),
        ca.subject().to_string(),
        "a tunnelled peer's certificate is not issued by pullcache's CA"
    );
    let mut c = common::client::Http1::handshake(tls_stream).await;
    let hello = c.get(TUNNELLED, "/").await;
    assert_eq!(hello.text(), format!("hello from {TUNNELLED}\n"));

    // Trusting only pullcache's CA fails: nothing was intercepted.
    let tcp = connect_ok(w.proxy(), &format!("{TUNNELLED}:443")).await;
    let refused = tls(tcp, TUNNELLED, client_config_trusting(&w.pc.ca_pem())).await;
    assert!(
        refused.is_err(),
        "a client trusting only pullcache's CA must reject a blind tunnel's peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnels_to_ports_not_allowed_are_forbidden() {
    let w = World::start().await;

    let answer = connect(w.proxy(), &format!("{TUNNELLED}:8443")).await;

    match answer {
        Ok(_) => panic!("CONNECT {TUNNELLED}:8443 was accepted; only --tunnel-port ports may be"),
        Err(r) => assert_eq!(r.status, 403, "CONNECT to a port not allowed: {r:?}"),
    }
    assert_eq!(
        w.tunnelled.server.accepted(),
        0,
        "the destination was never contacted"
    );
    assert_still_serving(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnel_ports_are_configurable() {
    let w = World::start_with(Flags::new().tunnel_port(443).tunnel_port(8443)).await;

    let tcp = connect_ok(w.proxy(), &format!("{TUNNELLED}:8443")).await;
    let tls_stream = tls(tcp, TUNNELLED, w.web_pki.client_config())
        .await
        .expect("TLS through a tunnel on an allowed extra port");
    let mut c = common::client::Http1::handshake(tls_stream).await;
    assert_eq!(
        c.get(TUNNELLED, "/").await.text(),
        format!("hello from {TUNNELLED}\n")
    );
}

// ----- the proxy's own endpoints --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_certificate_is_served_at_ca_crt() {
    let w = World::start().await;
    let mut c = plain(w.proxy()).await;

    let resp = c.get(&w.proxy().to_string(), "/ca.crt").await;

    assert_eq!(resp.status, StatusCode::OK, "{}", resp.describe());
    assert_eq!(resp.text(), w.pc.ca_pem(), "/ca.crt is exactly the CA PEM");
    assert_eq!(certs_from_pem(&resp.text()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_path_serves_help_text() {
    let w = World::start().await;
    let mut c = plain(w.proxy()).await;

    let resp = c.get(&w.proxy().to_string(), "/").await;

    assert_eq!(resp.status, StatusCode::OK, "{}", resp.describe());
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/"), "content-type {ct:?}");
    assert!(!resp.body.is_empty(), "help text is not empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absolute_form_plain_http_is_forwarded() {
    let origin = Origin::plain("plain.test").await;
    let pc = Pullcache::start(Flags::new().connect_to(origin.connect_to(80))).await;
    let mut c = plain(pc.proxy_addr()).await;

    let first = c.get("plain.test", "http://plain.test/echo/one?x=1").await;
    let second = c.get("plain.test", "http://plain.test:80/echo/two").await;

    for (resp, target) in [(first, "/echo/one?x=1"), (second, "/echo/two")] {
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.describe());
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("origin JSON");
        assert_eq!(json["origin"], "plain.test");
        assert_eq!(json["target"], target, "origin-form target upstream");
        assert_eq!(json["headers"]["host"], "plain.test", "Host upstream");
    }
    assert_eq!(origin.seen().len(), 2);
}

// ----- the CA and minted leaves --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_is_reused_across_restarts() {
    let mut w = World::start().await;
    let before = w.pc.ca_pem();

    w.pc.restart().await;

    assert_eq!(w.pc.ca_pem(), before, "same CA after a restart");
    let mut c = plain(w.proxy()).await;
    assert_eq!(
        c.get(&w.proxy().to_string(), "/ca.crt").await.text(),
        before
    );
    // A client that trusted the CA before the restart still trusts the proxy.
    let mut c = intercepted(w.proxy(), &before, ORIGIN).await;
    assert_eq!(c.get(ORIGIN, "/").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_first_connections_to_a_new_host_all_succeed_with_one_leaf() {
    let w = Arc::new(World::start().await);
    let barrier = Arc::new(tokio::sync::Barrier::new(32));

    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let w = w.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let tcp = connect_ok(w.proxy(), &format!("{ORIGIN}:443")).await;
                let s = tls(tcp, ORIGIN, client_config_trusting(&w.pc.ca_pem()))
                    .await
                    .expect("TLS with a minted leaf");
                let leaf = peer_chain(&s)[0].clone();
                let mut c = common::client::Http1::handshake(s).await;
                let r = c.get(ORIGIN, "/").await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
                leaf
            })
        })
        .collect();
    let mut leaves = Vec::new();
    for t in tasks {
        leaves.push(within(LONG, "32 concurrent clients", t).await.unwrap());
    }

    assert!(
        leaves.iter().all(|l| *l == leaves[0]),
        "every client got the same leaf: the host's leaf was minted once"
    );
}

fn extension<'a>(
    cert: &'a X509Certificate<'a>,
    pick: impl Fn(&ParsedExtension) -> bool,
) -> Option<&'a x509_parser::extensions::X509Extension<'a>> {
    cert.iter_extensions().find(|e| pick(e.parsed_extension()))
}

fn ski<'a>(cert: &'a X509Certificate<'a>) -> Option<&'a [u8]> {
    extension(cert, |e| {
        matches!(e, ParsedExtension::SubjectKeyIdentifier(_))
    })
    .and_then(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_and_minted_leaf_follow_the_certificate_profile() {
    let w = World::start().await;
    let tcp = connect_ok(w.proxy(), &format!("{ORIGIN}:443")).await;
    let s = tls(tcp, ORIGIN, client_config_trusting(&w.pc.ca_pem()))
        .await
        .expect("TLS with a minted leaf");
    let leaf_der = peer_chain(&s)[0].clone();
    let ca_der = certs_from_pem(&w.pc.ca_pem())[0].clone();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    // CA: critical CA:TRUE pathlen:0, critical keyCertSign + cRLSign, SKI.
    let bc = ca
        .basic_constraints()
        .unwrap()
        .expect("CA basicConstraints");
    assert!(
        bc.critical && bc.value.ca,
        "CA basicConstraints critical, CA:TRUE"
    );
    assert_eq!(bc.value.path_len_constraint, Some(0), "CA pathlen:0");
    let ku = ca.key_usage().unwrap().expect("CA keyUsage");
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    let ca_ski = ski(&ca).expect("CA subjectKeyIdentifier");

    // Leaf: SAN with the host, serverAuth, digitalSignature, AKI = CA's SKI, own key,
    // random serial of at least 64 bits, backdated, at most 397 days.
    let san = leaf.subject_alternative_name().unwrap().expect("leaf SAN");
    assert!(
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName(d) if *d == ORIGIN)),
        "leaf SAN names {ORIGIN}"
    );
    let eku = leaf.extended_key_usage().unwrap().expect("leaf EKU");
    assert!(eku.value.server_auth, "leaf EKU serverAuth");
    let ku = leaf.key_usage().unwrap().expect("leaf keyUsage");
    assert!(ku.value.digital_signature(), "leaf KU digitalSignature");
    let aki = extension(&leaf, |e| {
        matches!(e, ParsedExtension::AuthorityKeyIdentifier(_))
    })
    .expect("leaf authorityKeyIdentifier");
    if let ParsedExtension::AuthorityKeyIdentifier(aki) = aki.parsed_extension() {
        assert_eq!(
            aki.key_identifier.as_ref().map(|k| k.0),
            Some(ca_ski),
            "leaf AKI is the CA's SKI"
        );
    }
    if let Some(leaf_ski) = ski(&leaf) {
        assert_ne!(leaf_ski, ca_ski, "leaf SKI differs from the CA's");
    }
    assert_ne!(
        leaf.public_key().raw,
        ca.public_key().raw,
        "leaf has its own key"
    );
    let serial = leaf.raw_serial();
    let serial = &serial[serial.iter().take_while(|b| **b == 0).count()..];
    assert!(
        serial.len() >= 8,
        "serial of at least 64 bits: {serial:02x?}"
    );
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(nb <= now - 3600, "leaf notBefore is backdated");
    assert!(na > now, "leaf is valid now");
    assert!(na - nb <= 397 * 86400, "leaf validity at most 397 days");
}

// ----- hostile and broken input ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_connect_lines_are_rejected_and_the_proxy_keeps_serving() {
    let w = World::start().await;
    let cases: &[&[u8]] = &[
        b"CONNECT nonsense\r\n\r\n",
        b"CONNECT host:notaport HTTP/1.1\r\nHost: host:notaport\r\n\r\n",
        b"CONNECT nonsense HTTP/1.1\r\nHost: nonsense\r\n\r\n",
        b"CONNECT :443 HTTP/1.1\r\nHost: :443\r\n\r\n",
        b"CONNECT origin.test:99999 HTTP/1.1\r\nHost: origin.test:99999\r\n\r\n",
    ];
    for case in cases {
        let what = String::from_utf8_lossy(case).into_owned();

        let outcome = raw_exchange(w.proxy(), case).await;

        assert_rejected(&outcome, &what);
        assert_still_serving(&w).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_header_block_is_rejected_and_the_proxy_keeps_serving() {
    let w = World::start().await;
    let big = "a".repeat(200 * 1024);
    let cases = [
        format!("GET / HTTP/1.1\r\nHost: proxy\r\nX-Big: {big}\r\n\r\n"),
        format!("CONNECT {ORIGIN}:443 HTTP/1.1\r\nHost: {ORIGIN}:443\r\nX-Big: {big}\r\n\r\n"),
    ];
    for case in &cases {
        let outcome = raw_exchange(w.proxy(), case.as_bytes()).await;

        assert_rejected(&outcome, "200 KiB header block");
        assert_still_serving(&w).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_bytes_are_rejected_and_the_proxy_keeps_serving() {
    let w = World::start().await;
    let mut noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    noise.extend_from_slice(b"\r\n\r\n");
    // A TLS ClientHello sent to the plain proxy port (a client configured with https://).
    let client_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x02,
        0x13, 0x01, 0x01, 0x00, b'\r', b'\n', b'\r', b'\n',
    ];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        ("TLS ClientHello", client_hello.to_vec()),
        ("NUL bytes", vec![0u8; 1024]),
        (
            "header without colon",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        let outcome = raw_exchange(w.proxy(), bytes).await;

        assert_rejected(&outcome, what);
        assert_still_serving(&w).await;
    }
}

// ----- upstream failures ----------------------------------------------------------------------

/// A loopback address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_upstream_answers_502_naming_the_host() {
    let dead = dead_addr();
    let pc = Pullcache::start(
        Flags::new()
            .intercept("dead.test")
            .connect_to(format!("dead.test:443={dead}"))
            .connect_to(format!("deadtunnel.test:443={dead}")),
    )
    .await;

    // Intercepted: the proxy may refuse the CONNECT already, or answer inside the tunnel.
    match connect(pc.proxy_addr(), "dead.test:443").await {
        Err(r) => {
            assert_eq!(r.status, 502, "CONNECT to an unreachable intercepted host");
            assert!(
                r.body_text().contains("dead.test"),
                "body names the host: {r:?}"
            );
        }
        Ok(tcp) => {
            let s = tls(tcp, "dead.test", client_config_trusting(&pc.ca_pem()))
                .await
                .expect("TLS with a minted leaf");
            let mut c = common::client::Http1::handshake(s).await;
            let r = c.get("dead.test", "/v2/").await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.describe());
            assert!(
                r.text().contains("dead.test"),
                "body names the host: {}",
                r.describe()
            );
        }
    }

    // Tunnelled: the CONNECT itself fails.
    match connect(pc.proxy_addr(), "deadtunnel.test:443").await {
        Ok(_) => panic!("CONNECT to an unreachable tunnel destination answered 200"),
        Err(r) => {
            assert_eq!(
                r.status, 502,
                "CONNECT to an unreachable destination: {r:?}"
            );
            assert!(
                r.body_text().contains("deadtunnel.test"),
                "body names the host: {r:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_with_an_untrusted_certificate_answers_502() {
    let trusted = TestCa::new("web PKI");
    let stranger = TestCa::new("stranger CA");
    let origin = Origin::https(&stranger, "untrusted.test").await;
    let pc = Pullcache::start(
        Flags::new()
            .intercept("untrusted.test")
            .connect_to(origin.connect_to(443))
            .upstream_ca(trusted.pem_path()),
    )
    .await;

    let r = match connect(pc.proxy_addr(), "untrusted.test:443").await {
        Err(r) => {
            assert_eq!(r.status, 502, "CONNECT to an untrusted upstream: {r:?}");
            return;
        }
        Ok(tcp) => {
            let s = tls(tcp, "untrusted.test", client_config_trusting(&pc.ca_pem()))
                .await
                .expect("TLS with a minted leaf");
            let mut c = common::client::Http1::handshake(s).await;
            c.get("untrusted.test", "/").await
        }
    };

    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.describe());
    assert!(
        origin.seen().is_empty(),
        "no request reached an upstream whose certificate failed verification"
    );
}
