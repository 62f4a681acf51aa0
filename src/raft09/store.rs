//! [`GroupLogStore`] for openraft 0.9: one Raft group's log, vote and commit pointer in a shared
//! [`Engine`], over the version-independent `GroupCore`.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ops::{Range, RangeBounds};

use openraft09::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft09::{
    AnyError, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftTypeConfig,
    StorageError, StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft_shared::codec::{bincode_decode, bincode_encode};
use crate::raft_shared::group::{encode_append, error_kind, to_range, GroupCore};
use crate::{Engine, Error};

/// The openraft 0.9 log storage of one Raft group, backed by a shared [`Engine`].
///
/// A handle is an engine handle, a group id and a read limit: cloning it is cheap, and any
/// number of handles for any number of groups may share one engine (and the engine may serve
/// 0.10 groups at the same time). Appends of different groups issued at the same time are made
/// durable by the same fdatasync. A handle is its own [`RaftLogReader`].
///
/// | call | engine write | durable when it returns |
/// |---|---|---|
/// | `append` | one batch of entries, `write_async` | no: `LogFlushed` reports it |
/// | `save_vote` | `set_vote`, `write_durable(..).await` | yes |
/// | `save_committed` | `set_committed`, `write_unsynced` | no (ordered before any later write) |
/// | `truncate(id)` | `truncate_from(id.index)`, `write_unsynced` | no (ordered) |
/// | `purge(id)` | `purge_to` + put [`LAST_PURGED_KEY`](super::LAST_PURGED_KEY), `write_unsynced` | no (ordered) |
pub struct GroupLogStore<C: RaftTypeConfig> {
    core: GroupCore,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for GroupLogStore<C> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> fmt::Debug for GroupLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupLogStore09")
            .field("group", &self.core.group)
            .field("max_read_bytes", &self.core.max_read_bytes)
            .finish_non_exhaustive()
    }
}

/// Wraps an engine error into openraft 0.9's `StorageError`.
fn engine_err<NID: openraft09::NodeId>(
    subject: ErrorSubject<NID>,
    verb: ErrorVerb,
    err: Error,
) -> StorageError<NID> {
    StorageIOError::new(subject, verb, AnyError::new(&err)).into()
}

fn codec_err<NID: openraft09::NodeId>(
    subject: ErrorSubject<NID>,
    verb: ErrorVerb,
    err: io::Error,
) -> StorageError<NID> {
    StorageIOError::new(subject, verb, AnyError::new(&err)).into()
}

// openraft 0.9's `StorageError` is large, but it is the error type of the traits implemented
// here; the helpers return it as is rather than boxing and unboxing it.
#[allow(clippy::result_large_err)]
impl<C> GroupLogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    /// A handle for `group` in `engine`, with the default read limit. Nothing is written.
    pub fn new(engine: Engine, group: u64) -> Self {
        Self {
            core: GroupCore::new(engine, group),
            _config: PhantomData,
        }
    }

    /// Sets the soft cap on the encoded bytes one `limited_get_log_entries` call returns
    /// (default 1 MiB). At least one entry is returned whatever the cap.
    pub fn max_read_bytes(mut self, bytes: usize) -> Self {
        self.core.max_read_bytes = bytes.max(1);
        self
    }

    /// The group this handle serves.
    pub fn group(&self) -> u64 {
        self.core.group
    }

    /// The engine this handle writes to.
    pub fn engine(&self) -> &Engine {
        &self.core.engine
    }

    /// The last purged log id, as stored by `purge`.
    ///
    /// # Errors
    ///
    /// A storage error if the stored value does not decode.
    pub fn last_purged_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        match self.core.last_purged() {
            None => Ok(None),
            Some(bytes) => bincode_decode(&bytes, "last purged log id")
                .map(Some)
                .map_err(|e| codec_err(ErrorSubject::Logs, ErrorVerb::Read, e)),
        }
    }

    fn read_entries(
        &self,
        range: Range<u64>,
        max_bytes: usize,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let (start, raw) = self
            .core
            .raw_entries(range, max_bytes)
            .map_err(|(i, e)| engine_err(ErrorSubject::LogIndex(i), ErrorVerb::Read, e))?;
        let mut entries = Vec::with_capacity(raw.len());
        for (index, bytes) in (start..).zip(raw.iter()) {
            let entry: C::Entry = bincode_decode(bytes, "log entry")
                .map_err(|e| codec_err(ErrorSubject::LogIndex(index), ErrorVerb::Read, e))?;
            if entry.get_log_id().index != index {
                return Err(codec_err(
                    ErrorSubject::LogIndex(index),
                    ErrorVerb::Read,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "group {}: the entry stored at index {index} says index {}",
                            self.core.group,
                            entry.get_log_id().index
                        ),
                    ),
                ));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let Some((last, bytes)) = self
            .core
            .last_raw_entry()
            .map_err(|(i, e)| engine_err(ErrorSubject::LogIndex(i), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        let entry: C::Entry = bincode_decode(&bytes, "log entry")
            .map_err(|e| codec_err(ErrorSubject::LogIndex(last), ErrorVerb::Read, e))?;
        Ok(Some(entry.get_log_id().clone()))
    }
}

impl<C> RaftLogReader<C> for GroupLogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.read_entries(to_range(&range), usize::MAX)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.read_entries(start..end, self.core.max_read_bytes)
    }
}

