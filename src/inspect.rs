//! Read-only inspection, verification and explicit repair of a data directory: the library
//! behind `mrwal-ctl`.
//!
//! Job: tell an operator what a directory holds and what a normal [`Engine::open`] of it would
//! do ([`Inspection`]), verify every record and the checkpoint ([`check`]), and only when asked,
//! repair it ([`plan_repair`], [`repair`]).
//!
//! Invariants:
//! - [`Inspection::open`] and [`check`] never change the directory: they create, cut, trim,
//!   remove, rename, preallocate and sync nothing, and so work on a full or read-only disk. They
//!   run recovery's own code (the same scan, classification and replay an open runs) on a file
//!   system that opens files read-only and refuses every write, creation, rename and lock; the
//!   cuts, removals and syncs recovery asks for are recorded instead of done, and that record is
//!   the plan of a normal open ([`PlannedChange`]).
//! - A path that is not an existing directory is an error; nothing is created.
//! - Locking: no lock file is created. When `LOCK` exists, a shared lock is taken on it for the
//!   duration of the scan (an engine opening meanwhile gets [`Error::Locked`]); when an engine
//!   holds it, the inspection still runs and reports `engine_running`: its view may then include
//!   a tail that is being written, which it may classify as torn.
//! - Only [`repair`] writes: a torn tail is cut by opening the engine in
//!   [`RecoveryMode::TolerateTail`]; damage to durable data is dropped exactly as
//!   [`RecoveryMode::TolerateAny`] recovery would, by writing the state that recovery serves into
//!   a new directory beside the old one, checking it, and swapping the two (the old directory is
//!   kept, renamed, never modified).
//! - No input makes this module panic; it allocates from no unchecked length (recovery's rules,
//!   whose code it reuses).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::batch::WriteBatch;
use crate::checkpoint::{Checkpoint, CHECKPOINT_NAME};
use crate::codec::{verify_record, RecordHeader, RECORD_HEADER_LEN};
use crate::engine::{Engine, LOCK_NAME};
use crate::error::{Error, Result};
use crate::fs::{DirLock, FileSystem, FsFile, StdFs};
use crate::index::{Group, Run};
use crate::options::{Options, RecoveryMode, MIN_SEGMENT_SIZE};
use crate::recovery::verify::{load_seal, past_seal, verify_segments};
use crate::recovery::{recover, RecoveryReport, SkippedRange};
use crate::segment::{parse_segment_name, segment_name};

/// Bytes read so far by an inspection, and how many it expects to read: for a progress bar.
/// Cheap to clone; clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct ScanProgress {
    read: Arc<AtomicU64>,
    expected: Arc<AtomicU64>,
}

impl ScanProgress {
    /// A fresh counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of segment and metadata files read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes the work started so far expects to read in all (grows as phases start).
    pub fn bytes_expected(&self) -> u64 {
        self.expected.load(Ordering::Relaxed)
    }

    fn expect(&self, bytes: u64) {
        self.expected.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A change to the directory that a normal open would make (found without making it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlannedChange {
    /// Cut a torn tail: bytes `offset..offset + bytes` of the segment, past its last
    /// proven-durable point.
    CutTornTail {
        /// Segment id.
        segment: u64,
        /// Where the cut starts.
        offset: u64,
        /// Bytes dropped.
        bytes: u64,
    },
    /// Trim zeros (in a recycled segment: zeros, then stale bytes of the older segments the file
    /// held) after the last record of a segment that was active (not damage).
    TrimZeroTail {
        /// Segment id.
        segment: u64,
        /// Where the trim starts (the end of the last record).
        offset: u64,
        /// Bytes dropped (zeros, or a recycled segment's stale bytes).
        bytes: u64,
    },
    /// fdatasync a segment whose accepted bytes were not proven durable.
    SyncSegment {
        /// Segment id.
        segment: u64,
    },
    /// Delete a segment the checkpoint already made dead.
    RemoveStaleSegment {
        /// Segment id.
        segment: u64,
    },
    /// Delete a leftover temporary file.
    RemoveLeftover {
        /// File name.
        name: String,
    },
    /// Create a new, empty segment (for writes, or prepared as the next one).
    CreateSegment {
        /// Segment id.
        segment: u64,
    },
    /// Delete an empty segment the engine will not use.
    RemoveUnusedSegment {
        /// Segment id.
        segment: u64,
    },
}

impl PlannedChange {
    /// Whether the change drops bytes that held data (a torn tail); the others drop nothing
    /// (zeros, dead or temporary files) or only add.
    pub fn drops_data(&self) -> bool {
        matches!(self, PlannedChange::CutTornTail { .. })
    }
}

impl fmt::Display for PlannedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlannedChange::CutTornTail {
                segment,
                offset,
                bytes,
            } => write!(
                f,
                "cut torn tail of segment {segment}: {bytes} bytes from offset {offset}"
            ),
            PlannedChange::TrimZeroTail {
                segment,
                offset,
                bytes,
            } => write!(
                f,
                "trim {bytes} bytes of zeros (or stale bytes of a recycled file) after the last record of segment {segment} (offset {offset})"
            ),
            PlannedChange::SyncSegment { segment } => write!(f, "fdatasync segment {segment}"),
            PlannedChange::RemoveStaleSegment { segment } => {
                write!(f, "delete segment {segment} (dead under the checkpoint)")
            }
            PlannedChange::RemoveLeftover { name } => write!(f, "delete leftover file {name}"),
            PlannedChange::CreateSegment { segment } => write!(f, "create segment {segment}"),
            PlannedChange::RemoveUnusedSegment { segment } => {
                write!(f, "delete unused empty segment {segment}")
            }
        }
    }
}

