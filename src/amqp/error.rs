//! Maps what fe2o3 reports (AMQP errors with their conditions, send, attach and detach
//! failures, delivery outcomes) to hubsend's [`Error`], through the policy table.

use fe2o3_amqp::link::{DetachError, SendError, SenderAttachError};
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp_types::primitives::Symbol;

use crate::error::{Condition, Error, ErrorKind, Result};

/// Maps a fe2o3 AMQP error (condition + description) to ours.
pub(crate) fn from_amqp_error(error: &definitions::Error, context: &str) -> Error {
    let symbol = serde_amqp::to_vec(&error.condition)
        .ok()
        .and_then(|bytes| serde_amqp::from_slice::<Symbol>(&bytes).ok())
        .map(|s| s.0)
        .unwrap_or_else(|| "amqp:internal-error".to_owned());
    Error::from_condition(
        Condition::from_symbol(&symbol),
        error.description.as_deref(),
        context,
    )
}

pub(crate) fn stop_reason_error(
    reason: &fe2o3_amqp::link::SessionStopReason,
    context: &str,
) -> Error {
    use fe2o3_amqp::connection::ConnectionStopReason as C;
    use fe2o3_amqp::link::SessionStopReason as S;
    match reason {
        S::EndedWithError(e) | S::RemoteEndedWithError(e) => from_amqp_error(e, context),
        S::ConnectionStopped(C::ClosedWithError(e) | C::RemoteClosedWithError(e)) => {
            from_amqp_error(e, context)
        }
        _ => Error::new(
            ErrorKind::Connection,
            format!("{context}: the connection or session ended"),
        ),
    }
}

pub(crate) fn detach_error(error: &DetachError, context: &str) -> Error {
    match error {
        DetachError::RemoteDetachedWithError(e) | DetachError::RemoteClosedWithError(e) => {
            from_amqp_error(e, context)
        }
        DetachError::SessionStopped(reason) => stop_reason_error(reason, context),
        _ => Error::new(
            ErrorKind::Link,
            format!("{context}: the hub detached the link"),
        ),
    }
}

pub(crate) fn send_error(error: SendError, context: &str) -> Error {
    use fe2o3_amqp::link::LinkStateError as L;
    match error {
        SendError::LinkStateError(L::RemoteDetachedWithError(e) | L::RemoteClosedWithError(e)) => {
            from_amqp_error(&e, context)
        }
        SendError::LinkStateError(L::SessionStopped(reason)) => stop_reason_error(&reason, context),
        SendError::Detached(d) => detach_error(&d, context),
        SendError::MessageSizeExceeded(e) => {
            Error::new(ErrorKind::MessageTooLarge, format!("{context}: {e}")).with_source(e)
        }
        other => Error::new(ErrorKind::Link, format!("{context}: {other}")).with_source(other),
    }
}

pub(crate) fn attach_error(error: SenderAttachError, context: &str) -> Error {
    match error {
        SenderAttachError::RemoteClosedWithError(e) => from_amqp_error(&e, context),
        SenderAttachError::SessionStopped(reason) => stop_reason_error(&reason, context),
        other => Error::new(ErrorKind::Link, format!("{context}: {other}")).with_source(other),
    }
}

pub(crate) fn outcome_result(result: std::result::Result<Outcome, SendError>) -> Result<()> {
    match result {
        Ok(Outcome::Accepted(_)) => Ok(()),
        Ok(Outcome::Rejected(rejected)) => Err(match rejected.error {
            Some(e) => from_amqp_error(&e, "the hub rejected the delivery"),
            None => Error::new(ErrorKind::Rejected, "the hub rejected the delivery"),
        }),
        Ok(Outcome::Released(_)) => Err(Error::new(
            ErrorKind::NotStored,
            "the hub released the delivery without storing it",
        )),
        Ok(Outcome::Modified(_)) => Err(Error::new(
            ErrorKind::NotStored,
            "the hub returned the delivery as modified without storing it",
        )),
        #[allow(unreachable_patterns)]
        Ok(_) => Err(Error::new(
            ErrorKind::Protocol,
            "the hub settled the delivery with an unexpected state",
        )),
        Err(e) => Err(send_error(e, "delivery failed")),
    }
}
