//! Errors on the request path, and the one place that turns them into responses.
//!
//! Every error knows whose fault it is: the client's (4xx, logged at debug), the upstream's
//! (502/504, warn) or ours (500, error). [`ProxyError::status`] and [`ProxyError::log`] are the
//! only mapping from error to status code and log level.

use http::StatusCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("cannot reach {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("TLS to {host} failed: {reason}")]
    UpstreamTls { host: String, reason: String },
    #[error("{host} did not answer in time")]
    UpstreamTimeout { host: String },
    #[error("{host} sent a bad response: {reason}")]
    BadUpstream { host: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::BadRequest(_) | ProxyError::Forbidden(_) => Fault::Downstream,
            ProxyError::Unreachable { .. }
            | ProxyError::UpstreamTls { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::BadUpstream { .. } => Fault::Upstream,
            ProxyError::Internal(_) => Fault::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable { .. }
            | ProxyError::UpstreamTls { .. }
            | ProxyError::BadUpstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Logs the error at the level its fault deserves.
    pub fn log(&self) {
        match self.fault() {
            Fault::Downstream => tracing::debug!(error = %self, "client error"),
            Fault::Upstream => tracing::warn!(error = %self, "upstream error"),
            Fault::Internal => tracing::error!(error = %self, "internal error"),
        }
    }
}

impl From<std::io::Error> for ProxyError {
    fn from(e: std::io::Error) -> Self {
        ProxyError::Internal(e.to_string())
    }
}
