//! THE policy table: for every AMQP condition the hub can send, the [`ErrorKind`] callers see,
//! whether trying again can help, and what a sender link does about a delivery that failed
//! with it. [`Error::is_retriable`](super::Error::is_retriable), the retry classifier
//! ([`crate::retry`]) and the link task all read this one table, so they cannot disagree.
//!
//! Sources for the choices: the service's documented conditions and what Microsoft's SDKs do
//! with them (`../shared/PROTOCOL.md` F.2): throttling is retried where it happened; a lost
//! link or connection is recovered; authorisation, missing entities and bad input fail.

use super::ErrorKind;

/// What a sender link does about a delivery that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send the same delivery again after a back-off: the hub is healthy but could not take
    /// it now.
    Retry,
    /// The link (and maybe the connection) is gone: re-attach, reconnecting when needed, and
    /// resend every unsettled delivery in order.
    Reattach,
    /// The link was dropped for its token: put a fresh token first, then re-attach. A token
    /// the hub refuses fails the delivery.
    RefreshAndReattach,
    /// Give up on the delivery: trying again cannot succeed.
    Fail,
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

/// One row of the policy table.
struct Policy {
    symbol: &'static str,
    condition: Condition,
    kind: ErrorKind,
    /// Whether the same operation may succeed when tried again (what callers are told).
    retriable: bool,
    /// What a sender link does with a delivery that failed with it.
    action: Action,
}

macro_rules! policies {
    ($($symbol:literal => $condition:ident, $kind:ident, $retriable:literal, $action:ident;)*) => {
        &[$(Policy {
            symbol: $symbol,
            condition: Condition::$condition,
            kind: ErrorKind::$kind,
            retriable: $retriable,
            action: Action::$action,
        }),*]
    };
}

/// symbol => condition, kind, retriable, action.
const POLICIES: &[Policy] = policies! {
    "com.microsoft:server-busy" => ServerBusy, ServerBusy, true, Retry;
    "com.microsoft:timeout" => Timeout, Timeout, true, Retry;
    "amqp:internal-error" => InternalError, Rejected, true, Retry;
    "com.microsoft:operation-cancelled" => OperationCancelled, Rejected, true, Retry;
    "amqp:link:detach-forced" => DetachForced, Link, true, Reattach;
    "amqp:link:stolen" => Stolen, Link, true, Reattach;
    "amqp:link:transfer-limit-exceeded" => TransferLimitExceeded, Link, true, Reattach;
    "amqp:connection:forced" => ConnectionForced, Connection, true, Reattach;
    "amqp:connection:framing-error" => FramingError, Connection, true, Reattach;
    "amqp:illegal-state" => IllegalState, Rejected, true, Reattach;
    "com.microsoft:partition-not-owned" => PartitionNotOwned, Rejected, true, Reattach;
    "amqp:unauthorized-access" => UnauthorizedAccess, Unauthorized, false, RefreshAndReattach;
    "amqp:not-found" => NotFound, NotFound, false, Fail;
    "com.microsoft:entity-disabled" => EntityDisabled, NotFound, false, Fail;
    "amqp:link:message-size-exceeded" => MessageSizeExceeded, MessageTooLarge, false, Fail;
    "amqp:connection:redirect" => ConnectionRedirect, Connection, false, Fail;
    "amqp:decode-error" => DecodeError, Rejected, false, Fail;
    "amqp:resource-limit-exceeded" => ResourceLimitExceeded, Rejected, false, Fail;
    "amqp:not-allowed" => NotAllowed, Rejected, false, Fail;
    "amqp:invalid-field" => InvalidField, Rejected, false, Fail;
    "amqp:not-implemented" => NotImplemented, Rejected, false, Fail;
    "amqp:resource-locked" => ResourceLocked, Rejected, false, Fail;
    "amqp:precondition-failed" => PreconditionFailed, Rejected, false, Fail;
    "amqp:resource-deleted" => ResourceDeleted, Rejected, false, Fail;
    "amqp:frame-size-too-small" => FrameSizeTooSmall, Rejected, false, Fail;
    "amqp:session:window-violation" => WindowViolation, Rejected, false, Fail;
    "amqp:session:errant-link" => ErrantLink, Rejected, false, Fail;
    "amqp:session:handle-in-use" => HandleInUse, Rejected, false, Fail;
    "amqp:session:unattached-handle" => UnattachedHandle, Rejected, false, Fail;
    "amqp:link:redirect" => LinkRedirect, Rejected, false, Fail;
    "com.microsoft:argument-error" => ArgumentError, InvalidArgument, false, Fail;
    "com.microsoft:argument-out-of-range" => ArgumentOutOfRange, InvalidArgument, false, Fail;
    "com.microsoft:publisher-revoked" => PublisherRevoked, Unauthorized, false, Fail;
    "com.microsoft:producer-epoch-stolen" => ProducerEpochStolen, Rejected, false, Fail;
    "com.microsoft:out-of-order-sequence" => OutOfOrderSequence, Rejected, false, Fail;
};

