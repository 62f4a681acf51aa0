//! The write stage of group commit: writers queue their encoded records; one leader takes the
//! whole queue, validates it, gives every record its position, appends them all to the log with
//! one copy into the tail buffer (and at most one positioned write), applies the group to the
//! index and registers its members with the sync stage (`commit`). Also: rotation, segment
//! preparation, and the tail buffer that lets unsynced writes skip the system call.
//!
//! Invariants:
//! - One leader at a time writes (`Queue::leader`), under the log lock: records get positions and
//!   sequence numbers in the order they are applied to the index, and validation sees every
//!   earlier record, including earlier members of the same group.
//! - Leadership passes from writer to writer through `Queue` and [`Signal`]s: followers park and
//!   are woken once, when written (unsynced and asynchronous writes), when durable (synced
//!   writes), or to lead. Nothing spins or yields.
//! - A record is applied to the index only after its bytes are in the tail buffer or the file;
//!   a reader finds them in one or the other (`flushed` says which, and moves only after the
//!   bytes reached the file).
//! - The tail buffer is written out before every fsync, rotation and shutdown, so an fsync covers
//!   every write group registered before it started; a write group is acknowledged durable only
//!   through `commit`, after that fsync returned.
//! - A segment receives records only once the previous one was written out and fsynced.
//! - Rotation waits for nothing it could have had ready: the next segment is created in the
//!   background one rotation ahead, and a zero-fill still running is cancelled, not awaited.
//! - Nothing here is proportional to the number of groups or entries: a write group costs its
//!   members' ops, one lock per touched index shard, and O(segments) at rotation.
//! - Disk space is reserved as the workload needs it: a segment starts with a small reservation
//!   (1 MiB, or the segment size if smaller) that grows in steps (its current size, 1 to 16 MiB)
//!   as records reach it, and the next segment is prepared only once the active one is half
//!   full. An idle engine holds 2 MiB (with the freeing reserve), not two whole segments.
//! - Zero-filling grows with the workload: it starts only once the active segment serves a
//!   synced workload that it pays for (16 fdatasyncs for waiters, covering at most
//!   [`PREFILL_MAX_BYTES_PER_SYNC`] each on average: each zero byte is written twice, and what
//!   it saves is a metadata journal commit per fdatasync). The first zero-filled segment is
//!   [`PREFILL_FIRST`] long, each next one twice as long as the one before, up to the segment
//!   size: a segment's data limit (`LogWriter::limit`) is what was zero-filled for it. The next
//!   zero-filled segment is prepared once a quarter of the active one is used, so a workload
//!   that writes a few MiB zero-fills a few MiB, not whole segments.
//! - On a full disk a batch that only frees space (purge, truncate, remove group) can still be
//!   written: every segment keeps a *freeing reserve* (a quarter of the segment size, 4 KiB to
//!   1 MiB) beyond what other batches may use, and such a batch may also go past the segment
//!   size when no next segment can be created. Other batches are refused with
//!   [`Error::NoSpace`] (with every later member of their write group, so that what is placed
//!   is always a prefix that validation saw) and nothing is poisoned.
//! - Every positioned write of the tail also writes [`TERMINATOR_LEN`] zero bytes right after
//!   its last record (one `pwritev`, covered by the same fdatasync; the next write overwrites
//!   them): a completed write always ends in a zero record header, which is how recovery finds
//!   the end of the data in a recycled segment, whose later bytes are stale records. The space
//!   checks (rotation, reservation, the freeing reserve) count the terminator.
//! - A next segment comes from the recycling pool (`pool`) when it holds a file: its header is
//!   rewritten and it is extended if short, never zero-filled again (its bytes are written).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::batch::WriteBatch;
use crate::codec::{record_crc, seal_record, set_crc, Op, RECORD_HEADER_LEN};
use crate::commit::{Callback, Signal, Syncer, Waiter};
use crate::engine::Inner;
use crate::error::{Error, Result};
use crate::fs::FsFile;
use crate::index::{apply_op, ApplyCtx, Groups, Range, RecordPos, RefDelta};
use crate::options::MAX_RECORD_BYTES;
use crate::pool::Pool;
use crate::segment::{
    create_segment, recycle_segment, segment_name, SEGMENT_HEADER_LEN, TERMINATOR_LEN,
};

/// The tail buffer is written out once it holds this much (or at the next fsync or rotation).
const FLUSH_AT: usize = 64 << 10;

/// fsyncs a segment must see before the engine zero-fills segments ahead: a bulk load that
/// syncs once at its end is not a synced workload.
const PREFILL_AFTER_SYNCS: u32 = 16;

/// Zero-filling pays when fdatasyncs cover few bytes each: it writes every byte of the segment
/// twice (a sequential write in the background) to save one metadata journal commit per
/// fdatasync (≈ 100 µs on the test machine, about what 128 KiB of sequential writing costs).
/// Above this average of bytes per fdatasync (for waiters, in the active segment), segments
/// are not zero-filled.
pub(crate) const PREFILL_MAX_BYTES_PER_SYNC: u64 = 64 << 10;

/// The data limit of the first zero-filled segment; each next one doubles it, up to the
/// segment size.
pub(crate) const PREFILL_FIRST: u64 = 8 << 20;

/// A segment's first reservation (or the segment size, if smaller) and the bounds of the steps
/// it grows by.
const RESERVE_FIRST: u64 = 1 << 20;
const RESERVE_MAX_STEP: u64 = 16 << 20;

/// Bytes every segment keeps reserved beyond what batches that do not only free space may use:
/// a quarter of the segment size, 4 KiB to 1 MiB.
pub(crate) fn freeing_reserve(segment_size: u64) -> u64 {
    (segment_size / 4).clamp(4 << 10, 1 << 20)
}

