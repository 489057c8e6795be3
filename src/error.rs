//! The one public error type: an opaque [`Error`] with a matchable [`ErrorKind`] and, when
//! the hub said why, the AMQP [`Condition`] it sent.

use std::fmt;

/// A `Result` whose error is [`hubsend::Error`](Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, at a level callers can act on.
///
/// Match on this through [`Error::kind`]. New kinds may be added in minor releases.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection string is malformed; the message names the offending key.
    InvalidConnectionString,
    /// A configuration value is unusable (bad CA file, zero batch size, ...).
    InvalidConfig,
    /// The hub refused the credentials (`amqp:unauthorized-access`, put-token 401/403).
    Unauthorized,
    /// The hub, partition or other entity does not exist (`amqp:not-found`, put-token 404).
    NotFound,
    /// An event or batch is larger than the link's maximum message size.
    MessageTooLarge,
    /// A batch size was requested that the link cannot carry.
    InvalidBatchSize,
    /// The producer's in-flight bound is reached and the caller asked not to wait.
    Busy,
    /// The hub is throttling (`com.microsoft:server-busy`).
    ServerBusy,
    /// An operation did not finish in time.
    Timeout,
    /// The hub rejected a delivery for another reason (see [`Error::condition`]).
    Rejected,
    /// The delivery was released or modified by the hub: it was not stored.
    NotStored,
    /// The sender link was detached or could not be attached.
    Link,
    /// The connection could not be opened or was lost (I/O, TLS, SASL, close frame).
    Connection,
    /// The `$management` node answered with an error or an unexpected shape.
    Management,
    /// The peer broke the protocol or sent data hubsend cannot decode.
    Protocol,
    /// The producer has been closed.
    Closed,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidConnectionString => "invalid connection string",
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not found",
            ErrorKind::MessageTooLarge => "message too large",
            ErrorKind::InvalidBatchSize => "invalid batch size",
            ErrorKind::Busy => "producer busy",
            ErrorKind::ServerBusy => "server busy",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Rejected => "rejected by the hub",
            ErrorKind::NotStored => "not stored by the hub",
            ErrorKind::Link => "link error",
            ErrorKind::Connection => "connection error",
            ErrorKind::Management => "management error",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Closed => "producer closed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An AMQP error condition sent by the hub (AMQP 1.0 §2.8.15 and Microsoft's extensions).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Condition {
    /// `amqp:internal-error`
    InternalError,
    /// `amqp:not-found`
    NotFound,
    /// `amqp:unauthorized-access`
    UnauthorizedAccess,
    /// `amqp:decode-error`
    DecodeError,
    /// `amqp:resource-limit-exceeded`
    ResourceLimitExceeded,
    /// `amqp:not-allowed`
    NotAllowed,
    /// `amqp:invalid-field`
    InvalidField,
    /// `amqp:not-implemented`
    NotImplemented,
    /// `amqp:resource-locked`
    ResourceLocked,
    /// `amqp:precondition-failed`
    PreconditionFailed,
    /// `amqp:resource-deleted`
    ResourceDeleted,
    /// `amqp:illegal-state`
    IllegalState,
    /// `amqp:frame-size-too-small`
    FrameSizeTooSmall,
    /// `amqp:connection:forced`
    ConnectionForced,
    /// `amqp:connection:framing-error`
    FramingError,
    /// `amqp:connection:redirect`
    ConnectionRedirect,
    /// `amqp:session:window-violation`
    WindowViolation,
    /// `amqp:session:errant-link`
    ErrantLink,
    /// `amqp:session:handle-in-use`
    HandleInUse,
    /// `amqp:session:unattached-handle`
    UnattachedHandle,
    /// `amqp:link:detach-forced`
    DetachForced,
    /// `amqp:link:transfer-limit-exceeded`
    TransferLimitExceeded,
    /// `amqp:link:message-size-exceeded`
    MessageSizeExceeded,
    /// `amqp:link:redirect`
    LinkRedirect,
    /// `amqp:link:stolen`
    Stolen,
    /// `com.microsoft:server-busy`
    ServerBusy,
    /// `com.microsoft:timeout`
    Timeout,
    /// `com.microsoft:argument-error`
    ArgumentError,
    /// `com.microsoft:argument-out-of-range`
    ArgumentOutOfRange,
    /// `com.microsoft:entity-disabled`
    EntityDisabled,
    /// `com.microsoft:operation-cancelled`
    OperationCancelled,
    /// `com.microsoft:partition-not-owned`
    PartitionNotOwned,
    /// `com.microsoft:publisher-revoked`
    PublisherRevoked,
    /// `com.microsoft:producer-epoch-stolen`
    ProducerEpochStolen,
    /// `com.microsoft:out-of-order-sequence`
    OutOfOrderSequence,
    /// Any other condition symbol, verbatim.
    Other(String),
}

