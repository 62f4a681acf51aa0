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
///
/// ```
/// use multiraft_wal::{Engine, Error, Options, WriteBatch};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let engine = Engine::open(dir.path(), Options::default())?;
/// engine.write(WriteBatch::new().append(7, 1, [b"a", b"b"]).clone())?;
/// // Index 5 would leave a gap after entry 2.
/// match engine.write(WriteBatch::new().append(7, 5, [b"e"]).clone()) {
///     Err(Error::NonContiguousAppend { group, index, next, .. }) => {
///         assert_eq!((group, index, next), (7, 5, 3));
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// An append would leave a gap after the group's last entry or start before its first: a
    /// group holding `first..next` accepts appends starting within `first..=next` (an overlap
    /// replaces the tail); an empty group accepts any index. Nothing of the batch was written.
    #[error(
        "append to group {group} at index {index} refused: the group holds {first}..{next}, so an append must start within {first}..={next}"
    )]
    NonContiguousAppend {
        /// The group.
        group: u64,
        /// The first index of the refused append.
        index: u64,
        /// The group's first entry.
        first: u64,
        /// One past the group's last entry.
        next: u64,
    },
    /// An append's indexes would pass `u64::MAX`. Nothing of the batch was written.
    #[error(
        "append of {count} entries to group {group} at index {index} overflows the index space"
    )]
    IndexOverflow {
        /// The group.
        group: u64,
        /// The first index of the refused append.
        index: u64,
        /// Its number of entries.
        count: u64,
    },
    /// One entry is larger than the largest record ([`crate::MAX_RECORD_BYTES`]).
    #[error("entry {index} of group {group} is {bytes} bytes, more than the largest record ({limit} bytes)")]
    EntryTooLarge {
        /// The group.
        group: u64,
        /// The entry's index.
        index: u64,
        /// Its length.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A batch encodes to more than the largest record ([`crate::MAX_RECORD_BYTES`]): split it.
    #[error("batch of {bytes} bytes exceeds the largest record ({limit} bytes)")]
    BatchTooLarge {
        /// The batch's encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// An option is out of its range (see [`crate::Options`]).
    #[error("option {option}: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The data directory's path names something that is not a directory.
    #[error("{path:?} is not a directory")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A conditional write (a GC rewrite) found its group changed since it was read; nothing
    /// was written. Only the engine's own GC makes such writes.
    #[error("group {group} changed while being rewritten")]
    GroupChanged {
        /// The group.
        group: u64,
    },
    /// A data directory cannot be recovered in the mode asked for (read-only inspection).
    #[error("the directory cannot be recovered {reason}")]
    Unrecoverable {
        /// The mode and why.
        reason: String,
    },
    /// The data directory changed between a repair's plan and its execution; nothing was
    /// repaired.
    #[error("the directory changed since the repair plan was made; run repair again")]
    StaleRepairPlan,
    /// A repair cannot proceed (the reason says what to do); the original directory is unchanged.
    #[error("repair refused: {reason}")]
    Repair {
        /// Why.
        reason: String,
    },
    /// Segment ids are 32-bit on disk and all of them were used.
    #[error("segment ids exhausted")]
    SegmentIdsExhausted,
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

    /// A copy of this error for each member of a failed write group (an I/O error's source is
    /// copied by kind and message).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Corruption {
                segment,
                offset,
                reason,
            } => Error::Corruption {
                segment: *segment,
                offset: *offset,
                reason: reason.clone(),
            },
            Error::TornTail { segment, offset } => Error::TornTail {
                segment: *segment,
                offset: *offset,
            },
            Error::Checkpoint { path, reason } => Error::Checkpoint {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::MissingSegment { segment } => Error::MissingSegment { segment: *segment },
            Error::Inconsistent { group, reason } => Error::Inconsistent {
                group: *group,
                reason: reason.clone(),
            },
            Error::Poisoned { reason } => Error::Poisoned {
                reason: reason.clone(),
            },
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::NoSpace { context } => Error::NoSpace {
                context: context.clone(),
            },
            Error::NonContiguousAppend {
                group,
                index,
                first,
                next,
            } => Error::NonContiguousAppend {
                group: *group,
                index: *index,
                first: *first,
                next: *next,
            },
            Error::IndexOverflow {
                group,
                index,
                count,
            } => Error::IndexOverflow {
                group: *group,
                index: *index,
                count: *count,
            },
            Error::EntryTooLarge {
                group,
                index,
                bytes,
                limit,
            } => Error::EntryTooLarge {
                group: *group,
                index: *index,
                bytes: *bytes,
                limit: *limit,
            },
            Error::BatchTooLarge { bytes, limit } => Error::BatchTooLarge {
                bytes: *bytes,
                limit: *limit,
            },
            Error::InvalidOption { option, reason } => Error::InvalidOption {
                option,
                reason: reason.clone(),
            },
            Error::NotADirectory { path } => Error::NotADirectory { path: path.clone() },
            Error::GroupChanged { group } => Error::GroupChanged { group: *group },
            Error::Unrecoverable { reason } => Error::Unrecoverable {
                reason: reason.clone(),
            },
            Error::StaleRepairPlan => Error::StaleRepairPlan,
            Error::Repair { reason } => Error::Repair {
                reason: reason.clone(),
            },
            Error::SegmentIdsExhausted => Error::SegmentIdsExhausted,
            Error::Closed => Error::Closed,
        }
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
