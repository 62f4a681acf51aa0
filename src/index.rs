//! The in-memory index: for each group, the positions of its entries (never their payloads), its
//! vote, committed marker and keys; and the sharded map of all groups.
//!
//! Invariants:
//! - A group's entries are contiguous: `first .. first + positions.len()`.
//! - `runs` is sorted by `first` and each run names the record holding entries from its `first`
//!   up to the next run's `first`; the front run may start before the group's `first` after a purge.
//! - The same [`Range`] transitions decide both whether a batch is valid and how it is applied,
//!   so validation and application cannot disagree; [`apply_op`] is the one function that
//!   applies an [`Op`] to a group, for the write path and for replay alike.
//! - An append never "starts a group afresh": one that does not fit (it would leave a gap or
//!   start before the group's first entry) is refused and changes nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

use parking_lot::RwLock;

use crate::codec::{EntrySpan, Op};

/// The range of indexes a group holds: `first .. first + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Range {
    pub(crate) first: u64,
    pub(crate) len: u64,
}

/// Why an append does not fit a group's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendRefused {
    /// `index + count` passes `u64::MAX`.
    Overflow { index: u64, count: u64 },
    /// The group holds `first..next` and `index` is outside `first..=next`.
    Gap { index: u64, first: u64, next: u64 },
}

impl AppendRefused {
    /// The typed error for an append to `group`.
    pub(crate) fn into_error(self, group: u64) -> crate::error::Error {
        match self {
            AppendRefused::Overflow { index, count } => crate::error::Error::IndexOverflow {
                group,
                index,
                count,
            },
            AppendRefused::Gap { index, first, next } => crate::error::Error::NonContiguousAppend {
                group,
                index,
                first,
                next,
            },
        }
    }
}

impl std::fmt::Display for AppendRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendRefused::Overflow { index, count } => {
                write!(f, "entries {index}+{count} overflow the index space")
            }
            AppendRefused::Gap { index, first, next } => write!(
                f,
                "append at index {index} but the group holds {first}..{next} (must start within {first}..={next})"
            ),
        }
    }
}

impl Range {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn last(&self) -> Option<u64> {
        (self.len > 0).then(|| self.first + self.len - 1)
    }

    /// Where an append at `index` is allowed: anywhere in an empty group, else from `first` to
    /// one past the last entry (an overlap replaces the tail).
    pub(crate) fn check_append(&self, index: u64, count: u64) -> Result<(), AppendRefused> {
        if index.checked_add(count).is_none() {
            return Err(AppendRefused::Overflow { index, count });
        }
        if self.len == 0 {
            return Ok(());
        }
        let next = self.first + self.len;
        if index < self.first || index > next {
            return Err(AppendRefused::Gap {
                index,
                first: self.first,
                next,
            });
        }
        Ok(())
    }

    /// The range after appending `count` entries at `index`; an append that does not fit (see
    /// [`Self::check_append`]) is refused and leaves the range as it was.
    pub(crate) fn try_append(&mut self, index: u64, count: u64) -> Result<(), AppendRefused> {
        self.check_append(index, count)?;
        if self.len == 0 {
            *self = Range {
                first: index,
                len: count,
            };
        } else {
            self.len = index - self.first + count;
        }
        Ok(())
    }

    /// The range after `op` (the transition shared by validation and [`apply_op`]); an append
    /// that does not fit is refused and leaves the range as it was. `count` is the number of
    /// entries an append adds.
    pub(crate) fn apply<B>(&mut self, op: &Op<B>, count: u64) -> Result<(), AppendRefused> {
        match op {
            Op::Append { first, .. } => self.try_append(*first, count)?,
            Op::Truncate { index, .. } => self.truncate_from(*index),
            Op::Purge { index, .. } => self.purge_to(*index),
            Op::RemoveGroup { .. } => *self = Range::default(),
            Op::Put { .. } | Op::Delete { .. } | Op::Vote { .. } | Op::Committed { .. } => {}
        }
        Ok(())
    }

    pub(crate) fn truncate_from(&mut self, index: u64) {
        if self.len == 0 {
            return;
        }
        if index <= self.first {
            self.len = 0;
        } else if index < self.first + self.len {
            self.len = index - self.first;
        }
    }

