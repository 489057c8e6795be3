//! The exit statuses of `hubsend` (listed in `hubsend send --help` and the README; scripts
//! depend on them) and which failures map to which.

use hubsend::ErrorKind;

/// Every valid record was stored by the hub (or the command did what it was asked).
pub(crate) const OK: u8 = 0;
/// The hub refused a valid record or it could not be stored (refused deliveries, an event
/// hub that does not exist, an event larger than the hub's limit), or another failure (the
/// input could not be read, the rejects file could not be written).
pub(crate) const FAILED: u8 = 1;
/// Usage error: a bad argument, no or a malformed connection string, an unusable option.
pub(crate) const USAGE: u8 = 2;
/// `--strict` and some lines were invalid.
pub(crate) const REJECTED: u8 = 3;
/// A second stop signal abandoned the wait for the hub's outcomes.
pub(crate) const ABANDONED: u8 = 4;
/// The hub refused the credentials (wrong key, expired token, a policy without Send).
pub(crate) const UNAUTHORIZED: u8 = 5;
/// The hub could not be reached: unknown host, connection refused, TLS failure, timeout,
/// connection lost for good.
pub(crate) const UNREACHABLE: u8 = 6;
/// Stopped by Ctrl-C or SIGTERM; everything read was stored.
pub(crate) const INTERRUPTED: u8 = 130;

/// The `error_kind` of a failure that is not the library's: bad usage.
pub(crate) const KIND_USAGE: &str = "usage";
/// The `error_kind` of a failure to read the input (or write the rejects file).
pub(crate) const KIND_INPUT: &str = "input";

/// The exit status for a failure of this kind.
pub(crate) fn for_kind(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::InvalidConnectionString | ErrorKind::InvalidConfig => USAGE,
        ErrorKind::Unauthorized => UNAUTHORIZED,
        ErrorKind::Connection | ErrorKind::Timeout => UNREACHABLE,
        _ => FAILED,
    }
}

/// The exit status for a report's `error_kind` (the library kind's text, or one of this
/// module's `KIND_*`).
pub(crate) fn for_kind_name(name: Option<&str>) -> u8 {
    const KINDS: [ErrorKind; 5] = [
        ErrorKind::InvalidConnectionString,
        ErrorKind::InvalidConfig,
        ErrorKind::Unauthorized,
        ErrorKind::Connection,
        ErrorKind::Timeout,
    ];
    match name {
        Some(KIND_USAGE) => USAGE,
        Some(name) => KINDS
            .into_iter()
            .find(|k| k.to_string() == name)
            .map_or(FAILED, for_kind),
        None => FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_statuses() {
        assert_eq!(for_kind(ErrorKind::Unauthorized), UNAUTHORIZED);
        assert_eq!(for_kind(ErrorKind::Connection), UNREACHABLE);
        assert_eq!(for_kind(ErrorKind::Rejected), FAILED);
        assert_eq!(for_kind_name(Some("unauthorized")), UNAUTHORIZED);
        assert_eq!(for_kind_name(Some("connection error")), UNREACHABLE);
        assert_eq!(for_kind_name(Some("rejected by the hub")), FAILED);
        assert_eq!(for_kind_name(Some(KIND_USAGE)), USAGE);
        assert_eq!(for_kind_name(None), FAILED);
    }
}