/// The reservation a segment starts with.
pub(crate) fn first_reservation(segment_size: u64) -> u64 {
    segment_size.min(RESERVE_FIRST) + freeing_reserve(segment_size)
}

/// How a writer wants its batch acknowledged.
pub(crate) enum Durability {
    /// Return once durable.
    Sync,
    /// Return once written (readable); durable with a later sync.
    Unsynced,
    /// Return once written; call back once durable.
    Async(Callback),
}

/// A writer's batch, queued for the write leader.
pub(crate) struct Request {
    batch: WriteBatch,
    record: Vec<u8>,
    /// The batch's payload buffer, for the entry cache (the record holds its own copy).
    payload: crate::cache::Payload,
    /// The CRC of `record` for the segment that was active when it was framed.
    crc: (u64, u32),
    sync: bool,
    is_async: bool,
    callback: parking_lot::Mutex<Option<Callback>>,
    signal: Arc<Signal>,
}

/// Writers waiting for the write leader.
#[derive(Default)]
pub(crate) struct Queue {
    pending: Vec<Arc<Request>>,
    leader: bool,
    /// The previous write group's member list, emptied: the next leader swaps it in for
    /// `pending`, so queueing allocates nothing in a steady state.
    spare: Vec<Arc<Request>>,
}

/// Bytes appended to the active segment but not yet written to its file.
#[derive(Default)]
pub(crate) struct Tail {
    /// The segment they belong to.
    pub(crate) segment: u64,
    /// The file offset of `bytes[0]`.
    pub(crate) base: u64,
    pub(crate) bytes: Vec<u8>,
}

/// Packs a (segment, offset) into the `flushed` word: everything of segments below `segment`,
/// and of `segment` below `offset`, is in the files.
pub(crate) fn pack_flushed(segment: u64, offset: u64) -> u64 {
    (segment << 32) | (offset & 0xFFFF_FFFF)
}

/// A segment ready to take writes.
pub(crate) struct Prepared {
    pub(crate) file: Arc<dyn FsFile>,
    /// Whether every byte up to the segment size plus the freeing reserve is written (zeros or a
    /// recycled file's old bytes): fdatasync into it needs no metadata.
    pub(crate) prefilled: bool,
    /// Bytes from the start of the file that are written (a zero-fill may start there).
    pub(crate) written_to: u64,
    /// Made from a pool file: stale bytes of older segments may follow its data.
    pub(crate) recycled: bool,
    /// Where records stop and the next segment begins: the segment size, or, for a segment
    /// zero-filled for fewer bytes (see the module's invariants), what was zero-filled for it.
    pub(crate) limit: u64,
}

impl Prepared {
    /// A segment written (header, zeros or a pool file's old bytes) up to `written_to`;
    /// `want` is the data limit it was zero-filled for (`None`: not zero-filled).
    fn new(
        file: Arc<dyn FsFile>,
        written_to: u64,
        recycled: bool,
        want: Option<u64>,
        segment_size: u64,
    ) -> Prepared {
        let reserve = freeing_reserve(segment_size);
        let (prefilled, limit) = match want {
            _ if written_to >= segment_size + reserve => (true, segment_size),
            Some(want) if written_to >= want + reserve => {
                // A pool file may be written further than asked: all of it serves.
                (true, (written_to - reserve).clamp(want, segment_size))
            }
            // Not zero-filled (or cancelled part way): reserved as records need it.
            _ => (false, segment_size),
        };
        Prepared {
            file,
            prefilled,
            written_to,
            recycled,
            limit,
        }
    }
}

/// The next segment, being created (and possibly zero-filled) in the background.
pub(crate) struct Preparing {
    id: u64,
    handle: JoinHandle<Result<Prepared>>,
    /// Whether it is being zero-filled.
    prefill: bool,
    /// Stops a zero-fill between chunks (a rotation does not wait for it).
    cancel: Arc<AtomicBool>,
}

/// The active segment and the write position. Guarded by the log lock.
pub(crate) struct LogWriter {
    pub(crate) segment: u64,
    pub(crate) file: Arc<dyn FsFile>,
    /// End of the last record (in the file or the tail buffer).
    pub(crate) offset: u64,
    /// Sequence number of the last write group.
    pub(crate) written: u64,
    /// Sequence number of the last write group whose bytes are all in the file.
    pub(crate) flushed_seq: u64,
    pub(crate) next: Option<Preparing>,
    /// Whether the active segment was zero-filled ahead (fdatasync into it is cheaper).
    pub(crate) prefilled: bool,
    /// Where the active segment's records stop (see [`Prepared::limit`]).
    pub(crate) limit: u64,
    /// fsyncs for durable writes into the active segment (a synced workload makes many).
    pub(crate) syncs_in_segment: u32,
    /// Bytes of the active segment's file reserved (its length: data, then reserved zeros).
    pub(crate) reserved: u64,
    /// Buffers a write group reuses (their capacity stays between groups).
    pub(crate) scratch: Scratch,
    /// Bytes written to the active segment's file since its last fdatasync (see
    /// `Options::bytes_per_sync`).
    pub(crate) unsynced_bytes: u64,
    /// The next segment waits for a file GC is putting in the recycling pool: it is prepared
    /// at half full, not earlier (see `rotate`).
    pub(crate) await_pool: bool,
}

/// The write leader's working buffers, kept with the log (whose lock the leader holds) so that
/// a write group allocates none of them.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Ranges the group's members leave, for validation.
    overlay: RangeMap,
    /// One member's ranges, for validation.
    mine: RangeMap,
    /// Placed members: (member, segment, offset).
    placed: Vec<(usize, u64, u64)>,
    /// Ops to apply, by shard: (shard, placed member, op).
    work: Vec<(usize, usize, usize)>,
    /// Whether a placed member's payload slack was charged to the cache.
    slack_charged: Vec<bool>,
}

