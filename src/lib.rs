//! pullcache: a caching forward proxy for container image pulls.
//!
//! Clients set `HTTPS_PROXY` and trust pullcache's CA. For intercepted registry hosts pullcache
//! terminates TLS with a leaf it mints, caches what is immutable (blobs and manifests by
//! digest) on local disk, and answers repeat pulls without touching the upstream. Every other
//! host gets a blind CONNECT tunnel. See `docs/architecture.md` for the request flow.
//!
//! # Layout
//!
//! One module per stage of a request's journey:
//!
//! - [`config`]: flags and `PULLCACHE_*` environment, validated into [`config::Settings`].
//! - [`server`]: wiring — shared [`server::App`] state, binding, shutdown.
//! - [`listener`]: the proxy port — accept (bounded), HTTP/1.1, dispatch by request form;
//!   the one place errors become responses.
//! - [`connect`]: `CONNECT` — intercept (TLS with a minted leaf) or blind tunnel.
//! - [`ca`]: the certificate authority and per-host leaf minting.
//! - [`registry`]: the request path on intercepted hosts: classify → authorize → lookup →
//!   serve / fill → record.
//! - [`route`]: classifies `/v2/<name>/{blobs,manifests}/<reference>`, validates names,
//!   tags and digests.
//! - [`auth`]: grants (which credential upstream accepted for which repository) and public
//!   repository detection.
//! - [`cache`]: the digest cache — [`cache::blobs`] (files), [`cache::index`] (sled),
//!   [`cache::fill`] (one download per digest, streamed to every waiting client).
//! - [`upstream`]: dialing (with `--connect-to`), verified TLS, the pooled client, redirects.
//! - [`stats`]: counters per registry and repository, persisted.
//! - [`admin`]: the admin port — JSON API, Prometheus metrics, the dashboard.
//! - [`cli`]: the client commands (`stats`, `entries`, `purge`) over the admin API.
//! - [`setup`]: client setup recipes (`pullcache setup`, `GET /setup/<target>`).
//! - [`body`], [`error`]: the shared body type; errors and whose fault they are.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod config;
pub mod connect;
pub mod error;
pub mod listener;
pub mod registry;
pub mod route;
pub mod server;
pub mod setup;
pub mod stats;
pub mod upstream;
