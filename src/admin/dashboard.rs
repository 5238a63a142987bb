//! The dashboard at `GET /`: one HTML page, one script, one style sheet, all compiled into the
//! binary (no CDN, no fonts, no images: it works on an air-gapped host).
//!
//! The files carry no data and are served without a token; the script fetches everything from
//! the JSON API every 5 seconds (it reads the token from `#token=…` in the URL, keeps it in
//! `sessionStorage`, or asks for it). Elements that show a figure have a stable `id` and the raw
//! number in `data-value`, for `scripts/e2e-dashboard.sh` and other checks.

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static str,
}

const INDEX_HTML: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_str!("dashboard/index.html"),
};
const SCRIPT: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_str!("dashboard/dashboard.js"),
};
const STYLE: Asset = Asset {
    content_type: "text/css; charset=utf-8",
    body: include_str!("dashboard/dashboard.css"),
};

/// Only the page's own files may load, and the script may only talk to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// The static file at `path`, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        "/" | "/index.html" => Some(&INDEX_HTML),
        "/assets/dashboard.js" => Some(&SCRIPT),
        "/assets/dashboard.css" => Some(&STYLE),
        _ => None,
    }
}

pub fn response(asset: &'static Asset) -> Response<Body> {
    let mut resp = super::text(StatusCode::OK, asset.content_type, asset.body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Always revalidate, so an upgraded binary's page is never mixed with an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_references_only_its_own_files() {
        for a in [&INDEX_HTML, &SCRIPT, &STYLE] {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                let hits: Vec<&str> = a
                    .body
                    .lines()
                    .filter(|l| l.contains(scheme) && !l.contains("http://www.w3.org/2000/svg"))
                    .collect();
                assert!(hits.is_empty(), "external reference {scheme}: {hits:?}");
            }
        }
        assert!(INDEX_HTML.body.contains("src=\"/assets/dashboard.js\""));
        assert!(INDEX_HTML.body.contains("href=\"/assets/dashboard.css\""));
    }

    #[test]
    fn figures_have_stable_ids() {
        for id in [
            "hit-ratio",
            "bytes-from-cache",
            "bytes-from-upstream",
            "quota-remaining",
            "cache-bytes",
            "cache-entries",
            "top-repos",
            "recent-requests",
            "chart",
        ] {
            assert!(
                INDEX_HTML.body.contains(&format!("id=\"{id}\"")),
                "no element with id {id}"
            );
        }
    }
}