/// Entry ranges by group, for validation: hashed, so that a write group of many members, or a
/// batch touching many groups, is validated in time linear in its ops.
type RangeMap = std::collections::HashMap<u64, Range, foldhash::fast::RandomState>;

/// Validates one batch against the index and the ranges earlier members of its write group
/// leave (`overlay`); on success `overlay` includes this batch's effects.
fn validate(
    groups: &Groups,
    batch: &WriteBatch,
    overlay: &mut RangeMap,
    mine: &mut RangeMap,
) -> Result<()> {
    if let Some(e) = batch.too_large() {
        return Err(e);
    }
    mine.clear();
    for &(group, version) in &batch.expect_version {
        // An earlier member of this write group may have written the group without being
        // applied yet: the version alone would not show it.
        let touched = overlay.contains_key(&group);
        let now = groups.read(group, |g| g.version);
        if touched || now != Some(version) {
            return Err(Error::GroupChanged { group });
        }
    }
    for op in &batch.ops {
        let group = op.group();
        let range = mine.entry(group).or_insert_with(|| {
            overlay
                .get(&group)
                .copied()
                .or_else(|| groups.read(group, |g| g.entries.range()))
                .unwrap_or_default()
        });
        let count = match op {
            Op::Append { spans, .. } => spans.len() as u64,
            _ => 0,
        };
        range.apply(op, count).map_err(|e| e.into_error(group))?;
    }
    overlay.extend(mine.drain());
    Ok(())
}

impl Syncer for Inner {
    fn sync_active(&self, for_waiters: bool) -> Result<(u64, Option<Error>)> {
        let (file, target, short, point) = {
            let mut log = self.log.lock();
            // A full disk leaves buffered bytes unwritten: sync what the file holds, and let
            // the waiters beyond it know.
            let short = match self.flush_tail(&mut log, None) {
                Ok(()) => None,
                Err(e @ Error::NoSpace { .. }) => Some(e),
                Err(e) => return Err(e),
            };
            // A background round says nothing about the workload (see `note_sync`).
            if for_waiters {
                self.note_sync(&mut log);
            }
            log.unsynced_bytes = 0;
            let file_end = self.tail.read().base;
            (
                log.file.clone(),
                log.flushed_seq,
                short,
                (log.segment, file_end),
            )
        };
        self.commit
            .guarded_sync("fdatasync of the active segment", || file.sync_data())?;
        // The next write group declares it with a sync marker.
        self.sync_point.synced(point.0, point.1);
        Ok((target, short))
    }
}

impl Inner {
    /// Writes `batch` with the given durability; returns when the batch is written (and, for
    /// [`Durability::Sync`], durable).
    pub(crate) fn submit(&self, mut batch: WriteBatch, durability: Durability) -> Result<()> {
        if let Some(e) = batch.too_large() {
            return Err(e);
        }
        if batch.is_empty() {
            return self.submit_empty(durability);
        }
        if batch.body.raw_len() as u64 + RECORD_HEADER_LEN as u64 > MAX_RECORD_BYTES {
            return Err(Error::BatchTooLarge {
                bytes: batch.body.raw_len() as u64 + RECORD_HEADER_LEN as u64,
                limit: MAX_RECORD_BYTES,
            });
        }
        self.commit.check_poison()?;
        let record = batch.body.encode(self.opts.compression_threshold);
        batch.shift_spans_to_record();
        let payload = if self.cache.enabled() {
            crate::cache::Payload::take(&mut batch.body)
        } else {
            crate::cache::Payload::default()
        };
        // The CRC covers the segment id: computed here, outside every lock, for the segment that
        // is active now; in the rare case a rotation comes first, the leader computes it again.
        let guess = self.active_segment.load(Ordering::Relaxed);
        let crc = record_crc(guess, &record);
        let (sync, callback) = match durability {
            Durability::Sync => (true, None),
            Durability::Unsynced => (false, None),
            Durability::Async(cb) => (false, Some(cb)),
        };
        let req = Arc::new(Request {
            batch,
            record,
            payload,
            crc: (guess, crc),
            sync,
            is_async: callback.is_some(),
            callback: parking_lot::Mutex::new(callback),
            signal: Arc::new(Signal::default()),
        });
        let lead = {
            let mut q = self.queue.lock();
            q.pending.push(req.clone());
            !std::mem::replace(&mut q.leader, true)
        };
        if lead {
            return self.lead(&req);
        }
        // A follower: parked until written, durable, or asked to lead.
        enum Event {
            Lead,
            Written(Result<u64>),
            Durability,
        }
        let event = req.signal.wait_for(|st| {
            if std::mem::take(&mut st.lead_write) {
                return Some(Event::Lead);
            }
            if let Some(w) = st.written.take() {
                return Some(Event::Written(w));
            }
            st.durable.is_some().then_some(Event::Durability)
        });
        match event {
            Event::Lead => self.lead(&req),
            Event::Written(w) => w.map(|_| ()),
            Event::Durability => self.commit.wait_durable(&req.signal, self),
        }
    }

    /// An empty batch writes nothing; it is acknowledged like a write of the same durability
    /// made now (a synced one waits for everything written before it).
    fn submit_empty(&self, durability: Durability) -> Result<()> {
        match durability {
            Durability::Unsynced => Ok(()),
            Durability::Sync => self.sync_all(),
            Durability::Async(cb) => {
                let log = self.log.lock();
                self.commit.register(log.written, Waiter::Callback(cb));
                drop(log);
                self.commit.kick(false);
                Ok(())
            }
        }
    }

    /// Makes everything written so far durable.
    pub(crate) fn sync_all(&self) -> Result<()> {
        self.commit.check_poison()?;
        let signal = Arc::new(Signal::default());
        {
            let log = self.log.lock();
            self.commit
                .register(log.written, Waiter::Signal(signal.clone()));
        }
        self.commit.wait_durable(&signal, self)
    }

