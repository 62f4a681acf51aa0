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
//! - `save_vote` and `truncate_after` are durable when they return;
//! - a purge and the last purged log id are written in one batch, so they are never seen apart,
//!   before or after a crash;
//! - the committed log id and purges are written unsynced: the engine's log is ordered, so they
//!   become durable no later than the next synced write and never ahead of the entries they
//!   refer to;
//! - a group reads and writes only its own group id: groups never see each other's data.
//!
//! [`Engine`]: crate::Engine

pub mod codec;
pub mod kv;
pub mod store;

pub use codec::{BincodeCodec, Codec};
pub use store::{GroupLogStore, DEFAULT_MAX_READ_BYTES, LAST_PURGED_KEY};
