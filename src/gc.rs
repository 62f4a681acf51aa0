//! Garbage collection: finding dead segments, storing the checkpoint that lets them go, deleting
//! them, rewriting small groups that pin sparse old segments, and telling the caller who holds
//! the rest.
//!
//! Invariants:
//! - A segment is deleted only after a durable checkpoint covers it and no group references it.
//! - Dead segments are found in O(segments) from the per-segment run counts (`SegmentRefs`):
//!   at a rotation to segment `B`, a sealed segment below `B` with no run is dead at boundary
//!   `B`, and stays dead (runs are only added for the active segment).
//! - The checkpoint for boundary `B` holds every group's metadata exactly as it was at the start
//!   of segment `B`, although it is collected later, on the GC thread, while writers go on:
//!   while a collection is armed, the first write to a group in or after `B` saves the group's
//!   metadata first (`Group::at_boundary`). Only one collection is armed at a time.
//! - Checkpoints, deletions and rewrites run on the GC thread or the caller of [`Engine::gc`],
//!   never under the log lock or on a writer's path; checkpoints are stored in boundary order.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::batch::WriteBatch;
use crate::checkpoint::{Checkpoint, GroupMeta};
use crate::engine::{Engine, Inner};
use crate::error::{Error, Result};
use crate::options::MAX_RECORD_BYTES;
use crate::pipeline::Durability;
use crate::segment::segment_name;

/// What one call of [`Engine::gc`] did and found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GcReport {
    /// Segments deleted.
    pub deleted_segments: Vec<u64>,
    /// Bytes of the deleted segment files.
    pub freed_bytes: u64,
    /// Groups rewritten into the newest segment so that an old segment could go.
    pub rewritten_groups: Vec<u64>,
    /// Segments still on disk after this call.
    pub live_segments: usize,
    /// Groups that keep old segments alive, oldest first: `(group, oldest segment it
    /// references, its live entries)`. Purging (compacting) these groups lets GC go further.
    pub holders: Vec<(u64, u64, u64)>,
}

/// A checkpoint to collect and the segments it frees.
struct Job {
    boundary: u64,
    dead: Vec<u64>,
    survivors: Vec<u64>,
}

#[derive(Default)]
struct Queue {
    job: Option<Job>,
    /// Jobs finished (or dropped) so far, and what the last one deleted.
    done: u64,
    queued: u64,
    last: (Vec<u64>, u64),
    shutdown: bool,
}

/// The GC thread's mailbox.
#[derive(Default)]
pub(crate) struct GcState {
    /// The boundary whose checkpoint is being collected (0: none).
    armed: AtomicU32,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// The boundary of the last checkpoint stored.
    last_checkpoint: Mutex<u64>,
}

impl GcState {
    /// The boundary being collected, read by the write leader under the log lock.
    pub(crate) fn armed(&self) -> u32 {
        self.armed.load(Ordering::Acquire)
    }

    pub(crate) fn shutdown(&self) {
        let mut q = self.queue.lock();
        q.shutdown = true;
        self.cv.notify_all();
    }
}

impl Inner {
    /// Arms a checkpoint at boundary `boundary` (the segment just rotated to, still empty) if
    /// some sealed segment is dead and no collection is armed. Called with the log lock held;
    /// O(segments). Returns the job's number, if one was queued.
    pub(crate) fn arm_gc(&self, boundary: u64) -> Option<u64> {
        if self.gc.armed() != 0 {
            return None;
        }
        let b = u32::try_from(boundary).ok()?;
        let (dead, survivors): (Vec<u64>, Vec<u64>) = self
            .segments
            .read()
            .keys()
            .copied()
            .filter(|&s| s < boundary)
            .partition(|&s| self.refs.count(s) == 0);
        if dead.is_empty() {
            return None;
        }
        let mut q = self.gc.queue.lock();
        if q.job.is_some() {
            return None;
        }
        self.gc.armed.store(b, Ordering::Release);
        q.queued += 1;
        q.job = Some(Job {
            boundary,
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
            let span = tracing::info_span!("gc", boundary = job.boundary).entered();
            let result = self.collect_and_delete(job);
            if let Ok((deleted, freed)) = &result {
                tracing::debug!(deleted = deleted.len(), freed, "GC job done");
                crate::telemetry::gc_run(*freed, self.segments.read().len());
                self.stats();
            }
            drop(span);
            let mut q = self.gc.queue.lock();
            q.done += 1;
            q.last = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "GC failed");
                    (Vec::new(), 0)
                }
            };
            self.gc.cv.notify_all();
        }
    }

    fn collect_and_delete(&self, job: Job) -> Result<(Vec<u64>, u64)> {
        let b = u32::try_from(job.boundary).unwrap_or(u32::MAX);
        let mut groups: Vec<(u64, GroupMeta)> = Vec::new();
        for shard in self.groups.shards() {
            let shard = shard.read();
            for (&id, g) in shard.iter() {
                if g.last_segment < b {
                    groups.push((id, g.meta()));
                } else if let Some((at, meta)) = &g.at_boundary {
                    if *at == b {
                        groups.push((id, (**meta).clone()));
                    }
                }
                // Otherwise the group did not exist at the boundary.
            }
        }
        self.gc.armed.store(0, Ordering::Release);
        groups.sort_unstable_by_key(|(id, _)| *id);
        let checkpoint = Checkpoint {
            covers_below: job.boundary,
            survivors: job.survivors,
            groups,
        };
        let mut last = self.gc.last_checkpoint.lock();
        if checkpoint.covers_below <= *last {
            return Ok((Vec::new(), 0));
        }
        self.commit.check_poison()?;
        // A full disk only postpones GC (nothing was deleted yet); any other failure poisons.
        checkpoint
            .store(self.fs.as_ref(), &self.dir)
            .map_err(|e| match e {
                Error::NoSpace { .. } => e,
                e => self.fail(e),
            })?;
        *last = checkpoint.covers_below;
        let mut freed = 0;
        for id in &job.dead {
            if let Some(f) = self.segments.write().remove(id) {
                freed += f.len().unwrap_or(0);
            }
            // A dead segment left behind is harmless: recovery removes it (the checkpoint no
            // longer lists it).
            if let Err(e) = self.fs.remove(&self.dir.join(segment_name(*id))) {
                tracing::warn!(segment = id, error = %e, "removing a dead segment");
            }
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| self.fail(Error::io("syncing the directory after GC", e)))?;
        Ok((job.dead, freed))
    }

    /// Waits until GC job `n` (or a later one) is done; returns what the last job deleted.
    fn wait_gc_job(&self, n: u64) -> (Vec<u64>, u64) {
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
}