    /// Leads the write stage: writes the queue as one group, hands leadership to the first
    /// writer that queued meanwhile (or gives it up), then completes `own` (the leader's own
    /// request: a synced one waits for durability, leading the sync stage if nobody does).
    fn lead(&self, own: &Arc<Request>) -> Result<()> {
        let mut members = {
            let mut q = self.queue.lock();
            let spare = std::mem::take(&mut q.spare);
            std::mem::replace(&mut q.pending, spare)
        };
        let outcome = self.write_group(&members);
        crate::telemetry::write_group(outcome.iter().filter(|r| r.is_ok()).count());
        let mut own_result: Result<Option<u64>> = Ok(None);
        let mut others_wait = false;
        for (m, result) in members.iter().zip(outcome) {
            if Arc::ptr_eq(m, own) {
                own_result = result.map(Some);
                continue;
            }
            match result {
                Ok(_) if m.sync => others_wait = true,
                Ok(seq) => {
                    others_wait |= m.is_async;
                    m.signal.update(|s| s.written = Some(Ok(seq)));
                }
                Err(e) => m.signal.update(|s| s.written = Some(Err(e))),
            }
        }
        members.clear();
        {
            let mut q = self.queue.lock();
            match q.pending.first() {
                Some(next) => next.signal.update(|s| s.lead_write = true),
                None => q.leader = false,
            }
            if members.capacity() <= 4096 {
                q.spare = members;
            }
        }
        let own_waits_sync = own.sync && matches!(own_result, Ok(Some(_)));
        if own_waits_sync {
            // This thread leads the sync stage if nobody does: it covers the others too.
            return self.commit.wait_durable(&own.signal, self);
        }
        if others_wait || own.is_async {
            // Parked synced writers and callbacks: the flusher leads the sync stage for them.
            self.commit.kick(false);
        }
        own_result.map(|_| ())
    }

