//! The entry cache: the entries written most recently, served from memory without a system
//! call, within a per-engine byte budget ([`Options::cache_bytes`](crate::Options)).
//!
//! Structure:
//! - Each group keeps, next to its index and under the same shard lock, a [`GroupCache`]: the
//!   payload of its recent appends as [`Bytes`] slices of the writer's own payload buffer (the
//!   `WriteBatch` built it; the write path hands it over instead of dropping it, so filling the
//!   cache copies no entry byte), sorted by record position.
//! - One engine-wide eviction queue ([`EntryCache`]) lists the cached appends oldest first with
//!   the bytes each is charged. Only the write path touches it (under the log lock); readers
//!   never do. When the charged bytes exceed the budget, the oldest appends are evicted from
//!   their groups (one shard write lock per shard touched).
//!
//! Invariants:
//! - Correctness never depends on invalidation: a reader first locates the entry in the index
//!   (which purge, truncate, overwrite and group removal keep exact), then asks the group's
//!   cache for the bytes of *that record* (segment and offset, which no other record ever has)
//!   at *that span*. A cached slice holds exactly the bytes the record's raw body holds there
//!   (`base` is the raw-body offset of the slice's first byte). So the cache can only answer
//!   what a disk read of the located record would answer: never a purged, truncated or
//!   overwritten entry.
//! - Invalidation only frees memory early: after an op that drops runs from a group, its cached
//!   appends outside the remaining runs' record positions are dropped ([`GroupCache::retain`]);
//!   removing a group drops its cache with it.
//! - Memory: `charged` is the sum, over the appends in the eviction queue, of their payload
//!   bytes plus [`OVERHEAD`], plus the unused capacity of each payload buffer (charged to its
//!   first append). It never exceeds the budget once a write group's eviction is done, and it
//!   bounds the memory the cache keeps alive (an append dropped early by invalidation stays
//!   charged until the queue reaches it, so the figure errs high, never low).
//! - The cache holds only bytes the index already serves (inserted in the same critical section
//!   as the append's index entry), so it never makes unsynced data more visible than the tail
//!   buffer already does, and never makes anything durable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::codec::EntrySpan;
#[cfg(test)]
use crate::index::Run;
use crate::index::{EntryIndex, EntryLoc, GroupMap, Groups, RecordPos};

/// Bytes charged per cached append besides its payload: its slot in the group's cache and in
/// the eviction queue, rounded up.
pub(crate) const OVERHEAD: u64 = 64;

/// The cached payload of one append: raw-body bytes `base .. base + payload.len()` of the
/// record at (`segment`, `rec_off`).
#[derive(Debug, Clone)]
struct Cached {
    segment: u32,
    rec_off: u32,
    base: u32,
    /// The index of the append's first entry when it was cached: only a hint for finding the
    /// append by entry index (an overwrite can make it stale; lookups check the record).
    first: u64,
    payload: Bytes,
}

impl Cached {
    fn key(&self) -> (u32, u32, u32) {
        (self.segment, self.rec_off, self.base)
    }
}

/// One group's cached appends, sorted by (segment, record offset, base): append order.
#[derive(Debug, Default)]
pub(crate) struct GroupCache {
    recs: VecDeque<Cached>,
}

impl GroupCache {
    /// The bytes of entry `index` at `loc`, if its record's slice is cached; `end` is one past
    /// the group's last entry. O(1) usually, O(log cached appends) at worst.
    pub(crate) fn get(&self, loc: &EntryLoc, index: u64, end: u64) -> Option<Bytes> {
        let (c, from, to) = self.find(loc, index, end)?;
        Some(c.payload.slice(from..to))
    }

    /// [`Self::get`] copied into a new vector: no reference count is touched (the writer that
    /// just cached the payload owns that cache line).
    pub(crate) fn copy(&self, loc: &EntryLoc, index: u64, end: u64) -> Option<Vec<u8>> {
        let (c, from, to) = self.find(loc, index, end)?;
        c.payload.get(from..to).map(<[u8]>::to_vec)
    }

