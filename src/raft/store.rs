//! [`GroupLogStore`]: one Raft group's log, vote and commit pointer, kept in a shared [`Engine`].

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, Range, RangeBounds};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::type_config::TypeConfigExt;
use openraft::{
    ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError,
};

use super::codec::{BincodeCodec, Codec};
use crate::{Engine, Error, WriteBatch};

/// The key, in the group's key space, under which the last purged log id is kept.
///
/// It is written in the same batch as the purge itself, so the two are never seen apart.
pub const LAST_PURGED_KEY: &[u8] = b"raft/last_purged";

/// Default cap on the bytes one [`RaftLogReader::limited_get_log_entries`] call returns: 1 MiB.
pub const DEFAULT_MAX_READ_BYTES: usize = 1 << 20;

/// The openraft log storage of one Raft group, backed by a shared [`Engine`].
///
/// A handle is an engine handle, a group id, a codec and a read limit: cloning it is cheap, and
/// any number of handles for any number of groups may share one engine. Appends of different
/// groups issued at the same time are made durable by the same fdatasync (the engine's group
/// commit). A handle is its own [`RaftLogReader`].
///
/// What each openraft call does in the engine:
///
/// | call | engine write | durable when it returns |
/// |---|---|---|
/// | `append` | one batch of entries, `write_async` | no: the callback reports it |
/// | `save_vote` | `set_vote`, `write` | yes |
/// | `save_committed` | `set_committed`, `write_unsynced` | no (ordered before any later write) |
/// | `truncate_after` | `truncate_from`, `write` | yes |
/// | `purge` | `purge_to` + put [`LAST_PURGED_KEY`], `write_unsynced` | no (ordered) |
///
/// The engine's log is one ordered stream, so an unsynced write becomes durable no later than
/// the next synced one, and never after a write issued later: a recovered `committed` or purge
/// never refers to entries the crash lost.
///
/// Synced writes (`save_vote`, `truncate_after`) block the calling thread for one fdatasync;
/// they are rare in a running cluster (elections and conflicts).
///
/// Two handles of the same group must not be written concurrently: openraft writes through one
/// handle from its core task and reads through clones.
pub struct GroupLogStore<C: RaftTypeConfig, K: Codec<C> = BincodeCodec> {
    engine: Engine,
    group: u64,
    codec: K,
    max_read_bytes: usize,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig, K: Codec<C>> Clone for GroupLogStore<C, K> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            group: self.group,
            codec: self.codec.clone(),
            max_read_bytes: self.max_read_bytes,
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig, K: Codec<C> + fmt::Debug> fmt::Debug for GroupLogStore<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupLogStore")
            .field("group", &self.group)
            .field("codec", &self.codec)
            .field("max_read_bytes", &self.max_read_bytes)
            .finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> GroupLogStore<C, BincodeCodec> {
    /// A handle for `group` in `engine`, with the default codec and read limit.
    ///
    /// Nothing is written: a group exists in the engine once something is written for it.
    pub fn new(engine: Engine, group: u64) -> Self {
        Self::with_codec(engine, group, BincodeCodec)
    }
}

impl<C: RaftTypeConfig, K: Codec<C>> GroupLogStore<C, K> {
    /// A handle for `group` in `engine` that encodes values with `codec`.
    ///
    /// Every handle that ever opens a group must use the same codec.
    pub fn with_codec(engine: Engine, group: u64, codec: K) -> Self {
        Self {
            engine,
            group,
            codec,
            max_read_bytes: DEFAULT_MAX_READ_BYTES,
            _config: PhantomData,
        }
    }

    /// Sets the soft cap on the encoded bytes one `limited_get_log_entries` call returns
    /// (default [`DEFAULT_MAX_READ_BYTES`]). At least one entry is returned whatever the cap;
    /// 0 is treated as 1.
    pub fn max_read_bytes(mut self, bytes: usize) -> Self {
        self.max_read_bytes = bytes.max(1);
        self
    }

    /// The group this handle serves.
    pub fn group(&self) -> u64 {
        self.group
    }

