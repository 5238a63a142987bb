//! The sled index under `<cache-dir>/index/`: per-digest metadata, small manifests inline,
//! tag → digest, public repositories, last `/v2/` challenge per registry, and counters.
//!
//! Invariant: the blob files are the truth. Everything here can be lost: an index that sled
//! cannot open is moved aside and rebuilt from `blobs/`, and start-up reconciles the two (an
//! entry without a file is dropped; a file without an entry is indexed).
//! Every function here may block on disk: call it from `spawn_blocking`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::cache::blobs::BlobStore;
use crate::route::Digest;

/// How many distinct registries/repositories an entry lists for people (admin API).
pub const MAX_SEEN_IN: usize = 32;
/// How many `registry/repository` pairs an entry remembers as confirmed homes. Past this, a
/// request from another repository costs one upstream HEAD to confirm it (never a wrong answer).
pub const MAX_KNOWN_IN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Sled(#[from] sled::Error),
    #[error("index I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} is in use by another pullcache (or one still shutting down); give each instance its own --cache-dir")]
    Locked(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Blob,
    Manifest,
}

/// What the index knows about one cached digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub size: u64,
    pub media_type: String,
    /// Unix seconds.
    pub created: u64,
    pub last_access: u64,
    pub hits: u64,
    pub registries: Vec<String>,
    pub repos: Vec<String>,
    /// `registry/repository` pairs upstream has confirmed hold this digest (a fetch from
    /// there, a HEAD there, or a tag there that resolved to it). A registry answers a digest
    /// only in repositories that hold it, so pullcache does too.
    #[serde(default)]
    pub known_in: Vec<String>,
}

impl Entry {
    /// Notes that the entry was served in `registry`/`repo` at `now` (after upstream confirmed
    /// that `repo` holds it).
    pub fn seen(&mut self, registry: &str, repo: &str, now: u64) {
        self.last_access = self.last_access.max(now);
        remember(&mut self.registries, registry, MAX_SEEN_IN);
        remember(&mut self.repos, repo, MAX_SEEN_IN);
        remember(&mut self.known_in, &home(registry, repo), MAX_KNOWN_IN);
    }

    /// Has upstream confirmed that `registry`/`repo` holds this digest?
    pub fn is_known_in(&self, registry: &str, repo: &str) -> bool {
        let key = home(registry, repo);
        self.known_in.contains(&key)
    }
}

/// How a repository is named in [`Entry::known_in`].
pub fn home(registry: &str, repo: &str) -> String {
    format!("{registry}/{repo}")
}

fn remember(list: &mut Vec<String>, item: &str, max: usize) {
    if !item.is_empty() && !list.iter().any(|x| x == item) && list.len() < max {
        list.push(item.to_string());
    }
}

/// The last digest a tag resolved to, for one `Accept` value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// Unix seconds of the last time upstream confirmed it.
    pub validated_at: u64,
}

/// The last answer a registry gave to `GET /v2/`, replayed while it is unreachable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    pub status: u16,
    pub www_authenticate: Option<String>,
}

