//! Classifies a request on an intercepted registry: blob by digest, manifest by digest,
//! manifest by tag, or anything else (passed through unchanged).
//!
//! Invariant: a [`Digest`] can only be built from a string that matches the strict grammar
//! (`sha256:[a-f0-9]{64}` or `sha512:[a-f0-9]{128}`), so its hex part is safe to use in a file
//! path; repository names and tags are checked against the distribution grammar.

use http::Method;

/// A validated content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Option<Digest> {
        let (algo, hex) = s.split_once(':')?;
        let len = match algo {
            "sha256" => 64,
            "sha512" => 128,
            _ => return None,
        };
        let ok = hex.len() == len && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| Digest(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map(|(a, _)| a).unwrap_or("")
    }

    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or("")
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a request on an intercepted registry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Blob {
        repo: String,
        digest: Digest,
    },
    ManifestByDigest {
        repo: String,
        digest: Digest,
    },
    ManifestByTag {
        repo: String,
        tag: String,
    },
    /// `GET /v2/` — the API version check that carries the auth challenge.
    Ping,
    /// Anything else; `repo` is known when the path names a valid repository.
    Pass {
        repo: Option<String>,
    },
}

impl Route {
    pub fn repo(&self) -> Option<&str> {
        match self {
            Route::Blob { repo, .. }
            | Route::ManifestByDigest { repo, .. }
            | Route::ManifestByTag { repo, .. } => Some(repo),
            Route::Pass { repo } => repo.as_deref(),
            Route::Ping => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Route::Blob { .. } => "blob",
            Route::ManifestByDigest { .. } => "manifest",
            Route::ManifestByTag { .. } => "tag",
            Route::Ping => "ping",
            Route::Pass { .. } => "pass",
        }
    }

    /// The digest or tag the request names, for logs.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Route::Blob { digest, .. } | Route::ManifestByDigest { digest, .. } => {
                Some(digest.as_str())
            }
            Route::ManifestByTag { tag, .. } => Some(tag),
            _ => None,
        }
    }
}

/// Classifies a request. Only `GET` and `HEAD` without a query string can be served from cache.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> Route {
    if path == "/v2/" || path == "/v2" {
        return if method == Method::GET {
            Route::Ping
        } else {
            Route::Pass { repo: None }
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Pass { repo: None };
    };
    let cacheable = (method == Method::GET || method == Method::HEAD) && query.is_none();
    // /v2/<name>/<kind>/<reference>: the name may contain slashes, so split from the right.
    let mut parts = rest.rsplitn(3, '/');
    let (reference, kind, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some(k), Some(n)) => (r, k, n),
        _ => return Route::Pass { repo: None },
    };
    if !matches!(kind, "blobs" | "manifests") || !valid_repo(name) {
        return Route::Pass {
            repo: repo_prefix(rest),
        };
    }
    let repo = name.to_string();
    if !cacheable {
        return Route::Pass { repo: Some(repo) };
    }
    match kind {
        "blobs" => match Digest::parse(reference) {
            Some(digest) => Route::Blob { repo, digest },
            None => Route::Pass { repo: Some(repo) },
        },
        _ => {
            if let Some(digest) = Digest::parse(reference) {
                Route::ManifestByDigest { repo, digest }
            } else if valid_tag(reference) {
                Route::ManifestByTag {
                    repo,
                    tag: reference.to_string(),
                }
            } else {
                Route::Pass { repo: Some(repo) }
            }
        }
    }
}

/// The repository of other API paths (`/v2/<name>/tags/list`, `/v2/<name>/blobs/uploads/…`).
fn repo_prefix(rest: &str) -> Option<String> {
    for marker in ["/tags/", "/blobs/", "/manifests/", "/referrers/"] {
        if let Some(i) = rest.find(marker) {
            let name = &rest[..i];
            if valid_repo(name) {
                return Some(name.to_string());
            }
        }
    }
    None
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn valid_repo(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests_are_strict() {
        assert!(Digest::parse(D).is_some());
        assert!(Digest::parse(&D.to_uppercase()).is_none());
        assert!(Digest::parse("sha256:../../etc/passwd").is_none());
        assert!(Digest::parse(&D[..70]).is_none());
        assert!(Digest::parse(&format!("{D}0")).is_none());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_some());
        assert!(Digest::parse(&format!("md5:{}", "a".repeat(32))).is_none());
        assert_eq!(Digest::parse(D).unwrap().hex().len(), 64);
    }

    #[test]
    fn repository_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "x9/y-z.w",
        ] {
            assert!(valid_repo(ok), "{ok}");
        }
        for bad in [
            "", "Alpine", "a//b", "-a", "a-", "a___b", "a..b", "a/", "/a", "a/../b", "a b", "a._b",
        ] {
            assert!(!valid_repo(bad), "{bad}");
        }
    }

    #[test]
    fn tag_grammar() {
        assert!(valid_tag("3.20"));
        assert!(valid_tag("_x"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".hidden"));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag(""));
    }

    #[test]
    fn classification() {
        let get = Method::GET;
        assert_eq!(
            classify(&get, &format!("/v2/library/alpine/blobs/{D}"), None),
            Route::Blob {
                repo: "library/alpine".into(),
                digest: Digest::parse(D).unwrap()
            }
        );
        assert_eq!(
            classify(&Method::HEAD, &format!("/v2/a/manifests/{D}"), None),
            Route::ManifestByDigest {
                repo: "a".into(),
                digest: Digest::parse(D).unwrap()
            }
        );
        assert_eq!(
            classify(&get, "/v2/library/alpine/manifests/3.20", None),
            Route::ManifestByTag {
                repo: "library/alpine".into(),
                tag: "3.20".into()
            }
        );
        assert_eq!(classify(&get, "/v2/", None), Route::Ping);
        assert_eq!(
            classify(&get, "/v2/a/tags/list", None),
            Route::Pass {
                repo: Some("a".into())
            }
        );
        assert_eq!(
            classify(&Method::POST, "/v2/a/b/blobs/uploads/", None),
            Route::Pass {
                repo: Some("a/b".into())
            }
        );
        assert_eq!(
            classify(&Method::PUT, "/v2/a/manifests/v1", None),
            Route::Pass {
                repo: Some("a".into())
            }
        );
        assert_eq!(
            classify(&Method::DELETE, &format!("/v2/a/blobs/{D}"), None),
            Route::Pass {
                repo: Some("a".into())
            }
        );
        assert_eq!(
            classify(&get, "/v2/a/blobs/sha256:nothex", None),
            Route::Pass {
                repo: Some("a".into())
            }
        );
        assert_eq!(
            classify(&get, "/v2/UPPER/blobs/x", None),
            Route::Pass { repo: None }
        );
        assert_eq!(
            classify(&get, "/v2/_catalog", None),
            Route::Pass { repo: None }
        );
        assert_eq!(classify(&get, "/other", None), Route::Pass { repo: None });
        assert_eq!(
            classify(&get, &format!("/v2/a/blobs/{D}"), Some("x=1")),
            Route::Pass {
                repo: Some("a".into())
            }
        );
    }
}
