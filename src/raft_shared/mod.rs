//! What the openraft adapters share, whatever the openraft version: the group operations and key
//! layout (`GroupCore`), the bincode helpers, the snapshot store, and the reference
//! key-value store's requests. `multiraft_wal::raft` (openraft 0.10) and
//! `multiraft_wal::raft09` (openraft 0.9) are thin layers over these.

pub(crate) mod codec;
pub(crate) mod group;
pub mod kv;
pub mod snapshot;

pub use group::{DEFAULT_MAX_READ_BYTES, LAST_PURGED_KEY};
