//! [`GroupCore`]: what a Raft group's log store does in the engine, whatever the openraft
//! version. Each adapter turns openraft values into bytes with its codec, calls these, and maps
//! the engine's errors to its own `StorageError`.
//!
//! Key layout of a group (the same for every adapter, so a data directory does not depend on
//! the openraft line that wrote it, only on the codec): entries at their log index, the vote
//! and the committed log id in the engine's per-group slots (an empty committed value stands
//! for "none"), the last purged log id under [`LAST_PURGED_KEY`].

use std::ops::{Bound, Range, RangeBounds};

use crate::{DurableWrite, Engine, Error, Result, WriteBatch};

/// The key, in the group's key space, under which the last purged log id is kept.
///
/// It is written in the same batch as the purge itself, so the two are never seen apart.
pub const LAST_PURGED_KEY: &[u8] = b"raft/last_purged";

/// Default cap on the bytes one limited read returns: 1 MiB.
pub const DEFAULT_MAX_READ_BYTES: usize = 1 << 20;

/// A result whose error carries the log index being read or written.
pub(crate) type AtIndex<T, E = Error> = std::result::Result<T, (u64, E)>;

/// The first index of an append (if any) and its encoded entries.
pub(crate) type EncodedAppend = (Option<u64>, Vec<Vec<u8>>);

/// One group of an engine, as a Raft log store sees it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct GroupCore {
    pub(crate) engine: Engine,
    pub(crate) group: u64,
    pub(crate) max_read_bytes: usize,
}

impl GroupCore {
    pub(crate) fn new(engine: Engine, group: u64) -> Self {
        Self {
            engine,
            group,
            max_read_bytes: DEFAULT_MAX_READ_BYTES,
        }
    }

    /// The encoded entries of `range` that the log holds, at most `max_bytes` of them (at least
    /// one if the range's first present entry exists), with the index of the first. The start
    /// is clamped to the first present entry, so a range reaching into the purged prefix
    /// returns what follows it. On error, the index being read is returned with it. The entries
    /// are slices of the engine's cached payloads or of the records read (no per-entry copy);
    /// the adapters decode straight from them.
    pub(crate) fn raw_entries(
        &self,
        range: Range<u64>,
        max_bytes: usize,
    ) -> AtIndex<(u64, Vec<crate::Bytes>)> {
        let Some(first) = self.engine.first_index(self.group) else {
            return Ok((range.start, Vec::new()));
        };
        let start = range.start.max(first);
        if start >= range.end {
            return Ok((start, Vec::new()));
        }
        self.engine
            .entries_bytes(self.group, start..range.end, max_bytes)
            .map(|raw| (start, raw))
            .map_err(|e| (start, e))
    }

    /// The last entry, encoded, with its index.
    pub(crate) fn last_raw_entry(&self) -> AtIndex<Option<(u64, crate::Bytes)>> {
        let Some(last) = self.engine.last_index(self.group) else {
            return Ok(None);
        };
        match self.engine.entry_bytes(self.group, last) {
            Ok(Some(bytes)) => Ok(Some((last, bytes))),
            Ok(None) => Err((
                last,
                Error::Inconsistent {
                    group: self.group,
                    reason: format!("last index {last} has no entry"),
                },
            )),
            Err(e) => Err((last, e)),
        }
    }

    pub(crate) fn vote(&self) -> Option<Vec<u8>> {
        self.engine.vote(self.group)
    }

    /// The committed log id's bytes; `None` if never saved or saved as "none".
    pub(crate) fn committed(&self) -> Option<Vec<u8>> {
        self.engine
            .committed(self.group)
            .filter(|bytes| !bytes.is_empty())
    }

    pub(crate) fn last_purged(&self) -> Option<Vec<u8>> {
        self.engine.get(self.group, LAST_PURGED_KEY)
    }

    /// Writes the vote; durable once the returned future resolves (awaiting it holds no
    /// thread; one fdatasync covers the votes of every group waiting at the same time).
    pub(crate) fn save_vote(&self, vote: &[u8]) -> Result<DurableWrite> {
        let mut batch = WriteBatch::new();
        batch.set_vote(self.group, vote);
        self.engine.write_durable(batch)
    }