impl<C> RaftLogStorage<C> for GroupLogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self.last_purged_log_id()?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let mut bytes = Vec::new();
        bincode_encode(vote, &mut bytes)
            .map_err(|e| codec_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        // Durable once the group commit's fdatasync covering it has returned; awaiting parks
        // the task, not the thread.
        let err = |e| engine_err(ErrorSubject::Vote, ErrorVerb::Write, e);
        self.core.save_vote(&bytes).map_err(err)?.await.map_err(err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        match self.core.vote() {
            None => Ok(None),
            Some(bytes) => bincode_decode(&bytes, "vote")
                .map(Some)
                .map_err(|e| codec_err(ErrorSubject::Vote, ErrorVerb::Read, e)),
        }
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let bytes = match &committed {
            Some(id) => {
                let mut out = Vec::new();
                bincode_encode(id, &mut out)
                    .map_err(|e| codec_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
                Some(out)
            }
            None => None,
        };
        self.core
            .save_committed(bytes.as_deref())
            .map_err(|e| engine_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        match self.core.committed() {
            None => Ok(None),
            Some(bytes) => bincode_decode(&bytes, "committed log id")
                .map(Some)
                .map_err(|e| codec_err(ErrorSubject::Store, ErrorVerb::Read, e)),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (first_index, encoded) = encode_append(
            entries,
            |e: &C::Entry| e.get_log_id().index,
            bincode_encode::<C::Entry>,
            |index, prev| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("append: index {index} follows {prev}; entries must be contiguous"),
                )
            },
        )
        .map_err(|(index, e)| codec_err(ErrorSubject::LogIndex(index), ErrorVerb::Write, e))?;
        // Called exactly once, after the fdatasync covering the batch (or with the error that
        // prevented it), possibly on another thread.
        let on_durable = move |result: crate::Result<()>| {
            callback.log_io_completed(result.map_err(|e| io::Error::new(error_kind(&e), e)));
        };
        self.core
            .append(first_index, &encoded, on_durable)
            .map_err(|e| engine_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        // 0.9's truncate removes `log_id` itself. Unsynced: the log is ordered (see
        // `GroupCore::truncate_from`).
        self.core
            .truncate_from(log_id.index)
            .map_err(|e| engine_err(ErrorSubject::LogIndex(log_id.index), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let mut bytes = Vec::new();
        bincode_encode(&log_id, &mut bytes)
            .map_err(|e| codec_err(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete, e))?;
        self.core
            .purge_to(log_id.index, &bytes)
            .map_err(|e| engine_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}
