//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4).
//!
//! Counters come from the persisted per-registry counters, so they keep counting across
//! restarts; the duration histograms and gauges describe this process. Every name starts with
//! `pullcache_`. Outcome labels are lower-case `X-Cache` values (`hit`, `miss`, …).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::api::ratelimit_number;
use super::CacheSummary;
use crate::cache::index::now_secs;
use crate::server::App;
use crate::stats::{Counters, DurationHistogram, Outcome, DURATION_BUCKETS_SECS};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape shows, gathered first so rendering is a pure function.
pub struct Input {
    pub registries: Vec<(String, Counters)>,
    pub durations: Vec<(Outcome, DurationHistogram)>,
    pub cache: CacheSummary,
    pub downloads_in_flight: i64,
    pub open_connections: i64,
    pub started_at: u64,
    pub now: u64,
}

impl Input {
    pub fn gather(app: &App, cache: CacheSummary) -> Input {
        let mut registries = app.stats.registries();
        registries.sort_by(|a, b| a.0.cmp(&b.0));
        Input {
            registries,
            durations: Outcome::ALL
                .iter()
                .map(|o| (*o, app.stats.durations(*o)))
                .collect(),
            cache,
            downloads_in_flight: app.stats.fills_in_flight.load(Ordering::Relaxed).max(0),
            open_connections: app.stats.open_connections.load(Ordering::Relaxed).max(0),
            started_at: app.stats.started_at.load(Ordering::Relaxed),
            now: now_secs(),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let w = &mut out;

        header(
            w,
            "pullcache_requests_total",
            "counter",
            "Requests on intercepted registries, by cache outcome.",
        );
        for (reg, c) in &self.registries {
            for o in Outcome::ALL {
                let n = match o {
                    Outcome::Hit => c.hits,
                    Outcome::Miss => c.misses,
                    Outcome::Coalesced => c.coalesced,
                    Outcome::Revalidated => c.revalidated,
                    Outcome::Stale => c.stale,
                    Outcome::Pass => c.passes,
                };
                let _ = writeln!(
                    w,
                    "pullcache_requests_total{{registry=\"{}\",outcome=\"{}\"}} {n}",
                    escape(reg),
                    outcome_label(o)
                );
            }
        }

        let per_registry: [CounterFamily; 6] = [
            (
                "pullcache_bytes_from_cache_total",
                "Bytes sent to clients from the cache (what the cache saved).",
                |c| c.bytes_from_cache,
            ),
            (
                "pullcache_bytes_from_upstream_total",
                "Bytes downloaded from upstream registries and their CDNs.",
                |c| c.bytes_from_upstream,
            ),
            (
                "pullcache_upstream_manifest_gets_total",
                "Manifest GETs sent upstream (what Docker Hub counts as pulls).",
                |c| c.upstream_manifest_gets,
            ),
            (
                "pullcache_upstream_heads_total",
                "Manifest HEADs sent upstream to revalidate tags (not counted as pulls).",
                |c| c.upstream_heads,
            ),
            (
                "pullcache_failed_downloads_total",
                "Upstream downloads that failed.",
                |c| c.failed_downloads,
            ),
            (
                "pullcache_digest_mismatches_total",
                "Downloads whose bytes did not match their digest (discarded).",
                |c| c.digest_mismatches,
            ),
        ];
        for (name, help, get) in per_registry {
            header(w, name, "counter", help);
            for (reg, c) in &self.registries {
                let _ = writeln!(w, "{name}{{registry=\"{}\"}} {}", escape(reg), get(c));
            }
        }

        header(
            w,
            "pullcache_ratelimit_limit",
            "gauge",
            "Pull limit the registry last announced (ratelimit-limit).",
        );
        for (reg, c) in &self.registries {
            if let Some(n) = ratelimit_number(c.ratelimit_limit.as_deref()) {
                let _ = writeln!(
                    w,
                    "pullcache_ratelimit_limit{{registry=\"{}\"}} {n}",
                    escape(reg)
                );
            }
        }
        header(
            w,
            "pullcache_ratelimit_remaining",
            "gauge",
            "Pulls left that the registry last announced (ratelimit-remaining).",
        );
        for (reg, c) in &self.registries {
            if let Some(n) = ratelimit_number(c.ratelimit_remaining.as_deref()) {
                let _ = writeln!(
                    w,
                    "pullcache_ratelimit_remaining{{registry=\"{}\"}} {n}",
                    escape(reg)
                );
            }
        }

        header(
            w,
            "pullcache_request_duration_seconds",
            "histogram",
            "Time from request to the end of the response body, by cache outcome.",
        );
        for (o, h) in &self.durations {
            let label = outcome_label(*o);
            for (bound, n) in DURATION_BUCKETS_SECS.iter().zip(&h.cumulative) {
                let _ = writeln!(
                    w,
                    "pullcache_request_duration_seconds_bucket{{outcome=\"{label}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                w,
                "pullcache_request_duration_seconds_bucket{{outcome=\"{label}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                w,
                "pullcache_request_duration_seconds_sum{{outcome=\"{label}\"}} {}",
                h.sum_secs
            );
            let _ = writeln!(
                w,
                "pullcache_request_duration_seconds_count{{outcome=\"{label}\"}} {}",
                h.count
            );
        }

        header(
            w,
            "pullcache_cache_entries",
            "gauge",
            "Objects in the cache.",
        );
        let _ = writeln!(
            w,
            "pullcache_cache_entries{{kind=\"blob\"}} {}",
            self.cache.blobs
        );
        let _ = writeln!(
            w,
            "pullcache_cache_entries{{kind=\"manifest\"}} {}",
            self.cache.manifests
        );
        header(w, "pullcache_cache_bytes", "gauge", "Bytes in the cache.");
        let _ = writeln!(
            w,
            "pullcache_cache_bytes{{kind=\"blob\"}} {}",
            self.cache.blob_bytes
        );
        let _ = writeln!(
            w,
            "pullcache_cache_bytes{{kind=\"manifest\"}} {}",
            self.cache.manifest_bytes
        );

        let gauges = [
            (
                "pullcache_downloads_in_flight",
                "Upstream downloads running now.",
                self.downloads_in_flight,
            ),
            (
                "pullcache_open_connections",
                "Client connections open on the proxy port.",
                self.open_connections,
            ),
        ];
        for (name, help, v) in gauges {
            header(w, name, "gauge", help);
            let _ = writeln!(w, "{name} {v}");
        }
        header(
            w,
            "pullcache_start_time_seconds",
            "gauge",
            "Unix time this process started.",
        );
        let _ = writeln!(w, "pullcache_start_time_seconds {}", self.started_at);
        header(
            w,
            "pullcache_uptime_seconds",
            "gauge",
            "Seconds since this process started.",
        );
        let _ = writeln!(
            w,
            "pullcache_uptime_seconds {}",
            self.now.saturating_sub(self.started_at)
        );
        header(
            w,
            "pullcache_build_info",
            "gauge",
            "Always 1; labelled with the version.",
        );
        let _ = writeln!(
            w,
            "pullcache_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );
        out
    }
}

/// A per-registry counter: name, help text, and how to read it from [`Counters`].
type CounterFamily = (&'static str, &'static str, fn(&Counters) -> u64);

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

fn outcome_label(o: Outcome) -> String {
    o.as_str().to_ascii_lowercase()
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Input {
        let reg = Counters {
            requests: 3,
            hits: 2,
            misses: 1,
            bytes_from_cache: 2048,
            bytes_from_upstream: 1024,
            upstream_manifest_gets: 1,
            ratelimit_limit: Some("100;w=21600".into()),
            ratelimit_remaining: Some("99;w=21600".into()),
            ..Counters::default()
        };
        let mut hit = DurationHistogram {
            cumulative: vec![0; DURATION_BUCKETS_SECS.len() + 1],
            count: 2,
            sum_secs: 0.012,
        };
        for (i, b) in hit.cumulative.iter_mut().enumerate() {
            *b = if i == 0 { 1 } else { 2 };
        }
        Input {
            registries: vec![("registry-1.docker.io".into(), reg)],
            durations: vec![(Outcome::Hit, hit)],
            cache: CacheSummary {
                blobs: 2,
                blob_bytes: 3000,
                manifests: 1,
                manifest_bytes: 500,
            },
            downloads_in_flight: 0,
            open_connections: 4,
            started_at: 100,
            now: 160,
        }
    }

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let text = sample().render();
        for line in [
            "pullcache_requests_total{registry=\"registry-1.docker.io\",outcome=\"hit\"} 2",
            "pullcache_requests_total{registry=\"registry-1.docker.io\",outcome=\"miss\"} 1",
            "pullcache_bytes_from_cache_total{registry=\"registry-1.docker.io\"} 2048",
            "pullcache_ratelimit_remaining{registry=\"registry-1.docker.io\"} 99",
            "pullcache_request_duration_seconds_bucket{outcome=\"hit\",le=\"0.005\"} 1",
            "pullcache_request_duration_seconds_bucket{outcome=\"hit\",le=\"+Inf\"} 2",
            "pullcache_request_duration_seconds_count{outcome=\"hit\"} 2",
            "pullcache_cache_entries{kind=\"blob\"} 2",
            "pullcache_cache_bytes{kind=\"manifest\"} 500",
            "pullcache_open_connections 4",
            "pullcache_uptime_seconds 60",
            "# TYPE pullcache_request_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        for line in sample().render().lines() {
            if line.starts_with('#') {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').expect(line);
            assert!(name_labels.starts_with("pullcache_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
