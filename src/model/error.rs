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
    /// The catalog refused the request for what it holds — a permission on one name or key, a
    /// size limit, a value it does not take — and would take other requests: the export the
    /// refused operations belong to is held back, every other write goes on. `keys`: the
    /// operations the catalog named as refused, when it did (empty: somewhere in the
    /// request); the other operations of the request may or may not have been written.
    #[error("{message}")]
    Refused { message: String, keys: Vec<String> },
    /// Another cluster claimed this owner id in the catalog (its owner marker records another
    /// `kube-system` UID): nothing is written there (`backend::claim`).
    #[error("{0}")]
    OwnerClaimed(String),
}

impl BackendError {
    /// The reason for conditions and the metric label.
    pub fn reason(&self) -> Reason {
        match self {
            BackendError::Unreachable(_) => Reason::Unreachable,
            BackendError::Rejected(_) => Reason::Rejected,
            BackendError::Unauthorized(_) => Reason::Unauthorized,
            BackendError::Protocol(_) => Reason::ProtocolError,
            BackendError::Refused { .. } => Reason::Refused,
            BackendError::OwnerClaimed(_) => Reason::OwnerClaimed,
        }
    }

    /// A refusal of the request itself, without naming the operations refused.
    pub fn refused(message: impl Into<String>) -> BackendError {
        BackendError::Refused {
            message: message.into(),
            keys: Vec::new(),
        }
    }

    /// Whether the catalog refused the request for what it holds, so that other requests may
    /// go through (not an outage, not the credentials).
    pub fn is_refusal(&self) -> bool {
        matches!(self, BackendError::Refused { .. })
    }
}
