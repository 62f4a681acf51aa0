//! Recovery: scan every segment in parallel, check every CRC, then replay the records in segment
//! order into a fresh index, honouring the checkpoint and the recovery mode.
//!
//! Invariants:
//! - Nothing is changed on disk until every check has passed; then a torn tail is cut (file
//!   truncated and synced, so cut bytes can never come back) and stale segments are removed.
//! - A damaged record is a tolerated torn tail only if no later segment holds a record: a segment
//!   receives records only after the one before it was fsynced.
//! - Records of segments below the checkpoint only position entries; the checkpoint supplies
//!   metadata and the exact entry range each group must end up with.
//! - No length read from disk is used to slice or allocate before it is checked against the
//!   bytes present; no input makes recovery panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::checkpoint::{self, Checkpoint};
use crate::codec::{
    decode_body_into, verify_record, EntrySpan, Op, RecordHeader, RECORD_HEADER_LEN,
};
use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};
use crate::index::{Group, Run};
use crate::options::{Options, RecoveryMode, MAX_SEGMENT_SIZE};
use crate::segment::{check_header, parse_segment_name, SEGMENT_EXT, SEGMENT_HEADER_LEN, TMP_EXT};

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
    /// A torn tail cut off: (segment, offset where the cut starts, bytes dropped).
    pub tail_cut: Option<(u64, u64, u64)>,
    /// Damaged ranges skipped ([`RecoveryMode::TolerateAny`] only).
    pub skipped: Vec<SkippedRange>,
    /// Segments removed because the checkpoint had already made them dead.
    pub stale_removed: Vec<u64>,
    /// Whether a checkpoint was loaded.
    pub checkpoint: bool,
    /// Wall time of recovery.
    pub duration: Duration,
}

/// One operation of a scanned record, owning what it needs.
#[derive(Debug)]
enum ReplayOp {
    Append {
        group: u64,
        first: u64,
        /// Positions in the segment's span list.
        spans: std::ops::Range<usize>,
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

#[derive(Debug)]
struct ScannedRecord {
    offset: u32,
    len: u32,
    /// End of this record's ops in the segment's op list (they start where the previous
    /// record's end).
    ops_end: usize,
}

/// Everything decoded from one segment, in three flat lists (few allocations for millions of
/// entries).
#[derive(Debug, Default)]
struct Records {
    recs: Vec<ScannedRecord>,
    ops: Vec<ReplayOp>,
    spans: Vec<EntrySpan>,
}

/// The first damaged spot of a segment, when recovery stopped there.
#[derive(Debug, Clone)]
struct Damage {
    offset: u64,
    reason: String,
}

#[derive(Debug)]
struct SegmentScan {
    id: u64,
    file: Arc<dyn FsFile>,
    file_len: u64,
    records: Records,
    /// End of the last good record.
    valid_end: u64,
    damage: Option<Damage>,
    skipped: Vec<SkippedRange>,
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

fn to_replay(op: Op<'_>) -> ReplayOp {
    match op {
        Op::Append {
            group,
            first,
            spans,
        } => ReplayOp::Append {
            group,
            first,
            spans,
        },
        Op::Truncate { group, index } => ReplayOp::Truncate { group, index },
        Op::Purge { group, index } => ReplayOp::Purge { group, index },
        Op::Put { group, key, value } => ReplayOp::Put {
            group,
            key: key.into(),
            value: value.into(),
        },
        Op::Delete { group, key } => ReplayOp::Delete {
            group,
            key: key.into(),
        },
        Op::Vote { group, value } => ReplayOp::Vote {
            group,
            value: value.into(),
        },
        Op::Committed { group, value } => ReplayOp::Committed {
            group,
            value: value.into(),
        },
        Op::RemoveGroup { group } => ReplayOp::RemoveGroup { group },
    }
}

/// Decodes the records of segment `id` from its whole contents. Never panics.
pub fn scan_records(
    id: u64,
    data: &[u8],
    tolerate_any: bool,
) -> (u64, usize, Option<(u64, String)>, Vec<SkippedRange>) {
    match scan_source(id, &data, tolerate_any, &mut Vec::new()) {
        Ok(scan) => (
            scan.0,
            scan.1.recs.len(),
            scan.2.map(|d| (d.offset, d.reason)),
            scan.3,
        ),
        // Reading a slice never fails.
        Err(e) => (0, 0, Some((0, e.to_string())), Vec::new()),
    }
}

type ScanParts = (u64, Records, Option<Damage>, Vec<SkippedRange>);

/// What is at a position of a segment.
enum Found {
    /// A good record of this many bytes (decoded into the lists).
    Record(u64),
    /// The clean end: zeros to the end of the file.
    End,
    /// Damage; the damaged record's length if it was readable.
    Bad(String, Option<u64>),
}

/// Bytes to scan: a file, or a slice (tests and fuzzers).
trait Source {
    fn size(&self) -> u64;
    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Source for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = offset as usize;
        let src = self
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

struct FileSource<'a>(&'a dyn FsFile, u64);

impl Source for FileSource<'_> {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// Bytes read per refill: small enough to stay in the CPU's caches while the CRC and the
/// decoder go over them right after the copy.
const WINDOW: usize = 1 << 20;

/// A sliding window over a source: `buf[..filled]` holds the bytes at `start..`.
struct Window<'a, S: Source> {
    src: &'a S,
    buf: &'a mut Vec<u8>,
    start: u64,
    filled: usize,
}

impl<S: Source> Window<'_, S> {
    /// The `len` bytes at `pos`, which must lie within the source (checked by the caller).
    fn bytes(&mut self, pos: u64, len: usize) -> std::io::Result<&[u8]> {
        let end = pos + len as u64;
        if pos < self.start || end > self.start + self.filled as u64 {
            // Refill from `pos`: at least `len` bytes, at most a window (or the rest).
            let want = len
                .max(WINDOW)
                .min((self.src.size() - pos) as usize)
                .max(len);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            self.src.read_into(&mut self.buf[..want], pos)?;
            self.start = pos;
            self.filled = want;
        }
        let at = (pos - self.start) as usize;
        Ok(&self.buf[at..at + len])
    }

    /// Whether every byte from `pos` to the end of the source is zero.
    fn zero_from(&mut self, mut pos: u64) -> std::io::Result<bool> {
        let size = self.src.size();
        while pos < size {
            let n = ((size - pos) as usize).min(WINDOW);
            if !is_zero(self.bytes(pos, n)?) {
                return Ok(false);
            }
            pos += n as u64;
        }
        Ok(true)
    }
}

/// Whether a slice is all zero (word at a time).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    let words = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0);
    words && chunks.remainder().iter().all(|&x| x == 0)
}

