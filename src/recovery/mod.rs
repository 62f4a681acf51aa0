//! Recovery: scan every segment in parallel ([`scan`]), classify damage against the proven
//! durable points, replay the records in segment order into a fresh index ([`replay`]), then
//! repair the directory and make every accepted byte durable.
//!
//! Invariants:
//! - Nothing is changed on disk until every check has passed.
//! - Data is proven durable when it lies in a segment followed by one holding a record or sync
//!   marker, before the `synced_to` of an intact sync marker of its segment, or before the
//!   length a valid `SEAL` file names ([`seal`]). Damage to proven-durable data is
//!   [`Error::Corruption`] in every mode but [`RecoveryMode::TolerateAny`], and is never cut.
//!   Only bytes past the last proven-durable point of the last segments may be cut as a torn
//!   tail (TolerateTail), and a cut is truncated and synced so cut bytes never come back.
//! - Before the engine takes writes, every segment whose accepted bytes were not proven durable
//!   by the log itself (markers, a later segment, the seal; not the checkpoint) is fsynced, and so is the directory: after a process kill they may still be only in the
//!   page cache.
//! - Records the checkpoint covers (those of segments below its segment, and those of its segment
//!   starting below its offset) only position entries; the checkpoint supplies metadata and the
//!   exact entry range each group must end up with. The covering segment is proven durable up
//!   to the covered offset (the checkpoint was stored only after those records were durable);
//!   a covering segment whose records end before it is corruption.
//! - No length read from disk is used to slice or allocate before it is checked against the
//!   bytes present; no input makes recovery panic.

#![deny(clippy::indexing_slicing, clippy::cast_possible_truncation)]

pub(crate) mod replay;
pub(crate) mod scan;
pub(crate) mod seal;
pub(crate) mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};
use crate::index::Group;
use crate::options::{Options, RecoveryMode};
use crate::segment::{parse_segment_name, SEGMENT_EXT, SEGMENT_HEADER_LEN, TMP_EXT};

pub(crate) use scan::scan_records;
pub(crate) use seal::{seal_clean_shutdown, SyncPoint};

use replay::{replay_segment, segment_u32, OldReplay};
use scan::{scan_all, SegmentScan};
use seal::Seal;

/// A range of bytes recovery skipped in [`RecoveryMode::TolerateAny`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedRange {
    /// Segment id.
    pub segment: u64,
    /// First byte skipped.
    pub start: u64,
    /// One past the last byte skipped.
    pub end: u64,
    /// Why.
    pub reason: String,
}

/// A torn tail recovery cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TailCut {
    /// The segment id.
    pub segment: u64,
    /// Where the cut starts (the end of the last intact record).
    pub offset: u64,
    /// Bytes dropped.
    pub bytes: u64,
}

/// What [`Engine::open`](crate::Engine::open) found and did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Entries in the index after recovery.
    pub entries: u64,
    /// Bytes of segment files scanned.
    pub bytes: u64,
    /// A torn tail cut off. Only bytes past the last proven-durable point are ever cut.
    pub tail_cut: Option<TailCut>,
    /// Damaged ranges skipped ([`RecoveryMode::TolerateAny`] only).
    pub skipped: Vec<SkippedRange>,
    /// Segments removed because the checkpoint had already made them dead.
    pub stale_removed: Vec<u64>,
    /// Whether a checkpoint was loaded.
    pub checkpoint: bool,
    /// Whether the log had been sealed by a clean shutdown (a valid seal file naming a
    /// segment recovery read).
    pub clean_seal: bool,
    /// Why a seal file present was not used (damaged), if it was not.
    pub seal_ignored: Option<String>,
    /// Segments fsynced by recovery because their accepted bytes were not proven durable
    /// (the log was not closed cleanly).
    pub synced_segments: Vec<u64>,
    /// Wall time of recovery.
    pub duration: Duration,
}