/// One segment file of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentFile {
    /// Segment id.
    pub id: u64,
    /// File name.
    pub name: String,
    /// File size in bytes.
    pub bytes: u64,
}

/// The checkpoint file as found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointState {
    /// No checkpoint file.
    Absent,
    /// A valid checkpoint.
    Valid {
        /// Segments below this id are covered by it.
        covers_below: u64,
        /// Records of segment `covers_below` starting below this offset are covered too
        /// (the segment header's length: none).
        covers_offset: u64,
        /// Segments below `covers_below` that must still exist.
        survivors: Vec<u64>,
        /// Groups it holds metadata for.
        groups: usize,
        /// File size.
        bytes: u64,
    },
    /// The file fails its checks (a normal open refuses the directory).
    Damaged {
        /// What check failed.
        reason: String,
    },
}

/// The clean-shutdown seal file as found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealState {
    /// No seal file (the log was never closed cleanly, or sealed state was not kept).
    Absent,
    /// A valid seal: segment `segment` was durable up to `len` at a clean shutdown.
    Valid {
        /// Segment id.
        segment: u64,
        /// Sealed length.
        len: u64,
    },
    /// A seal file that fails its checks; recovery ignores it.
    Damaged {
        /// What check failed.
        reason: String,
    },
}

/// One group as recovery would serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSummary {
    /// Group id.
    pub id: u64,
    /// First index held (`None`: no entry).
    pub first: Option<u64>,
    /// Last index held (`None`: no entry).
    pub last: Option<u64>,
    /// Entries held.
    pub entries: u64,
    /// Payload bytes of the entries held.
    pub bytes: u64,
    /// The oldest segment holding one of its entries.
    pub oldest_segment: Option<u64>,
    /// Whether a vote is stored.
    pub has_vote: bool,
    /// Whether a committed marker is stored.
    pub has_committed: bool,
    /// Keys stored.
    pub keys: usize,
}

/// What a normal open in the inspected mode would find and do.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenFindings {
    /// Recovery's report, as [`Engine::recovery_report`] would return it (its `tail_cut`,
    /// `stale_removed` and `synced_segments` are what the open would do).
    pub report: RecoveryReport,
    /// Every change the open would make to the directory, in order.
    pub changes: Vec<PlannedChange>,
}

/// The recovered state, kept to serve entries.
struct State {
    groups: BTreeMap<u64, Group>,
    files: BTreeMap<u64, Arc<dyn FsFile>>,
}

/// A read-only view of a data directory: its files, and what recovery in one mode makes of them
/// (without changing anything).
#[non_exhaustive]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// The recovery mode the view was taken in.
    pub mode: RecoveryMode,
    /// Whether an engine held the directory's lock (the view may include a tail being written).
    pub engine_running: bool,
    /// Every segment file, by id.
    pub segments: Vec<SegmentFile>,
    /// Files that are neither segments nor the checkpoint, seal or lock files.
    pub other_files: Vec<String>,
    /// The checkpoint.
    pub checkpoint: CheckpointState,
    /// The seal file.
    pub seal: SealState,
    /// What an open would find and do, or the error it would fail with.
    pub recovery: Result<OpenFindings>,
    state: Option<State>,
    live: Vec<u64>,
}

impl fmt::Debug for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inspection")
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .field("engine_running", &self.engine_running)
            .field("segments", &self.segments)
            .field("checkpoint", &self.checkpoint)
            .field("seal", &self.seal)
            .field("recovery", &self.recovery)
            .finish_non_exhaustive()
    }
}

/// Fails unless `dir` is an existing directory (nothing is created).
fn require_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(format!("opening {dir:?}"), e))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// A shared lock on an existing `LOCK` file (none is created): `Ok(true)` if an engine holds
/// it exclusively.
fn shared_lock(dir: &Path) -> (Option<std::fs::File>, bool) {
    let Ok(file) = std::fs::File::open(dir.join(LOCK_NAME)) else {
        return (None, false);
    };
    match file.try_lock_shared() {
        Ok(()) => (Some(file), false),
        Err(std::fs::TryLockError::WouldBlock) => (None, true),
        Err(std::fs::TryLockError::Error(_)) => (None, false),
    }
}

