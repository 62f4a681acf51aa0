//! Scanning one segment: header, then every record's length bounds, CRC, decompression and body
//! structure, streamed through a window. Pure with respect to the directory (it only reads), so
//! it is the fuzzing surface; it never panics and never allocates from an unchecked length.
//!
//! Sync markers are read here too: the highest `synced_to` declared by an intact marker of the
//! segment is what recovery may rely on as proven durable. After damage, the rest of the segment
//! is searched for intact markers, since a marker after the damage still proves the bytes before
//! its `synced_to` were durable (see docs/FORMAT.md, "Durable points").
//!
//! The end of the data: the first zero record header (or fewer than 16 bytes left). In a
//! segment without the recycled flag every byte after it must be zero, anything else is damage
//! at the end. In a recycled segment (header flag `FLAG_RECYCLED`) the bytes after it are stale
//! records of older segments, which never pass a CRC seeded with this segment's id; there the
//! rest of the segment is searched for an intact sync marker of this segment instead: one found
//! means records were lost after the zero header (damage at the end, which the durable points
//! classify), none means a clean end.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::codec::{
    decode_body_into, parse_sync_marker, verify_record, EntrySpan, Op, RecordHeader, SyncMarker,
    RECORD_HEADER_LEN, SYNC_MARKER_LEN, SYNC_MARKER_MAGIC,
};
use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};
use crate::options::{Options, RecoveryMode, MAX_SEGMENT_SIZE};
use crate::segment::{check_header, FLAG_RECYCLED, SEGMENT_HEADER_LEN};

use super::SkippedRange;

/// One good batch record of a segment.
#[derive(Debug)]
pub(super) struct ScannedRecord {
    pub(super) offset: u32,
    pub(super) len: u32,
    /// End of this record's ops in the segment's op list (they start where the previous
    /// record's end).
    pub(super) ops_end: usize,
}

/// Everything decoded from one segment, in three flat lists (few allocations for millions of
/// entries), and what its sync markers declare.
#[derive(Debug, Default)]
pub(super) struct Records {
    pub(super) recs: Vec<ScannedRecord>,
    pub(super) ops: Vec<Op<Box<[u8]>>>,
    pub(super) spans: Vec<EntrySpan>,
    /// Intact sync markers read in order (not counting those found after damage).
    pub(super) markers: usize,
    /// The highest `synced_to` any intact marker of the segment declares (0: none).
    pub(super) synced_to: u64,
    /// The sealed length of the previous segment an intact marker declares (0: none).
    pub(super) prev_sealed_len: u64,
}

/// The first damaged spot of a segment, when the scan stopped there.
#[derive(Debug, Clone)]
pub(super) struct Damage {
    pub(super) offset: u64,
    pub(super) reason: String,
}

/// What scanning one segment's bytes found.
#[derive(Debug, Default)]
pub(super) struct ScanParts {
    /// End of the last good record (or marker).
    pub(super) valid_end: u64,
    pub(super) records: Records,
    pub(super) damage: Option<Damage>,
    /// Damaged ranges skipped ([`RecoveryMode::TolerateAny`] only).
    pub(super) skipped: Vec<SkippedRange>,
    /// The header has the recycled flag: bytes after the end may be stale records.
    pub(super) recycled: bool,
}

impl ScanParts {
    /// Records damage at `offset`, taking in what the intact sync markers after it declare
    /// (`later`, from [`markers_after`]): they can prove the damaged bytes durable.
    fn damaged_at(&mut self, offset: u64, reason: String, later: &SyncMarker) {
        let r = &mut self.records;
        r.synced_to = r.synced_to.max(later.synced_to);
        r.prev_sealed_len = r.prev_sealed_len.max(later.prev_sealed_len);
        self.damage = Some(Damage { offset, reason });
    }
}

/// One scanned segment file.
#[derive(Debug)]
pub(super) struct SegmentScan {
    pub(super) id: u64,
    pub(super) file: Arc<dyn FsFile>,
    pub(super) file_len: u64,
    pub(super) parts: ScanParts,
}

