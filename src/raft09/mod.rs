//! The openraft 0.9 adapter (feature `openraft09`): every Raft group of a process keeps its log
//! in one shared [`Engine`], for applications on openraft's stable 0.9 line (`=0.9.25`, its
//! `storage-v2` API).
//!
//! [`GroupLogStore`] implements 0.9's `RaftLogStorage` and `RaftLogReader` for one group id of
//! an engine. It is a thin layer over the version-independent [`raft_shared`] code that the
//! 0.10 adapter ([`crate::raft`], feature `openraft`) uses too: the group operations, the key
//! layout, the bincode helpers, the snapshot store and the reference key-value requests. Both
//! features can be enabled in one build (openraft 0.9 is a renamed dependency).
//!
//! What differs from the 0.10 adapter, following openraft 0.9:
//! - `append` reports durability through `LogFlushed::log_io_completed` (0.10: `IOFlushed`),
//!   called from the engine's commit path after the covering fdatasync, never before; 0.9's
//!   RaftCore waits for every such callback;
//! - `truncate(log_id)` removes `log_id` itself and everything after (0.10's `truncate_after`
//!   keeps it); like 0.10's it is written unsynced (see docs/ADAPTER.md);
//! - `read_vote` belongs to the storage, not the reader; errors are `StorageError<NodeId>`;
//! - entries, votes and log ids are encoded with serde + bincode 2 (standard configuration); a
//!   data directory must always be read with the encoding that wrote it.
//!
//! Invariants (the same as the 0.10 adapter's): appended entries are readable when `append`
//! returns; `save_vote` is durable when it returns and awaits the group commit instead of
//! blocking a thread; a purge and the last purged log id are one batch; a group reads and writes
//! only its own group id.
//!
//! [`Engine`]: crate::Engine
//! [`raft_shared`]: crate::raft_shared

pub mod kv;
pub mod store;

pub use crate::raft_shared::snapshot::{SnapshotError, SnapshotStore, StoredSnapshot};
pub use crate::raft_shared::{DEFAULT_MAX_READ_BYTES, LAST_PURGED_KEY};
pub use store::GroupLogStore;
