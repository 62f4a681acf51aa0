//! Garbage collection: finding dead segments, storing the checkpoint that lets them go, deleting
//! them, rewriting groups that pin sparse old segments, and telling the caller who holds the
//! rest.
//!
//! A checkpoint covers the log below a *position* `(B, O)`: every record of the segments below
//! `B` and the records of segment `B` starting below offset `O` (see `checkpoint`). GC never
//! rotates to get a boundary: it arms a checkpoint at the current end of the log, wherever that
//! is in the active segment.
//!
//! Invariants:
//! - A segment is deleted only after a durable checkpoint covers it and no group references it;
//!   at that point its file may go to the recycling pool instead (`pool`), if no reader holds it.
//! - A checkpoint at `(B, O)` is stored only once every record below `(B, O)` is durable: the GC
//!   thread waits for the write group that ended at `(B, O)` through the sync stage (it never
//!   fsyncs the log itself), because the checkpoint holds their effects.
//! - Dead segments are found in O(segments) from the per-segment run counts (`SegmentRefs`): a
//!   sealed segment with no run is dead, and stays dead (runs are only added for the active
//!   segment).
//! - The checkpoint at `(B, O)` holds every group's metadata exactly as it was at that position,
//!   although it is collected later, on the GC thread, while writers go on: while a collection
//!   is armed, the first write to a group at or after `(B, O)` saves the group's metadata first
//!   (`Group::at_boundary`), and removing a group that existed at `(B, O)` hands its metadata to
//!   the collection. Only one collection is armed at a time.
//! - Checkpoints, deletions and rewrites run on the GC thread or the caller of [`Engine::gc`],
//!   never under the log lock or on a writer's path; checkpoints are stored in position order.
//! - Convergence: a rewrite only moves groups that hold sealed segments into the active one, and
//!   only when the bytes it copies are at most a quarter of the bytes it frees; a second
//!   [`Engine::gc`] with nothing newly dead and nothing worth rewriting writes nothing.
//! - A full disk only postpones a checkpoint: before giving up, the GC thread gives back the
//!   space reserved ahead (the prepared next segment, the active segment's reservation beyond
//!   its data and the freeing reserve) and tries once more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::batch::WriteBatch;
use crate::checkpoint::{Checkpoint, GroupMeta};
use crate::commit::{Signal, Waiter};
use crate::engine::{Engine, Inner};
use crate::error::{Error, Result};
use crate::options::MAX_RECORD_BYTES;
use crate::pipeline::{pack_flushed, Durability, LogWriter};

/// A rewrite copies at most `1 / REWRITE_COPY_FRACTION` of the bytes it frees.
pub(crate) const REWRITE_COPY_FRACTION: u64 = 4;

/// What one call of [`Engine::gc`] did and found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GcReport {
    /// Segments removed from the log: their files deleted, or kept for recycling (those are
    /// also in `recycled_segments`).
    pub deleted_segments: Vec<u64>,
    /// Bytes of the segment files deleted (given back to the file system; files kept for
    /// recycling are not counted).
    pub freed_bytes: u64,
    /// Segments whose files were kept for reuse as new segments
    /// ([`crate::Options::recycle_segments`]) instead of being deleted.
    pub recycled_segments: Vec<u64>,
    /// Groups rewritten into the active segment so that old segments could go.
    pub rewritten_groups: Vec<u64>,
    /// Payload bytes those rewrites copied.
    pub rewritten_bytes: u64,
    /// Segments still on disk after this call.
    pub live_segments: usize,
    /// Every group that keeps a sealed segment alive (uncapped), the group whose compaction
    /// would free the most first (then the oldest segment first). Purging (compacting) these
    /// groups lets GC go further.
    pub holders: Vec<GcHolder>,
    /// What a full disk made this call leave for a later one, if anything: rewrites (the
    /// deletions still ran), or the deletions themselves (the checkpoint could not be stored).
    /// Any other failure poisons the engine and is returned as the error.
    pub postponed: Option<String>,
}