/// A condition the table does not name (`Condition::Other`): the hub refused the delivery
/// for a reason hubsend does not know, so it is not tried again.
const UNKNOWN: (ErrorKind, bool, Action) = (ErrorKind::Rejected, false, Action::Fail);

/// For failures without a condition (raised locally: I/O, time-outs, released outcomes):
/// kind => retriable, action.
const BY_KIND: &[(ErrorKind, bool, Action)] = &[
    (ErrorKind::NotStored, true, Action::Retry),
    (ErrorKind::ServerBusy, true, Action::Retry),
    (ErrorKind::Link, true, Action::Reattach),
    (ErrorKind::Connection, true, Action::Reattach),
    (ErrorKind::Timeout, true, Action::Reattach),
    // The in-flight bound: the caller may try again once deliveries settle.
    (ErrorKind::Busy, true, Action::Fail),
];

/// Tests only: every row of the table as (symbol, kind, action).
#[cfg(test)]
pub(crate) fn table() -> impl Iterator<Item = (&'static str, ErrorKind, Action)> {
    POLICIES.iter().map(|p| (p.symbol, p.kind, p.action))
}

impl Condition {
    fn policy(&self) -> Option<&'static Policy> {
        POLICIES.iter().find(|p| p.condition == *self)
    }

    /// Maps a condition symbol as it appears on the wire.
    pub fn from_symbol(symbol: &str) -> Condition {
        POLICIES
            .iter()
            .find(|p| p.symbol == symbol)
            .map(|p| p.condition.clone())
            .unwrap_or_else(|| Condition::Other(symbol.to_owned()))
    }

    /// The condition symbol as it appears on the wire.
    pub fn as_symbol(&self) -> &str {
        match self {
            Condition::Other(s) => s,
            known => known
                .policy()
                .map(|p| p.symbol)
                .unwrap_or("amqp:internal-error"),
        }
    }

    /// The [`ErrorKind`] a hub error with this condition maps to.
    pub fn kind(&self) -> ErrorKind {
        self.policy().map(|p| p.kind).unwrap_or(UNKNOWN.0)
    }

    /// Whether an operation that failed with this condition may succeed when tried again.
    ///
    /// Throttling, time-outs, internal errors and lost links or connections are retriable;
    /// authorisation, missing entities, oversize messages and bad arguments are not.
    pub fn is_retriable(&self) -> bool {
        self.policy().map(|p| p.retriable).unwrap_or(UNKNOWN.1)
    }

    /// What a sender link does about a delivery that failed with this condition.
    pub(crate) fn action(&self) -> Action {
        self.policy().map(|p| p.action).unwrap_or(UNKNOWN.2)
    }
}

impl ErrorKind {
    /// Retriable and action for a failure of this kind that carries no condition.
    pub(crate) fn policy(self) -> (bool, Action) {
        BY_KIND
            .iter()
            .find(|(kind, _, _)| *kind == self)
            .map(|(_, retriable, action)| (*retriable, *action))
            .unwrap_or((false, Action::Fail))
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_symbol())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_has_one_row_and_round_trips() {
        for p in POLICIES {
            assert_eq!(Condition::from_symbol(p.symbol), p.condition);
            assert_eq!(p.condition.as_symbol(), p.symbol);
            assert_eq!(
                POLICIES
                    .iter()
                    .filter(|q| q.condition == p.condition)
                    .count(),
                1,
                "{}",
                p.symbol
            );
            // A retriable condition is one the link does something about, and back.
            let acts = p.action != Action::Fail;
            assert!(
                p.retriable == acts || p.action == Action::RefreshAndReattach,
                "{}",
                p.symbol
            );
        }
        let other = Condition::from_symbol("vendor:odd");
        assert_eq!(other, Condition::Other("vendor:odd".into()));
        assert_eq!(other.as_symbol(), "vendor:odd");
        assert_eq!(other.action(), Action::Fail);
        assert!(!other.is_retriable());
    }
}
