//! The admin port (loopback by default): what the cache served and saved.
//!
//! `GET /api/stats` (JSON counters per registry), `GET /healthz`, `GET /readyz`, `GET /ca.crt`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::cache::index::now_secs;
use crate::server::App;
use crate::stats::Counters;

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let (stream, _) = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app2 = app.clone();
        app.tasks.spawn(async move {
            let svc_app = app2.clone();
            let service = service_fn(move |req| {
                let app = svc_app.clone();
                async move { Ok::<_, Infallible>(route(&app, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(app2.settings.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = app2.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed"}),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => readiness(app).await,
        "/ca.crt" => text(
            StatusCode::OK,
            "application/x-pem-file",
            app.ca.cert_pem().to_string(),
        ),
        "/api/stats" => json_response(StatusCode::OK, &stats_json(app)),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

async fn readiness(app: &Arc<App>) -> Response<Body> {
    let index_ok = app.cache.with_index(|i| i.challenge("")).await.is_ok();
    let probe = app.settings.cache_dir.join("tmp").join(".readyz");
    let writable = tokio::fs::write(&probe, b"ok").await.is_ok()
        && tokio::fs::remove_file(&probe).await.is_ok();
    let ready = index_ok && writable;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({"ready": ready, "index": index_ok, "cache_dir_writable": writable, "ca": true}),
    )
}

fn counters_json(c: &Counters) -> serde_json::Value {
    let served = c.hits + c.revalidated + c.stale + c.misses + c.coalesced;
    let from_cache = c.hits + c.revalidated + c.stale;
    json!({
        "requests": c.requests,
        "hits": c.hits,
        "revalidated": c.revalidated,
        "misses": c.misses,
        "coalesced": c.coalesced,
        "stale": c.stale,
        "passes": c.passes,
        "hit_ratio": if served == 0 { 0.0 } else { from_cache as f64 / served as f64 },
        "bytes_from_cache": c.bytes_from_cache,
        "bytes_from_upstream": c.bytes_from_upstream,
        "upstream_manifest_gets": c.upstream_manifest_gets,
        "upstream_heads": c.upstream_heads,
        "failed_downloads": c.failed_downloads,
        "digest_mismatches": c.digest_mismatches,
        "ratelimit": {
            "limit": c.ratelimit_limit,
            "remaining": c.ratelimit_remaining,
            "seen_at": c.ratelimit_seen_at,
        },
    })
}

fn stats_json(app: &Arc<App>) -> serde_json::Value {
    let registries = app.stats.registries();
    let mut total = Counters::default();
    for (_, c) in &registries {
        total.requests += c.requests;
        total.hits += c.hits;
        total.revalidated += c.revalidated;
        total.misses += c.misses;
        total.coalesced += c.coalesced;
        total.stale += c.stale;
        total.passes += c.passes;
        total.bytes_from_cache += c.bytes_from_cache;
        total.bytes_from_upstream += c.bytes_from_upstream;
        total.upstream_manifest_gets += c.upstream_manifest_gets;
        total.upstream_heads += c.upstream_heads;
        total.failed_downloads += c.failed_downloads;
        total.digest_mismatches += c.digest_mismatches;
    }
    let mut out = counters_json(&total);
    if let Some(obj) = out.as_object_mut() {
        obj.remove("ratelimit");
        obj.insert(
            "uptime_s".into(),
            json!(now_secs().saturating_sub(app.stats.started_at.load(Ordering::Relaxed))),
        );
        obj.insert(
            "open_connections".into(),
            json!(app.stats.open_connections.load(Ordering::Relaxed)),
        );
        obj.insert(
            "downloads_in_flight".into(),
            json!(app.stats.fills_in_flight.load(Ordering::Relaxed)),
        );
        obj.insert(
            "registries".into(),
            registries
                .iter()
                .map(|(name, c)| (name.clone(), counters_json(c)))
                .collect(),
        );
    }
    out
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", format!("{value}\n"))
}

fn text(status: StatusCode, ctype: &'static str, body_text: String) -> Response<Body> {
    let mut resp = Response::new(body::full(body_text));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