const CONDITIONS: &[(&str, Condition)] = &[
    ("amqp:internal-error", Condition::InternalError),
    ("amqp:not-found", Condition::NotFound),
    ("amqp:unauthorized-access", Condition::UnauthorizedAccess),
    ("amqp:decode-error", Condition::DecodeError),
    (
        "amqp:resource-limit-exceeded",
        Condition::ResourceLimitExceeded,
    ),
    ("amqp:not-allowed", Condition::NotAllowed),
    ("amqp:invalid-field", Condition::InvalidField),
    ("amqp:not-implemented", Condition::NotImplemented),
    ("amqp:resource-locked", Condition::ResourceLocked),
    ("amqp:precondition-failed", Condition::PreconditionFailed),
    ("amqp:resource-deleted", Condition::ResourceDeleted),
    ("amqp:illegal-state", Condition::IllegalState),
    ("amqp:frame-size-too-small", Condition::FrameSizeTooSmall),
    ("amqp:connection:forced", Condition::ConnectionForced),
    ("amqp:connection:framing-error", Condition::FramingError),
    ("amqp:connection:redirect", Condition::ConnectionRedirect),
    ("amqp:session:window-violation", Condition::WindowViolation),
    ("amqp:session:errant-link", Condition::ErrantLink),
    ("amqp:session:handle-in-use", Condition::HandleInUse),
    (
        "amqp:session:unattached-handle",
        Condition::UnattachedHandle,
    ),
    ("amqp:link:detach-forced", Condition::DetachForced),
    (
        "amqp:link:transfer-limit-exceeded",
        Condition::TransferLimitExceeded,
    ),
    (
        "amqp:link:message-size-exceeded",
        Condition::MessageSizeExceeded,
    ),
    ("amqp:link:redirect", Condition::LinkRedirect),
    ("amqp:link:stolen", Condition::Stolen),
    ("com.microsoft:server-busy", Condition::ServerBusy),
    ("com.microsoft:timeout", Condition::Timeout),
    ("com.microsoft:argument-error", Condition::ArgumentError),
    (
        "com.microsoft:argument-out-of-range",
        Condition::ArgumentOutOfRange,
    ),
    ("com.microsoft:entity-disabled", Condition::EntityDisabled),
    (
        "com.microsoft:operation-cancelled",
        Condition::OperationCancelled,
    ),
    (
        "com.microsoft:partition-not-owned",
        Condition::PartitionNotOwned,
    ),
    (
        "com.microsoft:publisher-revoked",
        Condition::PublisherRevoked,
    ),
    (
        "com.microsoft:producer-epoch-stolen",
        Condition::ProducerEpochStolen,
    ),
    (
        "com.microsoft:out-of-order-sequence",
        Condition::OutOfOrderSequence,
    ),
];

