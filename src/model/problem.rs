//! Reasons and problems: the one list of the CamelCase words users see as the `reason` of a
//! condition or an Event, and use as a metric label. Every reason catalog-bridge gives is a
//! [`Reason`]; none is written as a string elsewhere.

use std::fmt;

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Why a condition is what it is, or what an Event reports. Bounded: a metric label.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The word itself (`ServiceNotFound`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // An export that cannot take effect.
    /// `catalog-bridge.io/export` or another annotation of the Service is not usable.
    InvalidAnnotation,
    /// The Service an export names does not exist.
    ServiceNotFound,
    /// The Service is maintained by an import, and imported Services are never exported.
    ImportedService,
    /// The ExternalCatalog an export or import names does not exist.
    CatalogNotFound,
    /// The Service has no port by the name or number the export asks for.
    PortNotFound,
    /// The catalog's policy (`spec.policy`) does not let this namespace export to it or import
    /// from it, or not under this name.
    NotAllowed,
    /// Another namespace's older export holds this name in the catalog, whose policy does not
    /// merge one name from several namespaces.
    NameConflict,
    // An export that takes effect, with a part of it left out.
    /// A meta pair the catalog would refuse was left out of the entries.
    InvalidMeta,

    // A catalog that cannot be used.
    /// The ExternalCatalog's settings cannot be used (a bad address, an unusable certificate).
    InvalidConfig,
    /// A Secret the ExternalCatalog references does not exist.
    SecretNotFound,
    /// Reading a Secret the ExternalCatalog references is not allowed.
    SecretForbidden,
    /// A Secret the ExternalCatalog references lacks a key.
    SecretKeyNotFound,
    /// A Secret's key is not what it should be (not text).
    InvalidSecret,

    // A catalog operation that failed.
    /// No address of the catalog answered.
    Unreachable,
    /// The catalog answered with an error.
    Rejected,
    /// The catalog refused the credentials.
    Unauthorized,
    /// What the catalog answered could not be understood.
    ProtocolError,
    /// The catalog refused the writes of one export (a permission on its name, a size limit);
    /// every other export is written.
    Refused,
    /// Another cluster claimed this cluster's owner id (`clusterId`) in the catalog: nothing is
    /// written there, so that neither deletes the other's entries.
    OwnerClaimed,

    // Import.
    /// The Service an import would write belongs to someone else.
    ServiceConflict,
    /// Writing the imported Service or EndpointSlices failed.
    ApplyFailed,
    /// A catalog entry could not be imported and was skipped.
    UnparsableEntry,
    /// The catalog suddenly stopped listing most instances of an imported name: their
    /// endpoints are kept for `spec.import.emptyHoldSeconds` (the empty-hold).
    ImportHeld,
    /// An empty-hold ran out: the endpoints the catalog still does not list were removed.
    ImportHoldExpired,
    /// The catalog lists the held instances again: the empty-hold is over.
    ImportHoldReleased,

    // Conditions that are fine, or on their way.
    /// The catalog answers.
    Connected,
    /// The catalog was not contacted yet.
    NotContacted,
    /// The catalog, or the EndpointSlices, hold exactly what they should.
    InSync,
    /// In sync, with something the operator should look at.
    NeedsAttention,
    /// Being written.
    Syncing,
    /// An export is valid and in effect.
    Exported,
    /// An import is reading its catalog and maintaining its Service.
    Imported,
    /// An import waits for the first read of its catalog.
    Waiting,

    // Deletion.
    /// A deleted ExternalCatalog waits until this cluster's entries there are removed.
    RemovalPending,
    /// A deleted ExternalCatalog was let go without removing its entries (the annotation
    /// `catalog-bridge.io/abandon`).
    Abandoned,

    // Supervision.
    /// The task that serves the object stopped unexpectedly and was started again.
    TaskRestarted,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why something is not (fully) in effect: a [`Reason`] and the message users read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

impl Problem {
    pub fn new(reason: Reason, message: impl Into<String>) -> Problem {
        Problem {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_camel_case_words() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.starts_with(|c: char| c.is_ascii_uppercase()), "{s}");
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        }
    }
}
