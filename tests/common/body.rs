//! Bodies: deterministic payloads, a channel-fed body for servers that shape their output
//! (gates, truncation), and helpers to read responses.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::mpsc;

/// The body type every fake server answers with and every test client sends.
pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Deterministic pattern: byte `i` of stream `seed` is a pure function of (seed, i), so any range
// can be produced or checked without holding the whole payload.

fn word(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, index)
    let mut z = seed
        .wrapping_mul(0xD6E8_FEB8_6659_FD93)
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of pattern `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let w = word(seed, pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// The first `len` bytes of pattern `seed`.
pub fn pattern_bytes(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    fill_pattern(seed, 0, &mut v);
    Bytes::from(v)
}

/// SHA-256 (hex) of the first `len` bytes of pattern `seed`, computed chunk by chunk.
pub fn pattern_sha256(seed: u64, len: u64) -> String {
    let mut h = super::digest::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        fill_pattern(seed, pos, &mut buf[..n]);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finish_hex()
}

/// Streams `len` pattern bytes in 64 KiB frames, generating each frame on demand: a 64 MiB
/// transfer never sits in memory.
pub struct PatternBody {
    seed: u64,
    pos: u64,
    end: u64,
}

impl PatternBody {
    pub fn new(seed: u64, len: u64) -> Self {
        PatternBody {
            seed,
            pos: 0,
            end: len,
        }
    }

    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.pos >= self.end {
            return Poll::Ready(None);
        }
        let n = ((self.end - self.pos) as usize).min(64 * 1024);
        let mut chunk = vec![0u8; n];
        fill_pattern(self.seed, self.pos, &mut chunk);
        self.pos += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

// ---------------------------------------------------------------------------------------------

/// A body fed by a task through a channel. An `Err` item aborts the response (hyper closes the
/// connection mid-body). `on_end` runs once the body has handed out `len` bytes (hyper stops
/// polling a body as soon as `Content-Length` is reached) or ended without error.
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl ChannelBody {
    /// Returns the sending half and the body, which will carry `len` bytes.
    pub fn channel(
        len: u64,
        on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
        let (tx, rx) = mpsc::channel(2);
        (
            tx,
            BodyExt::boxed(ChannelBody {
                rx,
                remaining: len,
                on_end,
            }),
        )
    }

    fn ended(&mut self) {
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                if self.remaining == 0 {
                    self.ended();
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.on_end = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.ended();
                Poll::Ready(None)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------------------------------------------------------------------------------------------

/// Reads the next data frame of `body`, skipping trailers. `None` at the end of the body.
pub async fn next_chunk<B>(body: &mut B) -> Option<Result<Bytes, B::Error>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Some(Ok(data));
                    }
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// How reading a body to its end went, compared with the bytes expected.
#[derive(Debug)]
pub struct Compared {
    /// Bytes received (including those read before the comparison started).
    pub received: usize,
    /// Offset of the first byte that differed from the expectation, if any.
    pub first_mismatch: Option<usize>,
    /// The transport error that ended the body early, if any.
    pub error: Option<String>,
}

impl Compared {
    /// Nothing compared yet; the next byte arrives at `offset`.
    pub fn starting_at(offset: usize) -> Compared {
        Compared {
            received: offset,
            first_mismatch: None,
            error: None,
        }
    }

    /// The body ended cleanly with exactly the expected bytes.
    pub fn is_exact(&self, expected_len: usize) -> bool {
        self.error.is_none() && self.first_mismatch.is_none() && self.received == expected_len
    }

    /// The body was complete in length and ended without a transport error.
    pub fn completed(&self, expected_len: usize) -> bool {
        self.error.is_none() && self.received >= expected_len
    }
}

/// Reads `body` to its end, comparing every byte with `expected[offset..]` without buffering.
pub async fn compare_body<B>(body: &mut B, expected: &[u8], offset: usize) -> Compared
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut c = Compared::starting_at(offset);
    while let Some(next) = next_chunk(body).await {
        match next {
            Ok(data) => {
                check_chunk(&mut c, expected, &data);
            }
            Err(e) => {
                c.error = Some(e.to_string());
                break;
            }
        }
    }
    c
}

/// Records `data` (arriving at `c.received`) against `expected`.
pub fn check_chunk(c: &mut Compared, expected: &[u8], data: &[u8]) {
    if c.first_mismatch.is_none() {
        let start = c.received;
        let end = start + data.len();
        if end > expected.len() {
            c.first_mismatch = Some(expected.len().max(start));
        } else if expected[start..end] != *data {
            let at = data
                .iter()
                .zip(&expected[start..end])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            c.first_mismatch = Some(start + at);
        }
    }
    c.received += data.len();
}
