//! The one response/request body type used across pullcache, and small constructors.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body pullcache sends or forwards: streamed, never required to be `Sync`.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Wraps hyper's incoming body (a client upload or an upstream response) without buffering.
pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(BoxError::from).boxed_unsync()
}

/// Wraps a body so that `done(bytes_sent, ended)` runs exactly once: when the body ends,
/// fails, or is dropped early (the client went away).
pub fn metered<F>(inner: Body, done: F) -> Body
where
    F: FnOnce(u64, bool) + Send + 'static,
{
    Metered {
        inner,
        bytes: 0,
        done: Some(Box::new(done)),
    }
    .boxed_unsync()
}

type DoneFn = Box<dyn FnOnce(u64, bool) + Send>;

struct Metered {
    inner: Body,
    bytes: u64,
    done: Option<DoneFn>,
}

impl Metered {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.bytes, complete);
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => self.finish(false),
            std::task::Poll::Ready(None) => self.finish(true),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let complete = http_body::Body::is_end_stream(&self.inner);
        self.finish(complete);
    }
}
