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
//!   is fsynced: after a process kill they may still be only in the page cache.
//! - Records of segments below the checkpoint only position entries; the checkpoint supplies
//!   metadata and the exact entry range each group must end up with.
//! - No length read from disk is used to slice or allocate before it is checked against the
//!   bytes present; no input makes recovery panic.

pub(crate) mod replay;
pub(crate) mod scan;
pub(crate) mod seal;

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
pub(crate) use seal::{seal_clean_shutdown, with_marker, SyncPoint};

use replay::{replay_segment, segment_u32, OldReplay};
use scan::{scan_all, SegmentScan};
use seal::Seal;

/// A range of bytes recovery skipped in [`RecoveryMode::TolerateAny`].
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What [`Engine::open`](crate::Engine::open) found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Entries in the index after recovery.
    pub entries: u64,
    /// Bytes of segment files scanned.
    pub bytes: u64,
    /// A torn tail cut off: (segment, offset where the cut starts, bytes dropped). Only bytes
    /// past the last proven-durable point are ever cut.
    pub tail_cut: Option<(u64, u64, u64)>,
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
    pub(crate) report: RecoveryReport,
}

/// Up to where each scanned segment is proven durable (`u64::MAX`: the whole segment).
fn durable_points(scans: &[SegmentScan], seal: Option<Seal>) -> Vec<u64> {
    let mut later_holds_records = false;
    let mut points = vec![0; scans.len()];
    for (s, point) in scans.iter().zip(points.iter_mut()).rev() {
        let sealed_later = seal.is_some_and(|seal| seal.segment > s.id);
        let sealed_here = seal.filter(|seal| seal.segment == s.id).map_or(0, |x| x.len);
        *point = if later_holds_records || sealed_later {
            u64::MAX
        } else {
            s.parts.records.synced_to.max(sealed_here)
        };
        later_holds_records |= s.holds_records();
    }
    points
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
    let (covers_below, survivors): (u64, BTreeSet<u64>) = match &checkpoint {
        Some(c) => (c.covers_below, c.survivors.iter().copied().collect()),
        None => (1, BTreeSet::new()),
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
    let durable = durable_points(&scans, seal);

    // Classify damage: below a proven-durable point it is corruption; past it, a torn tail.
    let mut cuts: Vec<usize> = Vec::new();
    for (i, (s, &point)) in scans.iter().zip(&durable).enumerate() {
        report.skipped.extend(s.parts.skipped.iter().cloned());
        if let Some(seal) = seal.filter(|seal| seal.segment == s.id) {
            let end = s.parts.damage.as_ref().map_or(s.parts.valid_end, |d| d.offset);
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
                format!("{} (in data proven durable up to {})", d.reason, point.min(s.file_len))
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

    // Replay in order. Below the checkpoint, the checkpoint fixes each group's range and
    // metadata; the segments only say where each index was last written. Truncate, purge and
    // remove records there may be gone with deleted segments, so they are not replayed: the
    // latest surviving write of an index inside the range is its current version, because the
    // current version of an index is by definition its latest write, and it is live, so its
    // segment was kept.
    let mut groups: HashMap<u64, Group> = HashMap::new();
    let mut old = checkpoint
        .as_ref()
        .map(|c| OldReplay::new(c, &scans, covers_below))
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
        if s.id >= covers_below {
            if let Some(o) = old.take() {
                o.finish(&mut groups, mode, &mut report)?;
            }
        }
        report.segments += 1;
        report.bytes += s.file_len;
        let records = std::mem::take(&mut s.parts.records);
        replay_segment(s.id, records, old.as_mut(), &mut groups, mode, &mut report)?;
    }
    if let Some(o) = old.take() {
        o.finish(&mut groups, mode, &mut report)?;
    }

    // Every check passed: now repair the directory.
    let mut dir_dirty = false;
    for name in &names {
        let segment_tmp = name.ends_with(TMP_EXT) && name.ends_with(&format!("{SEGMENT_EXT}{TMP_EXT}"));
        if segment_tmp || checkpoint::is_temp(name) || name == seal::SEAL_TMP {
            fs.remove(&dir.join(name))
                .map_err(|e| Error::io(format!("removing leftover {name}"), e))?;
            dir_dirty = true;
        }
    }
    for (i, (s, &point)) in scans.iter().zip(&durable).enumerate() {
        let cut = cuts.contains(&i);
        if cut {
            s.file
                .set_len(s.parts.valid_end)
                .map_err(|e| Error::io(format!("cutting the torn tail of segment {}", s.id), e))?;
            report.tail_cut = Some((s.id, s.parts.valid_end, s.file_len - s.parts.valid_end));
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
            s.file.sync_data().map_err(|e| {
                Error::io(format!("syncing segment {} during recovery", s.id), e)
            })?;
            report.synced_segments.push(s.id);
        }
    }
    for &id in &stale {
        let name = crate::segment::segment_name(id);
        fs.remove(&dir.join(&name))
            .map_err(|e| Error::io(format!("removing dead segment {id}"), e))?;
        report.stale_removed.push(id);
        dir_dirty = true;
    }
    if dir_dirty {
        fs.sync_dir(dir)
            .map_err(|e| Error::io("syncing the data directory after recovery", e))?;
    }

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
    let files = scans.into_iter().map(|s| (s.id, s.file)).collect();
    report.duration = started.elapsed();
    Ok(Recovered {
        groups,
        files,
        empty_tail,
        next_segment,
        report,
    })
}