    pub(crate) fn purge_to(&mut self, index: u64) {
        if self.len == 0 || index < self.first {
            return;
        }
        let next = self.first + self.len;
        if index >= next - 1 {
            *self = Range {
                first: index.saturating_add(1),
                len: 0,
            };
        } else {
            *self = Range {
                first: index + 1,
                len: next - index - 1,
            };
        }
    }
}

/// The record that holds a run of a group's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Index of the first entry of the run.
    pub(crate) first: u64,
    /// Segment id.
    pub(crate) segment: u32,
    /// Offset of the record in the segment.
    pub(crate) rec_off: u32,
    /// Length of the whole record.
    pub(crate) rec_len: u32,
}

/// Where to find one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryLoc {
    pub(crate) run: Run,
    pub(crate) span: EntrySpan,
    /// How many runs of the group follow `run` (a hint for the entry cache, whose appends
    /// follow the runs: it is checked there, never trusted).
    pub(crate) later_runs: usize,
}

/// One group's entry positions.
#[derive(Debug, Default)]
pub(crate) struct EntryIndex {
    range: Range,
    spans: VecDeque<EntrySpan>,
    runs: VecDeque<Run>,
}

impl EntryIndex {
    pub(crate) fn range(&self) -> Range {
        self.range
    }

    /// Appends `spans` as entries `index..` held by the record `run` names; an overlap
    /// replaces the tail. An append that does not fit is refused and changes nothing.
    pub(crate) fn try_append(
        &mut self,
        index: u64,
        run: Run,
        spans: &[EntrySpan],
    ) -> Result<(), AppendRefused> {
        self.try_append_counted(index, run, spans, &mut RefDelta::default())
    }

    /// [`Self::try_append`], noting in `refs` the runs it adds and drops.
    pub(crate) fn try_append_counted(
        &mut self,
        index: u64,
        run: Run,
        spans: &[EntrySpan],
        refs: &mut RefDelta,
    ) -> Result<(), AppendRefused> {
        let count = spans.len() as u64;
        if count == 0 {
            return Ok(());
        }
        self.range.check_append(index, count)?;
        if self.range.is_empty() {
            self.clear_counted(refs);
        } else if self.range.last().is_some_and(|last| index <= last) {
            self.truncate_counted(index, refs);
        }
        self.range.try_append(index, count)?;
        self.runs.push_back(Run {
            first: index,
            ..run
        });
        refs.add(run.segment, 1);
        self.spans.extend(spans.iter().copied());
        debug_assert_eq!(self.spans.len() as u64, self.range.len);
        Ok(())
    }

    /// [`Self::try_append`] for an append already validated against the group's range (the
    /// write path); one that does not fit changes nothing.
    #[cfg(test)]
    pub(crate) fn append(&mut self, index: u64, run: Run, spans: &[EntrySpan]) {
        self.append_counted(index, run, spans, &mut RefDelta::default());
    }

    /// [`Self::append`], noting in `refs` the runs it adds and drops.
    #[cfg(test)]
    pub(crate) fn append_counted(
        &mut self,
        index: u64,
        run: Run,
        spans: &[EntrySpan],
        refs: &mut RefDelta,
    ) {
        let fits = self.try_append_counted(index, run, spans, refs);
        debug_assert!(fits.is_ok(), "unvalidated append: {fits:?}");
        if let Err(e) = fits {
            tracing::error!(error = %e, "an append that was not validated was refused");
        }
    }

    #[cfg(test)]
    pub(crate) fn truncate_from(&mut self, index: u64) {
        self.truncate_counted(index, &mut RefDelta::default());
    }