    /// Writes the committed log id unsynced (`None`: an empty value). The log is one ordered
    /// stream, so it is durable no later than the next synced write, and never ahead of the
    /// entries it refers to.
    pub(crate) fn save_committed(&self, committed: Option<&[u8]>) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.set_committed(self.group, committed.unwrap_or_default());
        self.engine.write_unsynced(batch)
    }

    /// Appends `entries` (encoded, contiguous from `first_index`); `on_durable` is called once,
    /// after the fdatasync covering them (or with the error that prevented it). With no entries
    /// nothing is written, but `on_durable` still waits for an fdatasync covering everything
    /// written before: "durable" may only be said once earlier appends are.
    pub(crate) fn append(
        &self,
        first_index: Option<u64>,
        entries: &[Vec<u8>],
        on_durable: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        let mut batch = WriteBatch::new();
        if let Some(first) = first_index {
            batch.append(self.group, first, entries);
        }
        self.engine.write_async(batch, on_durable)
    }

    /// Removes every entry from `from` on, unsynced.
    ///
    /// Unsynced on purpose: the engine's log is one ordered stream and recovery keeps a prefix
    /// of it, so a crash either keeps the truncation or returns the group to the log it had
    /// before the call, a state it was really in. Nothing is acknowledged on the strength of
    /// the truncation alone: openraft only reports progress after an append whose callback
    /// waits for an fdatasync, and that fdatasync covers this record too.
    pub(crate) fn truncate_from(&self, from: u64) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.truncate_from(self.group, from);
        self.engine.write_unsynced(batch)
    }

    /// Purges entries up to `index` (inclusive) and records `last_purged` (the encoded log id)
    /// in the same batch, unsynced (ordered, visible at once).
    pub(crate) fn purge_to(&self, index: u64, last_purged: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch
            .purge_to(self.group, index)
            .put(self.group, LAST_PURGED_KEY, last_purged);
        self.engine.write_unsynced(batch)
    }
}

/// Converts a `RangeBounds` into a half-open range, saturating at `u64::MAX`.
pub(crate) fn to_range<RB: RangeBounds<u64>>(range: &RB) -> Range<u64> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    start..end
}

/// Encodes the entries of one append, checking that their indexes are contiguous. `index_of`
/// gives an entry's log index, `encode` appends its encoding to a buffer. Returns the first
/// index (if any) and the encodings; on error, the index of the offending entry.
pub(crate) fn encode_append<E, Err>(
    entries: impl IntoIterator<Item = E>,
    index_of: impl Fn(&E) -> u64,
    mut encode: impl FnMut(&E, &mut Vec<u8>) -> std::result::Result<(), Err>,
    not_contiguous: impl Fn(u64, u64) -> Err,
) -> AtIndex<EncodedAppend, Err> {
    let mut encoded = Vec::new();
    let mut first_index = None;
    let mut next_index = 0u64;
    for entry in entries {
        let index = index_of(&entry);
        match first_index {
            None => first_index = Some(index),
            Some(_) if index != next_index => {
                return Err((index, not_contiguous(index, next_index.wrapping_sub(1))));
            }
            Some(_) => {}
        }
        next_index = index.wrapping_add(1);
        let mut buf = Vec::new();
        encode(&entry, &mut buf).map_err(|e| (index, e))?;
        encoded.push(buf);
    }
    Ok((first_index, encoded))
}

/// The `io::ErrorKind` an engine error is reported with by the adapters: the OS error's kind
/// for I/O errors, `StorageFull` for ENOSPC, `InvalidData` for corruption.
pub(crate) fn error_kind(err: &Error) -> std::io::ErrorKind {
    use std::io::ErrorKind;
    match err {
        Error::Io { source, .. } => source.kind(),
        Error::NoSpace { .. } => ErrorKind::StorageFull,
        Error::NonContiguousAppend { .. }
        | Error::IndexOverflow { .. }
        | Error::EntryTooLarge { .. }
        | Error::BatchTooLarge { .. }
        | Error::InvalidOption { .. } => ErrorKind::InvalidInput,
        Error::Corruption { .. } | Error::TornTail { .. } | Error::Checkpoint { .. } => {
            ErrorKind::InvalidData
        }
        _ => ErrorKind::Other,
    }
}