/// A group that keeps sealed segments alive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcHolder {
    /// The group.
    pub group: u64,
    /// The oldest segment it references.
    pub oldest_segment: u64,
    /// Its entries held in sealed segments (not the active one).
    pub live_entries: u64,
    /// The payload bytes of those entries.
    pub live_bytes: u64,
    /// Bytes of the sealed segments that only this group keeps alive: what compacting it past
    /// them (or a rewrite of it) would free.
    pub would_free_bytes: u64,
}

/// A checkpoint to collect and the segments it frees.
struct Job {
    /// The packed position `(B, O)` the checkpoint covers the log below.
    position: u64,
    /// The write group that ended at `position`: durable before the checkpoint is stored.
    seq: u64,
    dead: Vec<u64>,
    survivors: Vec<u64>,
}

/// What the last job did.
#[derive(Default, Clone)]
struct Outcome {
    deleted: Vec<u64>,
    freed: u64,
    pooled: Vec<u64>,
    postponed: Option<String>,
}

#[derive(Default)]
struct Queue {
    job: Option<Job>,
    /// Jobs finished (or dropped) so far, and what the last one did.
    done: u64,
    queued: u64,
    last: Outcome,
    shutdown: bool,
}

/// The GC thread's mailbox.
#[derive(Default)]
pub(crate) struct GcState {
    /// The packed position whose checkpoint is being collected (0: none).
    armed: AtomicU64,
    /// Groups removed at or after the armed position that existed at it, with their metadata
    /// as of the position (filled by the write leader under the log lock, one push per removal).
    removed: Mutex<Vec<(u64, GroupMeta)>>,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// The packed position of the last checkpoint stored.
    last_checkpoint: Mutex<u64>,
}

impl GcState {
    /// The position being collected, read by the write leader under the log lock.
    pub(crate) fn armed(&self) -> u64 {
        self.armed.load(Ordering::Acquire)
    }

    /// Hands the collection the metadata of groups removed since the armed position.
    pub(crate) fn note_removed(&self, removed: Vec<(u64, GroupMeta)>) {
        if !removed.is_empty() {
            self.removed.lock().extend(removed);
        }
    }