impl SegmentScan {
    /// Whether the segment holds an intact record or marker: proof that every earlier segment
    /// had been fsynced whole (a segment takes records only after its predecessor's fsync).
    pub(super) fn holds_records(&self) -> bool {
        !self.parts.records.recs.is_empty() || self.parts.records.markers > 0
    }
}

/// What is at a position of a segment.
enum Found {
    /// A good record or marker of this many bytes (decoded into the lists).
    Record(u64),
    /// The clean end: zeros to the end of the file.
    End,
    /// Damage; the damaged record's length if it was readable.
    Bad(String, Option<u64>),
}

/// Bytes to scan: a file, or a slice (tests and fuzzers).
pub(super) trait Source {
    fn size(&self) -> u64;
    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Source for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
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

/// `n` as a `usize`, saturating (a length that large is refused by the caller's bounds).
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl<S: Source> Window<'_, S> {
    /// The `len` bytes at `pos`, which must lie within the source (checked by the caller; an
    /// out-of-range request is an `UnexpectedEof` error, never a panic).
    fn bytes(&mut self, pos: u64, len: usize) -> std::io::Result<&[u8]> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let size = self.src.size();
        let end = pos.checked_add(len as u64).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(eof());
        };
        if pos < self.start || end > self.start + self.filled as u64 {
            // Refill from `pos`: at least `len` bytes, at most a window (or the rest).
            let want = len.max(WINDOW).min(to_usize(size - pos)).max(len);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let dst = self.buf.get_mut(..want).ok_or_else(eof)?;
            self.src.read_into(dst, pos)?;
            self.start = pos;
            self.filled = want;
        }
        let at = to_usize(pos - self.start);
        self.buf.get(at..at + len).ok_or_else(eof)
    }

    /// Whether every byte from `pos` to the end of the source is zero.
    fn zero_from(&mut self, mut pos: u64) -> std::io::Result<bool> {
        let size = self.src.size();
        while pos < size {
            let n = to_usize(size - pos).min(WINDOW);
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

/// Reads and checks the record header at `pos` (`left` bytes remain in the source). In a
/// `recycled` segment a zero header is the end whatever follows (the caller then looks for lost
/// markers).
fn header_at<S: Source>(
    pos: u64,
    left: u64,
    recycled: bool,
    win: &mut Window<'_, S>,
) -> std::io::Result<std::result::Result<RecordHeader, Found>> {
    let head = win.bytes(pos, to_usize(left).min(RECORD_HEADER_LEN))?;
    let Some(hb) = head.first_chunk::<RECORD_HEADER_LEN>().copied() else {
        if win.zero_from(pos)? {
            return Ok(Err(Found::End));
        }
        return Ok(Err(Found::Bad("truncated record header".into(), None)));
    };
    if is_zero(&hb) {
        if recycled || win.zero_from(pos)? {
            return Ok(Err(Found::End));
        }
        return Ok(Err(Found::Bad(
            "non-zero bytes after a zero record header".into(),
            None,
        )));
    }
    Ok(match RecordHeader::parse(&hb) {
        Ok(Some(h)) => Ok(h),
        Ok(None) => Err(Found::Bad("zero record header".into(), None)),
        Err(e) => Err(Found::Bad(format!("record header: {e}"), None)),
    })
}

fn decode_at<S: Source>(
    id: u64,
    pos: u64,
    recycled: bool,
    win: &mut Window<'_, S>,
    out: &mut Records,
) -> std::io::Result<Found> {
    let left = win.src.size().saturating_sub(pos);
    let header = match header_at(pos, left, recycled, win)? {
        Ok(h) => h,
        Err(found) => return Ok(found),
    };
    let rec_len = header.record_len();
    if rec_len > left {
        return Ok(Found::Bad(
            "record extends past the end of the file".into(),
            None,
        ));
    }
    // Positions are kept as u32 in the index: a record the index could not name is damage.
    let (Ok(offset), Ok(len)) = (u32::try_from(pos), u32::try_from(rec_len)) else {
        return Ok(Found::Bad(
            "record beyond the 4 GiB a position can name".into(),
            Some(rec_len),
        ));
    };
    let rec = win.bytes(pos, to_usize(rec_len))?;
    let raw = match verify_record(id, &header, rec) {
        Ok(raw) => raw,
        Err(e) => return Ok(Found::Bad(format!("record: {e}"), Some(rec_len))),
    };
    if header.is_sync_marker() {
        return Ok(match parse_sync_marker(&raw, pos) {
            Ok(m) => {
                out.markers += 1;
                out.synced_to = out.synced_to.max(m.synced_to);
                out.prev_sealed_len = out.prev_sealed_len.max(m.prev_sealed_len);
                Found::Record(rec_len)
            }
            Err(e) => Found::Bad(format!("sync marker: {e}"), Some(rec_len)),
        });
    }
    let ops_start = out.ops.len();
    let ops = &mut out.ops;
    let decoded = decode_body_into(&raw, &mut out.spans, |op| ops.push(op.into_owned()));
    if let Err(e) = decoded {
        out.ops.truncate(ops_start);
        return Ok(Found::Bad(format!("record body: {e}"), Some(rec_len)));
    }
    out.recs.push(ScannedRecord {
        offset,
        len,
        ops_end: out.ops.len(),
    });
    Ok(Found::Record(rec_len))
}

/// What the intact sync markers starting after `from` declare (the highest of each field). Used after damage, where record boundaries are lost: every position holding the
/// marker magic is tried as a marker. Costs one pass over the rest of the segment.
fn markers_after<S: Source>(
    id: u64,
    from: u64,
    win: &mut Window<'_, S>,
) -> std::io::Result<SyncMarker> {
    const MAGIC_AT: u64 = RECORD_HEADER_LEN as u64;
    let size = win.src.size();
    let mut best = SyncMarker::default();
    let mut candidates = Vec::new();
    // Chunks overlap by a marker's length so no magic straddles two chunks unseen.
    let mut pos = from.saturating_add(1);
    while pos < size {
        let n = to_usize(size - pos).min(WINDOW);
        let chunk = win.bytes(pos, n)?;
        candidates.clear();
        candidates.extend(
            chunk
                .windows(SYNC_MARKER_MAGIC.len())
                .enumerate()
                .filter(|(_, w)| *w == SYNC_MARKER_MAGIC)
                .filter_map(|(i, _)| (pos + i as u64).checked_sub(MAGIC_AT))
                .filter(|&at| at > from),
        );
        for &at in &candidates {
            if at + SYNC_MARKER_LEN as u64 > size {
                continue;
            }
            let rec = win.bytes(at, SYNC_MARKER_LEN)?;
            let Some(hb) = rec.first_chunk::<RECORD_HEADER_LEN>() else {
                continue;
            };
            let Ok(Some(header)) = RecordHeader::parse(hb) else {
                continue;
            };
            if !header.is_sync_marker() {
                continue;
            }
            if let Ok(body) = verify_record(id, &header, rec) {
                if let Ok(m) = parse_sync_marker(&body, at) {
                    best.synced_to = best.synced_to.max(m.synced_to);
                    best.prev_sealed_len = best.prev_sealed_len.max(m.prev_sealed_len);
                }
            }
        }
        if n < WINDOW {
            break;
        }
        pos += (n - SYNC_MARKER_LEN) as u64;
    }
    Ok(best)
}

/// Scans the records of segment `id` from `src`.
pub(super) fn scan_source<S: Source>(
    id: u64,
    src: &S,
    tolerate_any: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<ScanParts> {
    let len = src.size();
    let mut parts = ScanParts::default();
    let mut win = Window {
        src,
        buf,
        start: 0,
        filled: 0,
    };
    let head = win.bytes(0, to_usize(len.min(SEGMENT_HEADER_LEN)))?;
    let checked = check_header(id, head);
    parts.recycled = checked.is_ok_and(|flags| flags & FLAG_RECYCLED != 0);
    if let Err(reason) = checked {
        if tolerate_any {
            // The whole segment is skipped and reported; it contributes nothing.
            parts.skipped.push(SkippedRange {
                segment: id,
                start: 0,
                end: len,
                reason: reason.to_owned(),
            });
        } else {
            parts.damage = Some(Damage {
                offset: 0,
                reason: reason.to_owned(),
            });
        }
        return Ok(parts);
    }
    let mut pos = SEGMENT_HEADER_LEN;
    parts.valid_end = pos;
    let recycled = parts.recycled;
    while pos < len {
        match decode_at(id, pos, recycled, &mut win, &mut parts.records)? {
            Found::Record(n) => {
                pos += n;
                parts.valid_end = pos;
            }
            Found::End if recycled => {
                // Stale bytes of older segments may follow; an intact marker of this segment
                // may not: records of this segment were lost before it.
                let later = markers_after(id, pos, &mut win)?;
                if later.synced_to > 0 {
                    let reason = "an intact sync marker of this segment after the end of its \
                                  data (a zero record header in a recycled segment): records \
                                  were lost"
                        .to_owned();
                    if tolerate_any {
                        parts.skipped.push(SkippedRange {
                            segment: id,
                            start: pos,
                            end: len,
                            reason,
                        });
                    } else {
                        parts.damaged_at(pos, reason, &later);
                    }
                }
                break;
            }
            Found::End => break,
            Found::Bad(reason, extent) => {
                if !tolerate_any {
                    let later = markers_after(id, pos, &mut win)?;
                    parts.damaged_at(pos, reason, &later);
                    return Ok(parts);
                }
                let end = extent.map_or(len, |e| pos + e);
                parts.skipped.push(SkippedRange {
                    segment: id,
                    start: pos,
                    end,
                    reason,
                });
                pos = end;
            }
        }
    }
    Ok(parts)
}

/// Decodes the records of segment `id` from its whole contents (fuzzing entry point): the end
/// of the last good record, the number of good batch records, the first damage and the skipped
/// ranges. Never panics.
pub(crate) fn scan_records(
    id: u64,
    data: &[u8],
    tolerate_any: bool,
) -> (u64, usize, Option<(u64, String)>, Vec<SkippedRange>) {
    match scan_source(id, &data, tolerate_any, &mut Vec::new()) {
        Ok(p) => (
            p.valid_end,
            p.records.recs.len(),
            p.damage.map(|d| (d.offset, d.reason)),
            p.skipped,
        ),
        // Reading a slice within its bounds never fails.
        Err(e) => (0, 0, Some((0, e.to_string())), Vec::new()),
    }
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
    let parts = scan_source(id, &FileSource(file.as_ref(), file_len), tolerate_any, buf)
        .map_err(|e| Error::io(format!("reading segment {id}"), e))?;
    Ok(SegmentScan {
        id,
        file,
        file_len,
        parts,
    })
}

/// Scans segments `ids` on `opts.recovery_threads` threads; results in the order of `ids`.
pub(super) fn scan_all(
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
                    let (Some(&id), Some(slot)) = (ids.get(i), slots.get(i)) else {
                        break;
                    };
                    let r = scan_segment(fs, dir, id, tolerate_any, &mut buf);
                    let failed = r.is_err();
                    *slot.lock() = Some(r);
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

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "tests index known fixtures"
)]
mod tests {
    use super::*;
    use crate::codec::{encode_sync_marker, seal_record, BodyBuilder, SyncMarker};

    fn marker(synced_to: u64) -> SyncMarker {
        SyncMarker {
            synced_to,
            prev_sealed_len: 0,
        }
    }
    use crate::segment::encode_header;

    fn scan_bytes(id: u64, data: &[u8], tolerate_any: bool) -> ScanParts {
        scan_source(id, &data, tolerate_any, &mut Vec::new()).unwrap()
    }

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
        let p = scan_bytes(3, &data, false);
        assert_eq!((p.valid_end, p.records.recs.len()), (ends[4], 5));
        assert!(p.damage.is_none());
    }

    #[test]
    fn every_cut_stops_at_the_last_whole_record() {
        let (data, ends) = segment_with_records(3, 3);
        for cut in ends[1]..ends[2] {
            let p = scan_bytes(3, &data[..cut as usize], false);
            assert_eq!(
                (p.valid_end, p.records.recs.len()),
                (ends[1], 2),
                "cut {cut}"
            );
            assert_eq!(p.damage.is_some(), cut > ends[1], "cut {cut}");
        }
    }

    #[test]
    fn records_of_another_segment_do_not_pass() {
        let (data, _) = segment_with_records(3, 2);
        let mut moved = encode_header(4).to_vec();
        moved.extend_from_slice(&data[SEGMENT_HEADER_LEN as usize..]);
        let p = scan_bytes(4, &moved, false);
        assert_eq!((p.valid_end, p.records.recs.len()), (SEGMENT_HEADER_LEN, 0));
        assert_eq!(p.damage.map(|d| d.offset), Some(SEGMENT_HEADER_LEN));
    }

    #[test]
    fn tolerate_any_skips_a_bad_record_and_continues() {
        let (mut data, ends) = segment_with_records(3, 3);
        data[ends[0] as usize + 20] ^= 1;
        let p = scan_bytes(3, &data, true);
        assert_eq!(p.records.recs.len(), 2);
        assert!(p.damage.is_none());
        assert_eq!(p.skipped.len(), 1);
        assert_eq!((p.skipped[0].start, p.skipped[0].end), (ends[0], ends[1]));
    }

    #[test]
    fn tolerate_any_skips_a_bad_header_without_damage() {
        let (mut data, _) = segment_with_records(3, 3);
        data[5] ^= 1;
        let p = scan_bytes(3, &data, true);
        assert!(p.damage.is_none());
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.records.recs.len(), 0);
    }

    #[test]
    fn markers_are_read_in_order_and_found_after_damage() {
        let (mut data, ends) = segment_with_records(3, 3);
        data.extend_from_slice(&encode_sync_marker(3, marker(ends[1])));
        let marked = data.len() as u64;
        let p = scan_bytes(3, &data, false);
        assert_eq!(
            (p.valid_end, p.records.markers, p.records.synced_to),
            (marked, 1, ends[1])
        );
        // Damage in the first record: the marker after it is still found, by its magic.
        data[ends[0] as usize - 3] ^= 0x10;
        let p = scan_bytes(3, &data, false);
        assert_eq!(
            p.damage.as_ref().map(|d| d.offset),
            Some(SEGMENT_HEADER_LEN)
        );
        assert_eq!(p.records.synced_to, ends[1]);
        // A marker of another segment, or one vouching for bytes after itself, counts for nothing.
        let (mut data, ends) = segment_with_records(3, 2);
        data.extend_from_slice(&encode_sync_marker(4, marker(ends[1])));
        data.extend_from_slice(&encode_sync_marker(3, marker(ends[1] + 100)));
        let p = scan_bytes(3, &data, false);
        assert_eq!(p.records.synced_to, 0);
        assert_eq!(p.damage.map(|d| d.offset), Some(ends[1]));
    }

    /// A recycled segment: `records` written over the file of segment `old` (its records and
    /// a marker), with the terminator after them, as the engine leaves it.
    fn recycled(id: u64, records: &[Vec<u8>], old: u64) -> (Vec<u8>, u64) {
        // Other records than this segment's (as a reused file holds: another workload's).
        let mut stale = encode_header(old).to_vec();
        for i in 0..12u64 {
            let mut b = BodyBuilder::default();
            b.append(2, i + 7, [vec![0xA0 + i as u8; 45]], &mut Vec::new())
                .unwrap();
            let mut rec = b.encode(usize::MAX);
            seal_record(&mut rec, old);
            stale.extend_from_slice(&rec);
        }
        stale.extend_from_slice(&encode_sync_marker(old, marker(40)));
        let (mut data, end) = crate::segment::recycled_image(id, records);
        if stale.len() > data.len() {
            data.extend_from_slice(&stale[data.len()..]);
        }
        (data, end)
    }

    fn records_of(id: u64, n: u64) -> Vec<Vec<u8>> {
        let (data, ends) = segment_with_records(id, n);
        let mut at = SEGMENT_HEADER_LEN as usize;
        ends.iter()
            .map(|&e| {
                let r = data[at..e as usize].to_vec();
                at = e as usize;
                r
            })
            .collect()
    }

    #[test]
    fn a_recycled_segment_ends_at_its_terminator_whatever_follows() {
        let recs = records_of(9, 3);
        let (data, end) = recycled(9, &recs, 4);
        // Stale records of segment 4 follow the terminator: not damage, in any mode.
        assert!(data[end as usize + 16..].iter().any(|&b| b != 0));
        for any in [false, true] {
            let p = scan_bytes(9, &data, any);
            assert!(p.recycled);
            assert_eq!((p.valid_end, p.records.recs.len()), (end, 3));
            assert!(p.damage.is_none() && p.skipped.is_empty(), "{p:?}");
        }
        // No record yet: the end is right after the header.
        let (empty, empty_end) = recycled(9, &[], 4);
        let p = scan_bytes(9, &empty, false);
        assert_eq!(
            (p.valid_end, empty_end),
            (SEGMENT_HEADER_LEN, SEGMENT_HEADER_LEN)
        );
        assert!(p.damage.is_none());
        // The same bytes without the flag: the stale bytes are damage at the end.
        let mut plain = data.clone();
        plain[..SEGMENT_HEADER_LEN as usize].copy_from_slice(&encode_header(9));
        let p = scan_bytes(9, &plain, false);
        assert_eq!(p.damage.map(|d| d.offset), Some(end));
    }

    #[test]
    fn a_torn_write_in_a_recycled_segment_is_damage_at_the_end() {
        let recs = records_of(9, 3);
        let (good, _) = recycled(9, &recs[..2], 4);
        let end2 = SEGMENT_HEADER_LEN + (recs[0].len() + recs[1].len()) as u64;
        // The third record's write torn: a prefix of it over the old terminator, stale after.
        let mut torn = good.clone();
        let part = &recs[2][..recs[2].len() / 2];
        torn[end2 as usize..end2 as usize + part.len()].copy_from_slice(part);
        let p = scan_bytes(9, &torn, false);
        assert_eq!((p.valid_end, p.records.recs.len()), (end2, 2));
        assert_eq!(p.damage.map(|d| d.offset), Some(end2));
    }

    #[test]
    fn an_intact_marker_after_a_zero_header_in_a_recycled_segment_is_damage() {
        let recs = records_of(9, 4);
        let mut with_marker = recs.clone();
        let marker_at = SEGMENT_HEADER_LEN + (recs[0].len() + recs[1].len()) as u64;
        with_marker.insert(2, encode_sync_marker(9, marker(marker_at)));
        let (mut data, _) = recycled(9, &with_marker, 4);
        // Records 1 and the marker's predecessor lost: zeros over record 1 (a write that never
        // reached the disk, followed by one that did).
        let r1 = SEGMENT_HEADER_LEN as usize + recs[0].len();
        data[r1..r1 + recs[1].len()].fill(0);
        let p = scan_bytes(9, &data, false);
        assert_eq!(p.valid_end, r1 as u64);
        assert_eq!(
            p.damage.as_ref().map(|d| d.offset),
            Some(r1 as u64),
            "{p:?}"
        );
        // The marker's declaration counts (recovery decides corruption vs torn tail with it).
        assert_eq!(p.records.synced_to, marker_at);
        // TolerateAny reports the range instead.
        let p = scan_bytes(9, &data, true);
        assert_eq!(p.skipped.first().map(|r| r.start), Some(r1 as u64));
        // A marker of another segment there (stale) is not one of this segment's.
        let mut stale = recs.clone();
        stale.insert(2, encode_sync_marker(4, marker(marker_at)));
        let (mut data, _) = recycled(9, &stale, 4);
        data[r1..r1 + recs[1].len()].fill(0);
        let p = scan_bytes(9, &data, false);
        assert!(p.damage.is_none(), "{p:?}");
        assert_eq!(p.valid_end, r1 as u64);
    }
}
