//! The one public error type: an opaque [`Error`] with a matchable [`ErrorKind`] and, when
//! the hub said why, the AMQP [`Condition`] it sent. What each condition means for a delivery
//! is decided in one table (the crate-private `condition` module).

mod condition;

#[cfg(test)]
pub(crate) use condition::table as policy_table;
pub(crate) use condition::Action;
pub use condition::Condition;

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
    /// An argument passed to hubsend (or forwarded to the hub) is unusable, and the message
    /// says which (`com.microsoft:argument-error` and `argument-out-of-range` map here too).
    InvalidArgument,
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
            ErrorKind::InvalidArgument => "invalid argument",
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

/// Hub-supplied text made safe to print: control characters (ANSI escapes among them) are
/// shown as `\u{..}` escapes, and the text is cut at 512 characters.
pub(crate) fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(512));
    for (i, c) in text.chars().enumerate() {
        if i == 512 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of every fallible hubsend operation.
///
/// Ask it questions rather than matching its text: [`kind`](Error::kind),
/// [`condition`](Error::condition), [`is_retriable`](Error::is_retriable). Its `Display`
/// and `Debug` never contain keys, tokens or payloads.
///
/// Cheap to clone (the inside is shared), so one failure can be handed to every caller it
/// concerns with its whole [`source`](std::error::Error::source) chain.
#[derive(Clone)]
pub struct Error {
    inner: std::sync::Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    condition: Option<Condition>,
    message: String,
    source: Option<SharedError>,
}

impl Error {
    /// Creates an error of `kind` with a human-readable message.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            inner: std::sync::Arc::new(Inner {
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
            Some(d) if !d.is_empty() => format!("{context}: {condition}: {}", sanitize(d)),
            _ => format!("{context}: {condition}"),
        };
        let kind = condition.kind();
        Error::new(kind, message).with_condition(condition)
    }

    pub(crate) fn with_condition(mut self, condition: Condition) -> Error {
        std::sync::Arc::make_mut(&mut self.inner).condition = Some(condition);
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        std::sync::Arc::make_mut(&mut self.inner).source = Some(std::sync::Arc::new(source));
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
        match &self.inner.condition {
            Some(c) => c.is_retriable(),
            None => self.inner.kind.policy().0,
        }
    }

    /// What a sender link does about a delivery that failed with this error (the policy
    /// table in [`condition`](self::condition)).
    pub(crate) fn action(&self) -> Action {
        match &self.inner.condition {
            Some(c) => c.action(),
            None => self.inner.kind.policy().1,
        }
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

    #[test]
    fn hub_text_is_sanitised() {
        let e = Error::from_condition(
            Condition::Other("x:y".into()),
            Some("evil \u{1b}[2J\u{1b}]0;pwned\u{7}\nnext"),
            "send",
        );
        let shown = e.to_string();
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert!(shown.contains("evil"), "{shown}");
        assert!(sanitize(&"a".repeat(2000)).chars().count() <= 513);
    }
}