/// What recovery hands to the engine.
pub(crate) struct Recovered {
    pub(crate) groups: HashMap<u64, Group>,
    pub(crate) files: BTreeMap<u64, Arc<dyn FsFile>>,
    /// The trailing segments that hold no record (oldest first): they can take writes.
    pub(crate) empty_tail: Vec<(u64, Arc<dyn FsFile>)>,
    /// Id for the next segment to create.
    pub(crate) next_segment: u64,
    /// The last segment holding records and its length after repair (cut to its last record
    /// and synced, or proven durable): the next segment's first marker declares it.
    pub(crate) last_sealed: Option<(u64, u64)>,
    pub(crate) report: RecoveryReport,
}

/// Up to where each scanned segment is proven durable (`u64::MAX`: the whole segment).
fn durable_points(scans: &[SegmentScan], seal: Option<Seal>) -> Vec<u64> {
    let mut later_holds_records = false;
    let mut points = vec![0; scans.len()];
    for (s, point) in scans.iter().zip(points.iter_mut()).rev() {
        let sealed_later = seal.is_some_and(|seal| seal.segment > s.id);
        let sealed_here = seal
            .filter(|seal| seal.segment == s.id)
            .map_or(0, |x| x.len);
        *point = if later_holds_records || sealed_later {
            u64::MAX
        } else {
            s.parts.records.synced_to.max(sealed_here)
        };
        later_holds_records |= s.holds_records();
    }
    points
}

/// Raises the durable point of the segment a checkpoint covers (`covered`: its segment and
/// offset) to the covered offset: the checkpoint was stored only once every record it covers
/// was durable. Recovery and `inspect`'s verification both apply it.
fn raise_to_checkpoint(scans: &[SegmentScan], points: &mut [u64], covered: Option<(u64, u64)>) {
    let Some((segment, offset)) = covered.filter(|&(_, o)| o > SEGMENT_HEADER_LEN) else {
        return;
    };
    for (s, point) in scans.iter().zip(points.iter_mut()) {
        if s.id == segment {
            *point = (*point).max(offset);
        }
    }
}

/// A segment followed by a record was sealed by its rotation: cut to its last record and
/// fdatasynced before the next segment took one. So it must end exactly at its last record
/// (a zero tail there means records were lost, not that a write was torn), and at the length
/// the next segment's first marker declares, when it declares one.
fn check_sealed_lengths(scans: &[SegmentScan], durable: &[u64]) -> Result<()> {
    for (i, (s, &point)) in scans.iter().zip(durable).enumerate() {
        if s.parts.damage.is_some() {
            continue;
        }
        let end = s.parts.valid_end;
        let declared = scans
            .get(i + 1)
            .filter(|next| next.id.checked_sub(1) == Some(s.id))
            .map(|next| next.parts.records.prev_sealed_len)
            .filter(|&len| len > 0);
        if let Some(len) = declared {
            if end != len || s.file_len != len {
                return Err(Error::corruption(
                    s.id,
                    end.min(len),
                    format!(
                        "segment holds {end} bytes of records in a {}-byte file, but was sealed at {len} bytes",
                        s.file_len
                    ),
                ));
            }
        }
        if point == u64::MAX && s.holds_records() && s.file_len > end {
            return Err(Error::corruption(
                s.id,
                end,
                "bytes after the last record of a segment sealed by rotation (lost records?)",
            ));
        }
    }
    Ok(())
}