impl Inspection {
    /// Takes a read-only view of `dir` as recovery in `mode` sees it. Fails only if the
    /// directory cannot be listed (a missing path, not a directory, no permission); what
    /// recovery would refuse is reported in [`Inspection::recovery`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if `dir` does not exist or cannot be listed, [`Error::NotADirectory`] if
    /// it is not a directory. Nothing is created either way.
    pub fn open(
        dir: impl AsRef<Path>,
        mode: RecoveryMode,
        progress: &ScanProgress,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        require_dir(&dir)?;
        let (_lock, engine_running) = shared_lock(&dir);
        let fs = ReadOnlyFs::new(progress.clone());
        let names = fs
            .list(&dir)
            .map_err(|e| Error::io(format!("listing {dir:?}"), e))?;
        let mut segments = Vec::new();
        let mut other_files = Vec::new();
        for name in &names {
            if let Some(id) = parse_segment_name(name) {
                let bytes = std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
                segments.push(SegmentFile {
                    id,
                    name: name.clone(),
                    bytes,
                });
            } else if name != CHECKPOINT_NAME
                && name != crate::recovery::seal::SEAL_NAME
                && name != LOCK_NAME
            {
                other_files.push(name.clone());
            }
        }
        segments.sort_by_key(|s| s.id);
        other_files.sort();
        progress.expect(segments.iter().map(|s| s.bytes).sum());

        let checkpoint = match Checkpoint::load(&fs, &dir, &names) {
            Ok(None) => CheckpointState::Absent,
            Ok(Some(c)) => CheckpointState::Valid {
                covers_below: c.covers_below,
                covers_offset: c.covers_offset,
                survivors: c.survivors.clone(),
                groups: c.groups.len(),
                bytes: std::fs::metadata(dir.join(CHECKPOINT_NAME)).map_or(0, |m| m.len()),
            },
            Err(Error::Checkpoint { reason, .. }) => CheckpointState::Damaged { reason },
            Err(e) => CheckpointState::Damaged {
                reason: e.to_string(),
            },
        };
        let seal = match load_seal(&fs, &dir, &names) {
            Ok(Ok(None)) => SealState::Absent,
            Ok(Ok(Some(s))) => SealState::Valid {
                segment: s.segment,
                len: s.len,
            },
            Ok(Err(reason)) => SealState::Damaged { reason },
            Err(e) => SealState::Damaged {
                reason: e.to_string(),
            },
        };

        let opts = Options::default()
            .recovery_mode(mode)
            .prefill_segments(false);
        let (recovery, state, live) = match recover(&fs, &dir, &opts) {
            Ok(rec) => {
                let changes = planned_changes(&rec.report, &fs.take_log(), &rec);
                let live: Vec<u64> = rec.files.keys().copied().collect();
                let state = State {
                    groups: rec.groups.into_iter().collect(),
                    files: rec.files,
                };
                let findings = OpenFindings {
                    report: rec.report,
                    changes,
                };
                (Ok(findings), Some(state), live)
            }
            Err(e) => {
                // What recovery would have scanned: the live segments by the checkpoint's rule.
                let live = match &checkpoint {
                    CheckpointState::Valid {
                        covers_below,
                        survivors,
                        ..
                    } => segments
                        .iter()
                        .map(|s| s.id)
                        .filter(|id| id >= covers_below || survivors.contains(id))
                        .collect(),
                    _ => segments.iter().map(|s| s.id).collect(),
                };
                (Err(e), None, live)
            }
        };
        Ok(Inspection {
            dir,
            mode,
            engine_running,
            segments,
            other_files,
            checkpoint,
            seal,
            recovery,
            state,
            live,
        })
    }

    /// Every group recovery would serve, by id (empty if recovery would fail).
    pub fn groups(&self) -> Vec<GroupSummary> {
        let Some(state) = &self.state else {
            return Vec::new();
        };
        state
            .groups
            .iter()
            .map(|(&id, g)| {
                let range = g.entries.range();
                let mut bytes = 0;
                g.entries.for_each_run(|_, _, b| bytes += b);
                GroupSummary {
                    id,
                    first: (!range.is_empty()).then_some(range.first),
                    last: range.last(),
                    entries: range.len,
                    bytes,
                    oldest_segment: g.entries.oldest_segment().map(u64::from),
                    has_vote: g.vote.is_some(),
                    has_committed: g.committed.is_some(),
                    keys: g.kv.len(),
                }
            })
            .collect()
    }

    /// The vote, committed marker and keys of `group` as recovery would serve them.
    pub fn group_meta(&self, group: u64) -> Option<GroupMeta> {
        let g = self.state.as_ref()?.groups.get(&group)?;
        Some(GroupMeta {
            vote: g.vote.as_deref().map(<[u8]>::to_vec),
            committed: g.committed.as_deref().map(<[u8]>::to_vec),
            kv: g.kv.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
        })
    }

    /// Up to `count` entries of `group` from index `from` (its first index if `None`), read
    /// from the files (read-only) and checked: `(index, bytes)` pairs, stopping at the group's
    /// last entry. Fails if recovery would fail, or if a record no longer passes its checks.
    ///
    /// # Errors
    ///
    /// [`Error::Unrecoverable`] if recovery in this view's mode fails (see
    /// [`Inspection::recovery`]); [`Error::Corruption`] if a record no longer passes its
    /// checks, [`Error::Io`] if it cannot be read.
    pub fn entries(
        &self,
        group: u64,
        from: Option<u64>,
        count: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let state = match (&self.state, &self.recovery) {
            (Some(s), _) => s,
            (None, Err(e)) => {
                return Err(Error::Unrecoverable {
                    reason: format!("in {:?} mode: {e}", self.mode),
                })
            }
            (None, Ok(_)) => return Ok(Vec::new()),
        };
        let Some(g) = state.groups.get(&group) else {
            return Ok(Vec::new());
        };
        let range = g.entries.range();
        let Some(first) = from.or((!range.is_empty()).then_some(range.first)) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut current: Option<(Run, Vec<u8>, usize)> = None;
        let mut index = first;
        while (out.len() as u64) < count {
            let Some(loc) = g.entries.locate(index) else {
                break;
            };
            if current.as_ref().is_none_or(|(run, _, _)| *run != loc.run) {
                let file =
                    state
                        .files
                        .get(&u64::from(loc.run.segment))
                        .ok_or(Error::MissingSegment {
                            segment: u64::from(loc.run.segment),
                        })?;
                let (buf, start) = read_record(file.as_ref(), &loc.run)?;
                current = Some((loc.run, buf, start));
            }
            if let Some((run, buf, start)) = &current {
                let at = start.saturating_add(loc.span.off as usize);
                let bytes = buf
                    .get(at..at.saturating_add(loc.span.len as usize))
                    .ok_or_else(|| {
                        Error::corruption(
                            u64::from(run.segment),
                            u64::from(run.rec_off),
                            "entry outside its record",
                        )
                    })?;
                out.push((index, bytes.to_vec()));
            }
            let Some(next) = index.checked_add(1) else {
                break;
            };
            index = next;
        }
        Ok(out)
    }
}