    /// [`Self::truncate_from`], noting in `refs` the runs it drops.
    pub(crate) fn truncate_counted(&mut self, index: u64, refs: &mut RefDelta) {
        self.range.truncate_from(index);
        self.spans.truncate(self.range.len as usize);
        while self.runs.back().is_some_and(|r| r.first >= index) {
            if let Some(r) = self.runs.pop_back() {
                refs.add(r.segment, -1);
            }
        }
        if self.range.is_empty() {
            for r in self.runs.drain(..) {
                refs.add(r.segment, -1);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn purge_to(&mut self, index: u64) {
        self.purge_counted(index, &mut RefDelta::default());
    }

    /// [`Self::purge_to`], noting in `refs` the runs it drops.
    pub(crate) fn purge_counted(&mut self, index: u64, refs: &mut RefDelta) {
        let before = self.range;
        self.range.purge_to(index);
        if self.range == before {
            return;
        }
        let drop = (self.range.first - before.first).min(self.spans.len() as u64) as usize;
        self.spans.drain(..drop);
        if self.range.is_empty() {
            for r in self.runs.drain(..) {
                refs.add(r.segment, -1);
            }
            self.spans.clear();
            return;
        }
        while self.runs.len() > 1 && self.runs[1].first <= self.range.first {
            if let Some(r) = self.runs.pop_front() {
                refs.add(r.segment, -1);
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = EntryIndex::default();
    }

    /// [`Self::clear`], noting in `refs` the runs it drops.
    pub(crate) fn clear_counted(&mut self, refs: &mut RefDelta) {
        for r in self.runs.drain(..) {
            refs.add(r.segment, -1);
        }
        self.clear();
    }

    pub(crate) fn locate(&self, index: u64) -> Option<EntryLoc> {
        if self.range.is_empty()
            || index < self.range.first
            || index >= self.range.first + self.range.len
        {
            return None;
        }
        let span = *self.spans.get((index - self.range.first) as usize)?;
        let at = self.run_at(index)?;
        let run = *self.runs.get(at)?;
        Some(EntryLoc {
            run,
            span,
            later_runs: self.runs.len() - 1 - at,
        })
    }

    /// The position in `runs` of the run holding `index` (the last run whose `first` is at most
    /// `index`), for an `index` inside the group's range.
    ///
    /// Runs of one group usually hold about as many entries each, so the position is first
    /// guessed from the average run length and checked (one or two cache lines, where a binary
    /// search of a few hundred runs takes a chain of dependent misses); a wrong guess narrows
    /// the binary search to the side it failed on. O(1) for even runs, O(log runs) at worst.
    fn run_at(&self, index: u64) -> Option<usize> {
        let n = self.runs.len();
        if n == 0 {
            return None;
        }
        // Interpolated over the group's range rather than from the front run's first index
        // (which a purge may leave below it): one cache line fewer to read; a guess off by the
        // purged part of the front run is caught by the check below.
        let front = self.range.first;
        let end = self.range.first + self.range.len;
        let width = end.checked_sub(front).filter(|w| *w > 0)?;
        let guess = index
            .checked_sub(front)
            .and_then(|d| d.checked_mul(n as u64))
            .map_or(n / 2, |x| (x / width) as usize)
            .min(n - 1);
        let holds = |i: usize| self.runs.get(i).is_some_and(|r| r.first <= index);
        if !holds(0) {
            return None;
        }
        let (lo, hi) = if holds(guess) {
            if !holds(guess + 1) {
                return Some(guess);
            }
            (guess + 1, n)
        } else {
            if holds(guess.wrapping_sub(1)) {
                return Some(guess - 1);
            }
            (0, guess)
        };
        // The answer is the last position in lo - 1 .. hi that holds `index` (`lo - 1` does).
        let (mut lo, mut hi) = (lo, hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if holds(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }

    /// Calls `f` for each run with the number of its entries still live.
    pub(crate) fn for_each_run(&self, mut f: impl FnMut(&Run, u64, u64)) {
        let Some(last) = self.range.last() else {
            return;
        };
        for (i, r) in self.runs.iter().enumerate() {
            let start = r.first.max(self.range.first);
            let end = self.runs.get(i + 1).map_or(last + 1, |n| n.first);
            if end > start {
                let bytes: u64 = (start..end)
                    .filter_map(|ix| self.spans.get((ix - self.range.first) as usize))
                    .map(|s| u64::from(s.len))
                    .sum();
                f(r, end - start, bytes);
            }
        }
    }

    /// The segments this group's entries live in (every run holds at least one live entry:
    /// purge and truncate drop the runs they empty). O(runs), unlike [`Self::for_each_run`].
    pub(crate) fn segments(&self) -> impl Iterator<Item = u32> + '_ {
        self.runs.iter().map(|r| r.segment)
    }

    /// The record positions (segment, offset) of the first and the last run, if any. O(1).
    /// Runs are sorted by record position as well as by index (both follow append order), and
    /// are only ever dropped at either end, so every record position between the two that held
    /// a run of this group still does.
    pub(crate) fn record_bounds(&self) -> Option<((u32, u32), (u32, u32))> {
        let first = self.runs.front()?;
        let last = self.runs.back()?;
        Some(((first.segment, first.rec_off), (last.segment, last.rec_off)))
    }

    /// Whether some run names the record at (`segment`, `rec_off`). O(log runs).
    #[cfg(test)]
    pub(crate) fn names(&self, segment: u32, rec_off: u32) -> bool {
        let at = self
            .runs
            .partition_point(|r| (r.segment, r.rec_off) < (segment, rec_off));
        self.runs
            .get(at)
            .is_some_and(|r| (r.segment, r.rec_off) == (segment, rec_off))
    }

    pub(crate) fn oldest_segment(&self) -> Option<u32> {
        self.runs.iter().map(|r| r.segment).min()
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.spans.shrink_to_fit();
        self.runs.shrink_to_fit();
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.spans.capacity() * std::mem::size_of::<EntrySpan>()
            + self.runs.capacity() * std::mem::size_of::<Run>()
    }
}

/// Changes to the number of index runs per segment, gathered while a write group is applied and
/// folded into [`SegmentRefs`] once.
#[derive(Debug, Default)]
pub(crate) struct RefDelta(Vec<(u32, i64)>);

impl RefDelta {
    pub(crate) fn add(&mut self, segment: u32, delta: i64) {
        match self.0.iter_mut().find(|(s, _)| *s == segment) {
            Some((_, d)) => *d += delta,
            None => self.0.push((segment, delta)),
        }
    }
}

/// How many index runs (of all groups) point into each segment, kept up to date as batches are
/// applied, purged and truncated, so that finding dead segments is O(segments).
///
/// Invariant: for every segment, the count equals the number of runs in all groups' indexes
/// naming it (checked against a full scan in tests). A sealed segment whose count is zero is
/// dead for good: runs are only ever added for the active segment.
#[derive(Debug, Default)]
pub(crate) struct SegmentRefs {
    counts: parking_lot::Mutex<BTreeMap<u32, u64>>,
}

impl SegmentRefs {
    pub(crate) fn apply(&self, delta: &RefDelta) {
        if delta.0.is_empty() {
            return;
        }
        let mut counts = self.counts.lock();
        for &(seg, d) in &delta.0 {
            let c = counts.entry(seg).or_insert(0);
            *c = c.saturating_add_signed(d);
            if *c == 0 {
                counts.remove(&seg);
            }
        }
    }

    /// Rebuilds the counts from every group's index (at open).
    pub(crate) fn rebuild(&self, groups: &Groups) {
        let mut counts = BTreeMap::new();
        for shard in groups.shards() {
            for g in shard.read().values() {
                for seg in g.entries.segments() {
                    *counts.entry(seg).or_insert(0u64) += 1;
                }
            }
        }
        *self.counts.lock() = counts;
    }

    /// Runs pointing into `segment`.
    pub(crate) fn count(&self, segment: u64) -> u64 {
        u32::try_from(segment)
            .ok()
            .and_then(|s| self.counts.lock().get(&s).copied())
            .unwrap_or(0)
    }
}

/// Everything the engine knows about one group.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(crate) entries: EntryIndex,
    pub(crate) vote: Option<Box<[u8]>>,
    pub(crate) committed: Option<Box<[u8]>>,
    pub(crate) kv: BTreeMap<Box<[u8]>, Box<[u8]>>,
    /// The position `(segment << 32) | offset` of the record holding the last write to this
    /// group (0: none since open).
    pub(crate) last_pos: u64,
    /// Bumped by every write applied to this group (a GC rewrite checks it did not change).
    pub(crate) version: u64,
    /// This group's metadata as it was at log position `.0` (packed like `last_pos`), saved by
    /// the first write at or after that position while a checkpoint covering the log below it
    /// is being collected (see `gc`).
    pub(crate) at_boundary: Option<(u64, Box<crate::checkpoint::GroupMeta>)>,
    /// The payloads of this group's recent appends (see `cache`); filled by the write path
    /// only, trimmed here whenever runs are dropped.
    pub(crate) cache: crate::cache::GroupCache,
}

/// Where a record lies: what each append of it records in its group's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordPos {
    pub(crate) segment: u32,
    pub(crate) rec_off: u32,
    pub(crate) rec_len: u32,
}

impl RecordPos {
    /// The record's position packed as `(segment << 32) | offset`: ordered like the log.
    pub(crate) fn packed(&self) -> u64 {
        (u64::from(self.segment) << 32) | u64::from(self.rec_off)
    }
}

/// What applying ops also maintains besides the groups: the per-segment run counts and, while
/// a GC checkpoint is being collected, the boundary snapshots (see `gc`). Replay uses the
/// default (no boundary armed) and rebuilds the counts afterwards.
#[derive(Debug, Default)]
pub(crate) struct ApplyCtx {
    pub(crate) refs: RefDelta,
    /// The packed position of the checkpoint being collected (0: none).
    pub(crate) armed: u64,
    /// Groups removed that existed at the armed position, with their metadata as of it.
    pub(crate) removed: Vec<(u64, crate::checkpoint::GroupMeta)>,
}

impl Group {
    /// This group's metadata, as a checkpoint stores it.
    pub(crate) fn meta(&self) -> crate::checkpoint::GroupMeta {
        crate::checkpoint::GroupMeta {
            range: self.entries.range(),
            vote: self.vote.clone(),
            committed: self.committed.clone(),
            kv: self
                .kv
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Notes a write by the record at packed position `pos`; first saves the metadata if a
    /// checkpoint at position `armed` is being collected and this is the group's first write at
    /// or after that position.
    fn touch(&mut self, pos: u64, armed: u64) {
        if armed != 0 && self.last_pos < armed && pos >= armed {
            self.at_boundary = Some((armed, Box::new(self.meta())));
        }
        self.last_pos = pos;
        self.version += 1;
    }
}

/// Applies one op to `groups` (the whole map, or one shard of it): the one apply function of
/// the crate, for the write path and replay alike. `spans` is the span list an append's `spans`
/// range points into (the decoder's list, or the batch's own, shifted to record offsets). An
/// append that does not fit its group is refused and changes nothing: the caller decides
/// whether that is an invalid batch (write path: validation already refused it), an
/// inconsistency (replay) or a reported skip (tolerant replay).
pub(crate) fn apply_op<B: Into<Box<[u8]>>, S: BuildHasher>(
    groups: &mut HashMap<u64, Group, S>,
    op: Op<B>,
    spans: &[EntrySpan],
    pos: RecordPos,
    ctx: &mut ApplyCtx,
) -> Result<(), String> {
    let group = op.group();
    if let Op::RemoveGroup { .. } = op {
        if let Some(mut g) = groups.remove(&group) {
            // A checkpoint being collected must still see the group as it was at its position
            // (taken before the entries are cleared).
            if ctx.armed != 0 {
                if g.last_pos < ctx.armed {
                    ctx.removed.push((group, g.meta()));
                } else if let Some((at, meta)) = g.at_boundary.take() {
                    if at == ctx.armed {
                        ctx.removed.push((group, *meta));
                    }
                }
            }
            g.entries.clear_counted(&mut ctx.refs);
        }
        return Ok(());
    }
    let packed = pos.packed();
    let g = groups.entry(group).or_insert_with(|| Group {
        last_pos: packed,
        ..Group::default()
    });
    match op {
        Op::Append {
            first, spans: at, ..
        } => {
            let spans = spans
                .get(at)
                .ok_or_else(|| format!("group {group}: append names spans outside its record"))?;
            g.entries
                .range()
                .check_append(first, spans.len() as u64)
                .map_err(|e| format!("group {group}: {e}"))?;
            g.touch(packed, ctx.armed);
            if g.entries.range().last().is_some_and(|last| first <= last) {
                // An overwrite: the replaced tail goes first, and its cached appends with it
                // (retain keeps what lies between the first and last runs, and the new run is
                // the last one after the append).
                g.entries.truncate_counted(first, &mut ctx.refs);
                g.cache.retain(&g.entries);
            }
            let run = Run {
                first,
                segment: pos.segment,
                rec_off: pos.rec_off,
                rec_len: pos.rec_len,
            };
            g.entries
                .try_append_counted(first, run, spans, &mut ctx.refs)
                .map_err(|e| format!("group {group}: {e}"))?;
        }
        Op::Truncate { index, .. } => {
            g.touch(packed, ctx.armed);
            g.entries.truncate_counted(index, &mut ctx.refs);
            g.cache.retain(&g.entries);
        }
        Op::Purge { index, .. } => {
            g.touch(packed, ctx.armed);
            g.entries.purge_counted(index, &mut ctx.refs);
            g.cache.retain(&g.entries);
        }
        Op::Put { key, value, .. } => {
            g.touch(packed, ctx.armed);
            g.kv.insert(key.into(), value.into());
        }
        Op::Delete { key, .. } => {
            g.touch(packed, ctx.armed);
            let key: Box<[u8]> = key.into();
            g.kv.remove(&key);
        }
        Op::Vote { value, .. } => {
            g.touch(packed, ctx.armed);
            g.vote = Some(value.into());
        }
        Op::Committed { value, .. } => {
            g.touch(packed, ctx.armed);
            g.committed = Some(value.into());
        }
        Op::RemoveGroup { .. } => {}
    }
    Ok(())
}

const SHARDS: usize = 64;

/// One shard's groups by id. Hashed with foldhash (a multiply-fold of the 8-byte id, seeded
/// per map) rather than SipHash: every read starts with this lookup, and SipHash alone cost
/// about as much as the rest of the probe.
pub(crate) type GroupMap = HashMap<u64, Group, foldhash::fast::RandomState>;

/// One shard: its lock and map header on a cache line of their own, so that a writer locking
/// one shard does not take the line a reader of the neighbouring shard needs.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(RwLock<GroupMap>);

/// All groups, sharded so that readers of different groups rarely meet on a lock.
#[derive(Debug)]
pub(crate) struct Groups {
    shards: Vec<Shard>,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl Groups {
    pub(crate) fn shard(&self, group: u64) -> &RwLock<GroupMap> {
        self.shard_at(Self::shard_index(group))
    }

    /// Which shard holds `group`.
    pub(crate) fn shard_index(group: u64) -> usize {
        // Fibonacci hashing spreads sequential ids over the shards.
        (group.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
    }

    pub(crate) fn shard_at(&self, index: usize) -> &RwLock<GroupMap> {
        &self.shards[index % SHARDS].0
    }

    pub(crate) fn shards(&self) -> impl Iterator<Item = &RwLock<GroupMap>> {
        self.shards.iter().map(|s| &s.0)
    }

    pub(crate) fn read<R>(&self, group: u64, f: impl FnOnce(&Group) -> R) -> Option<R> {
        self.shard(group).read().get(&group).map(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seg: u32) -> Run {
        Run {
            first: 0,
            segment: seg,
            rec_off: 32,
            rec_len: 100,
        }
    }

    fn spans(n: u32) -> Vec<EntrySpan> {
        (0..n)
            .map(|i| EntrySpan {
                off: i * 10,
                len: 10,
            })
            .collect()
    }

    #[test]
    fn append_truncate_purge() {
        let mut ix = EntryIndex::default();
        ix.append(5, run(1), &spans(4)); // 5..=8
        ix.append(9, run(2), &spans(3)); // 9..=11
        assert_eq!(ix.range(), Range { first: 5, len: 7 });
        assert_eq!(ix.locate(9).unwrap().run.segment, 2);
        assert_eq!(ix.locate(8).unwrap().run.segment, 1);
        assert!(ix.locate(12).is_none() && ix.locate(4).is_none());
        // Overlapping append replaces the tail.
        ix.append(7, run(3), &spans(2)); // 5..=8 with 7,8 from seg 3
        assert_eq!(ix.range(), Range { first: 5, len: 4 });
        assert_eq!(ix.locate(7).unwrap().run.segment, 3);
        assert_eq!(ix.locate(6).unwrap().run.segment, 1);
        ix.purge_to(6);
        assert_eq!(ix.range(), Range { first: 7, len: 2 });
        assert_eq!(ix.oldest_segment(), Some(3));
        ix.truncate_from(8);
        assert_eq!(ix.range(), Range { first: 7, len: 1 });
        ix.purge_to(100);
        assert!(ix.range().is_empty());
        assert_eq!(ix.range().first, 101);
        // An empty group takes any index.
        ix.append(3, run(4), &spans(1));
        assert_eq!(ix.range(), Range { first: 3, len: 1 });
    }

    #[test]
    fn range_transitions_refuse_a_misfit_and_change_nothing() {
        let mut r = Range { first: 10, len: 5 };
        let append = |first| Op::<&[u8]>::Append {
            group: 1,
            first,
            spans: 0..2,
        };
        assert!(r.apply(&append(16), 2).is_err());
        assert_eq!(r, Range { first: 10, len: 5 });
        r.apply(&append(12), 2).unwrap();
        assert_eq!(r, Range { first: 10, len: 4 });
        r.apply(
            &Op::<&[u8]>::Purge {
                group: 1,
                index: 10,
            },
            0,
        )
        .unwrap();
        assert_eq!(r, Range { first: 11, len: 3 });
        r.apply(&Op::<&[u8]>::RemoveGroup { group: 1 }, 0).unwrap();
        assert_eq!(r, Range::default());
        // An empty group takes any index; apply_op refuses a misfit the same way.
        let mut groups = HashMap::new();
        let pos = RecordPos {
            segment: 1,
            rec_off: 32,
            rec_len: 100,
        };
        apply_op(
            &mut groups,
            append(5),
            &spans(2),
            pos,
            &mut ApplyCtx::default(),
        )
        .unwrap();
        assert!(apply_op(
            &mut groups,
            append(9),
            &spans(2),
            pos,
            &mut ApplyCtx::default()
        )
        .is_err());
        assert_eq!(groups[&1].entries.range(), Range { first: 5, len: 2 });
    }

    #[test]
    fn range_checks() {
        let r = Range { first: 10, len: 5 };
        assert!(r.check_append(15, 1).is_ok());
        assert!(r.check_append(10, 1).is_ok());
        assert!(r.check_append(16, 1).is_err());
        assert!(r.check_append(9, 1).is_err());
        assert!(Range::default().check_append(1000, 1).is_ok());
        assert!(r.check_append(u64::MAX, 2).is_err());
    }

    /// The guessed run lookup agrees with a plain binary search over runs of uneven lengths,
    /// after purges (front run starting before the range) and truncations.
    #[test]
    fn run_lookup_matches_binary_search() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for case in 0..300u64 {
            let mut ix = EntryIndex::default();
            let mut at = 1 + next(1000);
            let runs = 1 + next(200);
            for r in 0..runs {
                // Mostly even runs (the guess hits), some very uneven (it misses).
                let len = match case % 3 {
                    0 => 8,
                    1 => 1 + next(16),
                    _ => [1, 1, 1, 500][next(4) as usize],
                };
                ix.append(at, run(r as u32 + 1), &spans(len as u32));
                at += len;
            }
            if case % 4 == 1 {
                let first = ix.range().first;
                ix.purge_to(first + next(ix.range().len));
            }
            if case % 5 == 2 {
                let first = ix.range().first;
                ix.truncate_from(first + 1 + next(ix.range().len));
            }
            let range = ix.range();
            for index in range.first.saturating_sub(3)..range.first + range.len + 3 {
                let want = (index >= range.first && index < range.first + range.len).then(|| {
                    let at = ix.runs.partition_point(|r| r.first <= index);
                    (ix.runs[at - 1], ix.runs.len() - at)
                });
                let got = ix.locate(index).map(|l| (l.run, l.later_runs));
                assert_eq!(got, want, "case {case}, index {index}");
            }
        }
    }

    #[test]
    fn live_runs() {
        let mut ix = EntryIndex::default();
        ix.append(1, run(1), &spans(4));
        ix.append(5, run(2), &spans(4));
        ix.purge_to(2);
        let mut seen = Vec::new();
        ix.for_each_run(|r, n, b| seen.push((r.segment, n, b)));
        assert_eq!(seen, vec![(1, 2, 20), (2, 4, 40)]);
        assert_eq!(ix.segments().collect::<Vec<_>>(), vec![1, 2]);
    }
}