    /// The cached append holding `loc` (entry `index` of a group whose entries end before
    /// `end`) and the entry's range in its payload.
    ///
    /// Found without a binary search in the common case, by two guesses: the append at
    /// `loc.later_runs` from the back (appends are usually the group's last runs, one each; no
    /// other cache line is read), then the position interpolated from the entry index over the
    /// cached appends' first indexes (right where the runs and the appends do not line up, e.g.
    /// after an append was not cached). A miss of both falls back to the binary search. Every
    /// answer is checked against the located record and span, so a wrong guess costs time,
    /// never correctness.
    fn find(&self, loc: &EntryLoc, index: u64, end: u64) -> Option<(&Cached, usize, usize)> {
        let n = self.recs.len();
        let hinted = n
            .checked_sub(loc.later_runs.saturating_add(1))
            .and_then(|i| self.recs.get(i))
            .and_then(|c| Self::holds(c, loc));
        if hinted.is_some() {
            return hinted;
        }
        let front = self.recs.front()?.first;
        if let Some(guess) = index
            .checked_sub(front)
            .zip(end.checked_sub(front).filter(|w| *w > 0))
            .and_then(|(d, w)| d.checked_mul(n as u64).map(|x| (x / w) as usize))
        {
            for i in [guess, guess.wrapping_sub(1), guess + 1] {
                if let Some(hit) = self.recs.get(i).and_then(|c| Self::holds(c, loc)) {
                    return Some(hit);
                }
            }
        }
        let key = (loc.run.segment, loc.run.rec_off, loc.span.off);
        let at = self.recs.partition_point(|c| c.key() <= key);
        Self::holds(self.recs.get(at.checked_sub(1)?)?, loc)
    }

    /// `c` and the entry's range in it, if `c` is a slice of `loc`'s record covering its span.
    fn holds<'a>(c: &'a Cached, loc: &EntryLoc) -> Option<(&'a Cached, usize, usize)> {
        if (c.segment, c.rec_off) != (loc.run.segment, loc.run.rec_off) {
            return None;
        }
        let from = loc.span.off.checked_sub(c.base)? as usize;
        let to = from.checked_add(loc.span.len as usize)?;
        (to <= c.payload.len()).then_some((c, from, to))
    }

    /// Drops the cached appends at either end whose records no run of the group names any
    /// more (purge drops runs at the front; truncate, overwrite and clearing at the back; runs
    /// are never dropped in the middle, so this drops every unnamed append). O(1) per call plus
    /// O(1) per dropped append: an append is cached only for a record that a run of the group
    /// named when it was cached, so the appends still named are exactly those between the first
    /// and the last run's record positions ([`EntryIndex::record_bounds`]); no binary search of
    /// the runs (they can be thousands, on lines the CPU no longer has) runs on the write path.
    pub(crate) fn retain(&mut self, index: &EntryIndex) {
        let Some((first, last)) = index.record_bounds() else {
            self.recs.clear();
            return;
        };
        while self
            .recs
            .front()
            .is_some_and(|c| (c.segment, c.rec_off) < first)
        {
            self.recs.pop_front();
        }
        while self
            .recs
            .back()
            .is_some_and(|c| (c.segment, c.rec_off) > last)
        {
            self.recs.pop_back();
        }
        if self.recs.capacity() > 64 && self.recs.len() < self.recs.capacity() / 4 {
            self.recs.shrink_to(self.recs.len() * 2);
        }
    }

    /// Evicts the cached appends up to and including `key` (the oldest ones: eviction follows
    /// append order).
    fn evict_through(&mut self, key: (u32, u32, u32)) {
        while self.recs.front().is_some_and(|c| c.key() <= key) {
            self.recs.pop_front();
        }
    }

    fn push(&mut self, c: Cached) {
        match self.recs.back_mut() {
            // Two appends of one record starting at the same byte: the earlier one holds only
            // empty entries. Both are slices of the same record body from the same offset, so
            // the longer holds the shorter; keep it.
            Some(b) if b.key() == c.key() => {
                if c.payload.len() > b.payload.len() {
                    *b = c;
                }
            }
            // Appends arrive in record order; one that does not (never expected) is not cached,
            // so the sort order lookups rely on holds.
            Some(b) if b.key() > c.key() => {
                debug_assert!(false, "cache insert out of record order");
            }
            _ => self.recs.push_back(c),
        }
    }

    /// Appends cached for this group.
    pub(crate) fn len(&self) -> usize {
        self.recs.len()
    }
}