/// The metadata of one group: vote, committed marker, keys and values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct GroupMeta {
    /// The vote bytes.
    pub vote: Option<Vec<u8>>,
    /// The committed marker bytes.
    pub committed: Option<Vec<u8>>,
    /// Keys and values, by key.
    pub kv: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads and checks the record at `run`: its raw body as `(buffer, start of the body in it)`.
fn read_record(file: &dyn FsFile, run: &Run) -> Result<(Vec<u8>, usize)> {
    let seg = u64::from(run.segment);
    let off = u64::from(run.rec_off);
    let corrupt = |reason: String| Error::corruption(seg, off, reason);
    // `rec_len` was checked against the file by the scan that indexed it.
    let mut buf = vec![0u8; run.rec_len as usize];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| Error::io(format!("reading segment {seg} at {off}"), e))?;
    let hb = buf
        .first_chunk::<RECORD_HEADER_LEN>()
        .ok_or_else(|| corrupt("short record".into()))?;
    let header = RecordHeader::parse(hb)
        .map_err(|e| corrupt(format!("record header: {e}")))?
        .ok_or_else(|| corrupt("record header is zero".into()))?;
    let raw = verify_record(seg, &header, &buf).map_err(|e| corrupt(format!("record: {e}")))?;
    Ok(match raw {
        std::borrow::Cow::Owned(v) => (v, 0),
        std::borrow::Cow::Borrowed(_) => (buf, RECORD_HEADER_LEN),
    })
}

/// The changes a normal open would make: recovery's (recorded by the read-only file system),
/// then the engine's (the segment it writes into and the one it prepares).
fn planned_changes(
    report: &RecoveryReport,
    log: &[Recorded],
    rec: &crate::recovery::Recovered,
) -> Vec<PlannedChange> {
    let mut out = Vec::new();
    for r in log {
        match r {
            Recorded::Remove(name) => match parse_segment_name(name) {
                Some(segment) if report.stale_removed.contains(&segment) => {
                    out.push(PlannedChange::RemoveStaleSegment { segment })
                }
                _ => out.push(PlannedChange::RemoveLeftover { name: name.clone() }),
            },
            Recorded::SetLen { name, from, to } => {
                let Some(segment) = parse_segment_name(name) else {
                    continue;
                };
                let bytes = from.saturating_sub(*to);
                if report.tail_cut.is_some_and(|c| c.segment == segment) {
                    out.push(PlannedChange::CutTornTail {
                        segment,
                        offset: *to,
                        bytes,
                    });
                } else {
                    out.push(PlannedChange::TrimZeroTail {
                        segment,
                        offset: *to,
                        bytes,
                    });
                }
            }
            Recorded::Sync(name) => {
                if let Some(segment) = parse_segment_name(name) {
                    out.push(PlannedChange::SyncSegment { segment });
                }
            }
        }
    }
    // Engine::open: the oldest empty trailing segment takes writes (else a new one), the next
    // one is prepared (reused if it follows), any other empty one is removed.
    let mut empty = rec.empty_tail.iter().map(|(id, _)| *id);
    let active = match empty.next() {
        Some(id) => id,
        None => {
            out.push(PlannedChange::CreateSegment {
                segment: rec.next_segment,
            });
            rec.next_segment
        }
    };
    let ready = empty.next();
    for segment in empty {
        out.push(PlannedChange::RemoveUnusedSegment { segment });
    }
    if ready != active.checked_add(1) {
        if let Some(segment) = ready {
            out.push(PlannedChange::RemoveUnusedSegment { segment });
        }
        out.push(PlannedChange::CreateSegment {
            segment: active.saturating_add(1),
        });
    }
    out
}

/// The kind of a problem [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// Damaged bytes past the segment's last proven-durable point: a write torn by a crash,
    /// never acknowledged. A normal open cuts it ([`RecoveryMode::TolerateTail`]).
    TornTail,
    /// Damage inside data proven durable: acknowledged data is lost or altered. A normal open
    /// refuses the directory; `repair` drops the damaged records.
    DurableDamage,
    /// A segment sealed by a clean shutdown (or a rotation) has bytes after its sealed end.
    PastSealedEnd,
    /// A segment file could not be read or has an implausible size.
    Unreadable,
    /// The checkpoint file fails its checks.
    Checkpoint,
    /// The seal file fails its checks (recovery ignores it: the sync marker it duplicates
    /// still speaks for the segment).
    Seal,
    /// A normal open refuses the directory for a reason not listed above (a missing segment,
    /// groups inconsistent with the checkpoint, a segment shorter than its sealed length).
    OpenRefused,
}

impl ProblemKind {
    /// A short kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::TornTail => "torn-tail",
            ProblemKind::DurableDamage => "durable-damage",
            ProblemKind::PastSealedEnd => "past-sealed-end",
            ProblemKind::Unreadable => "unreadable",
            ProblemKind::Checkpoint => "checkpoint",
            ProblemKind::Seal => "seal",
            ProblemKind::OpenRefused => "open-refused",
        }
    }
}

