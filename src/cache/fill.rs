//! One download per digest, shared by every client that asks while it runs.
//!
//! A fill is its own task: it GETs the object upstream (following redirects), hashes it and
//! writes it to a temp file while announcing progress on a `watch` channel. Every client —
//! the one that started it and those that joined — reads the temp file up to the announced
//! length, so each starts receiving bytes at once and memory stays flat. The last byte is held
//! back until the digest has been verified: a fill that fails (upstream error, truncation,
//! digest mismatch) aborts every reader's response, so no client ever receives a complete body
//! with wrong bytes, and nothing is cached.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};

use crate::body::{Body, BoxError};
use crate::cache::index::{home, now_secs, Entry, Kind};
use crate::cache::Cache;
use crate::config::MAX_MANIFEST_BYTES;
use crate::route::Digest;

/// Bytes gathered from upstream before they are handed to the writer thread (smaller batches
/// go at once when the writer is idle).
pub const WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Batches queued for the writer thread before the network read waits (bounds memory).
pub const WRITE_QUEUE_BATCHES: usize = 4;
/// Batches written but not yet hashed before the writer waits (bounds memory).
pub const HASH_QUEUE_BATCHES: usize = 4;
/// Largest read a client stream does at once, from a cached file or a fill in progress.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// What the fill task needs to know.
pub struct FillRequest {
    pub digest: Digest,
    pub kind: Kind,
    pub registry: String,
    pub repo: String,
    pub uri: Uri,
    /// Headers sent upstream (the starting client's `Accept`, `Authorization`, `User-Agent`).
    pub headers: HeaderMap,
}

#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for upstream's response head.
    Pending,
    /// Bytes `0..written` are in the temp file.
    Streaming {
        len: Option<u64>,
        media_type: String,
        written: u64,
    },
    /// Verified and committed under `blobs/`.
    Done { size: u64, media_type: String },
    /// Upstream refused (status and headers to pass on) or the download went wrong.
    Failed {
        upstream: Option<(StatusCode, HeaderMap)>,
        reason: String,
    },
    /// The cache cannot take the object (disk full, cache directory unwritable); nothing
    /// was asked of upstream. Clients should be passed through to upstream instead.
    Unstorable { reason: String },
}

/// An in-flight download, as seen by its readers.
pub struct Fill {
    pub digest: Digest,
    /// The `registry/repository` the download was started for (see [`Entry::known_in`]).
    pub origin: String,
    tmp: PathBuf,
    done_path: PathBuf,
    state: watch::Receiver<FillState>,
}

/// The fill task's end of the progress channel.
pub(crate) struct Progress {
    tx: Arc<watch::Sender<FillState>>,
}

impl Fill {
    pub(crate) fn new(
        digest: Digest,
        origin: String,
        tmp: PathBuf,
        done_path: PathBuf,
    ) -> (Arc<Fill>, Progress) {
        let (tx, rx) = watch::channel(FillState::Pending);
        (
            Arc::new(Fill {
                digest,
                origin,
                tmp,
                done_path,
                state: rx,
            }),
            Progress { tx: Arc::new(tx) },
        )
    }

    /// Waits for the response head (or the failure).
    pub async fn head(&self) -> FillState {
        let mut rx = self.state.clone();
        let state = rx.wait_for(|s| !matches!(s, FillState::Pending)).await;
        match state {
            Ok(s) => s.clone(),
            Err(_) => FillState::Failed {
                upstream: None,
                reason: "download task ended".into(),
            },
        }
    }

    /// The body of bytes `start..end` of the object, streamed as the download progresses.
    pub fn reader(self: &Arc<Self>, start: u64, end: u64) -> Body {
        let reader = Reader {
            fill: Some(self.clone()),
            rx: Some(self.state.clone()),
            file: None,
            positioned: false,
            path: self.tmp.clone(),
            pos: start,
            end,
        };
        reader.into_body()
    }
}

/// Streams `start..end` of a committed file (a cache hit).
pub fn file_body(file: tokio::fs::File, start: u64, end: u64) -> Body {
    Reader {
        fill: None,
        rx: None,
        file: Some(file),
        positioned: false,
        path: PathBuf::new(),
        pos: start,
        end,
    }
    .into_body()
}

struct Reader {
    fill: Option<Arc<Fill>>,
    rx: Option<watch::Receiver<FillState>>,
    file: Option<tokio::fs::File>,
    /// Whether `file` has been moved to `pos` yet.
    positioned: bool,
    path: PathBuf,
    pos: u64,
    end: u64,
}

