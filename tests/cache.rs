//! The digest cache, specified by what clients get and what Docker Hub sees.
//!
//! Content addressed by digest is fetched from upstream at most once, verified before it is
//! kept, streamed to every concurrent client while it downloads, served with ranges, kept
//! across restarts and crashes, and never handed to a client upstream would refuse. Tags are
//! revalidated with an uncounted HEAD and served stale when upstream fails.

mod common;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::mpsc;

use common::body::{check_chunk, compare_body, Compared};
use common::client::{assert_manifest, BlobStream, RegistryClient, Resp};
use common::digest::hex_of;
use common::hub::{FakeHub, Fault, FaultRule, Host, Image, ACCEPT_MANIFESTS};
use common::pullcache::Pullcache;
use common::{eventually, files_below, within, KIB, LONG, MEDIUM, MIB, SHORT};

async fn hub_and_pullcache() -> (FakeHub, Pullcache) {
    let hub = FakeHub::start().await;
    let pc = Pullcache::for_hub(&hub, &[]).await;
    (hub, pc)
}

/// Upstream GETs of blob bytes, on the registry and on the CDN.
fn blob_traffic(hub: &FakeHub) -> (usize, usize) {
    (
        hub.count_on(Host::Registry, "GET", "/blobs/"),
        hub.count_on(Host::Cdn, "GET", ""),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Fails unless `r` refuses the content: the given status and none of `data`'s bytes.
fn assert_refused(r: &Resp, status: StatusCode, data: &[u8], what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.describe());
    let probe = &data[..data.len().min(64)];
    assert!(
        !contains(&r.body, probe),
        "{what}: the refusal carries the content's bytes"
    );
}

/// Reads a blob stream: reports its first chunk on `first`, then reads the rest, comparing
/// every byte with `expected`.
async fn read_reporting_first_chunk(
    mut s: BlobStream,
    expected: Bytes,
    first: mpsc::UnboundedSender<()>,
) -> (String, Compared) {
    let x_cache = s.x_cache();
    let mut c = Compared::starting_at(0);
    match s.next_chunk().await {
        Some(Ok(chunk)) => check_chunk(&mut c, &expected, &chunk),
        Some(Err(e)) => c.error = Some(e.to_string()),
        None => {}
    }
    let _ = first.send(());
    if c.error.is_some() || c.received == 0 {
        return (x_cache, c);
    }
    let rest = compare_body(&mut s.body, &expected, c.received).await;
    (
        x_cache,
        Compared {
            received: rest.received,
            first_mismatch: c.first_mismatch.or(rest.first_mismatch),
            error: rest.error,
        },
    )
}

/// Waits until pullcache answers a HEAD for the blob from its cache: the download that was
/// seen finishing upstream has been verified and committed. (A HEAD never causes an upstream
/// GET, so polling it leaves the counters alone.)
async fn wait_until_cached(pc: &Pullcache, hub: &FakeHub, repo: &str, digest: &str) {
    let mut c = RegistryClient::new(pc, hub);
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let r = c.head_blob(repo, digest).await;
        if r.x_cache() == "HIT" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{digest} never became a cache hit: {}",
            r.describe()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// ----- warm pulls -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_pull_costs_no_upstream_blob_or_manifest_get() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/alpine", "3.20", &[3 * MIB, 200 * KIB, 1000]);

    let first = RegistryClient::new(&pc, &hub).pull(&img).await;
    let blobs_after_first = blob_traffic(&hub);
    let manifest_gets_after_first = hub.manifest_gets();
    let remaining_after_first = hub.ratelimit_remaining();
    let second = RegistryClient::new(&pc, &hub).pull(&img).await;

    assert_eq!(first.tag, "MISS", "first pull, tag: {first:?}");
    assert!(
        first.blobs.iter().all(|x| x == "MISS"),
        "first pull, blobs: {first:?}"
    );
    assert_eq!(
        blob_traffic(&hub),
        blobs_after_first,
        "second pull: zero upstream blob GETs (registry, CDN)\n{}",
        hub.describe_requests()
    );
    assert_eq!(
        hub.manifest_gets(),
        manifest_gets_after_first,
        "second pull: zero manifest GETs (the tag is revalidated with HEAD)"
    );
    assert_eq!(
        hub.ratelimit_remaining(),
        remaining_after_first,
        "second pull: no counted pull"
    );
    assert_eq!(second.tag, "REVALIDATED", "second pull, tag: {second:?}");
    assert_eq!(second.manifest, "HIT", "second pull, manifest by digest");
    assert!(
        second.blobs.iter().all(|x| x == "HIT"),
        "second pull, blobs: {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_registry_response_carries_x_cache() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/labelled", "1", &[1000]);
    let unknown = format!("sha256:{}", "0".repeat(64));
    let mut c = RegistryClient::new(&pc, &hub);

    let answers = vec![
        ("ping", c.ping().await, 401),
        (
            "manifest by tag",
            c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS).await,
            200,
        ),
        (
            "HEAD manifest by digest",
            c.head_manifest(&img.repo, &img.manifest_digest, ACCEPT_MANIFESTS)
                .await,
            200,
        ),
        (
            "unknown tag",
            c.get_manifest(&img.repo, "no-such-tag", ACCEPT_MANIFESTS)
                .await,
            404,
        ),
        (
            "unknown blob",
            c.get_blob(&img.repo, &unknown, None).await,
            404,
        ),
        (
            "blob",
            c.get_blob(&img.repo, &img.config_digest, None).await,
            200,
        ),
        (
            "unsatisfiable range of a cached blob",
            c.get_blob(&img.repo, &img.config_digest, Some("bytes=99999999-"))
                .await,
            416,
        ),
    ];

    for (what, r, status) in answers {
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.describe());
        let x_cache = r.header("x-cache").unwrap_or_default();
        assert!(
            ["HIT", "MISS", "COALESCED", "REVALIDATED", "STALE", "PASS"].contains(&x_cache),
            "{what}: X-Cache {x_cache:?}"
        );
    }
}

