//! Replay: the scanned records, in segment order, into a fresh index.
//!
//! In the records the checkpoint covers (below its position: segments below its segment, and the
//! records of its segment starting below its offset), only appends are used: for each index of a
//! group's checkpointed range, the latest surviving write is its current version (the checkpoint
//! supplies the ranges and the metadata). At and above it, every op is applied as written, through the same
//! [`apply_op`](crate::index::apply_op) the write path uses. An append that does not fit its
//! group is never applied by starting the group afresh: it is [`Error::Inconsistent`], or a
//! reported skip in [`RecoveryMode::TolerateAny`].

use std::collections::HashMap;

use crate::checkpoint::Checkpoint;
use crate::codec::{EntrySpan, Op};
use crate::error::{Error, Result};
use crate::index::{apply_op, ApplyCtx, Group, Range, RecordPos, Run};
use crate::options::RecoveryMode;

use super::scan::{Records, SegmentScan};
use super::{RecoveryReport, SkippedRange};

/// The index's name for segment `id` (ids above `u32::MAX` are refused before replay).
pub(super) fn segment_u32(id: u64) -> Result<u32> {
    u32::try_from(id)
        .map_err(|_| Error::corruption(id, 0, "segment id beyond the 2^32 - 1 the index can name"))
}

#[derive(Clone, Copy)]
struct Slot {
    pos: RecordPos,
    span: EntrySpan,
}

/// Replay of the segments below the checkpoint: the latest write of each index inside each
/// group's checkpointed range.
pub(super) struct OldReplay {
    ranges: HashMap<u64, Range>,
    slots: HashMap<u64, Vec<Option<Slot>>>,
}

impl OldReplay {
    pub(super) fn new(c: &Checkpoint, scans: &[SegmentScan]) -> Result<OldReplay> {
        // Each index of a checkpointed range needs an entry span in a record the checkpoint
        // covers: the spans decoded in the segments up to the covering one bound every honest
        // range (and bound the slot vectors allocated below by memory already in use). A bound
        // in bytes would not do: under lz4 an entry can take far less than a byte of its segment.
        let old_spans: u64 = scans
            .iter()
            .filter(|s| s.id <= c.covers_below)
            .map(|s| s.parts.records.spans.len() as u64)
            .sum();
        let mut ranges = HashMap::with_capacity(c.groups.len());
        for (id, meta) in &c.groups {
            if meta.range.len > old_spans {
                return Err(Error::Inconsistent {
                    group: *id,
                    reason: format!(
                        "checkpoint claims {} entries, more than the {old_spans} entries the old segments hold",
                        meta.range.len
                    ),
                });
            }
            ranges.insert(*id, meta.range);
        }
        Ok(OldReplay {
            ranges,
            slots: HashMap::new(),
        })
    }

    fn apply(&mut self, op: &Op<Box<[u8]>>, all_spans: &[EntrySpan], pos: RecordPos) {
        let Op::Append {
            group,
            first,
            spans,
        } = op
        else {
            return;
        };
        let Some(range) = self.ranges.get(group) else {
            return;
        };
        if range.is_empty() {
            return;
        }
        // `range.len` was bounded by the spans held in memory (see `new`).
        let slots = self
            .slots
            .entry(*group)
            .or_insert_with(|| vec![None; usize::try_from(range.len).unwrap_or(0)]);
        for (i, span) in all_spans
            .get(spans.clone())
            .unwrap_or_default()
            .iter()
            .copied()
            .enumerate()
        {
            let Some(index) = first.checked_add(i as u64) else {
                break;
            };
            let Some(at) = index
                .checked_sub(range.first)
                .and_then(|k| usize::try_from(k).ok())
            else {
                continue;
            };
            if let Some(slot) = slots.get_mut(at) {
                *slot = Some(Slot { pos, span });
            }
        }
    }

