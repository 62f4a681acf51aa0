//! Records of sealed segments whose checksum a read has already verified, so that later gets
//! of entries in the same record copy only the entry out of the segment's mapping instead of
//! copying and checking the whole record again.
//!
//! Structure: a fixed, direct-mapped table of [`SLOTS`] atomic words (512 KiB, allocated zeroed
//! at open), each holding the packed position `(segment << 32) | offset` of one verified record
//! or 0. A record's slot is chosen by a multiplicative hash of its position; a later record
//! hashing to the same slot replaces it (the table forgets, it never grows).
//!
//! Invariants:
//! - Only an uncompressed record of a *sealed* segment read with `mmap_reads` on (from its
//!   mapping, or by `pread` where the file could not be mapped) and found intact (header and
//!   CRC) is ever inserted: its stored body is its raw body, so an entry is the bytes at
//!   `offset + RECORD_HEADER_LEN + span.off` of the segment.
//! - A sealed segment's bytes never change while the engine holds it (rotation cut and synced
//!   it; nothing in the engine writes below the active segment) and segment ids are never
//!   reused, so a position that was verified names the same intact bytes for the engine's
//!   lifetime. What this trades away: a page the kernel drops and later reads back corrupted
//!   from the disk after the first verification is not caught on later gets of that record
//!   (`Options::mmap_reads(false)`, which also keeps this table empty, re-verifies every
//!   read).
//! - The table only answers "was this record verified"; which record holds an entry, and
//!   whether the entry is live, is still decided by the index for every read, so it cannot
//!   make a purged, truncated or overwritten entry readable.
//! - Position 0 never names a record (offsets start after the segment header), so 0 means an
//!   empty slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of the table: 64 Ki positions (512 KiB), enough for every record of 128 MiB of 2 KiB
/// records.
pub(crate) const SLOTS: usize = 1 << 16;

/// The table of verified record positions.
#[derive(Debug)]
pub(crate) struct VerifiedRecords {
    slots: Box<[AtomicU64]>,
}

impl Default for VerifiedRecords {
    fn default() -> Self {
        VerifiedRecords {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl VerifiedRecords {
    fn packed(segment: u32, rec_off: u32) -> u64 {
        (u64::from(segment) << 32) | u64::from(rec_off)
    }

    fn slot(&self, key: u64) -> Option<&AtomicU64> {
        // Fibonacci hashing: the top bits of the product spread nearby positions.
        let ix =
            (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros())) as usize;
        self.slots.get(ix)
    }

    /// Whether the record at (`segment`, `rec_off`) was verified (see the module invariants).
    pub(crate) fn contains(&self, segment: u32, rec_off: u32) -> bool {
        let key = Self::packed(segment, rec_off);
        key != 0
            && self
                .slot(key)
                .is_some_and(|s| s.load(Ordering::Relaxed) == key)
    }

    /// Notes that the record at (`segment`, `rec_off`) was verified; the caller keeps the
    /// module invariants (uncompressed, sealed, intact).
    pub(crate) fn insert(&self, segment: u32, rec_off: u32) {
        let key = Self::packed(segment, rec_off);
        if let Some(s) = self.slot(key).filter(|_| key != 0) {
            s.store(key, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_for_inserted_positions_and_forgets_on_collision() {
        let t = VerifiedRecords::default();
        assert!(!t.contains(1, 32));
        t.insert(1, 32);
        assert!(t.contains(1, 32));
        assert!(!t.contains(1, 33) && !t.contains(2, 32) && !t.contains(0, 32));
        // Position 0 is never stored.
        t.insert(0, 0);
        assert!(!t.contains(0, 0));
        // A colliding position replaces the slot: the first is forgotten, never confused.
        let key = VerifiedRecords::packed(1, 32);
        let ix = |k: u64| (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize;
        let other = (33u32..)
            .find(|off| ix(VerifiedRecords::packed(1, *off)) == ix(key))
            .unwrap();
        t.insert(1, other);
        assert!(t.contains(1, other));
        assert!(!t.contains(1, 32));
    }
}