/// One problem [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// The file it is in.
    pub file: String,
    /// The segment, when it is in one.
    pub segment: Option<u64>,
    /// Byte offset where it starts (0 for a whole file).
    pub offset: u64,
    /// One past its last byte, when known.
    pub end: Option<u64>,
    /// What failed.
    pub reason: String,
}

/// What [`check`] verified in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentVerdict {
    /// Segment id.
    pub id: u64,
    /// File size.
    pub bytes: u64,
    /// End of the last good record (before the first damage).
    pub valid_end: u64,
    /// Good batch records (before the first damage).
    pub records: u64,
    /// Intact sync markers (before the first damage).
    pub markers: u64,
    /// Proven durable up to this offset (`None`: the whole segment).
    pub durable_to: Option<u64>,
}

/// What [`check`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CheckReport {
    /// The directory.
    pub dir: PathBuf,
    /// Whether an engine held the directory's lock while it was checked.
    pub engine_running: bool,
    /// Every live segment verified, in log order.
    pub segments: Vec<SegmentVerdict>,
    /// Segments present but dead under the checkpoint (a normal open deletes them; not read).
    pub stale_segments: Vec<u64>,
    /// Every problem, in log order.
    pub problems: Vec<Problem>,
    /// What a normal open ([`RecoveryMode::TolerateTail`]) would do, if it would succeed.
    pub open: Option<OpenFindings>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies every record of every live segment (header, framing, CRC, segment identity, body
/// structure), the checkpoint and the seal file, and what a normal open would make of them;
/// names the segment and offset of every problem and classifies damage as a torn tail (past
/// the last proven-durable point) or damage to durable data. Changes nothing. Fails only if
/// the directory cannot be listed.
///
/// # Errors
///
/// [`Error::Io`] if `dir` does not exist or cannot be listed, [`Error::NotADirectory`] if it
/// is not a directory. Everything found inside it is a [`Problem`], not an error.
pub fn check(dir: impl AsRef<Path>, progress: &ScanProgress) -> Result<CheckReport> {
    let dir = dir.as_ref();
    require_dir(dir)?;
    // Held over both scans (the view's own lock is released when it is taken).
    let (_lock, _) = shared_lock(dir);
    let view = Inspection::open(dir, RecoveryMode::TolerateTail, progress)?;
    let mut problems = Vec::new();
    if let CheckpointState::Damaged { reason } = &view.checkpoint {
        problems.push(Problem {
            kind: ProblemKind::Checkpoint,
            file: CHECKPOINT_NAME.into(),
            segment: None,
            offset: 0,
            end: None,
            reason: reason.clone(),
        });
    }
    if let SealState::Damaged { reason } = &view.seal {
        problems.push(Problem {
            kind: ProblemKind::Seal,
            file: crate::recovery::seal::SEAL_NAME.into(),
            segment: None,
            offset: 0,
            end: None,
            reason: reason.clone(),
        });
    }
    // The seal recovery uses: valid, and naming a segment the checkpoint has not made dead.
    let seal = match &view.seal {
        SealState::Valid { segment, len } if view.live.contains(segment) => {
            Some(crate::recovery::seal::Seal {
                segment: *segment,
                len: *len,
            })
        }
        _ => None,
    };
    let fs = ReadOnlyFs::new(progress.clone());
    let live_bytes: u64 = view
        .segments
        .iter()
        .filter(|s| view.live.contains(&s.id))
        .map(|s| s.bytes)
        .sum();
    progress.expect(live_bytes);
    let opts = Options::default().prefill_segments(false);
    let covered = match &view.checkpoint {
        CheckpointState::Valid {
            covers_below,
            covers_offset,
            ..
        } => Some((*covers_below, *covers_offset)),
        _ => None,
    };
    let (checks, sealed_rule) = verify_segments(&fs, dir, &view.live, seal, covered, &opts);
    let mut segments = Vec::with_capacity(checks.len());
    for c in &checks {
        let file = segment_name(c.id);
        if let Some(reason) = &c.unreadable {
            problems.push(Problem {
                kind: ProblemKind::Unreadable,
                file: file.clone(),
                segment: Some(c.id),
                offset: 0,
                end: None,
                reason: reason.clone(),
            });
        }
        for b in &c.bad {
            problems.push(Problem {
                kind: if b.torn {
                    ProblemKind::TornTail
                } else {
                    ProblemKind::DurableDamage
                },
                file: file.clone(),
                segment: Some(c.id),
                offset: b.start,
                end: Some(b.end),
                reason: b.reason.clone(),
            });
        }
        segments.push(SegmentVerdict {
            id: c.id,
            bytes: c.file_len,
            valid_end: c.valid_end,
            records: c.records,
            markers: c.markers,
            durable_to: (c.durable_to != u64::MAX).then_some(c.durable_to),
        });
    }
    if let Some((segment, offset, bytes)) = past_seal(&checks, seal) {
        problems.push(Problem {
            kind: ProblemKind::PastSealedEnd,
            file: segment_name(segment),
            segment: Some(segment),
            offset,
            end: Some(offset + bytes),
            reason: format!(
                "{bytes} bytes after the end a clean shutdown sealed (a normal open trims them)"
            ),
        });
    }
    let mut refusals: Vec<Error> = Vec::new();
    if let Some(e) = sealed_rule {
        refusals.push(e);
    }
    if let Err(e) = &view.recovery {
        let dup = refusals.iter().any(|r| r.to_string() == e.to_string());
        // Damage and checkpoint failures are listed above already.
        let listed = match e {
            Error::Corruption {
                segment, offset, ..
            }
            | Error::TornTail { segment, offset } => problems
                .iter()
                .any(|p| p.segment == Some(*segment) && p.offset == *offset),
            Error::Checkpoint { .. } => true,
            _ => false,
        };
        if !dup && !listed {
            refusals.push(Error::duplicate(e));
        }
    }
    for e in refusals {
        let (segment, offset) = match &e {
            Error::Corruption {
                segment, offset, ..
            }
            | Error::TornTail { segment, offset } => (Some(*segment), *offset),
            Error::MissingSegment { segment } => (Some(*segment), 0),
            _ => (None, 0),
        };
        // A sealed-length failure at a spot already listed as damage says nothing new.
        if problems.iter().any(|p| {
            segment.is_some()
                && p.segment == segment
                && p.offset == offset
                && p.kind != ProblemKind::PastSealedEnd
        }) {
            continue;
        }
        problems.push(Problem {
            kind: ProblemKind::OpenRefused,
            file: segment.map_or_else(String::new, segment_name),
            segment,
            offset,
            end: None,
            reason: e.to_string(),
        });
    }
    problems.sort_by_key(|a| (a.segment, a.offset));
    let stale_segments = view
        .segments
        .iter()
        .map(|s| s.id)
        .filter(|id| !view.live.contains(id))
        .collect();
    Ok(CheckReport {
        dir: dir.to_path_buf(),
        engine_running: view.engine_running,
        segments,
        stale_segments,
        problems,
        open: view.recovery.as_ref().ok().cloned(),
    })
}

/// What [`repair`] would do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepairPlan {
    /// A normal open succeeds and drops no data: nothing to repair.
    Nothing,
    /// A normal open ([`RecoveryMode::TolerateTail`]) makes these changes (a torn tail cut
    /// among them); repair opens the engine in that mode and closes it.
    Open {
        /// The changes, in order.
        changes: Vec<PlannedChange>,
    },
    /// A normal open refuses the directory (`refusal`); [`RecoveryMode::TolerateAny`]
    /// recovery drops the `dropped` ranges (and cuts `tail_cut`). Repair writes the state that
    /// recovery serves into a new directory, checks it, and swaps it in; the old directory is
    /// kept beside it, renamed.
    Rebuild {
        /// Why a normal open fails.
        refusal: String,
        /// Ranges TolerateAny recovery skips (segment 0: an entry missing below the
        /// checkpoint).
        dropped: Vec<SkippedRange>,
        /// A torn tail it cuts: (segment, offset, bytes).
        tail_cut: Option<crate::TailCut>,
        /// Groups and entries the rebuilt directory will hold.
        groups: usize,
        /// Entries the rebuilt directory will hold.
        entries: u64,
    },
    /// Not even TolerateAny recovery accepts the directory: this tool cannot repair it.
    Impossible {
        /// Why a normal open fails.
        refusal: String,
        /// Why TolerateAny recovery fails.
        reason: String,
    },
}

