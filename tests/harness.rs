//! Self-checks of the test harness: the fake Docker Hub behaves like the service it stands in
//! for, talked to directly (no pullcache in the way). If these fail, the proxy and cache tests
//! prove nothing.

mod common;

use base64::Engine;
use hyper::{Method, StatusCode};

use common::body::empty;
use common::client::{direct, parse_challenge, request, Http1, Resp};
use common::hub::{FakeHub, Fault, FaultRule, Host, ACCEPT_MANIFESTS, AUTH, CDN, REGISTRY};
use common::{within, MIB, SHORT};

async fn conn(hub: &FakeHub, host: Host) -> Http1 {
    direct(hub.addr(host), host.name(), hub.ca().client_config()).await
}

async fn token(hub: &FakeHub, repo: &str, creds: Option<(&str, &str)>) -> Resp {
    let mut c = conn(hub, Host::Auth).await;
    let mut b = request(
        Method::GET,
        AUTH,
        &format!(
            "/token?service=registry.docker.io&scope=repository%3A{}%3Apull",
            repo.replace('/', "%2F")
        ),
    );
    if let Some((u, p)) = creds {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        b = b.header("authorization", format!("Basic {basic}"));
    }
    c.fetch(b.body(empty()).unwrap()).await
}

async fn bearer(hub: &FakeHub, repo: &str, creds: Option<(&str, &str)>) -> String {
    let r = token(hub, repo, creds).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    json["token"].as_str().unwrap().to_string()
}