fn decode_at<S: Source>(
    id: u64,
    pos: u64,
    win: &mut Window<'_, S>,
    out: &mut Records,
) -> std::io::Result<Found> {
    let left = win.src.size() - pos;
    let head = win.bytes(pos, (left as usize).min(RECORD_HEADER_LEN))?;
    if head.len() < RECORD_HEADER_LEN || is_zero(head) {
        if win.zero_from(pos)? {
            return Ok(Found::End);
        }
        if left < RECORD_HEADER_LEN as u64 {
            return Ok(Found::Bad("truncated record header".into(), None));
        }
        return Ok(Found::Bad(
            "non-zero bytes after a zero record header".into(),
            None,
        ));
    }
    let mut hb = [0u8; RECORD_HEADER_LEN];
    hb.copy_from_slice(head);
    let header = match RecordHeader::parse(&hb) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Found::Bad("zero record header".into(), None)),
        Err(e) => return Ok(Found::Bad(format!("record header: {e}"), None)),
    };
    let rec_len = header.record_len();
    if rec_len > left {
        return Ok(Found::Bad(
            "record extends past the end of the file".into(),
            None,
        ));
    }
    let rec = win.bytes(pos, rec_len as usize)?;
    let raw = match verify_record(id, &header, rec) {
        Ok(raw) => raw,
        Err(e) => return Ok(Found::Bad(format!("record: {e}"), Some(rec_len))),
    };
    let ops_start = out.ops.len();
    let ops = &mut out.ops;
    let decoded = decode_body_into(&raw, &mut out.spans, |op| ops.push(to_replay(op)));
    if let Err(e) = decoded {
        out.ops.truncate(ops_start);
        return Ok(Found::Bad(format!("record body: {e}"), Some(rec_len)));
    }
    out.recs.push(ScannedRecord {
        offset: pos as u32,
        len: rec_len as u32,
        ops_end: out.ops.len(),
    });
    Ok(Found::Record(rec_len))
}