impl Reader {
    fn into_body(self) -> Body {
        let stream = futures_util::stream::try_unfold(self, |mut r| async move {
            match r.next_chunk().await? {
                Some(chunk) => Ok(Some((http_body::Frame::data(chunk), r))),
                None => Ok(None),
            }
        });
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }

    /// How far this reader may read now; `None` at the end of the object.
    async fn readable_until(&mut self) -> Result<Option<u64>, BoxError> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(Some(self.end));
        };
        loop {
            let limit = match &*rx.borrow_and_update() {
                FillState::Pending => 0,
                // Hold back the last byte until the digest is verified.
                FillState::Streaming { written, .. } => written.saturating_sub(1),
                FillState::Done { size, .. } if self.pos >= *size => return Ok(None),
                FillState::Done { size, .. } => *size,
                FillState::Failed { reason, .. } | FillState::Unstorable { reason } => {
                    return Err(format!("upstream download failed: {reason}").into())
                }
            };
            if limit > self.pos {
                return Ok(Some(limit.min(self.end)));
            }
            if rx.changed().await.is_err() {
                return Err("download task ended unexpectedly".into());
            }
        }
    }

    async fn open(&mut self) -> Result<&mut tokio::fs::File, BoxError> {
        if let (Some(file), false) = (self.file.as_mut(), self.positioned) {
            file.seek(std::io::SeekFrom::Start(self.pos)).await?;
            self.positioned = true;
        }
        if self.file.is_none() {
            let file = match tokio::fs::File::open(&self.path).await {
                Ok(f) => f,
                // Renamed into place between our check and the open.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match &self.fill {
                    Some(fill) => tokio::fs::File::open(&fill.done_path).await?,
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            };
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(self.pos)).await?;
            self.file = Some(file);
            self.positioned = true;
        }
        self.file.as_mut().ok_or_else(|| "file vanished".into())
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BoxError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let Some(limit) = self.readable_until().await? else {
            return Ok(None);
        };
        let want = (limit - self.pos).min(READ_CHUNK_BYTES as u64) as usize;
        let mut buf = BytesMut::zeroed(want);
        let file = self.open().await?;
        let mut filled = 0;
        while filled < want {
            let n = file.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Err("cached file is shorter than its index entry".into());
            }
            filled += n;
        }
        self.pos += want as u64;
        Ok(Some(buf.freeze()))
    }
}