/// One append in the eviction queue.
#[derive(Debug, Clone, Copy)]
struct Charge {
    group: u64,
    key: (u32, u32, u32),
    bytes: u64,
}

/// A write's payload buffer, handed from the batch to the cache.
#[derive(Debug, Default)]
pub(crate) struct Payload {
    /// The batch's entry payloads, back to back.
    pub(crate) bytes: Bytes,
    /// Raw-body offset of `bytes[0]` in the record (the batch's payload base).
    pub(crate) base: u32,
    /// Unused capacity of the buffer, charged to its first cached append.
    pub(crate) slack: u64,
}

impl Payload {
    /// Takes the payload buffer of an encoded batch (the record holds its own copy).
    pub(crate) fn take(body: &mut crate::codec::BodyBuilder) -> Payload {
        let base = u32::try_from(body.payload_base()).unwrap_or(u32::MAX);
        let buf = std::mem::take(&mut body.payload);
        let slack = (buf.capacity() - buf.len()) as u64;
        Payload {
            bytes: Bytes::from(buf),
            base,
            slack,
        }
    }
}

/// The engine-wide side of the cache: budget, charged bytes and the eviction queue.
#[derive(Debug, Default)]
pub(crate) struct EntryCache {
    budget: u64,
    charged: AtomicU64,
    queue: Mutex<VecDeque<Charge>>,
}

impl EntryCache {
    pub(crate) fn new(budget: u64) -> EntryCache {
        EntryCache {
            budget,
            ..EntryCache::default()
        }
    }