/// Works out what [`repair`] would do; changes nothing.
///
/// # Errors
///
/// As [`check`]; [`Error::Locked`] if an engine holds the directory.
pub fn plan_repair(dir: impl AsRef<Path>, progress: &ScanProgress) -> Result<RepairPlan> {
    let dir = dir.as_ref();
    let view = Inspection::open(dir, RecoveryMode::TolerateTail, progress)?;
    Ok(plan_from(dir, view, progress)?.0)
}

fn plan_from(
    dir: &Path,
    view: Inspection,
    progress: &ScanProgress,
) -> Result<(RepairPlan, Option<Inspection>)> {
    if view.engine_running {
        return Err(Error::Locked {
            path: dir.join(LOCK_NAME),
        });
    }
    match &view.recovery {
        Ok(f) => {
            if f.changes.iter().any(PlannedChange::drops_data) {
                Ok((
                    RepairPlan::Open {
                        changes: f.changes.clone(),
                    },
                    None,
                ))
            } else {
                Ok((RepairPlan::Nothing, None))
            }
        }
        Err(refusal) => {
            let refusal = refusal.to_string();
            let any = Inspection::open(dir, RecoveryMode::TolerateAny, progress)?;
            match &any.recovery {
                Ok(f) => {
                    let groups = any.groups();
                    // Sorted: recovery reports some in hash order, and plans are compared.
                    let mut dropped = f.report.skipped.clone();
                    dropped.sort_by(|a, b| {
                        (a.segment, a.start, a.end, &a.reason)
                            .cmp(&(b.segment, b.start, b.end, &b.reason))
                    });
                    let plan = RepairPlan::Rebuild {
                        refusal,
                        dropped,
                        tail_cut: f.report.tail_cut,
                        groups: groups.len(),
                        entries: groups.iter().map(|g| g.entries).sum(),
                    };
                    Ok((plan, Some(any)))
                }
                Err(e) => Ok((
                    RepairPlan::Impossible {
                        refusal,
                        reason: e.to_string(),
                    },
                    None,
                )),
            }
        }
    }
}

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepairOutcome {
    /// Nothing needed repair; nothing was changed.
    Nothing,
    /// The engine was opened in TolerateTail mode and closed: these changes were made.
    Opened {
        /// The changes.
        changes: Vec<PlannedChange>,
    },
    /// The directory was rebuilt; the damaged original is kept at `backup`.
    Rebuilt {
        /// Where the original directory now is (unchanged).
        backup: PathBuf,
        /// Groups written.
        groups: usize,
        /// Entries written.
        entries: u64,
    },
}