impl Engine {
    /// Garbage collection: deletes every sealed segment no group references any more, after
    /// writing a checkpoint that preserves what recovery needs from them (each group's range,
    /// vote, committed marker and keys). Small groups that alone keep an old segment alive are
    /// rewritten first (see [`crate::Options::gc_rewrite_max_entries`]); the groups that still
    /// hold old segments are returned in [`GcReport::holders`].
    ///
    /// Writers are never blocked by it beyond one rotation: the checkpoint is collected and
    /// stored, and segments deleted, on the engine's GC thread.
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`] once the engine is poisoned; I/O errors of a rewrite; a full disk
    /// while storing the checkpoint postpones GC ([`Error::NoSpace`] is not returned for it).
    pub fn gc(&self) -> Result<GcReport> {
        let inner = self.inner();
        let _serial = inner.gc_serial.lock();
        inner.commit.check_poison()?;
        inner.wait_gc_idle();
        let mut report = GcReport::default();
        let active = inner.active_segment.load(Ordering::Relaxed);

        // Live entries and bytes per sealed segment, and who holds them.
        let mut refs: std::collections::BTreeMap<u64, (u64, Vec<u64>)> = Default::default();
        let mut group_sizes: std::collections::HashMap<u64, (u64, u64)> = Default::default();
        for shard in inner.groups.shards() {
            for (&id, g) in shard.read().iter() {
                group_sizes.insert(id, (g.entries.range().len, g.version));
                g.entries.for_each_run(|run, _, bytes| {
                    let seg = u64::from(run.segment);
                    if seg < active {
                        let (live, holders) = refs.entry(seg).or_default();
                        *live += bytes;
                        if holders.last() != Some(&id) {
                            holders.push(id);
                        }
                    }
                });
            }
        }
        // Rewrite the small groups that alone keep a sparse old segment (under an eighth live)
        // alive; a dense segment is not worth copying.
        let max = inner.opts.gc_rewrite_max_entries;
        if max > 0 {
            let sparse = inner.opts.segment_size / 8;
            let mut to_rewrite: BTreeSet<u64> = BTreeSet::new();
            for (live, holders) in refs.values() {
                if *live < sparse
                    && holders
                        .iter()
                        .all(|g| group_sizes.get(g).map_or(0, |s| s.0) <= max)
                {
                    to_rewrite.extend(holders.iter().copied());
                }
            }
            for group in to_rewrite {
                let Some(&(_, version)) = group_sizes.get(&group) else {
                    continue;
                };
                if self.rewrite_group(group, version)? {
                    report.rewritten_groups.push(group);
                }
            }
        }
        // Who still holds old segments.
        let mut holders: Vec<(u64, u64, u64)> = Vec::new();
        for shard in inner.groups.shards() {
            for (&id, g) in shard.read().iter() {
                if let Some(oldest) = g.entries.oldest_segment() {
                    if u64::from(oldest) < active {
                        holders.push((id, u64::from(oldest), g.entries.range().len));
                    }
                }
            }
        }
        holders.sort_unstable_by_key(|&(g, seg, _)| (seg, g));
        holders.truncate(64);
        report.holders = holders;
        let referenced = inner.refs.referenced();
        let any_dead = inner
            .segments
            .read()
            .keys()
            .any(|&s| s < active && !referenced.contains(&s));
        if any_dead || !report.rewritten_groups.is_empty() {
            // A boundary for the checkpoint: the active segment if still empty, else a fresh
            // one (the rotation also fsyncs any rewrite).
            let job = {
                let mut log = inner.log.lock();
                let armed = if log.offset > crate::segment::SEGMENT_HEADER_LEN {
                    inner.rotate(&mut log)?
                } else {
                    None
                };
                let boundary = log.segment;
                armed.or_else(|| inner.arm_gc(boundary))
            };
            if let Some(n) = job {
                let (deleted, freed) = inner.wait_gc_job(n);
                report.deleted_segments = deleted;
                report.freed_bytes = freed;
            } else {
                inner.wait_gc_idle();
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