fn scan_source<S: Source>(
    id: u64,
    src: &S,
    tolerate_any: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<ScanParts> {
    let len = src.size();
    let mut out = Records::default();
    let mut skipped = Vec::new();
    let mut win = Window {
        src,
        buf,
        start: 0,
        filled: 0,
    };
    let head = win.bytes(0, (len as usize).min(SEGMENT_HEADER_LEN as usize))?;
    if let Err(reason) = check_header(id, head) {
        if tolerate_any {
            skipped.push(SkippedRange {
                segment: id,
                start: 0,
                end: len,
                reason: reason.to_owned(),
            });
        }
        return Ok((
            0,
            out,
            Some(Damage {
                offset: 0,
                reason: reason.to_owned(),
            }),
            skipped,
        ));
    }
    let mut pos = SEGMENT_HEADER_LEN;
    let mut valid_end = pos;
    while pos < len {
        match decode_at(id, pos, &mut win, &mut out)? {
            Found::Record(n) => {
                pos += n;
                valid_end = pos;
            }
            Found::End => break,
            Found::Bad(reason, extent) => {
                if !tolerate_any {
                    return Ok((
                        valid_end,
                        out,
                        Some(Damage {
                            offset: pos,
                            reason,
                        }),
                        skipped,
                    ));
                }
                let end = extent.map_or(len, |e| pos + e);
                skipped.push(SkippedRange {
                    segment: id,
                    start: pos,
                    end,
                    reason,
                });
                pos = end;
            }
        }
    }
    Ok((valid_end, out, None, skipped))
}

fn scan_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    id: u64,
    tolerate_any: bool,
    buf: &mut Vec<u8>,
) -> Result<SegmentScan> {
    let path = dir.join(crate::segment::segment_name(id));
    let file = fs
        .open(&path)
        .map_err(|e| Error::io(format!("opening segment {id}"), e))?;
    let file_len = file
        .len()
        .map_err(|e| Error::io(format!("reading size of segment {id}"), e))?;
    if file_len > 2 * MAX_SEGMENT_SIZE + (1 << 30) {
        return Err(Error::corruption(
            id,
            0,
            format!("implausible segment size {file_len}"),
        ));
    }
    let (valid_end, records, damage, skipped) =
        scan_source(id, &FileSource(file.as_ref(), file_len), tolerate_any, buf)
            .map_err(|e| Error::io(format!("reading segment {id}"), e))?;
    Ok(SegmentScan {
        id,
        file,
        file_len,
        records,
        valid_end,
        damage,
        skipped,
    })
}

fn scan_all(
    fs: &dyn FileSystem,
    dir: &Path,
    ids: &[u64],
    opts: &Options,
) -> Result<Vec<SegmentScan>> {
    let tolerate_any = opts.recovery_mode == RecoveryMode::TolerateAny;
    let threads = opts.recovery_threads.clamp(1, ids.len().max(1));
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<SegmentScan>>>> =
        ids.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&id) = ids.get(i) else { break };
                    let r = scan_segment(fs, dir, id, tolerate_any, &mut buf);
                    let failed = r.is_err();
                    *slots[i].lock() = Some(r);
                    if failed {
                        break;
                    }
                }
            });
        }
    });
    let mut out = Vec::with_capacity(ids.len());
    for (slot, &id) in slots.into_iter().zip(ids) {
        match slot.into_inner() {
            Some(r) => out.push(r?),
            None => {
                return Err(Error::corruption(
                    id,
                    0,
                    "segment was not scanned after an earlier failure",
                ))
            }
        }
    }
    Ok(out)
}

/// Applies one replayed operation of a segment at or above the checkpoint.
fn apply_op(
    groups: &mut HashMap<u64, Group>,
    op: ReplayOp,
    all_spans: &[EntrySpan],
    segment: u64,
    rec: (u32, u32),
) {
    match op {
        ReplayOp::Append {
            group,
            first,
            spans,
        } => {
            let run = Run {
                first,
                segment: segment as u32,
                rec_off: rec.0,
                rec_len: rec.1,
            };
            groups.entry(group).or_default().entries.append(
                first,
                run,
                all_spans.get(spans).unwrap_or_default(),
            );
        }
        ReplayOp::Truncate { group, index } => groups
            .entry(group)
            .or_default()
            .entries
            .truncate_from(index),
        ReplayOp::Purge { group, index } => {
            groups.entry(group).or_default().entries.purge_to(index)
        }
        ReplayOp::RemoveGroup { group } => {
            groups.remove(&group);
        }
        ReplayOp::Put { group, key, value } => {
            groups.entry(group).or_default().kv.insert(key, value);
        }
        ReplayOp::Delete { group, key } => {
            groups.entry(group).or_default().kv.remove(&key);
        }
        ReplayOp::Vote { group, value } => groups.entry(group).or_default().vote = Some(value),
        ReplayOp::Committed { group, value } => {
            groups.entry(group).or_default().committed = Some(value)
        }
    }
}

#[derive(Clone, Copy)]
struct Slot {
    segment: u32,
    rec_off: u32,
    rec_len: u32,
    span: EntrySpan,
}