    pub(super) fn finish(
        mut self,
        groups: &mut HashMap<u64, Group>,
        mode: RecoveryMode,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        groups.retain(|id, _| self.ranges.contains_key(id));
        for (id, range) in &self.ranges {
            let g = groups.entry(*id).or_default();
            g.entries.clear();
            if range.is_empty() {
                continue;
            }
            let slots = self.slots.remove(id).unwrap_or_default();
            let missing = |i: usize| range.first + i as u64;
            let mut i = 0usize;
            let mut spans = Vec::new();
            while (i as u64) < range.len {
                let Some(Some(head)) = slots.get(i).copied() else {
                    if mode == RecoveryMode::TolerateAny {
                        report.skipped.push(SkippedRange {
                            segment: 0,
                            start: 0,
                            end: 0,
                            reason: format!(
                                "group {id}: entry {} missing below the checkpoint",
                                missing(i)
                            ),
                        });
                        g.entries.clear();
                        break;
                    }
                    return Err(Error::Inconsistent {
                        group: *id,
                        reason: format!(
                            "checkpoint holds entries {}..{} but entry {} is in no segment",
                            range.first,
                            range.first + range.len,
                            missing(i)
                        ),
                    });
                };
                let start = i;
                spans.clear();
                while let Some(Some(s)) = slots.get(i) {
                    if s.pos != head.pos {
                        break;
                    }
                    spans.push(s.span);
                    i += 1;
                }
                let first = missing(start);
                let run = Run {
                    first,
                    segment: head.pos.segment,
                    rec_off: head.pos.rec_off,
                    rec_len: head.pos.rec_len,
                };
                g.entries
                    .try_append(first, run, &spans)
                    .map_err(|e| Error::Inconsistent {
                        group: *id,
                        reason: e.to_string(),
                    })?;
            }
        }
        Ok(())
    }
}

/// Replays one segment's records: those starting below `old_until` (the ones the checkpoint
/// covers) into `old`, the others into `groups`, after finishing `old` (once, at the first
/// record the checkpoint does not cover).
pub(super) fn replay_segment(
    id: u64,
    records: Records,
    old: &mut Option<OldReplay>,
    old_until: u64,
    groups: &mut HashMap<u64, Group>,
    mode: RecoveryMode,
    report: &mut RecoveryReport,
) -> Result<()> {
    let segment = segment_u32(id)?;
    let mut ops = records.ops.into_iter();
    let mut done = 0;
    for rec in &records.recs {
        report.records += 1;
        let pos = RecordPos {
            segment,
            rec_off: rec.offset,
            rec_len: rec.len,
        };
        let covered = u64::from(rec.offset) < old_until;
        if !covered {
            if let Some(o) = old.take() {
                o.finish(groups, mode, report)?;
            }
        }
        for op in ops.by_ref().take(rec.ops_end.saturating_sub(done)) {
            if covered {
                if let Some(o) = old.as_mut() {
                    o.apply(&op, &records.spans, pos);
                }
                continue;
            }
            let group = op.group();
            if let Err(reason) = apply_op(groups, op, &records.spans, pos, &mut ApplyCtx::default())
            {
                if mode != RecoveryMode::TolerateAny {
                    return Err(Error::Inconsistent {
                        group,
                        reason: format!("segment {id}, record at {}: {reason}", rec.offset),
                    });
                }
                // One report per group and segment, however many appends in a row misfit.
                let end = u64::from(rec.offset) + u64::from(rec.len);
                let prefix = format!("group {group}: ");
                match report.skipped.last_mut() {
                    Some(last) if last.segment == id && last.reason.starts_with(&prefix) => {
                        last.end = end;
                    }
                    _ => report.skipped.push(SkippedRange {
                        segment: id,
                        start: u64::from(rec.offset),
                        end,
                        reason: format!(
                            "{reason} (and any later appends to the group in this range)"
                        ),
                    }),
                }
            }
        }
        done = rec.ops_end;
    }
    Ok(())
}