// ----- one download, many clients -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_cold_clients_share_one_upstream_download_and_stream_while_it_runs() {
    let (hub, pc) = hub_and_pullcache().await;
    let (digest, data) = hub.add_random_blob("library/big", 64 * MIB);
    // The CDN sends 4 MiB, then holds the rest until every client has seen bytes.
    let gate = hub.gate_blob(&digest, 4 * MIB);
    let (first_tx, mut first_rx) = mpsc::unbounded_channel();

    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = RegistryClient::new(&pc, &hub);
        let (digest, data, first_tx) = (digest.clone(), data.clone(), first_tx.clone());
        tasks.push(tokio::spawn(async move {
            let s = client.get_blob_stream("library/big", &digest, None).await;
            assert_eq!(s.status, StatusCode::OK, "blob status");
            read_reporting_first_chunk(s, data, first_tx).await
        }));
    }
    for i in 0..16 {
        within(
            MEDIUM,
            &format!("client {i} of 16 receives its first bytes while upstream is held"),
            first_rx.recv(),
        )
        .await;
    }
    assert_eq!(
        hub.cdn_completions(&digest),
        0,
        "every client got bytes before the upstream download finished"
    );
    gate.release();
    let mut x_caches = Vec::new();
    for t in tasks {
        let (x_cache, got) = within(LONG, "clients read the whole blob", t)
            .await
            .unwrap();
        assert!(got.is_exact(data.len()), "a client's blob: {got:?}");
        x_caches.push(x_cache);
    }

    assert_eq!(
        hub.count_on(Host::Registry, "GET", hex_of(&digest)),
        1,
        "exactly one registry GET for the blob"
    );
    assert_eq!(
        hub.count_on(Host::Cdn, "GET", hex_of(&digest)),
        1,
        "exactly one CDN download of the blob"
    );
    x_caches.sort();
    assert_eq!(
        x_caches.iter().filter(|x| *x == "MISS").count(),
        1,
        "{x_caches:?}"
    );
    assert_eq!(
        x_caches.iter().filter(|x| *x == "COALESCED").count(),
        15,
        "{x_caches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_leaving_mid_blob_does_not_cancel_the_download() {
    let (hub, pc) = hub_and_pullcache().await;
    let (digest, data) = hub.add_random_blob("library/big", 16 * MIB);
    let gate = hub.gate_blob(&digest, 2 * MIB);

    let mut leaver = RegistryClient::new(&pc, &hub);
    let mut s = leaver.get_blob_stream("library/big", &digest, None).await;
    assert_eq!(s.status, StatusCode::OK);
    within(SHORT, "first chunk", s.next_chunk())
        .await
        .expect("a first chunk")
        .expect("first chunk");
    drop(s); // closes the client's connection mid-body
    gate.release();

    within(
        LONG,
        "the upstream download finishes although its only client left",
        hub.wait_cdn_completions(&digest, 1),
    )
    .await;
    wait_until_cached(&pc, &hub, "library/big", &digest).await;
    let next = RegistryClient::new(&pc, &hub)
        .get_blob("library/big", &digest, None)
        .await;

    assert_eq!(next.status, StatusCode::OK, "{}", next.describe());
    assert_eq!(next.x_cache(), "HIT");
    assert!(next.body == data, "the cached blob has the right bytes");
    assert_eq!(hub.count_on(Host::Registry, "GET", hex_of(&digest)), 1);
    assert_eq!(hub.count_on(Host::Cdn, "GET", hex_of(&digest)), 1);
}