    /// The engine this handle writes to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The last purged log id, as stored by [`RaftLogStorage::purge`].
    pub fn last_purged_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        match self.engine.get(self.group, LAST_PURGED_KEY) {
            None => Ok(None),
            Some(bytes) => self
                .codec
                .decode_log_id(&bytes)
                .map(Some)
                .map_err(|e| codec_err::<C>(ErrorSubject::Logs, ErrorVerb::Read, e)),
        }
    }

    /// Reads the entries of `range` that the log holds, at most `max_bytes` of them (at least one
    /// if the range's first present entry exists). The start is clamped to the first present
    /// entry, so a range reaching into the purged prefix returns what follows it.
    fn read_entries(&self, range: Range<u64>, max_bytes: usize) -> io::Result<Vec<EntryOf<C>>> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let first = match self.engine.first_index(self.group) {
            Some(first) => first,
            None => return Ok(Vec::new()),
        };
        let start = range.start.max(first);
        if start >= range.end {
            return Ok(Vec::new());
        }
        let raw = self
            .engine
            .entries(self.group, start..range.end, max_bytes)
            .map_err(|e| engine_err::<C>(ErrorSubject::LogIndex(start), ErrorVerb::Read, e))?;
        let mut entries = Vec::with_capacity(raw.len());
        for (index, bytes) in (start..).zip(raw.iter()) {
            let entry = self
                .codec
                .decode_entry(bytes)
                .map_err(|e| codec_err::<C>(ErrorSubject::LogIndex(index), ErrorVerb::Read, e))?;
            if entry.log_id_parts().1 != index {
                return Err(codec_err::<C>(
                    ErrorSubject::LogIndex(index),
                    ErrorVerb::Read,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "group {}: the entry stored at index {index} says index {}",
                            self.group,
                            entry.log_id_parts().1
                        ),
                    ),
                ));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        let Some(last) = self.engine.last_index(self.group) else {
            return Ok(None);
        };
        let bytes = self
            .engine
            .entry(self.group, last)
            .map_err(|e| engine_err::<C>(ErrorSubject::LogIndex(last), ErrorVerb::Read, e))?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("group {}: last index {last} has no entry", self.group),
                )
            })?;
        self.codec
            .decode_entry_log_id(&bytes)
            .map(Some)
            .map_err(|e| codec_err::<C>(ErrorSubject::LogIndex(last), ErrorVerb::Read, e))
    }
}