/// Repairs `dir` as [`plan_repair`] describes, provided the plan is still `expected` (the
/// directory did not change since it was shown): cuts a torn tail by opening the engine in
/// [`RecoveryMode::TolerateTail`], or drops damaged records as [`RecoveryMode::TolerateAny`]
/// would by rebuilding the directory (see [`RepairPlan::Rebuild`]). Afterwards a normal open
/// succeeds.
///
/// # Errors
///
/// As [`plan_repair`]; [`Error::StaleRepairPlan`] if the plan differs from `expected`;
/// [`Error::Repair`] if the plan is [`RepairPlan::Impossible`] or a rebuilt directory does
/// not check out (the original is then left in place, the half-written one removed); any
/// error of opening or writing the engine.
pub fn repair(
    dir: impl AsRef<Path>,
    expected: &RepairPlan,
    progress: &ScanProgress,
) -> Result<RepairOutcome> {
    let dir = dir.as_ref();
    let view = Inspection::open(dir, RecoveryMode::TolerateTail, progress)?;
    let (plan, any) = plan_from(dir, view, progress)?;
    if &plan != expected {
        return Err(Error::StaleRepairPlan);
    }
    match plan {
        RepairPlan::Nothing => Ok(RepairOutcome::Nothing),
        RepairPlan::Open { changes } => {
            let engine = Engine::open(
                dir,
                Options::default()
                    .recovery_mode(RecoveryMode::TolerateTail)
                    .prefill_segments(false)
                    .auto_gc(false),
            )?;
            drop(engine);
            Ok(RepairOutcome::Opened { changes })
        }
        RepairPlan::Rebuild { .. } => match any {
            Some(view) => rebuild(dir, &view),
            None => Err(Error::Repair {
                reason: "no recovered state to rebuild from".into(),
            }),
        },
        RepairPlan::Impossible { refusal, reason } => Err(Error::Repair {
 reason: format!(
            "cannot repair: a normal open fails ({refusal}) and so does TolerateAny recovery ({reason})"
        ),
 }),
    }
}

/// The largest segment a rebuild creates (the engine's default target size).
const DEFAULT_REBUILD_SEGMENT: u64 = 128 << 20;

/// Entries per rebuild batch (bounded in bytes too).
const REBUILD_BATCH_ENTRIES: u64 = 4096;
const REBUILD_BATCH_BYTES: usize = 64 << 20;

/// Writes the state `view` serves into `<dir>.mrwal-repair`, checks it reads back the same,
/// then renames `dir` to `<dir>.damaged-<unix seconds>` and the new one to `dir`.
fn rebuild(dir: &Path, view: &Inspection) -> Result<RepairOutcome> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Repair {
            reason: format!("{dir:?} has no usable file name"),
        })?;
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let fresh = parent.join(format!("{name}.mrwal-repair"));
    if fresh.exists() {
        return Err(Error::Repair {
            reason: format!("{fresh:?} exists (left by an interrupted repair?): remove it first"),
        });
    }
    // Hold the old directory's lock until the swap: no engine opens it meanwhile.
    let lock: Box<dyn DirLock> = StdFs.lock(&dir.join(LOCK_NAME)).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            Error::Locked {
                path: dir.join(LOCK_NAME),
            }
        } else {
            Error::io("locking the data directory", e)
        }
    })?;
    let groups = view.groups();
    // Segments no larger than the old ones (within the engine's bounds): the new directory
    // preallocates two, and the disk may be nearly full.
    let largest = view.segments.iter().map(|s| s.bytes).max().unwrap_or(0);
    let opts = Options::default()
        .segment_size(largest.clamp(MIN_SEGMENT_SIZE, DEFAULT_REBUILD_SEGMENT))
        .prefill_segments(false)
        .auto_gc(false)
        .recovery_mode(RecoveryMode::Strict);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let backup = parent.join(format!("{name}.damaged-{secs}"));
    if backup.exists() {
        return Err(Error::Repair {
            reason: format!("{backup:?} exists: run repair again in a second"),
        });
    }
    if let Err(e) = write_rebuild(&fresh, dir, view, &groups, &opts) {
        // Only what this call created goes; the original was not touched.
        let _ = std::fs::remove_dir_all(&fresh);
        return Err(e);
    }
    std::fs::rename(dir, &backup)
        .map_err(|e| Error::io(format!("renaming {dir:?} to {backup:?}"), e))?;
    drop(lock);
    std::fs::rename(&fresh, dir)
        .map_err(|e| Error::io(format!("renaming {fresh:?} to {dir:?}"), e))?;
    StdFs
        .sync_dir(parent)
        .map_err(|e| Error::io(format!("syncing {parent:?}"), e))?;
    Ok(RepairOutcome::Rebuilt {
        backup,
        groups: groups.len(),
        entries: groups.iter().map(|g| g.entries).sum(),
    })
}