    /// Disarms the job armed at `position`, if it is still the armed one; a later job armed
    /// meanwhile stays armed.
    fn disarm_job(&self, position: u64) {
        let _ = self
            .armed
            .compare_exchange(position, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn shutdown(&self) {
        let mut q = self.queue.lock();
        q.shutdown = true;
        self.cv.notify_all();
    }
}

impl Inner {
    /// Arms a checkpoint at the current end of the log (`log`'s segment and offset) if some
    /// sealed segment is dead and no collection is armed. Called with the log lock held;
    /// O(segments). Returns the job's number, if one was queued.
    pub(crate) fn arm_gc(&self, log: &LogWriter) -> Option<u64> {
        if self.gc.armed() != 0 {
            return None;
        }
        if u32::try_from(log.segment).is_err() || u32::try_from(log.offset).is_err() {
            return None;
        }
        let position = pack_flushed(log.segment, log.offset);
        let (dead, survivors): (Vec<u64>, Vec<u64>) = self
            .segments
            .read()
            .keys()
            .copied()
            .filter(|&s| s < log.segment)
            .partition(|&s| self.refs.count(s) == 0);
        if dead.is_empty() {
            return None;
        }
        let mut q = self.gc.queue.lock();
        if q.job.is_some() {
            return None;
        }
        self.gc.removed.lock().clear();
        self.gc.armed.store(position, Ordering::Release);
        q.queued += 1;
        q.job = Some(Job {
            position,
            seq: log.written,
            dead,
            survivors,
        });
        self.gc.cv.notify_all();
        Some(q.queued)
    }

    /// The GC thread: collects armed checkpoints, stores them, deletes what they free.
    pub(crate) fn run_gc_thread(&self) {
        loop {
            let job = {
                let mut q = self.gc.queue.lock();
                loop {
                    if q.shutdown {
                        return;
                    }
                    if let Some(job) = q.job.take() {
                        break job;
                    }
                    self.gc.cv.wait(&mut q);
                }
            };
            let span = tracing::info_span!(
                "gc",
                segment = job.position >> 32,
                offset = job.position & 0xFFFF_FFFF
            )
            .entered();
            let position = job.position;
            let result = self.collect_and_delete(job);
            // Disarm only if this job is still the armed one (a failure before `collect`
            // leaves it armed). `collect` disarms under the log lock, and a rotation may arm
            // the next job right after, while this one is still storing and deleting: a plain
            // store of 0 here would disarm that job, its first writes would save no metadata,
            // and its checkpoint would miss their groups.
            self.gc.disarm_job(position);
            if let Ok(done) = &result {
                tracing::debug!(
                    deleted = done.deleted.len(),
                    freed = done.freed,
                    "GC job done"
                );
                crate::telemetry::gc_run(
                    done.freed,
                    self.segments.read().len(),
                    self.pool.usage().0,
                );
                self.stats();
            }
            drop(span);
            let mut q = self.gc.queue.lock();
            q.done += 1;
            q.last = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "GC failed");
                    Outcome {
                        postponed: Some(e.to_string()),
                        ..Outcome::default()
                    }
                }
            };
            self.gc.cv.notify_all();
        }
    }

    /// Waits until write group `seq` is durable. The GC thread waits as a callback, not as a
    /// parked writer, and leaves the fdatasync to the flusher (or a writer leading the sync
    /// stage): a parked writer may be made sync leader, and a sync leader goes on syncing for
    /// others as long as their callbacks keep coming, so a GC job could stall behind a busy
    /// writer for as long as it writes.
    fn wait_written_durable(&self, seq: u64) -> Result<()> {
        let signal = Arc::new(Signal::default());
        let done = signal.clone();
        self.commit.register(
            seq,
            Waiter::Callback(Box::new(move |r| done.update(|s| s.durable = Some(r)))),
        );
        self.commit.kick(false);
        signal.wait_for(|s| s.durable.take())
    }

    /// Every group's metadata at the armed position `b`. Disarms.
    fn collect(&self, b: u64) -> Vec<(u64, GroupMeta)> {
        let mut groups: Vec<(u64, GroupMeta)> = Vec::new();
        for shard in self.groups.shards() {
            let shard = shard.read();
            for (&id, g) in shard.iter() {
                if g.last_pos < b {
                    groups.push((id, g.meta()));
                } else if let Some((at, meta)) = &g.at_boundary {
                    if *at == b {
                        groups.push((id, (**meta).clone()));
                    }
                }
                // Otherwise the group did not exist at the position (or was removed and
                // created again since: its metadata at the position is in `removed`).
            }
        }
        // Disarm and take the removals in one step under the log lock: every removal applied
        // before the disarm is in `removed`, and no later collection can be armed in between
        // (arming clears `removed`, and it happens under the log lock too).
        let removed = {
            let _log = self.log.lock();
            self.gc.armed.store(0, Ordering::Release);
            std::mem::take(&mut *self.gc.removed.lock())
        };
        let present: BTreeSet<u64> = groups.iter().map(|(id, _)| *id).collect();
        groups.extend(removed.into_iter().filter(|(id, _)| !present.contains(id)));
        groups.sort_unstable_by_key(|(id, _)| *id);
        groups
    }

    fn collect_and_delete(&self, job: Job) -> Result<Outcome> {
        // The checkpoint holds the effects of every record below its position: those records
        // must be durable first.
        self.wait_written_durable(job.seq)?;
        let groups = self.collect(job.position);
        let checkpoint = Checkpoint {
            covers_below: job.position >> 32,
            covers_offset: job.position & 0xFFFF_FFFF,
            survivors: job.survivors,
            groups,
        };
        let mut last = self.gc.last_checkpoint.lock();
        if checkpoint.position() <= *last {
            return Ok(Outcome::default());
        }
        self.commit.check_poison()?;
        let stored = match checkpoint.store(self.fs.as_ref(), &self.dir) {
            Err(Error::NoSpace { .. }) => {
                // A full disk: give back the space reserved ahead, then try once more.
                self.release_reserved_space();
                checkpoint.store(self.fs.as_ref(), &self.dir)
            }
            other => other,
        };
        match stored {
            Ok(()) => {}
            // A full disk only postpones GC (nothing was deleted yet); any other failure
            // poisons.
            Err(e @ Error::NoSpace { .. }) => {
                return Ok(Outcome {
                    postponed: Some(e.to_string()),
                    ..Outcome::default()
                })
            }
            Err(e) => return Err(self.fail(e)),
        }
        *last = checkpoint.position();
        let mut freed = 0;
        let mut pooled: Vec<(u64, u64)> = Vec::new();
        for id in &job.dead {
            // Out of the segment map first: no reader can take a new handle to it after this.
            let file = self.segments.write().remove(id);
            let len = file.as_ref().and_then(|f| f.len().ok()).unwrap_or(0);
            // Kept for recycling if no reader holds it and the pool has room; else deleted. A
            // dead segment left behind is harmless: recovery removes it (the checkpoint no
            // longer lists it).
            let max = self.opts.recycle_segments;
            match self
                .pool
                .retire(self.fs.as_ref(), &self.dir, *id, file, pooled.len(), max)
            {
                Ok(Some(len)) => pooled.push((*id, len)),
                Ok(None) => freed += len,
                Err(e) => tracing::warn!(segment = id, error = %e, "removing a dead segment"),
            }
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| self.fail(Error::io("syncing the directory after GC", e)))?;
        let pooled_ids = pooled.iter().map(|&(id, _)| id).collect();
        self.pool.add(pooled);
        Ok(Outcome {
            deleted: job.dead,
            freed,
            pooled: pooled_ids,
            postponed: None,
        })
    }

    /// Waits until GC job `n` (or a later one) is done; returns what the last job did.
    fn wait_gc_job(&self, n: u64) -> Outcome {
        let mut q = self.gc.queue.lock();
        while q.done < n && !q.shutdown {
            self.gc.cv.wait(&mut q);
        }
        q.last.clone()
    }

    /// Waits until no GC job is queued or being collected.
    fn wait_gc_idle(&self) {
        let mut q = self.gc.queue.lock();
        while q.done < q.queued && !q.shutdown {
            self.gc.cv.wait(&mut q);
        }
    }

    /// What every sealed segment holds and who holds it. O(groups + their entries in sealed
    /// segments); runs on the caller of [`Engine::gc`], one shard read lock at a time.
    fn survey(&self, active: u64) -> Survey {
        let mut survey = Survey::default();
        for (&id, file) in self.segments.read().iter() {
            if id < active {
                survey.sizes.insert(id, file.len().unwrap_or(0));
            }
        }
        for shard in self.groups.shards() {
            for (&id, g) in shard.read().iter() {
                let Some(oldest) = g.entries.oldest_segment() else {
                    continue;
                };
                if u64::from(oldest) >= active {
                    continue;
                }
                let mut held = Held {
                    oldest: u64::from(oldest),
                    version: g.version,
                    entries: g.entries.range().len,
                    ..Held::default()
                };
                g.entries.for_each_run(|run, entries, bytes| {
                    held.bytes += bytes;
                    let seg = u64::from(run.segment);
                    if seg < active {
                        held.sealed_entries += entries;
                        held.sealed_bytes += bytes;
                        let holders = survey.holders.entry(seg).or_default();
                        if holders.last() != Some(&id) {
                            holders.push(id);
                        }
                    }
                });
                survey.groups.insert(id, held);
            }
        }
        survey
    }
}