async fn registry(
    hub: &FakeHub,
    method: Method,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Resp {
    let mut c = conn(hub, Host::Registry).await;
    let mut b = request(method, REGISTRY, path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    c.fetch(b.body(empty()).unwrap()).await
}

/// Follows a 307 to the CDN, as a well-behaved client does (no Authorization).
async fn cdn_get(hub: &FakeHub, location: &str, extra: &[(&str, &str)]) -> Resp {
    let target = location
        .strip_prefix(&format!("https://{CDN}"))
        .expect("redirect to the CDN host");
    let mut c = conn(hub, Host::Cdn).await;
    let mut b = request(Method::GET, CDN, target);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    c.fetch(b.body(empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_hub_speaks_the_distribution_protocol() {
    let hub = FakeHub::start().await;
    let img = hub.add_image("library/app", "1.0", &[MIB, 1000]);

    let ping = registry(&hub, Method::GET, "/v2/", None, &[]).await;
    assert_eq!(ping.status, StatusCode::UNAUTHORIZED);
    let ch = parse_challenge(ping.header("www-authenticate").unwrap()).unwrap();
    assert_eq!(ch["realm"], "https://auth.docker.io/token");
    assert_eq!(ch["service"], "registry.docker.io");

    let unauth = registry(
        &hub,
        Method::GET,
        "/v2/library/app/manifests/1.0",
        None,
        &[],
    )
    .await;
    assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauth.header("www-authenticate").unwrap(),
        hub.repo_challenge("library/app")
    );

    let t = bearer(&hub, "library/app", None).await;
    let ping = registry(&hub, Method::GET, "/v2/", Some(&t), &[]).await;
    assert_eq!(ping.status, StatusCode::OK);

    let head = registry(
        &hub,
        Method::HEAD,
        "/v2/library/app/manifests/1.0",
        Some(&t),
        &[("accept", ACCEPT_MANIFESTS)],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(
        head.header("content-length"),
        Some(img.manifest.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
    assert_eq!(hub.ratelimit_remaining(), 100, "HEAD is not a pull");

    let get = registry(
        &hub,
        Method::GET,
        "/v2/library/app/manifests/1.0",
        Some(&t),
        &[("accept", ACCEPT_MANIFESTS)],
    )
    .await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.body, img.manifest);
    assert_eq!(get.header("ratelimit-remaining"), Some("99;w=21600"));
    assert_eq!(hub.ratelimit_remaining(), 99);
    let by_digest = registry(
        &hub,
        Method::GET,
        &format!("/v2/library/app/manifests/{}", img.manifest_digest),
        Some(&t),
        &[("accept", ACCEPT_MANIFESTS)],
    )
    .await;
    assert_eq!(by_digest.body, img.manifest);
    let wrong_accept = registry(
        &hub,
        Method::GET,
        "/v2/library/app/manifests/1.0",
        Some(&t),
        &[(
            "accept",
            "application/vnd.docker.distribution.manifest.v1+json",
        )],
    )
    .await;
    assert_eq!(wrong_accept.status, StatusCode::NOT_FOUND);

    let manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    assert_eq!(manifest["config"]["digest"], img.config_digest);
    assert_eq!(manifest["layers"][0]["size"], MIB);

    let blob = registry(
        &hub,
        Method::GET,
        &format!("/v2/library/app/blobs/{}", img.layer_digests[0]),
        Some(&t),
        &[],
    )
    .await;
    assert_eq!(blob.status, StatusCode::TEMPORARY_REDIRECT);
    let location = blob.header("location").unwrap().to_string();
    let bytes = cdn_get(&hub, &location, &[]).await;
    assert_eq!(bytes.status, StatusCode::OK);
    assert_eq!(bytes.body, img.layers[0]);
    assert_eq!(hub.cdn_completions(&img.layer_digests[0]), 1);
    let part = cdn_get(&hub, &location, &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 10-19/{MIB}").as_str())
    );
    assert_eq!(part.body, img.layers[0].slice(10..20));
    let with_auth = cdn_get(&hub, &location, &[("authorization", "Bearer x")]).await;
    assert_eq!(with_auth.status, StatusCode::UNAUTHORIZED);
    assert_eq!(hub.cdn_authorization_seen(), 1);
    let forged = cdn_get(&hub, &location.replace("sig=", "sig=0"), &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);

    let unknown = registry(&hub, Method::GET, "/v2/library/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000", Some(&t), &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    assert_eq!(
        hub.count("GET", "/manifests/"),
        4,
        "including the unauthorised one"
    );
    assert_eq!(hub.count("HEAD", "/manifests/"), 1);
    assert_eq!(hub.blob_gets(&img.layer_digests[0]), 1 + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_hub_keeps_private_repositories_private() {
    let hub = FakeHub::start().await;
    let img = hub.add_image("private/app", "v1", &[1000]);
    hub.add_user("alice", "alice-pw");
    hub.add_user("bob", "bob-pw");
    hub.make_private("private/app", &["alice"]);
    let path = format!("/v2/private/app/blobs/{}", img.layer_digests[0]);

    let alice = bearer(&hub, "private/app", Some(("alice", "alice-pw"))).await;
    let bob = bearer(&hub, "private/app", Some(("bob", "bob-pw"))).await;
    let anon = bearer(&hub, "private/app", None).await;
    let wrong = token(&hub, "private/app", Some(("alice", "nope"))).await;

    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        registry(&hub, Method::GET, &path, Some(&alice), &[])
            .await
            .status,
        StatusCode::TEMPORARY_REDIRECT
    );
    assert_eq!(
        registry(&hub, Method::HEAD, &path, Some(&alice), &[])
            .await
            .status,
        StatusCode::TEMPORARY_REDIRECT
    );
    for t in [&bob, &anon] {
        let r = registry(&hub, Method::GET, &path, Some(t), &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.header("www-authenticate").unwrap(),
            hub.repo_challenge("private/app")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_hub_faults_gates_and_down_switch_work() {
    let hub = FakeHub::start().await;
    let img = hub.add_image("library/app", "1.0", &[4 * MIB]);
    let layer = &img.layer_digests[0];
    let t = bearer(&hub, "library/app", None).await;
    let redirect = registry(
        &hub,
        Method::GET,
        &format!("/v2/library/app/blobs/{layer}"),
        Some(&t),
        &[],
    )
    .await;
    let location = redirect.header("location").unwrap().to_string();

    hub.add_fault(
        FaultRule::new(Host::Cdn, Fault::TruncateAt(MIB)).path(common::digest::hex_of(layer)),
    );
    let cut = cdn_get(&hub, &location, &[]).await;
    assert!(cut.body_error.is_some(), "truncated: {}", cut.describe());
    assert!(cut.body.len() <= MIB, "no byte past the cut");
    hub.clear_faults();

    hub.add_fault(FaultRule::new(Host::Cdn, Fault::WrongBytes));
    let wrong = cdn_get(&hub, &location, &[]).await;
    assert!(wrong.body_error.is_none());
    assert_eq!(wrong.body.len(), 4 * MIB);
    assert_ne!(wrong.body, img.layers[0]);
    hub.clear_faults();

    hub.add_fault(FaultRule::new(Host::Registry, Fault::Status(500)).path("/manifests/"));
    let r500 = registry(
        &hub,
        Method::HEAD,
        "/v2/library/app/manifests/1.0",
        Some(&t),
        &[],
    )
    .await;
    assert_eq!(r500.status, StatusCode::INTERNAL_SERVER_ERROR);
    hub.clear_faults();
    hub.add_fault(FaultRule::new(Host::Registry, Fault::TooManyRequests).method(Method::GET));
    let r429 = registry(
        &hub,
        Method::GET,
        "/v2/library/app/manifests/1.0",
        Some(&t),
        &[],
    )
    .await;
    assert_eq!(r429.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r429.text().contains("TOOMANYREQUESTS"));
    hub.clear_faults();

    // Stall: no answer until the faults are cleared.
    hub.add_fault(FaultRule::new(Host::Registry, Fault::Stall));
    let mut c = conn(&hub, Host::Registry).await;
    let stalled = c.send(
        request(Method::GET, REGISTRY, "/v2/")
            .body(empty())
            .unwrap(),
    );
    tokio::pin!(stalled);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), &mut stalled)
            .await
            .is_err()
    );
    hub.clear_faults();
    let r = within(SHORT, "stalled request after clear", stalled)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Gate: the CDN holds the body at the gate until released.
    let gate = hub.gate_blob(layer, MIB);
    let mut c = conn(&hub, Host::Cdn).await;
    let target = location.strip_prefix(&format!("https://{CDN}")).unwrap();
    let resp = c
        .send(request(Method::GET, CDN, target).body(empty()).unwrap())
        .await
        .unwrap();
    within(SHORT, "gate reached", gate.reached(1)).await;
    assert_eq!(
        hub.cdn_completions(layer),
        1,
        "only the earlier unfaulted GET completed"
    );
    let mut body = resp.into_body();
    let mut got = 0;
    while got < MIB {
        got += common::body::next_chunk(&mut body)
            .await
            .unwrap()
            .unwrap()
            .len();
    }
    assert_eq!(got, MIB, "exactly the bytes before the gate");
    gate.release();
    let rest = common::body::compare_body(&mut body, &img.layers[0], got).await;
    assert!(rest.is_exact(4 * MIB), "{rest:?}");
    within(SHORT, "completion", hub.wait_cdn_completions(layer, 2)).await;

    // Down: connections are closed at once.
    hub.set_down(Host::Registry, true);
    let tcp = tokio::net::TcpStream::connect(hub.addr(Host::Registry))
        .await
        .unwrap();
    let refused = common::client::tls(tcp, REGISTRY, hub.ca().client_config()).await;
    assert!(refused.is_err(), "TLS to a down host fails");
    hub.set_down(Host::Registry, false);
    let up = registry(&hub, Method::GET, "/v2/", None, &[]).await;
    assert_eq!(up.status, StatusCode::UNAUTHORIZED);
}