pub struct Index {
    db: sled::Db,
    entries: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    public: sled::Tree,
    challenges: sled::Tree,
    counters: sled::Tree,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Index {
    /// Opens `<cache-dir>/index`. If sled cannot open it (or panics on a corrupt file), the
    /// directory is moved aside to `index.broken-<time>` and a fresh index is created; the
    /// caller then reconciles it with the blob files. Returns whether it was rebuilt.
    pub fn open(cache_dir: &Path) -> Result<(Index, bool), IndexError> {
        let path = cache_dir.join("index");
        match open_sled(&path) {
            Ok(index) => Ok((index, false)),
            // A live index belongs to someone else: never "repair" it.
            Err(OpenFailure::Locked) => Err(IndexError::Locked(path.display().to_string())),
            Err(OpenFailure::Broken(reason)) => {
                let aside = cache_dir.join(format!("index.broken-{}", now_secs()));
                tracing::error!(path = %path.display(), aside = %aside.display(), %reason,
                    "cache index cannot be opened; moving it aside and rebuilding from the blob files");
                std::fs::rename(&path, &aside)?;
                let index = open_sled(&path).map_err(|e| {
                    IndexError::Io(std::io::Error::other(format!(
                        "fresh index failed too: {e:?}"
                    )))
                })?;
                Ok((index, true))
            }
        }
    }

    pub fn get(&self, digest: &Digest) -> Result<Option<Entry>, IndexError> {
        get_json(&self.entries, digest.as_str().as_bytes())
    }

    pub fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, IndexError> {
        Ok(self
            .manifests
            .get(digest.as_str())?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    pub fn insert(
        &self,
        digest: &Digest,
        entry: &Entry,
        inline: Option<&[u8]>,
    ) -> Result<(), IndexError> {
        if let Some(bytes) = inline {
            self.manifests.insert(digest.as_str(), bytes)?;
        }
        put_json(&self.entries, digest.as_str().as_bytes(), entry)
    }

    pub fn remove(&self, digest: &Digest) -> Result<Option<Entry>, IndexError> {
        self.manifests.remove(digest.as_str())?;
        let old = self.entries.remove(digest.as_str())?;
        Ok(old.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Applies hits: bumps `hits`, `last_access` and where the entry was seen.
    pub fn touch(
        &self,
        digest: &Digest,
        registry: &str,
        repo: &str,
        now: u64,
    ) -> Result<(), IndexError> {
        if let Some(mut e) = self.get(digest)? {
            e.hits += 1;
            e.seen(registry, repo, now);
            put_json(&self.entries, digest.as_str().as_bytes(), &e)?;
        }
        Ok(())
    }

    pub fn entries(&self) -> impl Iterator<Item = (Digest, Entry)> + '_ {
        self.entries.iter().filter_map(|kv| {
            let (k, v) = kv.ok()?;
            let digest = Digest::parse(std::str::from_utf8(&k).ok()?)?;
            Some((digest, serde_json::from_slice(&v).ok()?))
        })
    }

    pub fn tag(&self, key: &str) -> Result<Option<TagEntry>, IndexError> {
        get_json(&self.tags, key.as_bytes())
    }

    pub fn put_tag(&self, key: &str, tag: &TagEntry) -> Result<(), IndexError> {
        put_json(&self.tags, key.as_bytes(), tag)
    }

    /// Unix seconds at which `key` (registry + repository) was last seen to be public.
    pub fn public_since(&self, key: &str) -> Result<Option<u64>, IndexError> {
        get_json(&self.public, key.as_bytes())
    }

    pub fn set_public(&self, key: &str, public: bool) -> Result<(), IndexError> {
        if public {
            put_json(&self.public, key.as_bytes(), &now_secs())
        } else {
            self.public.remove(key)?;
            Ok(())
        }
    }

    pub fn challenge(&self, registry: &str) -> Result<Option<Challenge>, IndexError> {
        get_json(&self.challenges, registry.as_bytes())
    }

    pub fn put_challenge(&self, registry: &str, c: &Challenge) -> Result<(), IndexError> {
        put_json(&self.challenges, registry.as_bytes(), c)
    }

    pub fn counters<T: DeserializeOwned>(&self) -> Vec<(String, T)> {
        self.counters
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.ok()?;
                Some((
                    String::from_utf8(k.to_vec()).ok()?,
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect()
    }

    pub fn put_counters<T: Serialize>(&self, key: &str, value: &T) -> Result<(), IndexError> {
        put_json(&self.counters, key.as_bytes(), value)
    }

    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes the index agree with the files: entries whose file is gone are dropped, files
    /// without an entry are indexed (a manifest is recognised by its JSON `mediaType`).
    pub fn reconcile(&self, blobs: &BlobStore) -> Result<(usize, usize), IndexError> {
        let files: std::collections::HashMap<Digest, u64> = blobs.scan()?.into_iter().collect();
        let mut dropped = 0;
        for (digest, entry) in self.entries() {
            if files.get(&digest) != Some(&entry.size) {
                self.remove(&digest)?;
                dropped += 1;
            }
        }
        let mut added = 0;
        for (digest, size) in &files {
            if self.entries.contains_key(digest.as_str())? {
                continue;
            }
            let (kind, media_type, inline) = sniff(&blobs.path(digest), *size);
            let now = now_secs();
            let entry = Entry {
                kind,
                size: *size,
                media_type,
                created: now,
                last_access: now,
                hits: 0,
                registries: Vec::new(),
                repos: Vec::new(),
                known_in: Vec::new(),
            };
            self.insert(digest, &entry, inline.as_deref())?;
            added += 1;
        }
        Ok((dropped, added))
    }
}

/// Guesses what a file is when its entry was lost: small JSON with a manifest `mediaType`
/// is a manifest; anything else is a blob.
fn sniff(path: &PathBuf, size: u64) -> (Kind, String, Option<Vec<u8>>) {
    let blob = (Kind::Blob, "application/octet-stream".to_string(), None);
    if size > crate::config::MAX_MANIFEST_BYTES {
        return blob;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return blob;
    };
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        layers: Option<serde_json::Value>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(&bytes) {
        Ok(p) if p.schema_version.is_some() && (p.layers.is_some() || p.manifests.is_some()) => {
            let media_type = p.media_type.unwrap_or_else(|| {
                if p.manifests.is_some() {
                    "application/vnd.oci.image.index.v1+json".into()
                } else {
                    "application/vnd.oci.image.manifest.v1+json".into()
                }
            });
            (Kind::Manifest, media_type, Some(bytes))
        }
        _ => blob,
    }
}

#[derive(Debug)]
enum OpenFailure {
    /// Another process (or a not yet dropped handle in this one) holds the index.
    Locked,
    Broken(String),
}

fn open_sled(path: &Path) -> Result<Index, OpenFailure> {
    // sled panics on some kinds of corruption instead of returning an error.
    let path = path.to_path_buf();
    let opened = std::panic::catch_unwind(move || -> Result<Index, sled::Error> {
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(Some(1000))
            .open()?;
        Ok(Index {
            entries: db.open_tree("entries")?,
            manifests: db.open_tree("manifests")?,
            tags: db.open_tree("tags")?,
            public: db.open_tree("public")?,
            challenges: db.open_tree("challenges")?,
            counters: db.open_tree("counters")?,
            db,
        })
    });
    match opened {
        Ok(Ok(index)) => Ok(index),
        // sled reports a held lock only through this message (config.rs, `try_lock`).
        Ok(Err(e)) if e.to_string().contains("could not acquire lock") => Err(OpenFailure::Locked),
        Ok(Err(e)) => Err(OpenFailure::Broken(e.to_string())),
        Err(_) => Err(OpenFailure::Broken("sled panicked while opening".into())),
    }
}

fn get_json<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, IndexError> {
    Ok(tree.get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn put_json<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<(), IndexError> {
    let bytes = serde_json::to_vec(value).map_err(|e| IndexError::Io(std::io::Error::other(e)))?;
    tree.insert(key, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> Digest {
        Digest::parse(&format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
        ))
        .unwrap()
    }

    fn put_file(store: &BlobStore, bytes: &[u8]) -> Digest {
        let d = digest_of(bytes);
        let p = store.path(&d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        d
    }

    #[test]
    fn reconcile_indexes_orphans_and_drops_ghosts() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let (index, rebuilt) = Index::open(dir.path()).unwrap();
        assert!(!rebuilt);
        let layer = put_file(&store, b"layer bytes");
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
        let m = put_file(&store, manifest);
        let ghost = digest_of(b"gone");
        let e = Entry {
            kind: Kind::Blob,
            size: 4,
            media_type: "x".into(),
            created: 0,
            last_access: 0,
            hits: 0,
            registries: vec![],
            repos: vec![],
            known_in: vec![],
        };
        index.insert(&ghost, &e, None).unwrap();
        assert_eq!(index.reconcile(&store).unwrap(), (1, 2));
        assert_eq!(index.get(&layer).unwrap().unwrap().kind, Kind::Blob);
        let me = index.get(&m).unwrap().unwrap();
        assert_eq!(me.kind, Kind::Manifest);
        assert_eq!(me.media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(
            index.manifest_bytes(&m).unwrap().unwrap().as_ref(),
            manifest
        );
        assert!(index.get(&ghost).unwrap().is_none());
    }

    #[test]
    fn an_index_in_use_is_an_error_never_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Index::open(dir.path()).unwrap();
        first
            .put_challenge(
                "r",
                &Challenge {
                    status: 401,
                    www_authenticate: None,
                },
            )
            .unwrap();
        assert!(matches!(
            Index::open(dir.path()),
            Err(IndexError::Locked(_))
        ));
        assert!(first.challenge("r").unwrap().is_some());
        let moved_aside = std::fs::read_dir(dir.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("index.broken")
        });
        assert!(!moved_aside);
    }

    #[test]
    fn corrupt_index_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = put_file(&store, b"survivor");
        {
            let (index, _) = Index::open(dir.path()).unwrap();
            index.reconcile(&store).unwrap();
            index.flush().unwrap();
        }
        for entry in std::fs::read_dir(dir.path().join("index")).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::write(&p, vec![0xA5; 4096]).unwrap();
            }
        }
        let (index, _rebuilt) = Index::open(dir.path()).unwrap();
        index.reconcile(&store).unwrap();
        assert_eq!(index.get(&d).unwrap().unwrap().size, 8);
    }
}