impl Condition {
    /// Maps a condition symbol as it appears on the wire.
    pub fn from_symbol(symbol: &str) -> Condition {
        CONDITIONS
            .iter()
            .find(|(s, _)| *s == symbol)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| Condition::Other(symbol.to_owned()))
    }

    /// The condition symbol as it appears on the wire.
    pub fn as_symbol(&self) -> &str {
        match self {
            Condition::Other(s) => s,
            known => CONDITIONS
                .iter()
                .find(|(_, c)| c == known)
                .map(|(s, _)| *s)
                .unwrap_or("amqp:internal-error"),
        }
    }

    /// The [`ErrorKind`] a hub error with this condition maps to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Condition::UnauthorizedAccess => ErrorKind::Unauthorized,
            Condition::NotFound | Condition::EntityDisabled => ErrorKind::NotFound,
            Condition::MessageSizeExceeded => ErrorKind::MessageTooLarge,
            Condition::ServerBusy => ErrorKind::ServerBusy,
            Condition::Timeout => ErrorKind::Timeout,
            Condition::DetachForced | Condition::Stolen | Condition::TransferLimitExceeded => {
                ErrorKind::Link
            }
            Condition::ConnectionForced
            | Condition::FramingError
            | Condition::ConnectionRedirect => ErrorKind::Connection,
            _ => ErrorKind::Rejected,
        }
    }

    /// Whether an operation that failed with this condition may succeed when tried again.
    ///
    /// Throttling, time-outs, internal errors and lost links or connections are retriable;
    /// authorisation, missing entities, oversize messages and bad arguments are not.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Condition::ServerBusy
                | Condition::Timeout
                | Condition::InternalError
                | Condition::OperationCancelled
                | Condition::DetachForced
                | Condition::TransferLimitExceeded
                | Condition::ConnectionForced
                | Condition::FramingError
                | Condition::IllegalState
                | Condition::PartitionNotOwned
                | Condition::Stolen
        )
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_symbol())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of every fallible hubsend operation.
///
/// Ask it questions rather than matching its text: [`kind`](Error::kind),
/// [`condition`](Error::condition), [`is_retriable`](Error::is_retriable). Its `Display`
/// and `Debug` never contain keys, tokens or payloads.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    condition: Option<Condition>,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    /// Creates an error of `kind` with a human-readable message.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                condition: None,
                message: message.into(),
                source: None,
            }),
        }
    }

    /// Creates an error from a condition the hub sent, with its description.
    pub(crate) fn from_condition(
        condition: Condition,
        description: Option<&str>,
        context: &str,
    ) -> Error {
        let message = match description {
            Some(d) if !d.is_empty() => format!("{context}: {condition}: {d}"),
            _ => format!("{context}: {condition}"),
        };
        let kind = condition.kind();
        Error::new(kind, message).with_condition(condition)
    }

    pub(crate) fn with_condition(mut self, condition: Condition) -> Error {
        self.inner.condition = Some(condition);
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        self.inner.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The AMQP condition the hub sent, if this error came from the hub.
    pub fn condition(&self) -> Option<&Condition> {
        self.inner.condition.as_ref()
    }

    /// The human-readable message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_retriable(&self) -> bool {
        if let Some(c) = &self.inner.condition {
            return c.is_retriable();
        }
        matches!(
            self.inner.kind,
            ErrorKind::Timeout
                | ErrorKind::ServerBusy
                | ErrorKind::Connection
                | ErrorKind::Link
                | ErrorKind::NotStored
                | ErrorKind::Busy
        )
    }

    /// Whether this is a time-out.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
    }

    /// Whether the hub refused the credentials.
    pub fn is_auth(&self) -> bool {
        self.inner.kind == ErrorKind::Unauthorized
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("hubsend::Error");
        d.field("kind", &self.inner.kind);
        if let Some(c) = &self.inner.condition {
            d.field("condition", c);
        }
        d.field("message", &self.inner.message);
        if let Some(s) = &self.inner.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inner.message.is_empty() {
            write!(f, "{}", self.inner.kind)
        } else {
            write!(f, "{}: {}", self.inner.kind, self.inner.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_symbols_round_trip() {
        for (symbol, condition) in CONDITIONS {
            assert_eq!(Condition::from_symbol(symbol), *condition);
            assert_eq!(condition.as_symbol(), *symbol);
        }
        let other = Condition::from_symbol("vendor:odd");
        assert_eq!(other, Condition::Other("vendor:odd".into()));
        assert_eq!(other.as_symbol(), "vendor:odd");
    }

    #[test]
    fn classification_matches_the_service() {
        assert!(Condition::ServerBusy.is_retriable());
        assert!(Condition::DetachForced.is_retriable());
        assert!(!Condition::UnauthorizedAccess.is_retriable());
        assert!(!Condition::MessageSizeExceeded.is_retriable());
        assert_eq!(
            Condition::UnauthorizedAccess.kind(),
            ErrorKind::Unauthorized
        );
        let e = Error::from_condition(
            Condition::NotFound,
            Some("The messaging entity 'x' could not be found."),
            "attach",
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retriable());
        assert!(e.to_string().contains("amqp:not-found"));
    }
}