/// One group that holds sealed segments.
#[derive(Default)]
struct Held {
    oldest: u64,
    version: u64,
    /// All its entries, and their payload bytes (what a rewrite copies).
    entries: u64,
    bytes: u64,
    /// Its entries (and their bytes) in sealed segments.
    sealed_entries: u64,
    sealed_bytes: u64,
}

#[derive(Default)]
struct Survey {
    /// Sealed segments and their file sizes.
    sizes: BTreeMap<u64, u64>,
    /// Sealed segments and the groups holding them (none: dead).
    holders: BTreeMap<u64, Vec<u64>>,
    groups: HashMap<u64, Held>,
}

impl Survey {
    /// The groups to rewrite: segment by segment, oldest first, the holders of a segment not
    /// yet chosen, if every one of them can be rewritten (at most `max_entries` entries, one
    /// record) and together they copy at most a quarter of the segment's size.
    fn choose_rewrites(&self, max_entries: u64) -> Vec<u64> {
        let mut chosen: BTreeSet<u64> = BTreeSet::new();
        if max_entries == 0 {
            return Vec::new();
        }
        for (seg, holders) in &self.holders {
            let fresh: Vec<&u64> = holders.iter().filter(|g| !chosen.contains(g)).collect();
            if fresh.is_empty() {
                continue;
            }
            let mut copy = 0u64;
            let mut ok = true;
            for g in &fresh {
                let Some(h) = self.groups.get(g) else {
                    ok = false;
                    break;
                };
                if h.entries > max_entries || h.bytes > MAX_RECORD_BYTES / 4 {
                    ok = false;
                    break;
                }
                copy = copy.saturating_add(h.bytes);
            }
            let size = self.sizes.get(seg).copied().unwrap_or(0);
            if ok && copy.saturating_mul(REWRITE_COPY_FRACTION) <= size {
                chosen.extend(fresh.into_iter().copied());
            }
        }
        chosen.into_iter().collect()
    }

