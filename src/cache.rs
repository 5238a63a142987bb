//! The digest cache: the one interface the request path uses to find, fill and purge content.
//!
//! - [`blobs`]: content-addressed files, the truth;
//! - [`index`]: sled metadata, small manifests inline, tags, counters — rebuildable;
//! - [`fill`]: one upstream download per digest, streamed to every waiting client.
//!
//! Storage stays behind this type so another tier (an object store shared by a fleet) can be
//! added without touching the request path. Blocking work (sled, fsync, rename, directory
//! scans) runs on the blocking pool, never on a runtime thread.

pub mod blobs;
pub mod fill;
pub mod index;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::route::Digest;
use crate::stats::Stats;
use crate::upstream::Upstream;
use blobs::BlobStore;
use fill::{Fill, FillRequest};
use index::{Entry, Index, IndexError};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A cached object found by [`Cache::lookup`].
pub struct Hit {
    pub entry: Entry,
    /// The bytes of a manifest, kept inline in the index.
    pub inline: Option<Bytes>,
}

struct Touch {
    digest: Digest,
    registry: String,
    repo: String,
    at: u64,
}

pub struct Cache {
    index: Arc<Index>,
    blobs: Arc<BlobStore>,
    pub(crate) upstream: Upstream,
    pub(crate) stats: Arc<Stats>,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Fill tasks, tracked so shutdown can let them finish.
    tasks: TaskTracker,
    /// Hits waiting to be written to the index; `None` once closed.
    touches: Mutex<Option<mpsc::UnboundedSender<Touch>>>,
    recorder: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Cache {
    /// Opens (or rebuilds) the index, clears `tmp/` and reconciles index and files.
    pub async fn open(
        cache_dir: &Path,
        upstream: Upstream,
        stats: Arc<Stats>,
        tasks: TaskTracker,
    ) -> Result<Arc<Cache>, CacheError> {
        let dir = cache_dir.to_path_buf();
        let (index, blobs) = tokio::task::spawn_blocking(move || -> Result<_, CacheError> {
            let blobs = BlobStore::open(&dir)?;
            let (index, rebuilt) = Index::open(&dir)?;
            let (dropped, added) = index.reconcile(&blobs)?;
            if rebuilt || dropped > 0 || added > 0 {
                tracing::info!(
                    rebuilt,
                    dropped,
                    added,
                    "reconciled the cache index with the blob files"
                );
            }
            Ok((Arc::new(index), Arc::new(blobs)))
        })
        .await??;
        stats.load(&index);
        let (tx, rx) = mpsc::unbounded_channel();
        let recorder = tokio::spawn(apply_touches(index.clone(), rx));
        Ok(Arc::new(Cache {
            index,
            blobs,
            upstream,
            stats,
            fills: Mutex::new(HashMap::new()),
            tasks,
            touches: Mutex::new(Some(tx)),
            recorder: Mutex::new(Some(recorder)),
        }))
    }

    /// Runs `f` against the index on the blocking pool.
    pub async fn with_index<T, F>(&self, f: F) -> Result<T, CacheError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, IndexError> + Send + 'static,
    {
        let index = self.index.clone();
        Ok(tokio::task::spawn_blocking(move || f(&index)).await??)
    }

    pub async fn lookup(&self, digest: &Digest) -> Result<Option<Hit>, CacheError> {
        let d = digest.clone();
        self.with_index(move |index| {
            let Some(entry) = index.get(&d)? else {
                return Ok(None);
            };
            let inline = match entry.kind {
                index::Kind::Manifest => index.manifest_bytes(&d)?,
                index::Kind::Blob => None,
            };
            Ok(Some(Hit { entry, inline }))
        })
        .await
    }

    /// Opens a committed object for reading. `NotFound` means the index was stale.
    pub async fn open_file(&self, digest: &Digest) -> std::io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.blobs.path(digest)).await
    }

    /// Records a hit; applied to the index in batches, off the request path.
    pub fn touch(&self, digest: &Digest, registry: &str, repo: &str) {
        let touches = self.touches.lock().unwrap_or_else(|p| p.into_inner());
        let Some(touches) = touches.as_ref() else {
            return;
        };
        let _ = touches.send(Touch {
            digest: digest.clone(),
            registry: registry.to_string(),
            repo: repo.to_string(),
            at: index::now_secs(),
        });
    }

    /// Drops an index entry whose file has gone missing.
    pub async fn forget(&self, digest: &Digest) -> Result<(), CacheError> {
        let d = digest.clone();
        self.with_index(move |index| index.remove(&d).map(|_| ()))
            .await
    }

    /// Removes an entry and its file. Clients already streaming it keep their open file.
    pub async fn purge(&self, digest: &Digest) -> Result<bool, CacheError> {
        let d = digest.clone();
        let blobs = self.blobs.clone();
        let index = self.index.clone();
        let existed = tokio::task::spawn_blocking(move || -> Result<bool, CacheError> {
            let old = index.remove(&d)?;
            blobs.remove(&d)?;
            Ok(old.is_some())
        })
        .await??;
        Ok(existed)
    }

    /// The `registry/repository` an in-flight download of `digest` was started for.
    pub fn fill_origin(&self, digest: &Digest) -> Option<String> {
        let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        fills.get(digest).map(|f| f.origin.clone())
    }

    /// Joins the download of `req.digest` if one is running, or starts it. Returns the fill
    /// and whether this call started it.
    pub fn join_or_start(self: &Arc<Self>, req: FillRequest) -> (Arc<Fill>, bool) {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fill) = fills.get(&req.digest) {
            return (fill.clone(), false);
        }
        let (fill, progress) = Fill::new(
            req.digest.clone(),
            index::home(&req.registry, &req.repo),
            self.blobs.temp_path(&req.digest),
            self.blobs.path(&req.digest),
        );
        fills.insert(req.digest.clone(), fill.clone());
        drop(fills);
        self.stats.fill_started();
        // Its own task: the client that started it may go away; the others still need it.
        self.tasks
            .spawn(fill::run(self.clone(), fill.clone(), progress, req));
        (fill, true)
    }

    pub(crate) fn finish_fill(&self, digest: &Digest) {
        self.fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
        self.stats.fill_finished();
    }

    /// Makes a verified temp file durable, moves it into place, then indexes it.
    pub(crate) async fn commit(
        &self,
        tmp: std::path::PathBuf,
        file: std::fs::File,
        digest: Digest,
        entry: Entry,
        inline: Option<Vec<u8>>,
    ) -> Result<(), CacheError> {
        let blobs = self.blobs.clone();
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || -> Result<(), CacheError> {
            blobs.commit(&tmp, &file, &digest)?;
            index.insert(&digest, &entry, inline.as_deref())?;
            Ok(())
        })
        .await?
    }

    /// Stops recording hits (after writing the queued ones) and flushes. Called at shutdown,
    /// after the fills have finished, so the index can be released.
    pub async fn close(&self) -> Result<(), CacheError> {
        self.touches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let recorder = self
            .recorder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(recorder) = recorder {
            recorder.await?;
        }
        self.flush().await
    }

    /// Flushes counters and the index; called periodically and at shutdown.
    pub async fn flush(&self) -> Result<(), CacheError> {
        let stats = self.stats.clone();
        self.with_index(move |index| {
            stats.persist(index)?;
            index.flush()
        })
        .await
    }
}

async fn apply_touches(index: Arc<Index>, mut rx: mpsc::UnboundedReceiver<Touch>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let todo = std::mem::take(&mut batch);
        let index = index.clone();
        let applied = tokio::task::spawn_blocking(move || {
            for t in todo {
                if let Err(e) = index.touch(&t.digest, &t.registry, &t.repo, t.at) {
                    tracing::warn!(error = %e, "cannot record a cache hit");
                }
            }
        })
        .await;
        if applied.is_err() {
            tracing::error!("hit recorder task failed");
        }
    }
}
