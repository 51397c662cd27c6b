//! Why a catalog operation failed.

use super::Reason;

/// Why a catalog operation failed; the variant is a bounded category for metrics and
/// condition reasons, the text the real error.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// No address answered (connection refused, timeout, DNS).
    #[error("{0}")]
    Unreachable(String),
    /// The catalog answered, with an error.
    #[error("{0}")]
    Rejected(String),
    /// Credentials were refused.
    #[error("{0}")]
    Unauthorized(String),
    /// What the catalog returned could not be understood.
    #[error("{0}")]
    Protocol(String),
}

impl BackendError {
    /// The reason for conditions and the metric label.
    pub fn reason(&self) -> Reason {
        match self {
            BackendError::Unreachable(_) => Reason::Unreachable,
            BackendError::Rejected(_) => Reason::Rejected,
            BackendError::Unauthorized(_) => Reason::Unauthorized,
            BackendError::Protocol(_) => Reason::ProtocolError,
        }
    }
}
