//! How openraft values become the bytes the engine stores, and back.
//!
//! The engine stores opaque byte strings; a [`Codec`] decides their layout. [`BincodeCodec`], the
//! default, uses serde with bincode 2's standard configuration (varint integers), which works for
//! every type config because openraft's `serde` feature makes entries, votes and log ids
//! serializable.
//!
//! A codec must be deterministic only in one direction: `decode(encode(x)) == x`. Changing the
//! codec of an existing data directory makes it unreadable; the adapter stores no codec tag.

use std::fmt;
use std::io;

use openraft::entry::RaftEntry;
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{LogId, RaftTypeConfig};

/// Encodes and decodes the values a [`GroupLogStore`](super::GroupLogStore) keeps in the engine:
/// log entries, the vote, and log ids (the committed and the last purged log id).
///
/// Implementations are shared by every handle of a store, so they must be cheap to clone and
/// usable from many threads. Errors are returned as `io::Error` of kind `InvalidData` (decode)
/// or `InvalidInput` (encode); the store adds which value failed.
pub trait Codec<C: RaftTypeConfig>: Clone + Send + Sync + 'static {
    /// Appends the encoding of `entry` to `out`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the entry cannot be encoded.
    fn encode_entry(&self, entry: &EntryOf<C>, out: &mut Vec<u8>) -> io::Result<()>;

    /// Decodes an entry previously encoded by [`Codec::encode_entry`]; all of `bytes` is one
    /// entry.
    ///
    /// # Errors
    ///
    /// `InvalidData` if `bytes` is not one encoded entry.
    fn decode_entry(&self, bytes: &[u8]) -> io::Result<EntryOf<C>>;

    /// Decodes only the log id of an encoded entry. The default decodes the whole entry; a codec
    /// whose layout puts the log id first may do less work.
    ///
    /// # Errors
    ///
    /// `InvalidData` if `bytes` is not one encoded entry.
    fn decode_entry_log_id(&self, bytes: &[u8]) -> io::Result<LogIdOf<C>> {
        let entry = self.decode_entry(bytes)?;
        let (leader, index) = entry.log_id_parts();
        Ok(LogId::new(leader.clone(), index))
    }

    /// Encodes a vote.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the vote cannot be encoded.
    fn encode_vote(&self, vote: &VoteOf<C>) -> io::Result<Vec<u8>>;

    /// Decodes a vote previously encoded by [`Codec::encode_vote`].
    ///
    /// # Errors
    ///
    /// `InvalidData` if `bytes` is not an encoded vote.
    fn decode_vote(&self, bytes: &[u8]) -> io::Result<VoteOf<C>>;

    /// Encodes a log id (used for the committed and the last purged log id).
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the log id cannot be encoded.
    fn encode_log_id(&self, log_id: &LogIdOf<C>) -> io::Result<Vec<u8>>;

    /// Decodes a log id previously encoded by [`Codec::encode_log_id`].
    ///
    /// # Errors
    ///
    /// `InvalidData` if `bytes` is not an encoded log id.
    fn decode_log_id(&self, bytes: &[u8]) -> io::Result<LogIdOf<C>>;
}

/// The default codec: serde + bincode 2, standard configuration.
///
/// Decoding rejects trailing bytes, so a value cut or padded by a bug elsewhere is reported
/// rather than silently accepted.
#[derive(Clone, Copy, Default)]
pub struct BincodeCodec;

impl fmt::Debug for BincodeCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BincodeCodec")
    }
}

use crate::raft_shared::codec::{bincode_decode, bincode_encode};

impl<C: RaftTypeConfig> Codec<C> for BincodeCodec {
    fn encode_entry(&self, entry: &EntryOf<C>, out: &mut Vec<u8>) -> io::Result<()> {
        bincode_encode(entry, out)
    }

    fn decode_entry(&self, bytes: &[u8]) -> io::Result<EntryOf<C>> {
        bincode_decode(bytes, "log entry")
    }

    fn encode_vote(&self, vote: &VoteOf<C>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        bincode_encode(vote, &mut out)?;
        Ok(out)
    }

    fn decode_vote(&self, bytes: &[u8]) -> io::Result<VoteOf<C>> {
        bincode_decode(bytes, "vote")
    }

    fn encode_log_id(&self, log_id: &LogIdOf<C>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        bincode_encode(log_id, &mut out)?;
        Ok(out)
    }

    fn decode_log_id(&self, bytes: &[u8]) -> io::Result<LogIdOf<C>> {
        bincode_decode(bytes, "log id")
    }
}