// ----- bad upstream bytes are never served or kept --------------------------------------------

/// Four clients stream a blob whose upstream body goes bad after they started; every one of
/// them must see its response cut, nothing may be cached, and the next request goes upstream.
async fn bad_upstream_body_aborts_every_client_and_caches_nothing(fault: Fault) {
    let (hub, pc) = hub_and_pullcache().await;
    let len = 8 * MIB;
    let (digest, data) = hub.add_random_blob("library/bad", len);
    hub.add_fault(FaultRule::new(Host::Cdn, fault.clone()).path(hex_of(&digest)));
    let gate = hub.gate_blob(&digest, MIB);
    let (first_tx, mut first_rx) = mpsc::unbounded_channel();

    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = RegistryClient::new(&pc, &hub);
        let (digest, data, first_tx) = (digest.clone(), data.clone(), first_tx.clone());
        tasks.push(tokio::spawn(async move {
            let s = client.get_blob_stream("library/bad", &digest, None).await;
            if s.status != StatusCode::OK {
                // Refusing before any byte is also safe.
                let _ = first_tx.send(());
                let mut refused = Compared::starting_at(0);
                refused.error = Some(format!("status {}", s.status));
                return (s.status.to_string(), refused);
            }
            read_reporting_first_chunk(s, data, first_tx).await
        }));
    }
    for _ in 0..4 {
        within(MEDIUM, "each client starts receiving", first_rx.recv()).await;
    }
    gate.release();
    for t in tasks {
        let (_, got) = within(LONG, "clients finish", t).await.unwrap();
        assert!(
            !got.completed(len),
            "{fault:?}: a client got a complete body (first wrong byte at {:?}): {got:?}",
            got.first_mismatch
        );
    }

    assert!(
        !pc.blob_path(&digest).exists(),
        "{fault:?}: unverified bytes were committed to the cache"
    );
    hub.clear_faults();
    let registry_before = hub.count_on(Host::Registry, "GET", hex_of(&digest));
    let cdn_before = hub.count_on(Host::Cdn, "GET", hex_of(&digest));
    let retry = RegistryClient::new(&pc, &hub)
        .get_blob("library/bad", &digest, None)
        .await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.describe());
    assert!(
        retry.body_error.is_none() && retry.body == data,
        "{fault:?}: the retry gets the right bytes: {}",
        retry.describe()
    );
    assert_ne!(retry.x_cache(), "HIT", "{fault:?}: nothing was cached");
    assert!(
        hub.count_on(Host::Registry, "GET", hex_of(&digest)) > registry_before
            && hub.count_on(Host::Cdn, "GET", hex_of(&digest)) > cdn_before,
        "{fault:?}: the retry went upstream again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_bytes_from_upstream_abort_every_client_and_cache_nothing() {
    bad_upstream_body_aborts_every_client_and_caches_nothing(Fault::WrongBytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_upstream_body_aborts_every_client_and_caches_nothing() {
    bad_upstream_body_aborts_every_client_and_caches_nothing(Fault::TruncateAt(6 * MIB)).await;
}

// ----- ranges and HEAD ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_of_a_cached_blob_are_served_from_the_cache() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/ranged", "1", &[3 * MIB]);
    let mut c = RegistryClient::new(&pc, &hub);
    c.pull(&img).await;
    let (layer, data) = (&img.layer_digests[0], &img.layers[0]);
    let len = data.len();
    let before = blob_traffic(&hub);

    let open_ended = c
        .get_blob("library/ranged", layer, Some("bytes=1000-"))
        .await;
    let bounded = c
        .get_blob("library/ranged", layer, Some("bytes=1000-1999"))
        .await;
    let last_byte = c
        .get_blob(
            "library/ranged",
            layer,
            Some(&format!("bytes={}-", len - 1)),
        )
        .await;

    for (r, start, end) in [
        (&open_ended, 1000, len),
        (&bounded, 1000, 2000),
        (&last_byte, len - 1, len),
    ] {
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{}", r.describe());
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{}/{len}", end - 1).as_str()),
            "Content-Range"
        );
        assert_eq!(
            r.header("content-length"),
            Some((end - start).to_string().as_str())
        );
        let want = data.slice(start..end);
        assert!(
            r.body == want,
            "bytes {start}..{end}: got {} bytes, first difference at {:?}; they are the blob's \
             bytes from offset {:?}",
            r.body.len(),
            r.body.iter().zip(want.iter()).position(|(a, b)| a != b),
            data.windows(64.min(r.body.len()))
                .position(|w| r.body.starts_with(w))
        );
        assert_eq!(r.x_cache(), "HIT");
    }
    assert_eq!(
        blob_traffic(&hub),
        before,
        "ranges of a cached blob cost no upstream GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_requests_never_cause_an_upstream_get() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/headed", "1", &[2 * MIB, 1000]);
    let mut c = RegistryClient::new(&pc, &hub);

    for round in ["cold", "warm"] {
        if round == "warm" {
            c.pull(&img).await;
        }
        let gets_before = (hub.manifest_gets(), blob_traffic(&hub));
        let remaining_before = hub.ratelimit_remaining();

        for reference in [img.tag.as_str(), img.manifest_digest.as_str()] {
            let r = c
                .head_manifest(&img.repo, reference, ACCEPT_MANIFESTS)
                .await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{round} HEAD manifest {reference}"
            );
            assert_eq!(
                r.header("docker-content-digest"),
                Some(img.manifest_digest.as_str())
            );
            assert_eq!(
                r.header("content-length"),
                Some(img.manifest.len().to_string().as_str())
            );
            assert!(r.body.is_empty());
        }
        for (digest, _) in img.blobs() {
            // Whether the answer is 200 or upstream's redirect is another test's business.
            let r = c.head_blob(&img.repo, &digest).await;
            assert!(
                r.status == StatusCode::OK || r.status.is_redirection(),
                "{round} HEAD blob: {}",
                r.describe()
            );
            assert!(r.body.is_empty());
        }

        assert_eq!(
            (hub.manifest_gets(), blob_traffic(&hub)),
            gets_before,
            "{round}: HEAD caused an upstream GET\n{}",
            hub.describe_requests()
        );
        assert_eq!(
            hub.ratelimit_remaining(),
            remaining_before,
            "{round}: HEAD counted as a pull"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_of_a_blob_is_answered_by_the_proxy_never_with_the_cdn_redirect() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/headed", "1", &[2 * MIB, 1000]);
    let mut c = RegistryClient::new(&pc, &hub);

    for round in ["cold", "warm"] {
        if round == "warm" {
            c.pull(&img).await;
        }
        for (digest, data) in img.blobs() {
            let r = c.head_blob(&img.repo, &digest).await;

            assert_eq!(
                r.status,
                StatusCode::OK,
                "{round} HEAD blob: {}",
                r.describe()
            );
            assert!(r.header("location").is_none(), "{round}: no Location");
            assert_eq!(
                r.header("content-length"),
                Some(data.len().to_string().as_str()),
                "{round} HEAD blob Content-Length"
            );
            assert!(r.body.is_empty());
        }
    }
}

// ----- stale-if-error -------------------------------------------------------------------------

/// Pulls an image, then breaks the registry with `break_it`; returns the client that pulled.
async fn pulled_then_broken(
    break_it: impl FnOnce(&FakeHub),
) -> (FakeHub, Pullcache, RegistryClient, Image) {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/stale", "latest", &[1000]);
    let mut c = RegistryClient::new(&pc, &hub);
    c.pull(&img).await;
    break_it(&hub);
    (hub, pc, c, img)
}

fn assert_stale(r: &Resp, img: &Image, why: &str) {
    assert_manifest(r, img, &format!("tag while upstream {why}"));
    assert_eq!(r.x_cache(), "STALE", "tag while upstream {why}");
    assert!(
        r.header("warning").is_some(),
        "a stale answer carries a Warning header ({why})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_is_served_stale_when_upstream_answers_429() {
    let (_hub, _pc, mut c, img) = pulled_then_broken(|hub| {
        hub.add_fault(FaultRule::new(Host::Registry, Fault::TooManyRequests).path("/manifests/"))
    })
    .await;

    let r = c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS).await;

    assert_stale(&r, &img, "answers 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_is_served_stale_when_upstream_answers_500() {
    let (_hub, _pc, mut c, img) = pulled_then_broken(|hub| {
        hub.add_fault(FaultRule::new(Host::Registry, Fault::Status(500)).path("/manifests/"))
    })
    .await;

    let r = c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS).await;

    assert_stale(&r, &img, "answers 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_and_ping_are_served_stale_when_upstream_is_down() {
    let (hub, _pc, mut c, img) = pulled_then_broken(|hub| hub.set_down(Host::Registry, true)).await;

    let r = c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS).await;
    let ping = c.ping().await;

    assert_stale(&r, &img, "is down");
    assert_eq!(
        ping.status,
        StatusCode::UNAUTHORIZED,
        "/v2/ while down: {}",
        ping.describe()
    );
    assert_eq!(
        ping.header("www-authenticate"),
        Some(hub.ping_challenge().as_str()),
        "/v2/ while down answers the last challenge"
    );
}

// ----- private content ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_content_is_never_served_to_clients_upstream_refuses() {
    let (hub, pc) = hub_and_pullcache().await;
    hub.add_user("alice", "alice-pw");
    hub.add_user("bob", "bob-pw");
    let img = hub.add_image("private/app", "v1", &[2 * MIB, 1000]);
    hub.make_private("private/app", &["alice"]);
    hub.add_image("library/public", "latest", &[1000]);

    RegistryClient::new(&pc, &hub)
        .with_credentials("alice", "alice-pw")
        .pull(&img)
        .await;
    let cdn_after_alice = hub.count_on(Host::Cdn, "GET", "");

    let others = [
        ("anonymous", RegistryClient::new(&pc, &hub)),
        (
            "bob",
            RegistryClient::new(&pc, &hub).with_credentials("bob", "bob-pw"),
        ),
    ];
    for (who, mut c) in others {
        for reference in [img.tag.as_str(), img.manifest_digest.as_str()] {
            let r = c
                .get_manifest("private/app", reference, ACCEPT_MANIFESTS)
                .await;
            assert_refused(
                &r,
                StatusCode::UNAUTHORIZED,
                &img.manifest,
                &format!("{who}: GET private/app manifest {reference}"),
            );
            assert!(
                r.header("www-authenticate").is_some(),
                "{who}: the 401 carries upstream's challenge"
            );
            let r = c
                .head_manifest("private/app", reference, ACCEPT_MANIFESTS)
                .await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{who}: HEAD {reference}"
            );
        }
        for (digest, data) in img.blobs() {
            let r = c.get_blob("private/app", &digest, None).await;
            assert_refused(
                &r,
                StatusCode::UNAUTHORIZED,
                &data,
                &format!("{who}: GET private/app blob {digest}"),
            );
            assert!(r.header("www-authenticate").is_some());
            let r = c.get_blob("private/app", &digest, Some("bytes=0-")).await;
            assert_refused(&r, StatusCode::UNAUTHORIZED, &data, "ranged GET");
            let r = c.head_blob("private/app", &digest).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{who}: HEAD blob");

            // Same digest, asked under a public repository that does not hold it.
            let r = c.get_blob("library/public", &digest, None).await;
            assert_refused(
                &r,
                StatusCode::NOT_FOUND,
                &data,
                &format!("{who}: GET library/public blob {digest}"),
            );
        }
        let r = c
            .get_manifest("library/public", &img.manifest_digest, ACCEPT_MANIFESTS)
            .await;
        assert_refused(
            &r,
            StatusCode::NOT_FOUND,
            &img.manifest,
            &format!("{who}: private manifest digest under library/public"),
        );
    }

    assert_eq!(
        hub.count_on(Host::Cdn, "GET", ""),
        cdn_after_alice,
        "refusals download nothing"
    );
}