/// Rebuilds the index from the data directory.
pub(crate) fn recover(fs: &dyn FileSystem, dir: &Path, opts: &Options) -> Result<Recovered> {
    let started = Instant::now();
    let mode = opts.recovery_mode;
    let mut report = RecoveryReport::default();
    let names = fs
        .list(dir)
        .map_err(|e| Error::io("listing the data directory", e))?;

    let checkpoint = Checkpoint::load(fs, dir, &names)?;
    report.checkpoint = checkpoint.is_some();
    let ids: BTreeSet<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();

    // Which segments must exist, and which the checkpoint already made dead.
    // The checkpoint covers the log below (covers_below, covers_offset): whole segments below
    // `covers_below`, and the records of that segment starting below `covers_offset`.
    let (covers_below, covers_offset, survivors): (u64, u64, BTreeSet<u64>) = match &checkpoint {
        Some(c) => (
            c.covers_below,
            c.covers_offset,
            c.survivors.iter().copied().collect(),
        ),
        None => (1, SEGMENT_HEADER_LEN, BTreeSet::new()),
    };
    for &s in &survivors {
        if s >= covers_below || !ids.contains(&s) {
            return Err(Error::MissingSegment { segment: s });
        }
    }
    let stale: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|&i| i < covers_below && !survivors.contains(&i))
        .collect();
    let max = ids.iter().next_back().copied();
    if let Some(max) = max.filter(|&m| m >= covers_below) {
        for id in covers_below..=max {
            if !ids.contains(&id) {
                return Err(Error::MissingSegment { segment: id });
            }
        }
    } else if checkpoint.is_some() {
        return Err(Error::MissingSegment {
            segment: covers_below,
        });
    }
    let live: Vec<u64> = survivors
        .iter()
        .copied()
        .chain(ids.iter().copied().filter(|&i| i >= covers_below))
        .collect();
    for &id in &live {
        segment_u32(id)?;
    }

    // The clean-shutdown seal: it names a segment that must still be here (unless the
    // checkpoint has made it dead since).
    let seal = match seal::load(fs, dir, &names)? {
        Ok(seal) => seal,
        Err(reason) => {
            report.seal_ignored = Some(reason);
            None
        }
    };
    let seal = seal.filter(|s| s.segment >= covers_below || survivors.contains(&s.segment));
    if let Some(s) = seal {
        if !live.contains(&s.segment) && mode != RecoveryMode::TolerateAny {
            return Err(Error::MissingSegment { segment: s.segment });
        }
        report.clean_seal = live.contains(&s.segment);
    }

    let mut scans = scan_all(fs, dir, &live, opts)?;
    let mut durable = durable_points(&scans, seal);
    // What the log itself proves, before the checkpoint's contribution below: decides which
    // segments recovery fsyncs. A checkpoint proves the records it covers durable, but not the
    // segment's length (a rotation's trim may not have been synced before a kill).
    let proven_by_log = durable.clone();
    let covered = checkpoint
        .is_some()
        .then_some((covers_below, covers_offset));
    raise_to_checkpoint(&scans, &mut durable, covered);
    // The covering segment must hold records up to the covered offset.
    for s in &scans {
        if checkpoint.is_some() && s.id == covers_below && covers_offset > SEGMENT_HEADER_LEN {
            let end = s
                .parts
                .damage
                .as_ref()
                .map_or(s.parts.valid_end, |d| d.offset);
            if end < covers_offset && mode != RecoveryMode::TolerateAny {
                return Err(Error::corruption(
                    s.id,
                    end,
                    format!(
                        "the segment's records end at {end} but the checkpoint covers it up to {covers_offset}"
                    ),
                ));
            }
        }
    }

    if mode != RecoveryMode::TolerateAny {
        check_sealed_lengths(&scans, &durable)?;
    }

    // Classify damage: below a proven-durable point it is corruption; past it, a torn tail.
    let mut cuts: Vec<usize> = Vec::new();
    for (i, (s, &point)) in scans.iter().zip(&durable).enumerate() {
        report.skipped.extend(s.parts.skipped.iter().cloned());
        if let Some(seal) = seal.filter(|seal| seal.segment == s.id) {
            let end = s
                .parts
                .damage
                .as_ref()
                .map_or(s.parts.valid_end, |d| d.offset);
            if end < seal.len && s.parts.damage.is_none() && mode != RecoveryMode::TolerateAny {
                return Err(Error::corruption(
                    s.id,
                    end,
                    format!(
                        "the segment's data ends at {end} but a clean shutdown sealed it at {}",
                        seal.len
                    ),
                ));
            }
        }
        let Some(d) = &s.parts.damage else { continue };
        if d.offset == 0 || d.offset < point {
            let why = if d.offset == 0 {
                d.reason.clone()
            } else {
                format!(
                    "{} (in data proven durable up to {})",
                    d.reason,
                    point.min(s.file_len)
                )
            };
            return Err(Error::corruption(s.id, d.offset, why));
        }
        match mode {
            RecoveryMode::TolerateTail => cuts.push(i),
            RecoveryMode::Strict => {
                return Err(Error::TornTail {
                    segment: s.id,
                    offset: d.offset,
                })
            }
            // Damage is skipped and reported by the scan in this mode.
            RecoveryMode::TolerateAny => {}
        }
    }

    // (Replay takes the decoded records out of the scans.)
    let last_with_records = scans.iter().rposition(SegmentScan::holds_records);

    // Replay in order. Below the checkpoint, the checkpoint fixes each group's range and
    // metadata; the segments only say where each index was last written. Truncate, purge and
    // remove records there may be gone with deleted segments, so they are not replayed: the
    // latest surviving write of an index inside the range is its current version, because the
    // current version of an index is by definition its latest write, and it is live, so its
    // segment was kept.
    let mut groups: HashMap<u64, Group> = HashMap::new();
    let mut old = checkpoint
        .as_ref()
        .map(|c| OldReplay::new(c, &scans))
        .transpose()?;
    if let Some(c) = &checkpoint {
        for (id, meta) in &c.groups {
            let g = groups.entry(*id).or_default();
            g.vote = meta.vote.clone();
            g.committed = meta.committed.clone();
            g.kv = meta.kv.iter().cloned().collect();
        }
    }
    for s in &mut scans {
        // Records starting below this offset are covered by the checkpoint.
        let old_until = match s.id.cmp(&covers_below) {
            std::cmp::Ordering::Less => u64::MAX,
            std::cmp::Ordering::Equal => covers_offset,
            std::cmp::Ordering::Greater => 0,
        };
        report.segments += 1;
        report.bytes += s.file_len;
        let records = std::mem::take(&mut s.parts.records);
        replay_segment(
            s.id,
            records,
            &mut old,
            old_until,
            &mut groups,
            mode,
            &mut report,
        )?;
    }
    if let Some(o) = old.take() {
        o.finish(&mut groups, mode, &mut report)?;
    }

    // Every check passed: now repair the directory.

    for name in &names {
        let segment_tmp =
            name.ends_with(TMP_EXT) && name.ends_with(&format!("{SEGMENT_EXT}{TMP_EXT}"));
        if segment_tmp || checkpoint::is_temp(name) || name == seal::SEAL_TMP {
            fs.remove(&dir.join(name))
                .map_err(|e| Error::io(format!("removing leftover {name}"), e))?;
        }
    }
    for (i, (s, &point)) in scans.iter().zip(&proven_by_log).enumerate() {
        let cut = cuts.contains(&i);
        if cut {
            s.file
                .set_len(s.parts.valid_end)
                .map_err(|e| Error::io(format!("cutting the torn tail of segment {}", s.id), e))?;
            report.tail_cut = Some(TailCut {
                segment: s.id,
                offset: s.parts.valid_end,
                bytes: s.file_len - s.parts.valid_end,
            });
        }
        // A segment holding records that ends in zeros (the log was closed or crashed while it
        // was active) is sealed now, as a rotation would: cut to its last record, so later
        // recoveries read no zero tail. Empty segments are left whole: they will take writes.
        let trim = !cut
            && s.parts.damage.is_none()
            && s.parts.skipped.is_empty()
            && s.parts.valid_end > SEGMENT_HEADER_LEN
            && s.file_len > s.parts.valid_end;
        if trim {
            s.file
                .set_len(s.parts.valid_end)
                .map_err(|e| Error::io(format!("trimming segment {}", s.id), e))?;
        }
        // Accepted bytes not proven durable may be only in the page cache (a process kill):
        // make them durable before the engine writes anything after them.
        let unproven = s.parts.valid_end > SEGMENT_HEADER_LEN && s.parts.valid_end > point;
        if cut || trim || unproven {
            s.file
                .sync_data()
                .map_err(|e| Error::io(format!("syncing segment {} during recovery", s.id), e))?;
            report.synced_segments.push(s.id);
        }
    }
    for &id in &stale {
        let name = crate::segment::segment_name(id);
        fs.remove(&dir.join(&name))
            .map_err(|e| Error::io(format!("removing dead segment {id}"), e))?;
        report.stale_removed.push(id);
    }
    // Always, not only after removals: the names recovery read (a segment renamed into place,
    // a removal) may be those of a killed process that never synced the directory; the engine
    // is about to rely on them (it reuses empty segments), so they must be durable first.
    fs.sync_dir(dir)
        .map_err(|e| Error::io("syncing the data directory after recovery", e))?;

    for g in groups.values_mut() {
        g.entries.shrink_to_fit();
        report.entries += g.entries.range().len;
    }
    let empty = |s: &SegmentScan| {
        s.parts.valid_end == SEGMENT_HEADER_LEN
            && s.parts.damage.is_none()
            && s.parts.skipped.is_empty()
            && s.id >= covers_below
    };
    let tail_len = scans.iter().rev().take_while(|s| empty(s)).count();
    let empty_tail = scans
        .iter()
        .skip(scans.len() - tail_len)
        .map(|s| (s.id, s.file.clone()))
        .collect();
    let next_segment = max.map_or(1, |m| m + 1).max(covers_below);
    // Only a segment recovery left exactly at its last record (no damage, nothing skipped).
    let last_sealed = last_with_records
        .and_then(|i| scans.get(i))
        .filter(|s| {
            s.parts.damage.is_none()
                || cuts
                    .iter()
                    .any(|&i| scans.get(i).is_some_and(|c| c.id == s.id))
        })
        .filter(|s| s.parts.skipped.is_empty())
        .map(|s| (s.id, s.parts.valid_end));
    let files = scans.into_iter().map(|s| (s.id, s.file)).collect();
    report.duration = started.elapsed();
    Ok(Recovered {
        groups,
        files,
        empty_tail,
        next_segment,
        last_sealed,
        report,
    })
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "tests index known fixtures"
)]
mod tests {
    use super::*;
    use crate::checkpoint::GroupMeta;
    use crate::codec::{seal_record, BodyBuilder, EntrySpan};
    use crate::fs::StdFs;
    use crate::index::Range;
    use crate::segment::{encode_header, segment_name};

