//! [`SpoolError`]: one opaque error for the spool, with a `Copy` kind to match on and the
//! underlying I/O or hub error as its source.

use std::fmt;
use std::path::PathBuf;

/// What went wrong, to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpoolErrorKind {
    /// The spool directory cannot be written (read-only file system, no permission, or a
    /// directory whose mode grants no write access).
    NotWritable,
    /// Another process (or another `Spool` in this one) has the directory open.
    Locked,
    /// The spool is at its size limit and the policy is [`WhenFull::Refuse`](crate::WhenFull::Refuse).
    Full,
    /// One record is larger than the whole spool may be.
    TooLarge,
    /// The event holds something the spool cannot store (an application property type this
    /// version does not know).
    Unsupported,
    /// The spool or producer was closed.
    Closed,
    /// Reading or writing the spool failed.
    Io,
}

impl fmt::Display for SpoolErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpoolErrorKind::NotWritable => "spool directory not writable",
            SpoolErrorKind::Locked => "spool directory in use",
            SpoolErrorKind::Full => "spool full",
            SpoolErrorKind::TooLarge => "record larger than the spool",
            SpoolErrorKind::Unsupported => "event cannot be spooled",
            SpoolErrorKind::Closed => "spool closed",
            SpoolErrorKind::Io => "spool i/o error",
        })
    }
}

/// The spool's error: a [`kind`](Self::kind), a message naming the file involved, and the
/// underlying error as [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct SpoolError {
    kind: SpoolErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// `Result` with [`SpoolError`].
pub type Result<T> = std::result::Result<T, SpoolError>;

impl SpoolError {
    pub(crate) fn new(kind: SpoolErrorKind, message: impl Into<String>) -> SpoolError {
        SpoolError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure on `path`, classified: permission and read-only errors become
    /// [`SpoolErrorKind::NotWritable`].
    pub(crate) fn io(what: &str, path: &std::path::Path, error: std::io::Error) -> SpoolError {
        let kind = match error.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                SpoolErrorKind::NotWritable
            }
            _ => SpoolErrorKind::Io,
        };
        SpoolError {
            kind,
            message: format!("{what} {}", path.display()),
            source: Some(Box::new(error)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> SpoolErrorKind {
        self.kind
    }
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A damaged region found when the spool was opened: from `offset` to the end of `file`
/// (`skipped_bytes` long). Everything before it was kept; the region was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CorruptRegion {
    /// The segment file.
    pub file: PathBuf,
    /// Where the first bad record starts.
    pub offset: u64,
    /// How many bytes were cut off from there.
    pub skipped_bytes: u64,
    /// Why the record at `offset` was refused (bad checksum, impossible length, ...).
    pub reason: &'static str,
}