/// Replay of the segments below the checkpoint: the latest write of each index inside each
/// group's checkpointed range.
struct OldReplay {
    ranges: HashMap<u64, crate::index::Range>,
    slots: HashMap<u64, Vec<Option<Slot>>>,
}

impl OldReplay {
    fn new(c: &Checkpoint, scans: &[SegmentScan], covers_below: u64) -> Result<OldReplay> {
        // Every entry takes at least one byte of its segment: a bound on any honest range.
        let old_bytes: u64 = scans
            .iter()
            .filter(|s| s.id < covers_below)
            .map(|s| s.file_len)
            .sum();
        let mut ranges = HashMap::with_capacity(c.groups.len());
        for (id, meta) in &c.groups {
            if meta.range.len > old_bytes {
                return Err(Error::Inconsistent {
                    group: *id,
                    reason: format!(
                        "checkpoint claims {} entries, more than the old segments can hold",
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

    fn apply(&mut self, op: ReplayOp, all_spans: &[EntrySpan], segment: u64, rec: (u32, u32)) {
        let ReplayOp::Append {
            group,
            first,
            spans,
        } = op
        else {
            return;
        };
        let Some(range) = self.ranges.get(&group) else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let slots = self
            .slots
            .entry(group)
            .or_insert_with(|| vec![None; range.len as usize]);
        for (i, span) in all_spans
            .get(spans)
            .unwrap_or_default()
            .iter()
            .copied()
            .enumerate()
        {
            let Some(index) = first.checked_add(i as u64) else {
                break;
            };
            if index < range.first || index - range.first >= range.len {
                continue;
            }
            slots[(index - range.first) as usize] = Some(Slot {
                segment: segment as u32,
                rec_off: rec.0,
                rec_len: rec.1,
                span,
            });
        }
    }

    fn finish(
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
            let mut i = 0usize;
            let mut spans = Vec::new();
            while i < range.len as usize {
                let Some(Some(head)) = slots.get(i).copied() else {
                    if mode == RecoveryMode::TolerateAny {
                        report.skipped.push(SkippedRange {
                            segment: 0,
                            start: 0,
                            end: 0,
                            reason: format!(
                                "group {id}: entry {} missing below the checkpoint",
                                range.first + i as u64
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
                            range.first + i as u64
                        ),
                    });
                };
                let start = i;
                spans.clear();
                while let Some(Some(s)) = slots.get(i) {
                    if s.segment != head.segment || s.rec_off != head.rec_off {
                        break;
                    }
                    spans.push(s.span);
                    i += 1;
                }
                let first = range.first + start as u64;
                let run = Run {
                    first,
                    segment: head.segment,
                    rec_off: head.rec_off,
                    rec_len: head.rec_len,
                };
                g.entries.append(first, run, &spans);
            }
        }
        Ok(())
    }
}

/// Rebuilds the index from the data directory.
pub(crate) fn recover(fs: &dyn FileSystem, dir: &Path, opts: &Options) -> Result<Recovered> {
    let started = Instant::now();
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

    let mut scans = scan_all(fs, dir, &live, opts)?;

    // Decide what each damage means: a torn tail only if no later segment holds a record.
    let last_with_records = scans.iter().rposition(|s| !s.records.recs.is_empty());
    let mut cut: Option<usize> = None;
    for (i, s) in scans.iter().enumerate() {
        report.skipped.extend(s.skipped.iter().cloned());
        let Some(d) = &s.damage else { continue };
        let is_tail = last_with_records.is_none_or(|l| i >= l) && d.offset > 0;
        match opts.recovery_mode {
            RecoveryMode::TolerateTail if is_tail => cut = Some(i),
            RecoveryMode::Strict if is_tail => {
                return Err(Error::TornTail {
                    segment: s.id,
                    offset: d.offset,
                })
            }
            _ => return Err(Error::corruption(s.id, d.offset, d.reason.clone())),
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
                o.finish(&mut groups, opts.recovery_mode, &mut report)?;
            }
        }
        report.segments += 1;
        report.bytes += s.file_len;
        let records = std::mem::take(&mut s.records);
        let mut ops = records.ops.into_iter();
        let mut done = 0;
        for rec in &records.recs {
            report.records += 1;
            for op in ops.by_ref().take(rec.ops_end - done) {
                let at = (rec.offset, rec.len);
                match old.as_mut() {
                    Some(o) => o.apply(op, &records.spans, s.id, at),
                    None => apply_op(&mut groups, op, &records.spans, s.id, at),
                }
            }
            done = rec.ops_end;
        }
    }
    if let Some(o) = old.take() {
        o.finish(&mut groups, opts.recovery_mode, &mut report)?;
    }

    // Every check passed: now repair the directory.
    let mut dir_dirty = false;
    for name in &names {
        if name.ends_with(TMP_EXT)
            && (name.ends_with(&format!("{SEGMENT_EXT}{TMP_EXT}")) || checkpoint::is_temp(name))
        {
            fs.remove(&dir.join(name))
                .map_err(|e| Error::io(format!("removing leftover {name}"), e))?;
            dir_dirty = true;
        }
    }
    if let Some(i) = cut {
        let s = &scans[i];
        s.file
            .set_len(s.valid_end)
            .map_err(|e| Error::io(format!("cutting the torn tail of segment {}", s.id), e))?;
        s.file.sync_data().map_err(|e| {
            Error::io(
                format!("syncing segment {} after cutting its tail", s.id),
                e,
            )
        })?;
        report.tail_cut = Some((s.id, s.valid_end, s.file_len - s.valid_end));
    }
    // A segment holding records that ends in zeros (the log was closed or crashed while it was
    // active) is sealed now, as a rotation would: cut to its last record, so later recoveries
    // read no zero tail. Empty segments are left whole: they will take writes.
    for (i, s) in scans.iter().enumerate() {
        if cut == Some(i) || s.damage.is_some() || !s.skipped.is_empty() {
            continue;
        }
        if s.valid_end <= SEGMENT_HEADER_LEN || s.file_len <= s.valid_end {
            continue;
        }
        s.file
            .set_len(s.valid_end)
            .map_err(|e| Error::io(format!("trimming segment {}", s.id), e))?;
        s.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing segment {} after trimming it", s.id), e))?;
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
        s.valid_end == SEGMENT_HEADER_LEN
            && s.damage.is_none()
            && s.skipped.is_empty()
            && s.id >= covers_below
    };
    let tail_len = scans.iter().rev().take_while(|s| empty(s)).count();
    let empty_tail = scans[scans.len() - tail_len..]
        .iter()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{seal_record, BodyBuilder};

    fn scan_bytes(id: u64, data: &[u8], tolerate_any: bool) -> ScanParts {
        scan_source(id, &data, tolerate_any, &mut Vec::new()).unwrap()
    }
    use crate::segment::encode_header;

    fn segment_with_records(id: u64, n: u64) -> (Vec<u8>, Vec<u64>) {
        let mut data = encode_header(id).to_vec();
        let mut ends = Vec::new();
        for i in 0..n {
            let mut b = BodyBuilder::default();
            let mut lens = Vec::new();
            b.append(1, i + 1, [vec![i as u8; 30]], &mut lens).unwrap();
            let mut rec = b.encode(usize::MAX);
            seal_record(&mut rec, id);
            data.extend_from_slice(&rec);
            ends.push(data.len() as u64);
        }
        (data, ends)
    }

    #[test]
    fn clean_end_with_zero_padding() {
        let (mut data, ends) = segment_with_records(3, 5);
        data.resize(data.len() + 100, 0);
        let (end, recs, damage, _) = scan_bytes(3, &data, false);
        assert_eq!((end, recs.recs.len()), (ends[4], 5));
        assert!(damage.is_none());
    }

    #[test]
    fn every_cut_stops_at_the_last_whole_record() {
        let (data, ends) = segment_with_records(3, 3);
        for cut in ends[1]..ends[2] {
            let (end, recs, damage, _) = scan_bytes(3, &data[..cut as usize], false);
            assert_eq!((end, recs.recs.len()), (ends[1], 2), "cut {cut}");
            assert_eq!(damage.is_some(), cut > ends[1], "cut {cut}");
        }
    }

    #[test]
    fn records_of_another_segment_do_not_pass() {
        let (data, _) = segment_with_records(3, 2);
        let mut moved = encode_header(4).to_vec();
        moved.extend_from_slice(&data[SEGMENT_HEADER_LEN as usize..]);
        let (end, recs, damage, _) = scan_bytes(4, &moved, false);
        assert_eq!((end, recs.recs.len()), (SEGMENT_HEADER_LEN, 0));
        assert_eq!(damage.map(|d| d.offset), Some(SEGMENT_HEADER_LEN));
    }

    #[test]
    fn tolerate_any_skips_a_bad_record_and_continues() {
        let (mut data, ends) = segment_with_records(3, 3);
        data[ends[0] as usize + 20] ^= 1;
        let (_, recs, damage, skipped) = scan_bytes(3, &data, true);
        assert_eq!(recs.recs.len(), 2);
        assert!(damage.is_none());
        assert_eq!(skipped.len(), 1);
        assert_eq!((skipped[0].start, skipped[0].end), (ends[0], ends[1]));
    }
}
