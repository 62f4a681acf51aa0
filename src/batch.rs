//! [`WriteBatch`]: an atomic set of operations on any number of groups.
//!
//! The batch encodes its body as operations are added, so a write only has to frame, checksum
//! and copy it once. It also keeps its operations as [`Op`]s, the one operation type of the
//! crate (replay decodes the same type), for validating the batch against the index and
//! applying it with `index::apply_op` after the record is written.

use crate::codec::{tag, BodyBuilder, EntrySpan, Op};

/// A set of operations on any number of groups, written atomically: after any crash the whole
/// batch is visible or none of it is.
///
/// ```
/// # use multiraft_wal::WriteBatch;
/// let mut batch = WriteBatch::new();
/// batch
///     .append(1, 10, [b"entry 10", b"entry 11"])
///     .set_vote(1, b"term 3, node 2")
///     .purge_to(2, 99)
///     .put(2, b"applied", b"99");
/// assert!(!batch.is_empty());
/// ```
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub(crate) body: BodyBuilder,
    pub(crate) ops: Vec<Op<Box<[u8]>>>,
    /// Entry spans with offsets from the start of the payload area (appends index into it);
    /// [`WriteBatch::shift_spans_to_record`] shifts them to offsets in the record's raw body.
    pub(crate) spans: Vec<EntrySpan>,
    /// The first entry too large for a record: (group, index, bytes).
    pub(crate) invalid: Option<(u64, crate::codec::TooLargeEntry)>,
    /// Groups whose index version must be unchanged for the batch to apply (GC rewrites).
    pub(crate) expect_version: Vec<(u64, u64)>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every op only gives space back (purge, truncate, remove group): such a batch may
    /// use the reserve a full disk keeps for it (see `pipeline`).
    pub(crate) fn only_frees(&self) -> bool {
        !self.ops.is_empty()
            && self.ops.iter().all(|op| {
                matches!(
                    op,
                    Op::Purge { .. } | Op::Truncate { .. } | Op::RemoveGroup { .. }
                )
            })
    }

    /// Appends entries `first_index, first_index + 1, ...` to `group`. A group holding entries
    /// accepts `first_index` from its first index up to one past its last (an overlap replaces
    /// the old tail); an empty group accepts any index. An empty iterator adds nothing.
    pub fn append<I, E>(&mut self, group: u64, first_index: u64, entries: I) -> &mut Self
    where
        I: IntoIterator<Item = E>,
        E: AsRef<[u8]>,
    {
        let start = self.spans.len();
        match self
            .body
            .append(group, first_index, entries, &mut self.spans)
        {
            Ok(()) if self.spans.len() > start => {
                self.ops.push(Op::Append {
                    group,
                    first: first_index,
                    spans: start..self.spans.len(),
                });
            }
            Ok(()) => {}
            Err(e) => {
                self.invalid.get_or_insert((group, e));
            }
        }
        self
    }

    /// Removes entry `index` of `group` and every entry after it (`0` clears the log).
    pub fn truncate_from(&mut self, group: u64, index: u64) -> &mut Self {
        self.body.index_op(tag::TRUNCATE, group, index);
        self.ops.push(Op::Truncate { group, index });
        self
    }

    /// Removes entry `index` of `group` and every entry before it.
    pub fn purge_to(&mut self, group: u64, index: u64) -> &mut Self {
        self.body.index_op(tag::PURGE, group, index);
        self.ops.push(Op::Purge { group, index });
        self
    }

    /// Sets `key` of `group` to `value`.
    pub fn put(&mut self, group: u64, key: &[u8], value: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::PUT, group, &[key, value]);
        self.ops.push(Op::Put {
            group,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Deletes `key` of `group`.
    pub fn delete(&mut self, group: u64, key: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::DELETE, group, &[key]);
        self.ops.push(Op::Delete {
            group,
            key: key.into(),
        });
        self
    }

    /// Sets the vote of `group` (opaque bytes; the adapter stores openraft's `Vote`).
    pub fn set_vote(&mut self, group: u64, vote: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::VOTE, group, &[vote]);
        self.ops.push(Op::Vote {
            group,
            value: vote.into(),
        });
        self
    }

    /// Sets the committed marker of `group` (opaque bytes).
    pub fn set_committed(&mut self, group: u64, committed: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::COMMITTED, group, &[committed]);
        self.ops.push(Op::Committed {
            group,
            value: committed.into(),
        });
        self
    }

    /// Removes `group` entirely: entries, keys, vote and committed marker.
    pub fn remove_group(&mut self, group: u64) -> &mut Self {
        self.body.remove_group(group);
        self.ops.push(Op::RemoveGroup { group });
        self
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of entry payload in the batch.
    pub fn payload_bytes(&self) -> usize {
        self.body.payload.len()
    }

    /// Shifts the entry spans from payload-area offsets to offsets in the record's raw body
    /// (what the index stores). The write path calls it once, after encoding the record and
    /// before queueing the batch; the batch is not added to afterwards.
    pub(crate) fn shift_spans_to_record(&mut self) {
        let base = self.body.payload_base() as u32;
        for s in &mut self.spans {
            s.off += base;
        }
    }

    /// The error for an entry too large for a record, if the batch holds one.
    pub(crate) fn too_large(&self) -> Option<crate::Error> {
        self.invalid.map(|(group, e)| crate::Error::EntryTooLarge {
            group,
            index: e.index,
            bytes: e.bytes,
            limit: crate::options::MAX_RECORD_BYTES,
        })
    }
}
