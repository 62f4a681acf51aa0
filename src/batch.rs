//! [`WriteBatch`]: an atomic set of operations on any number of groups.
//!
//! The batch encodes its body as operations are added, so a write only has to frame, checksum
//! and copy it once. It also keeps a compact list of its operations for validating the batch
//! against the index and applying it after the record is written.

use crate::codec::{tag, BodyBuilder, EntrySpan};

/// One operation, kept for validation and for applying the batch to the index.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Append {
        group: u64,
        first: u64,
        lens_at: usize,
        count: usize,
        payload_at: usize,
    },
    Truncate {
        group: u64,
        index: u64,
    },
    Purge {
        group: u64,
        index: u64,
    },
    Put {
        group: u64,
        key: Box<[u8]>,
        value: Box<[u8]>,
    },
    Delete {
        group: u64,
        key: Box<[u8]>,
    },
    Vote {
        group: u64,
        value: Box<[u8]>,
    },
    Committed {
        group: u64,
        value: Box<[u8]>,
    },
    RemoveGroup {
        group: u64,
    },
}

impl Item {
    pub(crate) fn group(&self) -> u64 {
        match *self {
            Item::Append { group, .. }
            | Item::Truncate { group, .. }
            | Item::Purge { group, .. }
            | Item::Put { group, .. }
            | Item::Delete { group, .. }
            | Item::Vote { group, .. }
            | Item::Committed { group, .. }
            | Item::RemoveGroup { group } => group,
        }
    }
}

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
    pub(crate) items: Vec<Item>,
    pub(crate) lens: Vec<u32>,
    pub(crate) invalid: Option<String>,
    /// Groups whose index version must be unchanged for the batch to apply (GC rewrites).
    pub(crate) expect_version: Vec<(u64, u64)>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends entries `first_index, first_index + 1, ...` to `group`. A group holding entries
    /// accepts `first_index` from its first index up to one past its last (an overlap replaces
    /// the old tail); an empty group accepts any index. An empty iterator adds nothing.
    pub fn append<I, E>(&mut self, group: u64, first_index: u64, entries: I) -> &mut Self
    where
        I: IntoIterator<Item = E>,
        E: AsRef<[u8]>,
    {
        let lens_at = self.lens.len();
        let payload_at = self.body.payload.len();
        match self
            .body
            .append(group, first_index, entries, &mut self.lens)
        {
            Ok(()) => {
                let count = self.lens.len() - lens_at;
                if count > 0 {
                    self.items.push(Item::Append {
                        group,
                        first: first_index,
                        lens_at,
                        count,
                        payload_at,
                    });
                }
            }
            Err(e) => {
                self.invalid.get_or_insert_with(|| e.to_owned());
            }
        }
        self
    }

    /// Removes entry `index` of `group` and every entry after it (`0` clears the log).
    pub fn truncate_from(&mut self, group: u64, index: u64) -> &mut Self {
        self.body.index_op(tag::TRUNCATE, group, index);
        self.items.push(Item::Truncate { group, index });
        self
    }

    /// Removes entry `index` of `group` and every entry before it.
    pub fn purge_to(&mut self, group: u64, index: u64) -> &mut Self {
        self.body.index_op(tag::PURGE, group, index);
        self.items.push(Item::Purge { group, index });
        self
    }

    /// Sets `key` of `group` to `value`.
    pub fn put(&mut self, group: u64, key: &[u8], value: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::PUT, group, &[key, value]);
        self.items.push(Item::Put {
            group,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Deletes `key` of `group`.
    pub fn delete(&mut self, group: u64, key: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::DELETE, group, &[key]);
        self.items.push(Item::Delete {
            group,
            key: key.into(),
        });
        self
    }

    /// Sets the vote of `group` (opaque bytes; the adapter stores openraft's `Vote`).
    pub fn set_vote(&mut self, group: u64, vote: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::VOTE, group, &[vote]);
        self.items.push(Item::Vote {
            group,
            value: vote.into(),
        });
        self
    }

    /// Sets the committed marker of `group` (opaque bytes).
    pub fn set_committed(&mut self, group: u64, committed: &[u8]) -> &mut Self {
        self.body.bytes_op(tag::COMMITTED, group, &[committed]);
        self.items.push(Item::Committed {
            group,
            value: committed.into(),
        });
        self
    }

    /// Removes `group` entirely: entries, keys, vote and committed marker.
    pub fn remove_group(&mut self, group: u64) -> &mut Self {
        self.body.remove_group(group);
        self.items.push(Item::RemoveGroup { group });
        self
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Bytes of entry payload in the batch.
    pub fn payload_bytes(&self) -> usize {
        self.body.payload.len()
    }

    /// The spans (in the record's raw body) of an append item's entries.
    pub(crate) fn spans(&self, lens_at: usize, count: usize, payload_at: usize) -> Vec<EntrySpan> {
        let mut off = (self.body.payload_base() + payload_at) as u32;
        self.lens[lens_at..lens_at + count]
            .iter()
            .map(|&len| {
                let s = EntrySpan { off, len };
                off += len;
                s
            })
            .collect()
    }
}