    /// A record appending `n` entries at `first` to `group`.
    fn append_record(segment: u64, group: u64, first: u64, n: usize) -> Vec<u8> {
        let mut b = BodyBuilder::default();
        let mut lens: Vec<EntrySpan> = Vec::new();
        let entries: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 10]).collect();
        b.append(group, first, &entries, &mut lens).unwrap();
        let mut rec = b.encode(usize::MAX);
        seal_record(&mut rec, segment);
        rec
    }

    fn write_segment(dir: &Path, id: u64, records: &[Vec<u8>]) {
        let mut data = encode_header(id).to_vec();
        for r in records {
            data.extend_from_slice(r);
        }
        std::fs::write(dir.join(segment_name(id)), data).unwrap();
    }

    fn opts(mode: RecoveryMode) -> Options {
        Options::default().recovery_mode(mode)
    }

    #[test]
    fn an_append_that_does_not_fit_is_inconsistent_not_a_fresh_start() {
        let tmp = tempfile::tempdir().unwrap();
        // Group 1 holds 1..=3, then a record appends at 10: a gap.
        write_segment(
            tmp.path(),
            1,
            &[append_record(1, 1, 1, 3), append_record(1, 1, 10, 2)],
        );
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTail] {
            match recover(&StdFs, tmp.path(), &opts(mode)) {
                Err(Error::Inconsistent { group: 1, .. }) => {}
                Err(e) => panic!("{mode:?}: {e:?}"),
                Ok(r) => panic!(
                    "{mode:?}: opened with group 1 = {:?}",
                    r.groups[&1].entries.range()
                ),
            }
        }
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateAny)).unwrap();
        assert_eq!(r.groups[&1].entries.range(), Range { first: 1, len: 3 });
        assert_eq!(r.report.skipped.len(), 1, "{:?}", r.report.skipped);
    }

    #[test]
    fn segment_ids_beyond_u32_are_refused_not_wrapped() {
        let tmp = tempfile::tempdir().unwrap();
        let big = (1u64 << 32) + 1;
        // Segment 1 survives below the checkpoint with group 2's entry; segment 2^32 + 1 holds
        // group 1's. Wrapped to u32, group 1's run would name segment 1 and serve group 2's bytes.
        write_segment(tmp.path(), 1, &[append_record(1, 2, 1, 1)]);
        write_segment(tmp.path(), big, &[append_record(big, 1, 1, 1)]);
        let c = Checkpoint {
            covers_below: big,
            covers_offset: SEGMENT_HEADER_LEN,
            survivors: vec![1],
            groups: vec![(
                2,
                GroupMeta {
                    range: Range { first: 1, len: 1 },
                    ..GroupMeta::default()
                },
            )],
        };
        c.store(&StdFs, tmp.path()).unwrap();
        match recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)) {
            Err(Error::Corruption { segment, .. }) => assert_eq!(segment, big),
            Err(e) => panic!("{e:?}"),
            Ok(r) => panic!(
                "opened; group 1's entry is said to be in segment {:?}",
                r.groups[&1].entries.locate(1).map(|l| l.run.segment)
            ),
        }
    }

    #[test]
    fn a_checkpoint_inside_a_segment_covers_the_records_before_its_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let r1 = append_record(1, 1, 1, 2);
        let r2 = append_record(1, 1, 3, 2);
        write_segment(tmp.path(), 1, &[r1.clone(), r2.clone()]);
        let after_r1 = SEGMENT_HEADER_LEN + r1.len() as u64;
        // Covers r1 only: group 1 held 1..=2 there (the checkpoint says so, with a vote r1 never
        // wrote); r2 is replayed on top.
        let c = Checkpoint {
            covers_below: 1,
            covers_offset: after_r1,
            survivors: vec![],
            groups: vec![(
                1,
                GroupMeta {
                    range: Range { first: 1, len: 2 },
                    vote: Some((*b"v").into()),
                    ..GroupMeta::default()
                },
            )],
        };
        c.store(&StdFs, tmp.path()).unwrap();
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        let g = &r.groups[&1];
        assert_eq!(g.entries.range(), Range { first: 1, len: 4 });
        assert_eq!(g.vote.as_deref(), Some(&b"v"[..]));
        assert_eq!(
            g.entries.locate(2).unwrap().run.rec_off,
            SEGMENT_HEADER_LEN as u32
        );
        assert_eq!(g.entries.locate(3).unwrap().run.rec_off, after_r1 as u32);
        // A checkpoint covering more than the segment holds: records it covered were lost.
        let end = after_r1 + r2.len() as u64;
        let c = Checkpoint {
            covers_offset: end + 40,
            ..c
        };
        c.store(&StdFs, tmp.path()).unwrap();
        match recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)) {
            Err(Error::Corruption {
                segment: 1, offset, ..
            }) => assert_eq!(offset, end),
            other => panic!("{:?}", other.map(|r| r.report)),
        }
        // Damage below the covered offset is corruption, never a torn tail to cut.
        let c = Checkpoint {
            covers_offset: end,
            ..c
        };
        c.store(&StdFs, tmp.path()).unwrap();
        let path = tmp.path().join(segment_name(1));
        let mut bad = std::fs::read(&path).unwrap();
        bad[after_r1 as usize + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)),
            Err(Error::Corruption { segment: 1, .. })
        ));
    }

    #[test]
    fn damage_before_a_later_marker_is_corruption_after_it_a_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let r1 = append_record(1, 1, 1, 2);
        let r2 = append_record(1, 1, 3, 2);
        let synced_to = SEGMENT_HEADER_LEN + r1.len() as u64;
        let marker = crate::codec::encode_sync_marker(
            1,
            crate::codec::SyncMarker {
                synced_to,
                prev_sealed_len: 0,
            },
        );
        let r3 = append_record(1, 1, 5, 2);
        write_segment(tmp.path(), 1, &[r1.clone(), r2.clone(), marker, r3]);
        let path = tmp.path().join(segment_name(1));
        let good = std::fs::read(&path).unwrap();
        // A flip in r1 (declared synced by the marker): corruption in every strictness.
        let mut bad = good.clone();
        bad[SEGMENT_HEADER_LEN as usize + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTail] {
            match recover(&StdFs, tmp.path(), &opts(mode)) {
                Err(Error::Corruption {
                    segment: 1, offset, ..
                }) => {
                    assert_eq!(offset, SEGMENT_HEADER_LEN)
                }
                other => panic!("{mode:?}: {:?}", other.map(|r| r.report)),
            }
        }
        // A flip in r2 (after the synced point): a torn tail, cut in TolerateTail.
        let mut bad = good.clone();
        let r2_at = synced_to as usize;
        bad[r2_at + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::Strict)),
            Err(Error::TornTail { segment: 1, .. })
        ));
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        assert_eq!(r.report.tail_cut.map(|c| c.offset), Some(synced_to));
        assert_eq!(r.groups[&1].entries.range(), Range { first: 1, len: 2 });
        assert_eq!(r.report.synced_segments, vec![1]);
    }

    #[test]
    fn a_shutdown_on_an_empty_segment_seals_the_one_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let r1 = append_record(1, 1, 1, 2);
        let r2 = append_record(1, 1, 3, 2);
        write_segment(tmp.path(), 1, &[r1.clone(), r2]);
        write_segment(tmp.path(), 2, &[]);
        let empty = StdFs.open(&tmp.path().join(segment_name(2))).unwrap();
        seal_clean_shutdown(&StdFs, tmp.path(), 2, empty.as_ref(), SEGMENT_HEADER_LEN).unwrap();
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        assert!(r.report.clean_seal);
        // Segment 1 cut at a record boundary: no damage to see, but the seal pins its length.
        let path = tmp.path().join(segment_name(1));
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..SEGMENT_HEADER_LEN as usize + r1.len()]).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)),
            Err(Error::Corruption { segment: 1, .. })
        ));
    }

    #[test]
    fn a_seal_file_proves_the_whole_segment_and_names_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let r1 = append_record(1, 1, 1, 2);
        let r2 = append_record(1, 1, 3, 2);
        write_segment(tmp.path(), 1, &[r1.clone(), r2.clone()]);
        let end = SEGMENT_HEADER_LEN + (r1.len() + r2.len()) as u64;
        seal::store(
            &StdFs,
            tmp.path(),
            Seal {
                segment: 1,
                len: end,
            },
        )
        .unwrap();
        let path = tmp.path().join(segment_name(1));
        let good = std::fs::read(&path).unwrap();
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        assert!(r.report.clean_seal && r.report.synced_segments.is_empty());
        // The last record cut short, or zeroed: the seal says it was durable.
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)),
            Err(Error::Corruption { segment: 1, .. })
        ));
        let mut zeroed = good.clone();
        zeroed[SEGMENT_HEADER_LEN as usize + r1.len()..].fill(0);
        std::fs::write(&path, &zeroed).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)),
            Err(Error::Corruption { segment: 1, .. })
        ));
        // Garbage appended after the sealed end: a tail, cut.
        let mut longer = good.clone();
        longer.extend_from_slice(&[0xAB; 40]);
        std::fs::write(&path, &longer).unwrap();
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        assert_eq!(
            r.report.tail_cut,
            Some(TailCut {
                segment: 1,
                offset: end,
                bytes: 40
            })
        );
        // The sealed segment deleted: missing, not an empty log.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)),
            Err(Error::MissingSegment { segment: 1 })
        ));
    }

    /// A recycled segment (flag set) holding `records`, the terminator, then stale bytes of
    /// the file's previous segment `old`.
    fn write_recycled(dir: &Path, id: u64, records: &[Vec<u8>], old: u64) -> u64 {
        let (mut data, end) = crate::segment::recycled_image(id, records);
        for i in 0..20 {
            data.extend_from_slice(&append_record(old, 5, 1 + i * 3, 3));
        }
        std::fs::write(dir.join(segment_name(id)), data).unwrap();
        end
    }

    #[test]
    fn a_recycled_segment_with_stale_bytes_opens_in_strict_mode_and_is_trimmed() {
        let tmp = tempfile::tempdir().unwrap();
        write_segment(tmp.path(), 1, &[append_record(1, 1, 1, 2)]);
        let end = write_recycled(
            tmp.path(),
            2,
            &[append_record(2, 1, 3, 2), append_record(2, 1, 5, 1)],
            1,
        );
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::Strict)).unwrap();
        assert_eq!(r.groups[&1].entries.range(), Range { first: 1, len: 5 });
        assert!(r.report.tail_cut.is_none() && r.report.skipped.is_empty());
        // Sealed as a rotation would: cut to its last record (the stale bytes go).
        let len = std::fs::metadata(tmp.path().join(segment_name(2)))
            .unwrap()
            .len();
        assert_eq!(len, end);
        assert!(recover(&StdFs, tmp.path(), &opts(RecoveryMode::Strict)).is_ok());
    }

    #[test]
    fn records_lost_before_a_marker_in_a_recycled_segment_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let r1 = append_record(1, 1, 1, 2);
        let r2 = append_record(1, 1, 3, 2);
        let synced_to = SEGMENT_HEADER_LEN + (r1.len() + r2.len()) as u64;
        let marker = crate::codec::encode_sync_marker(
            1,
            crate::codec::SyncMarker {
                synced_to,
                prev_sealed_len: 0,
            },
        );
        let r3 = append_record(1, 1, 5, 1);
        write_recycled(tmp.path(), 1, &[r1.clone(), r2.clone(), marker, r3], 7);
        let path = tmp.path().join(segment_name(1));
        let good = std::fs::read(&path).unwrap();
        // r2 (synced, the marker says so) zeroed: a zero header, then an intact marker of this
        // segment. Corruption in every mode but TolerateAny, never a clean end.
        let mut lost = good.clone();
        let at = SEGMENT_HEADER_LEN as usize + r1.len();
        lost[at..at + r2.len()].fill(0);
        std::fs::write(&path, &lost).unwrap();
        for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTail] {
            match recover(&StdFs, tmp.path(), &opts(mode)) {
                Err(Error::Corruption {
                    segment: 1, offset, ..
                }) => assert_eq!(offset, at as u64),
                other => panic!("{mode:?}: {:?}", other.map(|r| r.report)),
            }
        }
        // r3 (after the marker, never synced) torn: a torn tail, cut in TolerateTail.
        let mut torn = good.clone();
        let r3_at = synced_to as usize + crate::codec::SYNC_MARKER_LEN;
        torn[r3_at + 20] ^= 1;
        std::fs::write(&path, &torn).unwrap();
        assert!(matches!(
            recover(&StdFs, tmp.path(), &opts(RecoveryMode::Strict)),
            Err(Error::TornTail { segment: 1, .. })
        ));
        let r = recover(&StdFs, tmp.path(), &opts(RecoveryMode::TolerateTail)).unwrap();
        assert_eq!(r.report.tail_cut.map(|c| c.offset), Some(r3_at as u64));
        assert_eq!(r.groups[&1].entries.range(), Range { first: 1, len: 4 });
    }
}