    /// Whether the cache is on (a budget above 0).
    pub(crate) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes charged to the cache now (see the module invariants).
    pub(crate) fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// Caches the payload of one append that was just applied to `group` in `shard` (same
    /// critical section). `spans` are the append's entry spans (raw-body offsets); `first`
    /// says whether this is the first append cached from `payload` (it carries the slack).
    pub(crate) fn fill(
        &self,
        shard: &mut GroupMap,
        group: u64,
        pos: RecordPos,
        spans: &[EntrySpan],
        payload: &Payload,
        first: bool,
    ) {
        if !self.enabled() {
            return;
        }
        let (Some(head), Some(tail)) = (spans.first(), spans.last()) else {
            return;
        };
        let (Some(from), Some(to)) = (
            head.off.checked_sub(payload.base),
            tail.off
                .checked_add(tail.len)
                .and_then(|end| end.checked_sub(payload.base)),
        ) else {
            return;
        };
        let (from, to) = (from as usize, to as usize);
        if from > to || to > payload.bytes.len() {
            debug_assert!(false, "append spans outside the batch payload");
            return;
        }
        let Some(g) = shard.get_mut(&group) else {
            return;
        };
        let slice = payload.bytes.slice(from..to);
        // The append was just applied: the group's entries end with its entries.
        let range = g.entries.range();
        let first_index = (range.first + range.len).saturating_sub(spans.len() as u64);
        let bytes = slice.len() as u64 + OVERHEAD + if first { payload.slack } else { 0 };
        let cached = Cached {
            segment: pos.segment,
            rec_off: pos.rec_off,
            base: head.off,
            first: first_index,
            payload: slice,
        };
        let key = cached.key();
        g.cache.push(cached);
        self.queue.lock().push_back(Charge { group, key, bytes });
        self.charged.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Evicts the oldest appends once the charged bytes exceed the budget, down to 1/64 below
    /// it, so that a full cache evicts in batches (one lock per touched shard for many
    /// victims) rather than one victim per write. Called by the write path after a write group
    /// was applied, with no shard lock held.
    pub(crate) fn evict(&self, groups: &Groups) {
        if self.charged() <= self.budget {
            return;
        }
        let low = self.budget - self.budget / 64;
        let mut victims: Vec<(usize, Charge)> = Vec::new();
        {
            let mut queue = self.queue.lock();
            while self.charged() > low {
                let Some(c) = queue.pop_front() else {
                    break;
                };
                self.charged.fetch_sub(c.bytes, Ordering::Relaxed);
                victims.push((Groups::shard_index(c.group), c));
            }
        }
        // One lock per shard; within a shard, the victims in queue order.
        victims.sort_by_key(|(s, _)| *s);
        let mut at = 0;
        while let Some(&(shard_ix, _)) = victims.get(at) {
            let mut shard = groups.shard_at(shard_ix).write();
            while let Some((s, c)) = victims.get(at) {
                if *s != shard_ix {
                    break;
                }
                at += 1;
                if let Some(g) = shard.get_mut(&c.group) {
                    g.cache.evict_through(c.key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u32, rec_off: u32, off: u32, len: u32) -> EntryLoc {
        EntryLoc {
            run: Run {
                first: 1,
                segment,
                rec_off,
                rec_len: 1000,
            },
            span: EntrySpan { off, len },
            later_runs: 0,
        }
    }

    /// Whatever the run hint says (right, wrong, out of range), a lookup answers only from a
    /// slice of the located record covering the span.
    #[test]
    fn run_hint_is_checked_never_trusted() {
        let mut gc = GroupCache::default();
        for r in 0..6u32 {
            gc.push(Cached {
                segment: 1,
                rec_off: 32 + r * 100,
                base: 10,
                first: u64::from(r) * 10 + 1,
                payload: Bytes::from(vec![r as u8; 8]),
            });
        }
        for r in 0..8u32 {
            let right = u64::from(r) * 10 + 3;
            for hint in [0, 1, 2, 5, 6, 7, usize::MAX] {
                for (index, end) in [(right, 61), (0, 61), (1, 61), (55, 61), (right, u64::MAX)] {
                    let mut l = loc(1, 32 + r * 100, 12, 4);
                    l.later_runs = hint;
                    let got = gc.get(&l, index, end);
                    let ctx = format!("record {r}, hint {hint}, index {index}, end {end}");
                    if r < 6 {
                        assert_eq!(got.unwrap(), vec![r as u8; 4], "{ctx}");
                    } else {
                        assert!(got.is_none(), "{ctx}");
                    }
                    // A span past the cached slice is not served, hinted or not.
                    let mut l = loc(1, 32 + r * 100, 16, 8);
                    l.later_runs = hint;
                    assert!(gc.get(&l, index, end).is_none(), "{ctx}");
                }
            }
        }
    }

    #[test]
    fn lookup_matches_record_and_span_only() {
        let mut gc = GroupCache::default();
        gc.push(Cached {
            segment: 1,
            rec_off: 32,
            base: 10,
            first: 1,
            payload: Bytes::from_static(b"abcdef"),
        });
        gc.push(Cached {
            segment: 1,
            rec_off: 32,
            base: 16,
            first: 2,
            payload: Bytes::from_static(b"XYZ"),
        });
        gc.push(Cached {
            segment: 2,
            rec_off: 32,
            base: 10,
            first: 3,
            payload: Bytes::from_static(b"0123"),
        });
        assert_eq!(gc.get(&loc(1, 32, 12, 2), 1, 4).unwrap(), &b"cd"[..]);
        assert_eq!(gc.get(&loc(1, 32, 16, 3), 1, 4).unwrap(), &b"XYZ"[..]);
        assert_eq!(gc.get(&loc(2, 32, 11, 3), 1, 4).unwrap(), &b"123"[..]);
        assert_eq!(gc.copy(&loc(2, 32, 11, 3), 1, 4).unwrap(), b"123");
        // Another record, or a span beyond the slice: not cached.
        assert!(gc.get(&loc(1, 64, 12, 2), 1, 4).is_none());
        assert!(gc.get(&loc(2, 32, 12, 3), 1, 4).is_none());
        assert!(gc.get(&loc(1, 0, 12, 2), 1, 4).is_none());
        // Retain keeps what the index names (record 1@32), drops the rest at the ends.
        let mut ix = EntryIndex::default();
        let run = Run {
            first: 1,
            segment: 1,
            rec_off: 32,
            rec_len: 100,
        };
        ix.try_append(1, run, &[EntrySpan { off: 10, len: 6 }])
            .unwrap();
        gc.retain(&ix);
        assert_eq!(gc.len(), 2);
        gc.evict_through((1, 32, 10));
        assert_eq!(gc.len(), 1);
        gc.retain(&EntryIndex::default());
        assert_eq!(gc.len(), 0);
    }

    /// `retain`'s O(1) bounds check drops exactly the appends no run names, over random
    /// appends (with overwrites), purges, truncates and evictions, called where
    /// `index::apply_op` calls it (after a purge or truncate, and for an overwriting append
    /// after its truncation and before the new run).
    #[test]
    fn retain_by_bounds_drops_exactly_the_unnamed_appends() {
        let seed: u64 = std::env::var("MRWAL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_cace);
        println!("MRWAL_SEED={seed}");
        let mut rng = seed | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n.max(1)
        };
        fn retain_checked(gc: &mut GroupCache, ix: &EntryIndex, seed: u64, step: usize) {
            let before: Vec<(u32, u32)> = gc.recs.iter().map(|c| (c.segment, c.rec_off)).collect();
            gc.retain(ix);
            let after: Vec<(u32, u32)> = gc.recs.iter().map(|c| (c.segment, c.rec_off)).collect();
            let named: Vec<(u32, u32)> = before
                .into_iter()
                .filter(|&(s, o)| ix.names(s, o))
                .collect();
            assert_eq!(after, named, "seed {seed}, step {step}");
        }
        let mut ix = EntryIndex::default();
        let mut gc = GroupCache::default();
        let (mut segment, mut off) = (1u32, 32u32);
        let mut overwrites = 0;
        for step in 0..20_000 {
            let r = ix.range();
            match next(10) {
                0 if !r.is_empty() => {
                    ix.purge_to(r.first + next(r.len));
                    retain_checked(&mut gc, &ix, seed, step);
                }
                1 if !r.is_empty() => {
                    ix.truncate_from(r.first + next(r.len));
                    retain_checked(&mut gc, &ix, seed, step);
                }
                2 => {
                    if let Some(c) = gc.recs.front().map(Cached::key) {
                        gc.evict_through(c);
                    }
                }
                _ => {
                    // Append at the end, or overwrite from somewhere inside.
                    let first = match r.last() {
                        Some(last) if next(4) == 0 => r.first + next(last - r.first + 1),
                        Some(last) => last + 1,
                        None => 1 + next(5),
                    };
                    if r.last().is_some_and(|last| first <= last) {
                        overwrites += 1;
                        ix.truncate_from(first);
                        retain_checked(&mut gc, &ix, seed, step);
                    }
                    let count = 1 + next(3) as u32;
                    let spans: Vec<EntrySpan> = (0..count)
                        .map(|k| EntrySpan {
                            off: 8 + 4 * k,
                            len: 4,
                        })
                        .collect();
                    let run = Run {
                        first,
                        segment,
                        rec_off: off,
                        rec_len: 64,
                    };
                    ix.try_append(first, run, &spans).unwrap();
                    gc.push(Cached {
                        segment,
                        rec_off: off,
                        base: 8,
                        first,
                        payload: Bytes::from(vec![step as u8; 4 * count as usize]),
                    });
                    off += 64;
                    if next(50) == 0 {
                        (segment, off) = (segment + 1, 32);
                    }
                }
            }
            for c in &gc.recs {
                assert!(ix.names(c.segment, c.rec_off), "seed {seed}, step {step}");
            }
        }
        assert!(overwrites > 100, "the model must exercise overwrites");
    }
}