    /// Writes a group of requests; returns each one's sequence number or error.
    fn write_group(&self, members: &[Arc<Request>]) -> Vec<Result<u64>> {
        let mut log = self.log.lock();
        if let Err(e) = self.commit.check_poison() {
            return members.iter().map(|_| Err(e.duplicate())).collect();
        }
        let mut scratch = std::mem::take(&mut log.scratch);
        // Validate in order; refused members take no position.
        scratch.overlay.clear();
        let mut results: Vec<Result<u64>> = members
            .iter()
            .map(|m| {
                validate(
                    &self.groups,
                    &m.batch,
                    &mut scratch.overlay,
                    &mut scratch.mine,
                )
                .map(|()| 0)
            })
            .collect();
        let placed = &mut scratch.placed;
        placed.clear();
        // Where this group starts in the tail buffer (earlier unsynced bytes may precede it).
        let mut group_start = self.tail.read().bytes.len();
        // Whether members were placed in a segment that a rotation then sealed.
        let mut split = false;
        let mut marked = false;
        let mut applied = 0;
        let mut failure: Option<Error> = None;
        // A member refused for want of space refuses every later one (validation saw them
        // after it).
        let mut refused: Option<Error> = None;
        for (i, m) in members.iter().enumerate() {
            if results.get(i).is_none_or(|r| r.is_err()) {
                continue;
            }
            if let Some(e) = &refused {
                if let Some(r) = results.get_mut(i) {
                    *r = Err(e.duplicate());
                }
                continue;
            }
            let len = m.record.len() as u64;
            let frees = m.batch.only_frees();
            // Every write ends with a terminator: room for it counts.
            let full =
                log.offset > SEGMENT_HEADER_LEN && log.offset + len + TERMINATOR_LEN > log.limit;
            let upgrade = !log.prefilled
                && log
                    .next
                    .as_ref()
                    .is_some_and(|n| n.prefill && n.handle.is_finished());
            if full || upgrade {
                // The members placed so far go to the index first, so that the run counts the
                // rotation reads for GC include them.
                self.apply_placed(
                    members,
                    placed.get(applied..).unwrap_or(&[]),
                    &mut scratch.work,
                    &mut scratch.slack_charged,
                );
                applied = placed.len();
                split |= !placed.is_empty();
                match self.rotate(&mut log) {
                    Ok(_) => {
                        group_start = 0;
                        marked = false;
                    }
                    // No next segment on a full disk (nothing changed): a batch that only
                    // frees goes into this segment's freeing reserve; others are refused.
                    Err(e @ Error::NoSpace { .. }) if self.commit.poisoned().is_none() => {
                        if !(frees && log.offset + len + TERMINATOR_LEN <= log.reserved) {
                            if let Some(r) = results.get_mut(i) {
                                *r = Err(e.duplicate());
                            }
                            refused = Some(e);
                            continue;
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            // Space for the record (and, unless it only frees, the freeing reserve after it).
            let want =
                log.offset + len + TERMINATOR_LEN + if frees { 0 } else { self.freeing_reserve() };
            if want > log.reserved {
                if let Err(e) = self.reserve(&mut log, want) {
                    if let Some(r) = results.get_mut(i) {
                        *r = Err(e.duplicate());
                    }
                    refused = Some(e);
                    continue;
                }
            }
            let mut tail = self.tail.write();
            if !marked {
                // A sync marker first, if an fsync advanced the durable point (or this segment
                // has not yet declared the previous one's sealed length): see recovery::seal.
                if let Some(marker) = self.sync_point.marker_due(log.segment, log.offset) {
                    tail.bytes.extend_from_slice(&marker);
                    log.offset += marker.len() as u64;
                }
                marked = true;
            }
            let at = tail.bytes.len();
            tail.bytes.extend_from_slice(&m.record);
            if let Some(rec) = tail.bytes.get_mut(at..) {
                match m.crc {
                    (segment, crc) if segment == log.segment => set_crc(rec, crc),
                    _ => seal_record(rec, log.segment),
                }
            }
            drop(tail);
            placed.push((i, log.segment, log.offset));
            log.offset += len;
        }
        // The next segment is prepared once this one is half full, or a quarter full if this
        // one is zero-filled (the next one is then zero-filled for twice as many bytes, if this
        // one serves a synced workload that zero-filling pays for, and has time to be).
        let due = log.limit / if log.prefilled { 4 } else { 2 };
        if log.next.is_none() && log.offset >= due {
            log.await_pool = false;
            let prefill = self
                .wants_prefill(&log)
                .then(|| self.next_prefill_limit(&log));
            log.next = Some(self.prepare(log.segment + 1, prefill));
        }
        // Synced writes go to the file now (so a full disk refuses them, before anything is
        // acknowledged or applied; their thread waits anyway). Unsynced and asynchronous ones
        // wait in the buffer until it fills: an asynchronous writer is often an async runtime
        // thread, which must not make the system call; the sync round that makes it durable (on
        // the flusher) writes the buffer out first. Their space was reserved above, so that
        // write does not find the disk full either.
        let wants_durability = placed
            .iter()
            .filter_map(|&(i, _, _)| members.get(i))
            .any(|m| m.sync);
        if failure.is_none() && (wants_durability || self.tail.read().bytes.len() >= FLUSH_AT) {
            if let Err(e) = self.flush_tail(&mut log, Some(group_start)) {
                failure = Some(e);
            }
        }
        // Unsynced bytes piling up in the page cache: the flusher syncs them in the
        // background, so the rotation's fdatasync (on this thread) finds little left.
        if self.opts.bytes_per_sync > 0 && log.unsynced_bytes >= self.opts.bytes_per_sync {
            self.commit.request_background_sync();
        }
        if let Some(e) = failure {
            // Nothing of this group reached the index unless a rotation happened (and then the
            // engine is poisoned below). A full disk refuses it cleanly only if
            // none of its bytes can become durable: it placed nothing before a failed rotation,
            // and a failed flush dropped its bytes. Otherwise poison: nothing more is
            // acknowledged at all.
            let clean = matches!(e, Error::NoSpace { .. }) && !split;
            if !clean && self.commit.poisoned().is_none() {
                self.commit.poison(e.to_string());
            }
            return members.iter().map(|_| Err(e.duplicate())).collect();
        }
        self.apply_placed(
            members,
            placed.get(applied..).unwrap_or(&[]),
            &mut scratch.work,
            &mut scratch.slack_charged,
        );
        log.written += 1;
        let seq = log.written;
        if self.tail.read().bytes.is_empty() {
            log.flushed_seq = seq;
        }
        // Register durability waiters in sequence order, still under the log lock.
        for &(i, _, _) in placed.iter() {
            let Some(m) = members.get(i) else { continue };
            if m.sync {
                self.commit.register(seq, Waiter::Signal(m.signal.clone()));
            } else if let Some(cb) = m.callback.lock().take() {
                self.commit.register(seq, Waiter::Callback(cb));
            }
            if let Some(r) = results.get_mut(i) {
                *r = Ok(seq);
            }
        }
        log.scratch = scratch;
        results
    }

    /// Applies placed members `(member, segment, offset)` to the index: one lock per touched
    /// shard, and one update of the segment run counts. Called with the log lock; `work` and
    /// `slack_charged` are reused buffers.
    fn apply_placed(
        &self,
        members: &[Arc<Request>],
        placed: &[(usize, u64, u64)],
        work: &mut Vec<(usize, usize, usize)>,
        slack_charged: &mut Vec<bool>,
    ) {
        if placed.is_empty() {
            return;
        }
        let mut ctx = ApplyCtx {
            refs: RefDelta::default(),
            armed: self.gc.armed(),
            removed: Vec::new(),
        };
        work.clear();
        for (p, &(i, _, _)) in placed.iter().enumerate() {
            if let Some(m) = members.get(i) {
                for (k, op) in m.batch.ops.iter().enumerate() {
                    work.push((Groups::shard_index(op.group()), p, k));
                }
            }
        }
        // (shard, member, op) is unique: sorting whole tuples keeps each shard's ops in write
        // order without the allocation of a stable sort.
        work.sort_unstable();
        slack_charged.clear();
        slack_charged.resize(placed.len(), false);
        let mut at = 0;
        while let Some(&(shard_ix, _, _)) = work.get(at) {
            let mut shard = self.groups.shard_at(shard_ix).write();
            while let Some(&(s, p, k)) = work.get(at) {
                if s != shard_ix {
                    break;
                }
                at += 1;
                let Some(&(i, segment, offset)) = placed.get(p) else {
                    continue;
                };
                let Some(m) = members.get(i) else { continue };
                let spans = &m.batch.spans;
                let Some(op) = m.batch.ops.get(k) else {
                    continue;
                };
                let pos = RecordPos {
                    segment: segment as u32,
                    rec_off: offset as u32,
                    rec_len: m.record.len() as u32,
                };
                // Validation refused every misfit already: an error here is a bug, not input.
                if let Err(e) = apply_op(&mut shard, op.borrowed(), spans, pos, &mut ctx) {
                    debug_assert!(false, "a validated op was refused: {e}");
                    tracing::error!(error = %e, "a validated op was refused");
                } else if let Op::Append {
                    group,
                    spans: range,
                    ..
                } = op
                {
                    // The entry cache takes the append's payload, in the same critical section.
                    let first = slack_charged
                        .get_mut(p)
                        .is_some_and(|c| !std::mem::replace(c, true));
                    let spans = spans.get(range.clone()).unwrap_or_default();
                    self.cache
                        .fill(&mut shard, *group, pos, spans, &m.payload, first);
                }
            }
        }
        self.refs.apply(&ctx.refs);
        self.gc.note_removed(std::mem::take(&mut ctx.removed));
        self.cache.evict(&self.groups);
    }

    /// Writes the tail buffer to the active segment's file. Called with the log lock.
    ///
    /// On a full disk it returns [`Error::NoSpace`] without poisoning: the bytes stay buffered
    /// (readable) for a later flush, except, with `keep = Some(n)`, those from `n` on (the write
    /// group being written, not yet applied), which are dropped so the group can be refused.
    /// Any other failure poisons.
    pub(crate) fn flush_tail(&self, log: &mut LogWriter, keep: Option<usize>) -> Result<()> {
        let tail = self.tail.read();
        if tail.bytes.is_empty() {
            return Ok(());
        }
        let (base, len) = (tail.base, tail.bytes.len() as u64);
        // The terminator: the next flush writes over it.
        const TERMINATOR: [u8; TERMINATOR_LEN as usize] = [0; TERMINATOR_LEN as usize];
        let written = log
            .file
            .write_all_vectored_at(&[&tail.bytes, &TERMINATOR], base);
        drop(tail);
        if let Err(e) = written {
            let err = Error::io(format!("writing to segment {}", log.segment), e);
            // A full disk: cut whatever prefix reached the file so that no partial record stays
            // behind the next one, and keep the earlier bytes buffered (readable, written by a
            // later flush). If even the cut fails, the segment's tail is unknown: poison.
            if matches!(err, Error::NoSpace { .. }) && log.file.set_len(base).is_ok() {
                if let Some(n) = keep {
                    let mut tail = self.tail.write();
                    tail.bytes.truncate(n);
                    log.offset = base + n as u64;
                }
                return Err(err);
            }
            self.commit.poison(err.to_string());
            return Err(err);
        }
        crate::telemetry::bytes_written(len);
        log.unsynced_bytes += len;
        let mut tail = self.tail.write();
        tail.base = base + len;
        tail.bytes.clear();
        if tail.bytes.capacity() > 4 * FLUSH_AT {
            tail.bytes.shrink_to(FLUSH_AT);
        }
        self.flushed
            .store(pack_flushed(log.segment, base + len), Ordering::Release);
        log.flushed_seq = log.written;
        Ok(())
    }

    fn freeing_reserve(&self) -> u64 {
        freeing_reserve(self.opts.segment_size)
    }

    /// Grows the active segment's reservation to at least `want` bytes: by a step of its
    /// current size (1 to 16 MiB), up to the segment size plus the freeing reserve. Called with
    /// the log lock; one `fallocate`. Returns [`Error::NoSpace`] on a full disk (nothing
    /// changed); any other failure is logged and ignored (writes then grow the file).
    fn reserve(&self, log: &mut LogWriter, want: u64) -> Result<()> {
        let cap = self.opts.segment_size + self.freeing_reserve();
        let step = log.reserved.clamp(RESERVE_FIRST, RESERVE_MAX_STEP);
        let target = want.max((log.reserved + step).min(cap));
        let mut allocated = log.file.allocate(target);
        if allocated
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
            && self.pool.drain(self.fs.as_ref(), &self.dir) > 0
        {
            // A full disk gives the recycling pool back first.
            allocated = log.file.allocate(target);
        }
        match allocated {
            Ok(()) => {
                log.reserved = target;
                Ok(())
            }
            Err(e) => {
                let err = Error::io(
                    format!(
                        "reserving {target} bytes of segment {} ({} more)",
                        log.segment,
                        target.saturating_sub(log.reserved)
                    ),
                    e,
                );
                if matches!(err, Error::NoSpace { .. }) {
                    return Err(err);
                }
                tracing::warn!(error = %err, "reserving segment space");
                log.reserved = want;
                Ok(())
            }
        }
    }

    /// Gives back the space reserved ahead of the data, for a checkpoint on a full disk: the
    /// prepared next segment (removed; a later write prepares it again) and the active
    /// segment's reservation beyond its last record (its freeing reserve included; a later
    /// write reserves again). Failures are logged: this only makes room.
    pub(crate) fn release_reserved_space(&self) {
        // The recycling pool goes first: it holds no data at all.
        self.pool.drain(self.fs.as_ref(), &self.dir);
        let mut log = self.log.lock();
        let next_id = log.next.as_ref().map(|p| p.id);
        if let Some(id) = next_id {
            drop(self.stop_preparing(&mut log));
            let removed = self.fs.remove(&self.dir.join(segment_name(id)));
            if let Err(e) = removed.and_then(|()| self.fs.sync_dir(&self.dir)) {
                tracing::warn!(segment = id, error = %e, "giving back the prepared segment");
            }
        }
        if log.reserved > log.offset {
            match log.file.set_len(log.offset) {
                Ok(()) => {
                    log.reserved = log.offset;
                    log.prefilled = false;
                }
                Err(e) => tracing::warn!(error = %e, "giving back the active segment's reserve"),
            }
        }
    }

    /// Starts preparing segment `id` in the background: zero-filled for `prefill` bytes of
    /// records (a data limit, see [`Prepared::limit`]) or with its first reservation; from a
    /// pool file when the recycling pool holds one.
    pub(crate) fn prepare(&self, id: u64, prefill: Option<u64>) -> Preparing {
        let fs = self.fs.clone();
        let dir = self.dir.clone();
        let segment_size = self.opts.segment_size;
        let size = match prefill {
            Some(limit) => limit + self.freeing_reserve(),
            None => first_reservation(segment_size),
        };
        let pooled = self.pool.take();
        let recycled = self.pool.recycled.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let zero = prefill.is_some();
        let handle = std::thread::spawn(move || {
            if let Some(pool_id) = pooled {
                match recycle_segment(fs.as_ref(), &dir, pool_id, id, size, zero, &stop) {
                    Ok((file, written_to)) => {
                        Pool::count_recycled(&recycled);
                        return Ok(Prepared::new(file, written_to, true, prefill, segment_size));
                    }
                    Err(e) => {
                        tracing::warn!(segment = id, error = %e, "recycling a pool file failed");
                    }
                }
            }
            let file = create_segment(fs.as_ref(), &dir, id, size)?;
            let written_to = if zero {
                zero_fill(file.as_ref(), id, SEGMENT_HEADER_LEN, size, &stop)?
            } else {
                SEGMENT_HEADER_LEN
            };
            Ok(Prepared::new(
                file,
                written_to,
                false,
                prefill,
                segment_size,
            ))
        });
        Preparing {
            id,
            handle,
            prefill: prefill.is_some(),
            cancel,
        }
    }

    /// A segment that was already prepared (an empty segment found at open).
    pub(crate) fn prepared(&self, id: u64, file: Arc<dyn FsFile>) -> Preparing {
        let segment_size = self.opts.segment_size;
        Preparing {
            id,
            handle: std::thread::spawn(move || {
                let recycled = crate::segment::is_recycled(file.as_ref());
                Ok(Prepared::new(
                    file,
                    SEGMENT_HEADER_LEN,
                    recycled,
                    None,
                    segment_size,
                ))
            }),
            prefill: false,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the active segment serves a synced workload that zero-filling pays for: at
    /// least [`PREFILL_AFTER_SYNCS`] fdatasyncs for waiters, covering on average at most
    /// [`PREFILL_MAX_BYTES_PER_SYNC`] each.
    fn wants_prefill(&self, log: &LogWriter) -> bool {
        let syncs = u64::from(log.syncs_in_segment);
        self.opts.prefill_segments
            && log.syncs_in_segment >= PREFILL_AFTER_SYNCS
            && log.offset.saturating_sub(SEGMENT_HEADER_LEN) / syncs.max(1)
                <= PREFILL_MAX_BYTES_PER_SYNC
    }

    /// The data limit of the next zero-filled segment: twice the active one's if that one is
    /// zero-filled, [`PREFILL_FIRST`] otherwise; at most the segment size.
    fn next_prefill_limit(&self, log: &LogWriter) -> u64 {
        let limit = if log.prefilled {
            log.limit.saturating_mul(2)
        } else {
            PREFILL_FIRST
        };
        limit.min(self.opts.segment_size)
    }

    /// Called by a sync leader with the log lock: the active segment serves durable writes.
    /// Zero-filling pays off only for them (cheaper fdatasync), so it is decided here: if the
    /// segment being prepared is not zero-filled, it is zero-filled once ready, and the writer
    /// moves to it as soon as that is done (see `write_group`).
    fn note_sync(&self, log: &mut LogWriter) {
        log.syncs_in_segment = log.syncs_in_segment.saturating_add(1);
        if log.prefilled || log.next.as_ref().is_some_and(|n| n.prefill) || !self.wants_prefill(log)
        {
            return;
        }
        let limit = self.next_prefill_limit(log);
        let Some(pending) = log.next.take() else {
            // Nothing prepared yet (the segment is not half full): a synced workload wants the
            // next segment now, zero-filled, and moves to it once it is ready; unless a file
            // is on its way to the recycling pool (prepared from it at half full).
            if !log.await_pool {
                log.next = Some(self.prepare(log.segment + 1, Some(limit)));
            }
            return;
        };
        let id = pending.id;
        let segment_size = self.opts.segment_size;
        let size = limit + self.freeing_reserve();
        let cancel = pending.cancel.clone();
        let stop = cancel.clone();
        let handle = std::thread::spawn(move || {
            let prepared = pending.handle.join().map_err(|_| {
                Error::io(
                    "preparing a segment",
                    std::io::Error::other("preparation thread panicked"),
                )
            })??;
            if prepared.prefilled {
                return Ok(prepared);
            }
            // Only what is not written yet (a recycled file is written up to its old length).
            let from = prepared.written_to.max(SEGMENT_HEADER_LEN);
            let written_to = zero_fill(prepared.file.as_ref(), id, from, size, &stop)?;
            Ok(Prepared::new(
                prepared.file,
                written_to,
                prepared.recycled,
                Some(limit),
                segment_size,
            ))
        });
        log.next = Some(Preparing {
            id,
            handle,
            prefill: true,
            cancel,
        });
    }

    /// Takes the prepared next segment, cancelling a zero-fill still running (the segment is
    /// usable as reserved space), or creates it inline if its preparation failed.
    fn take_next(&self, log: &mut LogWriter, next_id: u64) -> Result<Prepared> {
        if let Some(p) = log.next.take() {
            if p.id == next_id {
                p.cancel.store(true, Ordering::Relaxed);
                match p.handle.join() {
                    Ok(Ok(prepared)) => return Ok(prepared),
                    Ok(Err(e)) => tracing::warn!(error = %e, "preparing the next segment failed"),
                    Err(_) => tracing::warn!("the segment preparation thread panicked"),
                }
            }
        }
        // Prepare failed (or was never started): try once more inline. A leftover file of that
        // id is garbage from the failed attempt.
        let _ = self.fs.remove(&self.dir.join(segment_name(next_id)));
        let size = first_reservation(self.opts.segment_size);
        if let Some(pool_id) = self.pool.take() {
            let no_cancel = AtomicBool::new(false);
            let (fs, dir) = (self.fs.as_ref(), &self.dir);
            match recycle_segment(fs, dir, pool_id, next_id, size, false, &no_cancel) {
                Ok((file, written_to)) => {
                    Pool::count_recycled(&self.pool.recycled);
                    let size = self.opts.segment_size;
                    return Ok(Prepared::new(file, written_to, true, None, size));
                }
                Err(e) => tracing::warn!(error = %e, "recycling a pool file failed"),
            }
        }
        let file = create_segment(self.fs.as_ref(), &self.dir, next_id, size)?;
        let size = self.opts.segment_size;
        Ok(Prepared::new(file, SEGMENT_HEADER_LEN, false, None, size))
    }

    /// Seals the active segment (tail written out, trimmed, fsynced) and switches to the next
    /// one. Called with the log lock.
    /// Returns the GC job it armed, if any.
    pub(crate) fn rotate(&self, log: &mut LogWriter) -> Result<Option<u64>> {
        let _span = tracing::debug_span!("rotation", from = log.segment).entered();
        self.flush_tail(log, None)?;
        // Judged on the segment being sealed (see below).
        let synced_workload = self.wants_prefill(log);
        let next_id = log.segment + 1;
        if next_id > u64::from(u32::MAX) {
            return Err(self.fail(Error::SegmentIdsExhausted));
        }
        let Prepared {
            file,
            prefilled,
            limit,
            ..
        } = self.take_next(log, next_id)?;
        // A sealed segment ends with its last record: recovery reads no zero tail, and the space
        // reserved beyond the data goes back to the file system.
        if log.file.len().map_or(true, |l| l > log.offset) {
            if let Err(e) = log.file.set_len(log.offset) {
                return Err(self.fail(Error::io(format!("trimming segment {}", log.segment), e)));
            }
        }
        let what = format!("fdatasync of segment {} before rotation", log.segment);
        self.commit.guarded_sync(&what, || log.file.sync_data())?;
        self.sync_point.rotated(log.segment, log.offset);
        self.commit.mark_synced(log.written);
        log.unsynced_bytes = 0;
        log.reserved = file.len().unwrap_or(SEGMENT_HEADER_LEN);
        let segments = {
            let mut segments = self.segments.write();
            segments.insert(next_id, file.clone());
            segments.len()
        };
        crate::telemetry::rotation(segments);
        log.segment = next_id;
        self.active_segment.store(next_id, Ordering::Relaxed);
        log.file = file;
        log.offset = SEGMENT_HEADER_LEN;
        {
            let mut tail = self.tail.write();
            tail.segment = next_id;
            tail.base = SEGMENT_HEADER_LEN;
            tail.bytes.clear();
        }
        self.flushed
            .store(pack_flushed(next_id, SEGMENT_HEADER_LEN), Ordering::Release);
        // The segment after it: if the sealed one served a synced workload that zero-filling
        // pays for and this one is not zero-filled, it is zero-filled now (and the writer moves
        // to it once it is ready, see `write_group`). If this one is zero-filled, the next one
        // (for twice as many bytes, see `next_prefill_limit`) waits until a quarter of this one
        // is used: a workload that stops early (an election storm writes a few MiB) zero-fills
        // no more than it used. Otherwise the next one is prepared once this one is half full,
        // zero-filled only if this one serves such a workload by then. A bulk, unsynced load
        // gains nothing from zero-filling and would write every byte twice.
        //
        // With recycling, a GC armed by this rotation is about to put a dead segment's file in
        // the pool: the next segment is then prepared at half full, from that file, instead of
        // zero-filling a new one now (which would also hold one more segment on disk while the
        // pool holds the dead one).
        log.prefilled = prefilled;
        log.limit = limit;
        log.syncs_in_segment = 0;
        let job = if self.opts.auto_gc {
            self.arm_gc(log)
        } else {
            None
        };
        log.await_pool =
            self.opts.recycle_segments > 0 && job.is_some() && self.pool.usage().0 == 0;
        if synced_workload && !log.await_pool && !log.prefilled {
            let limit = self.next_prefill_limit(log);
            log.next = Some(self.prepare(next_id + 1, Some(limit)));
        }
        Ok(job)
    }

    /// Cancels and joins the segment preparation (shutdown); returns the prepared file, if any.
    pub(crate) fn stop_preparing(&self, log: &mut LogWriter) -> Option<Prepared> {
        let p = log.next.take()?;
        p.cancel.store(true, Ordering::Relaxed);
        p.handle.join().ok().and_then(|r| r.ok())
    }
}

/// Zero-fills `[from, to)` of segment `id` (see [`crate::segment::zero_fill_range`]); returns
/// where it stopped (a rotation cancels it).
fn zero_fill(file: &dyn FsFile, id: u64, from: u64, to: u64, cancel: &AtomicBool) -> Result<u64> {
    crate::segment::zero_fill_range(file, from, to, cancel)
        .map_err(|e| Error::io(format!("prefilling segment {id}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_behind_an_owner_write_in_the_same_group_is_refused() {
        let groups = Groups::default();
        let mut owner = WriteBatch::new();
        owner.append(1, 1, [b"new entry"]);
        // The rewrite read version 0 (the group as the index has it): alone it is valid...
        let mut rewrite = WriteBatch::new();
        rewrite.append(1, 1, [b"stale copy"]);
        rewrite.expect_version.push((1, 0));
        groups
            .shard(1)
            .write()
            .insert(1, crate::index::Group::default());
        assert!(validate(
            &groups,
            &rewrite,
            &mut RangeMap::default(),
            &mut RangeMap::default()
        )
        .is_ok());
        // ...but not behind an unapplied owner write to the same group in one write group.
        let mut overlay = RangeMap::default();
        validate(&groups, &owner, &mut overlay, &mut RangeMap::default()).unwrap();
        assert!(matches!(
            validate(&groups, &rewrite, &mut overlay, &mut RangeMap::default()),
            Err(Error::GroupChanged { .. })
        ));
    }
}
