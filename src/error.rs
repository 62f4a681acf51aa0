//! Typed errors of the engine.
//!
//! Every failure the engine reports is an [`Error`]. Corruption always names the segment and the
//! byte offset where it was found. Once the engine is poisoned (a failed fdatasync or write), every
//! later write returns [`Error::Poisoned`] carrying the original cause.

use std::io;
use std::path::PathBuf;

/// The result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A record or header failed its checks somewhere other than a tolerated tail.
    #[error("corruption in segment {segment} at offset {offset}: {reason}")]
    Corruption {
        /// The segment id.
        segment: u64,
        /// Byte offset in the segment file.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// The tail of the last segment is torn and the recovery mode is strict.
    #[error(
        "torn tail in segment {segment} at offset {offset} (strict recovery refuses to cut it)"
    )]
    TornTail {
        /// The segment id.
        segment: u64,
        /// Byte offset where the torn record starts.
        offset: u64,
    },
    /// The checkpoint file failed its checks.
    #[error("checkpoint {path:?} is corrupt: {reason}")]
    Checkpoint {
        /// Path of the checkpoint file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// A segment that recovery needs is absent.
    #[error("segment {segment} is missing from the data directory")]
    MissingSegment {
        /// The missing segment id.
        segment: u64,
    },
    /// The recovered entries of a group disagree with the checkpoint.
    #[error("group {group} is inconsistent after recovery: {reason}")]
    Inconsistent {
        /// The group id.
        group: u64,
        /// What disagreed.
        reason: String,
    },
    /// An earlier write or fdatasync failed; the engine refuses all writes from then on.
    #[error("engine is poisoned by an earlier failure and refuses writes: {reason}")]
    Poisoned {
        /// The original failure.
        reason: String,
    },
    /// The data directory is locked by another engine, in this process or another.
    #[error("data directory is locked by another engine: {path:?}")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The disk is full (ENOSPC) or the quota is exhausted (EDQUOT). Nothing of the failed
    /// write was acknowledged; writes may resume once space is freed.
    #[error("no space left on device while {context}")]
    NoSpace {
        /// What the engine was doing.
        context: String,
    },
    /// The caller asked for something the engine cannot do (bad index, bad option, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The engine has been shut down.
    #[error("engine is closed")]
    Closed,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if is_no_space(&source) {
            return Error::NoSpace { context };
        }
        Error::Io { context, source }
    }

    pub(crate) fn corruption(segment: u64, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corruption {
            segment,
            offset,
            reason: reason.into(),
        }
    }
}

/// Whether an I/O error means the disk (or the user's quota on it) is full: ENOSPC or EDQUOT.
/// Both leave the file system consistent and go away when space is freed, so neither poisons.
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_no_space() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = Error::io("writing", io::Error::from_raw_os_error(errno));
            assert!(matches!(e, Error::NoSpace { .. }), "errno {errno}: {e:?}");
        }
        let e = Error::io("writing", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, Error::Io { .. }));
    }
}