/// Runs one fill to the end. Never panics; every exit publishes `Done` or `Failed`.
pub(crate) async fn run(cache: Arc<Cache>, fill: Arc<Fill>, progress: Progress, req: FillRequest) {
    let tmp = fill.tmp.clone();
    // The temp file comes first: if the cache cannot store anything, upstream is not asked
    // (a manifest GET counts against Docker Hub's limit) and clients are passed through.
    let created = tokio::task::spawn_blocking(move || std::fs::File::create(tmp)).await;
    let file = match created {
        Ok(Ok(file)) => file,
        failed => {
            let reason = match failed {
                Ok(Err(e)) => format!("cannot create a temp file in the cache: {e}"),
                Err(e) => e.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            tracing::warn!(digest = %req.digest, %reason, "not caching; passing clients through");
            cache.stats.fill_failed(&req.registry);
            cache.finish_fill(&fill.digest);
            let _ = progress.tx.send(FillState::Unstorable { reason });
            return;
        }
    };
    let result = download(&cache, &fill, &progress, &req, file).await;
    let final_state = match result {
        Ok((size, media_type)) => FillState::Done { size, media_type },
        Err(failure) => {
            if let Some(reason) = &failure.log {
                tracing::warn!(digest = %req.digest, registry = %req.registry, repo = %req.repo,
                    %reason, "download failed; nothing cached");
                cache.stats.fill_failed(&req.registry);
            }
            let _ = tokio::fs::remove_file(&fill.tmp).await;
            FillState::Failed {
                upstream: failure.upstream.map(|b| *b),
                reason: failure.reason,
            }
        }
    };
    cache.finish_fill(&fill.digest);
    let _ = progress.tx.send(final_state);
}

struct Failure {
    upstream: Option<Box<(StatusCode, HeaderMap)>>,
    reason: String,
    /// Set when the failure deserves a warning (not a plain upstream refusal).
    log: Option<String>,
}

impl Failure {
    fn broken(reason: impl Into<String>) -> Failure {
        let reason = reason.into();
        Failure {
            upstream: None,
            log: Some(reason.clone()),
            reason,
        }
    }
}

async fn download(
    cache: &Arc<Cache>,
    fill: &Arc<Fill>,
    progress: &Progress,
    req: &FillRequest,
    file: std::fs::File,
) -> Result<(u64, String), Failure> {
    let resp = cache
        .upstream
        .fetch_following(Method::GET, req.uri.clone(), &req.headers)
        .await
        .map_err(|e| Failure {
            upstream: None,
            reason: e.to_string(),
            log: Some(e.to_string()),
        })?;
    cache.stats.upstream_response(
        &req.registry,
        &req.repo,
        resp.headers(),
        req.kind == Kind::Manifest,
    );
    if resp.status() != StatusCode::OK {
        let (parts, _) = resp.into_parts();
        return Err(Failure {
            reason: format!("upstream answered {}", parts.status),
            upstream: Some(Box::new((parts.status, parts.headers))),
            log: None,
        });
    }
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    if req.kind == Kind::Manifest && len.is_some_and(|l| l > MAX_MANIFEST_BYTES) {
        return Err(Failure::broken(format!(
            "manifest larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    let announced_type = media_type.clone();
    let streaming = move |written| FillState::Streaming {
        len,
        media_type: announced_type.clone(),
        written,
    };
    let _ = progress.tx.send(streaming(0));

    // Two blocking threads work while this task reads the next batches from the network: a
    // writer (write, then announce to readers) and a hasher behind it. Readers therefore run
    // at disk speed, not hashing speed; only the last byte waits for the verdict.
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE_BATCHES);
    let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Bytes>(HASH_QUEUE_BATCHES);
    let (progress_tx, stats) = (progress.tx.clone(), cache.stats.clone());
    let (registry, repo) = (req.registry.clone(), req.repo.clone());
    let digest_name = req.digest.algorithm().to_string();
    let algorithm = match req.digest.algorithm() {
        "sha512" => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    };
    let hasher = tokio::task::spawn_blocking(move || {
        let mut context = ring::digest::Context::new(algorithm);
        while let Ok(batch) = hash_rx.recv() {
            context.update(&batch);
        }
        format!("{}:{}", digest_name, hex::encode(context.finish()))
    });
    let writer = tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64), String> {
        let mut file = file;
        let mut written = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            file.write_all(&batch)
                .map_err(|e| format!("cannot write the temp file: {e}"))?;
            written += batch.len() as u64;
            stats.bytes_from_upstream(&registry, &repo, batch.len() as u64);
            let _ = progress_tx.send(streaming(written));
            hash_tx
                .send(batch)
                .map_err(|_| "the hasher stopped".to_string())?;
        }
        Ok((file, written))
    });

    let mut inline = Vec::new();
    let mut received = 0u64;
    let network = async {
        let mut batch = BytesMut::new();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Failure::broken(format!("upstream body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            if req.kind == Kind::Manifest {
                if received > MAX_MANIFEST_BYTES {
                    return Err(Failure::broken("manifest exceeds the size limit"));
                }
                inline.extend_from_slice(&data);
            }
            batch.extend_from_slice(&data);
            // Hand over a batch when it is big, or at once when the writer is idle (low
            // latency for the clients waiting on the first bytes).
            let hand_over = batch.len() >= WRITE_BATCH_BYTES || tx.capacity() == tx.max_capacity();
            if hand_over && tx.send(batch.split().freeze()).await.is_err() {
                return Ok(()); // the writer failed; its error is reported below
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(batch.freeze()).await;
        }
        Ok(())
    };
    let network = network.await;
    // Whatever happened, let the writer finish before the fill's end is announced, so no
    // progress update can follow the verdict.
    drop(tx);
    let written = writer.await.map_err(|e| Failure::broken(e.to_string()));
    network?;
    let (file, written) = written?.map_err(Failure::broken)?;
    let actual = hasher.await.map_err(|e| Failure::broken(e.to_string()))?;
    if written != received {
        return Err(Failure::broken("the writer stopped early"));
    }
    if let Some(expected) = len {
        if written != expected {
            return Err(Failure::broken(format!(
                "truncated: got {written} of {expected} bytes"
            )));
        }
    }
    if actual != req.digest.as_str() {
        cache.stats.digest_mismatch(&req.registry);
        return Err(Failure::broken(format!(
            "digest mismatch: upstream sent {actual}"
        )));
    }
    let size = written;
    let now = now_secs();
    let entry = Entry {
        kind: req.kind,
        size,
        media_type: media_type.clone(),
        created: now,
        last_access: now,
        hits: 0,
        registries: vec![req.registry.clone()],
        repos: vec![req.repo.clone()],
        known_in: vec![home(&req.registry, &req.repo)],
    };
    let inline = (req.kind == Kind::Manifest).then_some(inline);
    cache
        .commit(fill.tmp.clone(), file, req.digest.clone(), entry, inline)
        .await
        .map_err(|e| Failure::broken(format!("cannot store the download: {e}")))?;
    Ok((size, media_type))
}
