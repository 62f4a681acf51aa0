//! [`GroupLogStore`]: one Raft group's log, vote and commit pointer, kept in a shared [`Engine`].

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ops::{Range, RangeBounds};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::type_config::TypeConfigExt;
use openraft::{
    ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError,
};

use super::codec::{BincodeCodec, Codec};
use crate::raft_shared::group::{encode_append, error_kind, to_range, GroupCore};
pub use crate::raft_shared::group::{DEFAULT_MAX_READ_BYTES, LAST_PURGED_KEY};
use crate::{Engine, Error};

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
/// | `save_vote` | `set_vote`, `write_durable(..).await` | yes |
/// | `save_committed` | `set_committed`, `write_unsynced` | no (ordered before any later write) |
/// | `truncate_after` | `truncate_from`, `write_unsynced` | no (ordered; see docs/ADAPTER.md) |
/// | `purge` | `purge_to` + put [`LAST_PURGED_KEY`], `write_unsynced` | no (ordered) |
///
/// The engine's log is one ordered stream, so an unsynced write becomes durable no later than
/// the next synced one, and never after a write issued later: a recovered `committed` or purge
/// never refers to entries the crash lost.
///
/// `save_vote` awaits the group commit's fdatasync without holding a thread: the votes of every
/// group voting at once share one fdatasync.
///
/// Two handles of the same group must not be written concurrently: openraft writes through one
/// handle from its core task and reads through clones.
///
/// One engine, one handle per group; each handle goes to that group's `openraft::Raft::new`
/// (see `examples/quickstart.rs` for a whole node and `examples/cluster.rs` for many groups):
///
/// ```
/// use multiraft_wal::raft::kv::KvTypeConfig;
/// use multiraft_wal::raft::GroupLogStore;
/// use multiraft_wal::{Engine, Options};
/// use openraft::storage::RaftLogStorage;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let engine = Engine::open(tmp.path(), Options::default())?;
/// let mut logs: Vec<GroupLogStore<KvTypeConfig>> =
///     (1..=3).map(|group| GroupLogStore::new(engine.clone(), group)).collect();
/// // What openraft asks first: an empty log for a new group.
/// let state = logs[0].get_log_state().await?;
/// assert!(state.last_log_id.is_none());
/// assert_eq!(logs[2].group(), 3);
/// # Ok(()) }
/// ```
pub struct GroupLogStore<C: RaftTypeConfig, K: Codec<C> = BincodeCodec> {
    core: GroupCore,
    codec: K,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig, K: Codec<C>> Clone for GroupLogStore<C, K> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            codec: self.codec.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig, K: Codec<C> + fmt::Debug> fmt::Debug for GroupLogStore<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupLogStore")
            .field("group", &self.core.group)
            .field("codec", &self.codec)
            .field("max_read_bytes", &self.core.max_read_bytes)
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
            core: GroupCore::new(engine, group),
            codec,
            _config: PhantomData,
        }
    }

    /// Sets the soft cap on the encoded bytes one `limited_get_log_entries` call returns
    /// (default [`DEFAULT_MAX_READ_BYTES`]). At least one entry is returned whatever the cap;
    /// 0 is treated as 1.
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

    /// The last purged log id, as stored by [`RaftLogStorage::purge`].
    ///
    /// # Errors
    ///
    /// `InvalidData` if the stored value does not decode.
    pub fn last_purged_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        match self.core.last_purged() {
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
        let (start, raw) = self
            .core
            .raw_entries(range, max_bytes)
            .map_err(|(i, e)| engine_err::<C>(ErrorSubject::LogIndex(i), ErrorVerb::Read, e))?;
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
                            self.core.group,
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
        let Some((last, bytes)) = self
            .core
            .last_raw_entry()
            .map_err(|(i, e)| engine_err::<C>(ErrorSubject::LogIndex(i), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        self.codec
            .decode_entry_log_id(&bytes)
            .map(Some)
            .map_err(|e| codec_err::<C>(ErrorSubject::LogIndex(last), ErrorVerb::Read, e))
    }
}

/// Wraps an engine error into an `io::Error` carrying openraft's [`StorageError`] (what was
/// being read or written, and how), keeping the OS error kind when there is one.
pub(crate) fn engine_err<C: RaftTypeConfig>(
    subject: ErrorSubject<C>,
    verb: ErrorVerb,
    err: Error,
) -> io::Error {
    let kind = error_kind(&err);
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
        match self.core.vote() {
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
        self.read_entries(start..end, self.core.max_read_bytes)
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
        // Written (readable) now; durable once the group commit's fdatasync covering it has
        // returned. Awaiting parks this task, not the thread, so the votes of many groups
        // share one fdatasync.
        let err = |e| engine_err::<C>(ErrorSubject::Vote, ErrorVerb::Write, e);
        self.core.save_vote(&bytes).map_err(err)?.await.map_err(err)
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let bytes = match &committed {
            Some(id) => Some(
                self.codec
                    .encode_log_id(id)
                    .map_err(|e| codec_err::<C>(ErrorSubject::Store, ErrorVerb::Write, e))?,
            ),
            None => None,
        };
        self.core
            .save_committed(bytes.as_deref())
            .map_err(|e| engine_err::<C>(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        match self.core.committed() {
            None => Ok(None),
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
        let codec = &self.codec;
        let (first_index, encoded) = encode_append(
            entries,
            |e: &EntryOf<C>| e.log_id_parts().1,
            |e, buf| codec.encode_entry(e, buf),
            |index, prev| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("append: index {index} follows {prev}; entries must be contiguous"),
                )
            },
        )
        .map_err(|(index, e)| codec_err::<C>(ErrorSubject::LogIndex(index), ErrorVerb::Write, e))?;
        // The engine calls this exactly once, after the fdatasync covering the batch (or with
        // the error that prevented it), possibly on another thread.
        let on_durable = move |result: crate::Result<()>| {
            callback.io_completed(
                result.map_err(|e| engine_err::<C>(ErrorSubject::Logs, ErrorVerb::Write, e)),
            );
        };
        self.core
            .append(first_index, &encoded, on_durable)
            .map_err(|e| engine_err::<C>(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Keep `last_log_id` itself; `None` keeps nothing. Unsynced: see
        // `GroupCore::truncate_from` and docs/ADAPTER.md for why that is safe.
        let from = match &last_log_id {
            Some(id) => id.index().saturating_add(1),
            None => 0,
        };
        self.core
            .truncate_from(from)
            .map_err(|e| engine_err::<C>(ErrorSubject::LogIndex(from), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let bytes = self
            .codec
            .encode_log_id(&log_id)
            .map_err(|e| codec_err::<C>(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete, e))?;
        self.core
            .purge_to(log_id.index(), &bytes)
            .map_err(|e| engine_err::<C>(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}