/// Converts a `RangeBounds` into a half-open range, saturating at `u64::MAX`.
fn to_range<RB: RangeBounds<u64>>(range: &RB) -> Range<u64> {
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

/// Wraps an engine error into an `io::Error` carrying openraft's [`StorageError`] (what was
/// being read or written, and how), keeping the OS error kind when there is one.
pub(crate) fn engine_err<C: RaftTypeConfig>(
    subject: ErrorSubject<C>,
    verb: ErrorVerb,
    err: Error,
) -> io::Error {
    let kind = match &err {
        Error::Io { source, .. } => source.kind(),
        Error::NoSpace { .. } => io::ErrorKind::StorageFull,
        Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
        Error::Corruption { .. } | Error::TornTail { .. } | Error::Checkpoint { .. } => {
            io::ErrorKind::InvalidData
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        StorageError::<C>::new(subject, verb, C::err_from_error(&err)),
    )
}

/// Wraps a codec error the same way, keeping its kind.
fn codec_err<C: RaftTypeConfig>(
    subject: ErrorSubject<C>,
    verb: ErrorVerb,
    err: io::Error,
) -> io::Error {
    let kind = err.kind();
    io::Error::new(
        kind,
        StorageError::<C>::new(subject, verb, C::err_from_error(&err)),
    )
}

impl<C: RaftTypeConfig, K: Codec<C>> RaftLogReader<C> for GroupLogStore<C, K> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        self.read_entries(to_range(&range), usize::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        match self.engine.vote(self.group) {
            None => Ok(None),
            Some(bytes) => self
                .codec
                .decode_vote(&bytes)
                .map(Some)
                .map_err(|e| codec_err::<C>(ErrorSubject::Vote, ErrorVerb::Read, e)),
        }
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        self.read_entries(start..end, self.max_read_bytes)
    }
}

impl<C: RaftTypeConfig, K: Codec<C>> RaftLogStorage<C> for GroupLogStore<C, K> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id = self.last_purged_log_id()?;
        let last_log_id = match self.last_entry_log_id()? {
            Some(id) => Some(id),
            None => last_purged_log_id.clone(),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        let bytes = self
            .codec
            .encode_vote(vote)
            .map_err(|e| codec_err::<C>(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        let mut batch = WriteBatch::new();
        batch.set_vote(self.group, &bytes);
        // Written (readable) now; durable once the group commit's fdatasync covering it has
        // returned. Awaiting parks this task, not the thread, so the votes of many groups
        // share one fdatasync.
        let err = |e| engine_err::<C>(ErrorSubject::Vote, ErrorVerb::Write, e);
        self.engine
            .write_durable(batch)
            .map_err(err)?
            .await
            .map_err(err)
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // An empty value stands for `None`; an encoded log id is never empty.
        let bytes = match &committed {
            Some(id) => self
                .codec
                .encode_log_id(id)
                .map_err(|e| codec_err::<C>(ErrorSubject::Store, ErrorVerb::Write, e))?,
            None => Vec::new(),
        };
        let mut batch = WriteBatch::new();
        batch.set_committed(self.group, &bytes);
        self.engine
            .write_unsynced(batch)
            .map_err(|e| engine_err::<C>(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        match self.engine.committed(self.group) {
            None => Ok(None),
            Some(bytes) if bytes.is_empty() => Ok(None),
            Some(bytes) => self
                .codec
                .decode_log_id(&bytes)
                .map(Some)
                .map_err(|e| codec_err::<C>(ErrorSubject::Store, ErrorVerb::Read, e)),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        let mut first_index = None;
        let mut next_index = 0u64;
        for entry in entries {
            let index = entry.log_id_parts().1;
            match first_index {
                None => first_index = Some(index),
                Some(_) if index != next_index => {
                    return Err(codec_err::<C>(
                        ErrorSubject::LogIndex(index),
                        ErrorVerb::Write,
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "append: index {index} follows {}; entries must be contiguous",
                                next_index - 1
                            ),
                        ),
                    ));
                }
                Some(_) => {}
            }
            next_index = index.wrapping_add(1);
            let mut buf = Vec::new();
            self.codec
                .encode_entry(&entry, &mut buf)
                .map_err(|e| codec_err::<C>(ErrorSubject::LogIndex(index), ErrorVerb::Write, e))?;
            encoded.push(buf);
        }

        let mut batch = WriteBatch::new();
        if let Some(first_index) = first_index {
            batch.append(self.group, first_index, &encoded);
        }
        // An empty batch writes nothing, but its callback still waits for an fdatasync covering
        // everything written before it: "durable" may only be said once earlier appends are.
        // The engine calls this exactly once, after the fdatasync covering the batch (or with
        // the error that prevented it), possibly on another thread.
        let on_durable = move |result: crate::Result<()>| {
            callback.io_completed(
                result.map_err(|e| engine_err::<C>(ErrorSubject::Logs, ErrorVerb::Write, e)),
            );
        };
        self.engine
            .write_async(batch, on_durable)
            .map_err(|e| engine_err::<C>(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Keep `last_log_id` itself; `None` keeps nothing.
        let from = match &last_log_id {
            Some(id) => id.index().saturating_add(1),
            None => 0,
        };
        let mut batch = WriteBatch::new();
        batch.truncate_from(self.group, from);
        // Unsynced on purpose: the engine's log is one ordered stream and recovery keeps a
        // prefix of it, so a crash either keeps the truncation or returns the group to the log
        // it had before the call, a state it was really in. Nothing is acknowledged on the
        // strength of the truncation alone: openraft only reports progress after an append
        // whose callback waits for an fdatasync, and that fdatasync covers this record too.
        self.engine
            .write_unsynced(batch)
            .map_err(|e| engine_err::<C>(ErrorSubject::LogIndex(from), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let bytes = self
            .codec
            .encode_log_id(&log_id)
            .map_err(|e| codec_err::<C>(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete, e))?;
        let mut batch = WriteBatch::new();
        batch
            .purge_to(self.group, log_id.index())
            .put(self.group, LAST_PURGED_KEY, &bytes);
        self.engine
            .write_unsynced(batch)
            .map_err(|e| engine_err::<C>(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}