    /// Every holder, the one whose compaction would free the most first.
    fn holders(&self) -> Vec<GcHolder> {
        let mut sole: HashMap<u64, u64> = HashMap::new();
        for (seg, holders) in &self.holders {
            if let [only] = holders.as_slice() {
                *sole.entry(*only).or_default() += self.sizes.get(seg).copied().unwrap_or(0);
            }
        }
        let mut out: Vec<GcHolder> = self
            .groups
            .iter()
            .map(|(&group, h)| GcHolder {
                group,
                oldest_segment: h.oldest,
                live_entries: h.sealed_entries,
                live_bytes: h.sealed_bytes,
                would_free_bytes: sole.get(&group).copied().unwrap_or(0),
            })
            .collect();
        out.sort_unstable_by(|a, b| {
            b.would_free_bytes
                .cmp(&a.would_free_bytes)
                .then(a.oldest_segment.cmp(&b.oldest_segment))
                .then(a.group.cmp(&b.group))
        });
        out
    }
}

impl Engine {
    /// Garbage collection: deletes every sealed segment no group references any more, after
    /// storing a checkpoint that preserves what recovery needs from them (each group's range,
    /// vote, committed marker and keys). Groups that keep sparse old segments alive are first
    /// rewritten into the active segment when that copies at most a quarter of the bytes it
    /// frees (and they hold at most [`crate::Options::gc_rewrite_max_entries`] entries); the
    /// groups that still hold old segments are returned in [`GcReport::holders`].
    ///
    /// It never rotates: the checkpoint covers the log up to its current end, inside the active
    /// segment. A second call with nothing newly dead and nothing worth rewriting writes
    /// nothing. Writers are not blocked by it: the checkpoint is collected and stored, and
    /// segments deleted, on the engine's GC thread (after the records it covers are durable).
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`] once the engine is poisoned; I/O errors of a rewrite. A full disk is
    /// not an error: it postpones rewrites, or the deletions if even the checkpoint cannot be
    /// stored after the space reserved ahead was given back ([`GcReport::postponed`] says so).
    pub fn gc(&self) -> Result<GcReport> {
        let inner = self.inner();
        let _serial = inner.gc_serial.lock();
        inner.commit.check_poison()?;
        inner.wait_gc_idle();
        let mut report = GcReport::default();
        let active = inner.active_segment.load(Ordering::Relaxed);
        let mut survey = inner.survey(active);
        let to_rewrite = survey.choose_rewrites(inner.opts.gc_rewrite_max_entries);
        for group in to_rewrite {
            let Some(held) = survey.groups.get(&group) else {
                continue;
            };
            let bytes = held.bytes;
            match self.rewrite_group(group, held.version) {
                Ok(true) => {
                    report.rewritten_groups.push(group);
                    report.rewritten_bytes += bytes;
                }
                Ok(false) => {}
                // A full disk: no more rewrites now; the deletions below still give space back.
                Err(e @ Error::NoSpace { .. }) => {
                    report.postponed = Some(format!("rewrites: {e}"));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !report.rewritten_groups.is_empty() {
            survey = inner.survey(inner.active_segment.load(Ordering::Relaxed));
        }
        report.holders = survey.holders();
        let any_dead = {
            let active = inner.active_segment.load(Ordering::Relaxed);
            inner
                .segments
                .read()
                .keys()
                .any(|&s| s < active && inner.refs.count(s) == 0)
        };
        if any_dead {
            // The checkpoint covers the log up to where it ends now: no rotation.
            let job = {
                let log = inner.log.lock();
                inner.arm_gc(&log)
            };
            match job {
                Some(n) => {
                    let outcome = inner.wait_gc_job(n);
                    report.deleted_segments = outcome.deleted;
                    report.freed_bytes = outcome.freed;
                    report.recycled_segments = outcome.pooled;
                    report.postponed = outcome.postponed.or(report.postponed);
                }
                None => inner.wait_gc_idle(),
            }
            inner.commit.check_poison()?;
        }
        report.live_segments = inner.segments.read().len();
        Ok(report)
    }

    /// Rewrites `group`'s live entries into the active segment, unless the group changed since
    /// `version` was read. Returns whether it was rewritten.
    fn rewrite_group(&self, group: u64, version: u64) -> Result<bool> {
        let Some(first) = self.first_index(group) else {
            return Ok(false);
        };
        let entries = self.entries(group, first..u64::MAX, usize::MAX)?;
        if entries.is_empty() {
            return Ok(false);
        }
        // One atomic record (an append replaces the tail, so a rewrite cannot be split): a group
        // too large for one record is left to its owner to compact.
        if !rewrite_fits_one_record(entries.iter().map(Vec::len)) {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        batch.append(group, first, &entries);
        batch.expect_version.push((group, version));
        match self.inner().submit(batch, Durability::Unsynced) {
            Ok(()) => Ok(true),
            // The group changed meanwhile: its owner's writes are newer; skip it.
            Err(Error::GroupChanged { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether a rewrite of entries of these lengths stays one record well under the record limit
/// (issue 8, item 2: a rewrite above `MAX_RECORD_BYTES` was written, then refused by recovery
/// after the originals were deleted). Counts a generous per-entry and per-record overhead, and
/// keeps to half the limit so compression flags and headers never matter.
fn rewrite_fits_one_record(lens: impl Iterator<Item = usize>) -> bool {
    let bytes = lens.fold(1024u64, |sum, len| {
        sum.saturating_add((len as u64).saturating_add(16))
    });
    bytes <= MAX_RECORD_BYTES / 2
}

/// Starts the GC thread.
pub(crate) fn spawn(inner: Arc<Inner>) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mrwal-gc".into())
        .spawn(move || inner.run_gc_thread())
        .map_err(|e| Error::io("starting the GC thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GC thread finishing a job must not disarm the next one, armed by a rotation while
    /// the first was still storing its checkpoint (found by the crash explorer: that job's
    /// checkpoint then missed the groups first written after its position).
    #[test]
    fn finishing_a_job_leaves_a_later_armed_job_armed() {
        let gc = GcState::default();
        let (first, second) = (pack_flushed(3, 4096), pack_flushed(4, 32));
        gc.armed.store(first, Ordering::Release);
        // `collect` disarmed the first job; a rotation armed the second.
        gc.armed.store(0, Ordering::Release);
        gc.armed.store(second, Ordering::Release);
        gc.disarm_job(first);
        assert_eq!(gc.armed(), second);
        // A job that failed before `collect` is still armed: finishing it disarms it.
        gc.disarm_job(second);
        assert_eq!(gc.armed(), 0);
    }

    #[test]
    fn a_rewrite_never_builds_a_record_near_the_limit() {
        let half = (MAX_RECORD_BYTES / 2) as usize;
        assert!(rewrite_fits_one_record([100usize; 10].into_iter()));
        // One entry that alone is at the limit, and many that add up past half of it.
        assert!(!rewrite_fits_one_record(
            [MAX_RECORD_BYTES as usize].into_iter()
        ));
        assert!(!rewrite_fits_one_record(std::iter::repeat_n(
            half / 1000,
            1001
        )));
        // The boundary: exactly half of the limit with the overheads fits, one byte more not.
        assert!(rewrite_fits_one_record([half - 1024 - 16].into_iter()));
        assert!(!rewrite_fits_one_record([half - 1024 - 15].into_iter()));
        // No overflow on absurd lengths.
        assert!(!rewrite_fits_one_record(
            [usize::MAX, usize::MAX].into_iter()
        ));
    }
}
