//! The openraft adapter: every Raft group of a process keeps its log in one shared [`Engine`].
//!
//! [`GroupLogStore`] implements openraft's `RaftLogStorage` and `RaftLogReader` for one group id
//! of an engine; a process hosting many groups opens one engine and creates one handle per group.
//! Values are turned into bytes by a [`Codec`] ([`BincodeCodec`] by default). [`kv`] holds the
//! reference state machine used by the tests and examples.
//!
//! This module is the only part of the crate that imports openraft; the engine knows nothing of
//! Raft. Invariants the adapter keeps:
//! - appended entries are readable when `append` returns; its callback is called exactly once,
//!   from the engine's commit path, after the fdatasync covering them (or with the error that
//!   prevented it), never before;
//! - `save_vote` is durable when it returns; it awaits the engine's group commit
//!   ([`Engine::write_durable`]) instead of blocking a thread, so one fdatasync covers the votes
//!   of every group voting at the same time;
//! - `truncate_after` is written unsynced: the log is ordered, so the truncation is durable no
//!   later than the next append's fdatasync, and a crash before it leaves the log the group had
//!   before the call (see docs/ADAPTER.md);
//! - no call blocks an async runtime thread on an fdatasync (writes only copy into the page
//!   cache; see docs/ADAPTER.md for the rare exception of a segment rotation);
//! - a purge and the last purged log id are written in one batch, so they are never seen apart,
//!   before or after a crash;
//! - the committed log id and purges are written unsynced: the engine's log is ordered, so they
//!   become durable no later than the next synced write and never ahead of the entries they
//!   refer to;
//! - a group reads and writes only its own group id: groups never see each other's data.
//!
//! Snapshots live apart from the engine, in a [`SnapshotStore`] (one file per group and
//! snapshot): the engine's checkpoints never carry them.
//!
//! [`Engine`]: crate::Engine
//! [`Engine::write_durable`]: crate::Engine::write_durable

pub mod codec;
pub mod kv;
pub use crate::raft_shared::snapshot;
pub mod store;

pub use codec::{BincodeCodec, Codec};
pub use snapshot::{SnapshotError, SnapshotStore, StoredSnapshot};
pub use store::{GroupLogStore, DEFAULT_MAX_READ_BYTES, LAST_PURGED_KEY};