// ----- redirects ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_redirects_are_followed_inside_the_proxy_without_credentials() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/redirected", "1", &[MIB, 1000]);
    let mut c = RegistryClient::new(&pc, &hub);

    for (digest, data) in img.blobs() {
        let r = c.get_blob(&img.repo, &digest, None).await;

        assert_eq!(r.status, StatusCode::OK, "never the 307: {}", r.describe());
        assert!(r.header("location").is_none(), "no Location to the client");
        assert!(r.body == data);
        assert_eq!(hub.count_on(Host::Cdn, "GET", hex_of(&digest)), 1);
        assert!(
            hub.requests()
                .iter()
                .filter(|s| s.host == Host::Registry && s.method == hyper::Method::GET)
                .filter(|s| s.target.contains(hex_of(&digest)))
                .all(|s| s.authorization.is_some()),
            "the registry's blob GET carried the client's credentials:\n{:#?}",
            hub.requests()
        );
    }
    assert_eq!(
        hub.cdn_authorization_seen(),
        0,
        "Authorization was never sent to the CDN host"
    );
}

// ----- restarts and crash recovery ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_survives_a_restart() {
    let (hub, mut pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/kept", "1", &[2 * MIB, 1000]);
    RegistryClient::new(&pc, &hub).pull(&img).await;
    let before = blob_traffic(&hub);

    pc.restart().await;
    let again = RegistryClient::new(&pc, &hub).pull(&img).await;

    assert_eq!(
        blob_traffic(&hub),
        before,
        "after a restart: zero upstream blob GETs"
    );
    assert!(again.blobs.iter().all(|x| x == "HIT"), "{again:?}");
    assert_eq!(again.manifest, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leftover_temp_files_are_removed_at_startup() {
    let (hub, mut pc) = hub_and_pullcache().await;
    pc.stop().await;
    let tmp = pc.cache_dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let leftover = tmp.join("leftover.partial");
    std::fs::write(&leftover, vec![0xAA; 64 * KIB]).unwrap();

    pc.start_again().await;

    eventually(SHORT, "the leftover temp file is removed", || {
        let gone = !leftover.exists();
        async move { gone }
    })
    .await;
    let img = hub.add_image("library/after-crash", "1", &[1000]);
    RegistryClient::new(&pc, &hub).pull(&img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_file_written_but_not_indexed_is_served_after_restart() {
    let (hub, mut pc) = hub_and_pullcache().await;
    let (digest, data) = hub.add_random_blob("library/recover", MIB);
    pc.stop().await;
    // A crash between the rename into blobs/ and the index insert leaves exactly this.
    let path = pc.blob_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();

    pc.start_again().await;
    let r = RegistryClient::new(&pc, &hub)
        .get_blob("library/recover", &digest, None)
        .await;

    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.x_cache(), "HIT");
    assert!(r.body == data);
    assert_eq!(hub.blob_gets(&digest), 0, "no upstream GET for the blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_index_does_not_prevent_startup_and_blobs_stay_hits() {
    let (hub, mut pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/indexed", "1", &[MIB, 1000]);
    RegistryClient::new(&pc, &hub).pull(&img).await;
    let before = blob_traffic(&hub);
    pc.stop().await;
    let index_files = files_below(&pc.cache_dir().join("index"));
    assert!(
        !index_files.is_empty(),
        "expected the index under <cache-dir>/index/"
    );
    for f in &index_files {
        let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0).max(4096);
        std::fs::write(f, vec![0x5A; len as usize]).unwrap();
    }

    pc.start_again().await;
    let mut c = RegistryClient::new(&pc, &hub);

    for (digest, data) in img.blobs() {
        let r = c.get_blob(&img.repo, &digest, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
        assert_eq!(r.x_cache(), "HIT", "blob {digest} after index corruption");
        assert!(r.body == data);
    }
    assert_eq!(blob_traffic(&hub), before, "no upstream blob GET");
}

// ----- outage policy and tag TTL --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn during_an_outage_public_content_reaches_everyone_private_only_past_grantees() {
    // --auth-ttl 0: no grant is ever fresh, so every request needs upstream's word — and
    // while upstream is down only the outage policy decides.
    let hub = FakeHub::start().await;
    let pc = Pullcache::for_hub(&hub, &["--auth-ttl", "0"]).await;
    hub.add_user("alice", "alice-pw");
    let public = hub.add_image("library/open", "v1", &[4 * KIB]);
    let private = hub.add_image("private/vault", "v1", &[4 * KIB]);
    hub.make_private("private/vault", &["alice"]);
    RegistryClient::new(&pc, &hub).pull(&public).await;
    let mut alice = RegistryClient::new(&pc, &hub).with_credentials("alice", "alice-pw");
    alice.pull(&private).await;

    hub.set_down(Host::Registry, true);

    // A client pullcache has never seen (fresh anonymous token) gets the public image once
    // pullcache has learned, in the background, that the repository is public.
    let (pc_ref, hub_ref, img) = (&pc, &hub, &public);
    eventually(
        MEDIUM,
        "public tag served stale to a new client",
        || async move {
            let mut c = RegistryClient::new(pc_ref, hub_ref);
            c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS)
                .await
                .x_cache()
                == "STALE"
        },
    )
    .await;
    let mut stranger = RegistryClient::new(&pc, &hub);
    let layer = &public.layer_digests[0];
    let r = stranger.get_blob(&public.repo, layer, None).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "public blob during outage: {}",
        r.describe()
    );
    assert!(
        r.body == public.layers[0],
        "public blob bytes during outage"
    );

    // The private image: alice (who held a grant) still gets it; nobody else does.
    let r = alice
        .get_manifest(&private.repo, &private.tag, ACCEPT_MANIFESTS)
        .await;
    assert_stale(&r, &private, "is down (alice, past grant)");
    let r = alice
        .get_blob(&private.repo, &private.layer_digests[0], None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "alice's private blob: {}",
        r.describe()
    );
    for who in ["anonymous", "alice-with-a-new-token"] {
        let mut c = RegistryClient::new(&pc, &hub);
        if who != "anonymous" {
            c = c.with_credentials("alice", "alice-pw");
        }
        let r = c
            .get_manifest(&private.repo, &private.tag, ACCEPT_MANIFESTS)
            .await;
        assert_ne!(
            r.status,
            StatusCode::OK,
            "{who}: private tag during outage: {}",
            r.describe()
        );
        assert!(r.body.len() < 512, "{who}: no manifest bytes");
        let r = c
            .get_blob(&private.repo, &private.layer_digests[0], None)
            .await;
        assert_ne!(
            r.status,
            StatusCode::OK,
            "{who}: private blob during outage: {}",
            r.describe()
        );
        assert!(r.body.len() < 512, "{who}: no blob bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_ttl_skips_the_head_only_for_credentials_upstream_accepted() {
    let hub = FakeHub::start().await;
    let pc = Pullcache::for_hub(&hub, &["--tag-ttl", "1h"]).await;
    let img = hub.add_image("library/ttl", "v1", &[4 * KIB]);
    let mut c = RegistryClient::new(&pc, &hub);
    c.pull(&img).await;
    let heads = hub.count_on(Host::Registry, "HEAD", "/manifests/");

    let r = c.get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS).await;
    assert_manifest(&r, &img, "tag within --tag-ttl");
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(
        hub.count_on(Host::Registry, "HEAD", "/manifests/"),
        heads,
        "a fresh tag with a granted credential costs no upstream request"
    );

    // Another client (its own token, no grant yet) is checked upstream all the same.
    let mut other = RegistryClient::new(&pc, &hub);
    let r = other
        .get_manifest(&img.repo, &img.tag, ACCEPT_MANIFESTS)
        .await;
    assert_manifest(&r, &img, "tag for a new credential");
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(
        hub.count_on(Host::Registry, "HEAD", "/manifests/"),
        heads + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_digest_is_answered_only_in_repositories_upstream_says_hold_it() {
    let (hub, pc) = hub_and_pullcache().await;
    hub.add_user("alice", "alice-pw");
    let secret = hub.add_image("private/app", "v1", &[8 * KIB]);
    hub.make_private("private/app", &["alice"]);
    let public = hub.add_image("library/public", "v1", &[1000]);
    RegistryClient::new(&pc, &hub)
        .with_credentials("alice", "alice-pw")
        .pull(&secret)
        .await;

    // Bob holds a fresh grant for library/public (he just pulled it) ...
    let mut bob = RegistryClient::new(&pc, &hub);
    bob.pull(&public).await;
    // ... which must not open the private layer to him through that repository, nor make a
    // pusher believe library/public already holds it (docker would then skip the upload).
    let layer = &secret.layer_digests[0];
    let head = bob.head_blob(&public.repo, layer).await;
    assert_eq!(
        head.status,
        StatusCode::NOT_FOUND,
        "HEAD: {}",
        head.describe()
    );
    let get = bob.get_blob(&public.repo, layer, None).await;
    assert_eq!(get.status, StatusCode::NOT_FOUND, "GET: {}", get.describe());
    assert!(get.body.len() < 1024, "no layer bytes");
    let manifest = bob
        .get_manifest(&public.repo, &secret.manifest_digest, ACCEPT_MANIFESTS)
        .await;
    assert_eq!(
        manifest.status,
        StatusCode::NOT_FOUND,
        "{}",
        manifest.describe()
    );

    // Where upstream does hold it, the cached copy is served after that one confirmation.
    let shared = hub.add_blob("library/public", secret.layers[0].clone());
    assert_eq!(&shared, layer);
    let before = blob_traffic(&hub);
    let get = bob.get_blob(&public.repo, layer, None).await;
    assert_eq!(get.status, StatusCode::OK, "{}", get.describe());
    assert!(get.body == secret.layers[0]);
    assert_eq!(get.x_cache(), "HIT");
    assert_eq!(
        blob_traffic(&hub),
        before,
        "served from cache, no upstream GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_cache_cannot_store_clients_are_passed_through_and_nothing_is_cached() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/nodisk", "v1", &[256 * KIB]);
    let (digest, data) = (&img.layer_digests[0], &img.layers[0]);
    // Stand-in for a full or read-only disk (root ignores permissions): tmp/ is not a
    // directory, so no temp file can be created.
    let tmp = pc.cache_dir().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    let mut c = RegistryClient::new(&pc, &hub);
    for round in ["first", "second"] {
        let r = c.get_blob(&img.repo, digest, None).await;
        assert_eq!(r.status, StatusCode::OK, "{round}: {}", r.describe());
        assert!(
            r.body == *data,
            "{round}: the client still gets the right bytes"
        );
        assert_eq!(r.x_cache(), "PASS", "{round}");
        let r = c.get_blob(&img.repo, digest, Some("bytes=1000-")).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "{round} range: {}",
            r.describe()
        );
        assert!(r.body == data.slice(1000..));
    }
    assert!(!pc.blob_path(digest).exists(), "nothing was cached");

    // Once the disk is back, the next request fills the cache as usual.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let r = c.get_blob(&img.repo, digest, None).await;
    assert_eq!(r.x_cache(), "MISS", "{}", r.describe());
    assert!(r.body == *data);
    let r = c.get_blob(&img.repo, digest, None).await;
    assert_eq!(r.x_cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_first_requests_of_one_client_share_one_upstream_check() {
    let (hub, pc) = hub_and_pullcache().await;
    let img = hub.add_image("library/parallel", "v1", &[KIB, KIB, KIB, KIB, KIB, KIB]);
    let mut c = RegistryClient::new(&pc, &hub);
    let token = c.token(&img.repo).await.expect("an anonymous token");
    let heads_before = hub.count_on(Host::Registry, "HEAD", "");

    // Like a pull fetching its layers in parallel, before any grant exists for the token.
    let mut tasks = Vec::new();
    for digest in img.layer_digests.clone() {
        let (proxy, ca, repo, token) = (
            pc.proxy_addr(),
            pc.ca_pem(),
            img.repo.clone(),
            token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = common::client::intercepted(proxy, &ca, "registry-1.docker.io").await;
            let req = common::client::request(
                hyper::Method::GET,
                "registry-1.docker.io",
                &format!("/v2/{repo}/blobs/{digest}"),
            )
            .header("authorization", format!("Bearer {token}"))
            .body(common::body::empty())
            .unwrap();
            conn.fetch(req).await
        }));
    }
    for (task, data) in tasks.into_iter().zip(&img.layers) {
        let r = within(LONG, "parallel blob GET", task).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
        assert!(r.body == *data);
    }
    // One check for the six requests; the one-time public-repository probe, running in the
    // background, adds at most two HEADs of its own (anonymous, then with its own token).
    // Without the shared check this is six or more.
    let heads = hub.count_on(Host::Registry, "HEAD", "") - heads_before;
    assert!(
        (1..=3).contains(&heads),
        "{heads} upstream HEADs for six parallel first requests"
    );
}