/// Writes the state `view` serves (its `groups`) into the new directory `fresh`, then checks
/// that it opens in strict mode and serves the same groups, metadata and entry ranges.
fn write_rebuild(
    fresh: &Path,
    dir: &Path,
    view: &Inspection,
    groups: &[GroupSummary],
    opts: &Options,
) -> Result<()> {
    {
        let engine = Engine::open(fresh, opts.clone())?;
        for g in groups {
            let meta = view.group_meta(g.id).unwrap_or_default();
            let mut batch = WriteBatch::new();
            if let Some(v) = &meta.vote {
                batch.set_vote(g.id, v);
            }
            if let Some(c) = &meta.committed {
                batch.set_committed(g.id, c);
            }
            for (k, v) in &meta.kv {
                batch.put(g.id, k, v);
            }
            if g.first.is_none() {
                // Keeps an empty group known.
                batch.truncate_from(g.id, 0);
            }
            engine.write_unsynced(batch)?;
            let mut next = g.first;
            while let Some(from) = next.filter(|&i| g.last.is_some_and(|l| i <= l)) {
                let chunk = view.entries(g.id, Some(from), REBUILD_BATCH_ENTRIES)?;
                let mut batch = WriteBatch::new();
                let mut bytes = 0usize;
                let mut taken = Vec::new();
                for (_, e) in chunk {
                    if !taken.is_empty() && bytes + e.len() > REBUILD_BATCH_BYTES {
                        break;
                    }
                    bytes += e.len();
                    taken.push(e);
                }
                if taken.is_empty() {
                    return Err(Error::Inconsistent {
                        group: g.id,
                        reason: format!("entry {from} cannot be read for the rebuild"),
                    });
                }
                let n = taken.len() as u64;
                batch.append(g.id, from, &taken);
                engine.write_unsynced(batch)?;
                next = from.checked_add(n);
            }
        }
        engine.sync()?;
    }
    // The new directory must open normally and serve the same state.
    let check = Inspection::open(fresh, RecoveryMode::Strict, &ScanProgress::new())?;
    if let Err(e) = &check.recovery {
        return Err(Error::Repair {
            reason: format!("the rebuilt directory {fresh:?} does not open: {e}"),
        });
    }
    let same = |a: &[GroupSummary], b: &[GroupSummary]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                GroupSummary {
                    oldest_segment: None,
                    ..x.clone()
                } == GroupSummary {
                    oldest_segment: None,
                    ..y.clone()
                } && check.group_meta(x.id) == view.group_meta(y.id)
            })
    };
    if !same(&check.groups(), groups) {
        return Err(Error::Repair {
 reason: format!(
            "the rebuilt directory {fresh:?} does not hold the recovered state; {dir:?} is unchanged"
        ),
 });
    }
    Ok(())
}

/// A change recovery asked for, recorded instead of done.
#[derive(Debug, Clone)]
enum Recorded {
    Remove(String),
    SetLen { name: String, from: u64, to: u64 },
    Sync(String),
}

/// The file system of an inspection: opens files read-only; refuses every creation, write,
/// rename, allocation and lock; records the removals, cuts and syncs recovery asks for (it
/// reads nothing back after asking) instead of doing them.
#[derive(Debug, Clone)]
struct ReadOnlyFs {
    progress: ScanProgress,
    log: Arc<Mutex<Vec<Recorded>>>,
}

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "read-only inspection: the directory is never changed",
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl ReadOnlyFs {
    fn new(progress: ScanProgress) -> Self {
        ReadOnlyFs {
            progress,
            log: Arc::default(),
        }
    }

    fn take_log(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.log.lock())
    }
}

#[derive(Debug)]
struct ReadOnlyFile {
    file: std::fs::File,
    name: String,
    progress: ScanProgress,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl FsFile for ReadOnlyFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)?;
        self.progress
            .read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(refused())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.log.lock().push(Recorded::Sync(self.name.clone()));
        Ok(())
    }

    fn allocate(&self, _len: u64) -> io::Result<()> {
        Err(refused())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let from = self.len()?;
        self.log.lock().push(Recorded::SetLen {
            name: self.name.clone(),
            from,
            to: len,
        });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl FileSystem for ReadOnlyFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Err(refused())
    }

    fn create(&self, _path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Err(refused())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::File::open(path)?;
        Ok(Arc::new(ReadOnlyFile {
            file,
            name: file_name(path),
            progress: self.progress.clone(),
            log: self.log.clone(),
        }))
    }

    fn rename(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Err(refused())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.log.lock().push(Recorded::Remove(file_name(path)));
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock(&self, _path: &Path) -> io::Result<Box<dyn DirLock>> {
        Err(refused())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_only_fs_refuses_writes_and_records_what_recovery_asks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("0000000000000001.wal");
        std::fs::write(&path, b"0123456789").unwrap();
        let progress = ScanProgress::new();
        let fs = ReadOnlyFs::new(progress.clone());
        assert!(fs.create(&tmp.path().join("new")).is_err());
        assert!(fs.create_dir_all(&tmp.path().join("sub")).is_err());
        assert!(fs.rename(&path, &tmp.path().join("x")).is_err());
        assert!(fs.lock(&tmp.path().join("LOCK")).is_err());
        let f = fs.open(&path).unwrap();
        assert!(f.write_all_at(b"x", 0).is_err());
        assert!(f.allocate(1 << 20).is_err());
        let mut buf = [0u8; 4];
        f.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"2345");
        assert_eq!(progress.bytes_read(), 4);
        f.set_len(3).unwrap();
        f.sync_data().unwrap();
        fs.remove(&path).unwrap();
        fs.sync_dir(tmp.path()).unwrap();
        // Recorded, not done.
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["0000000000000001.wal".to_owned()]);
        let log = fs.take_log();
        assert!(
            matches!(
                &log[..],
                [
                    Recorded::SetLen {
                        from: 10,
                        to: 3,
                        ..
                    },
                    Recorded::Sync(_),
                    Recorded::Remove(_),
                ]
            ),
            "{log:?}"
        );
    }
}
