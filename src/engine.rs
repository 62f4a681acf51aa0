//! The public [`Engine`]: opening and recovery, the write path (validate, frame, one positioned
//! write, apply to the index, group commit), reads, garbage collection and shutdown.
//!
//! Invariants:
//! - One writer at a time holds the log lock: batches get their position and sequence number in
//!   the order they are applied to the index, and validation sees every earlier batch.
//! - A batch is applied to the index only after its bytes were written to the segment, so a
//!   reader that finds an entry can read it; a write is acknowledged only after the fsync that
//!   covers it (see `commit`).
//! - A segment receives records only once the previous one has been fsynced.
//! - A segment is deleted only after a durable checkpoint covers it and no group references it.
//! - After a failed write or fsync the engine is poisoned and accepts no more writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range as StdRange;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};

use crate::batch::{Item, WriteBatch};
use crate::checkpoint::{Checkpoint, GroupMeta};
use crate::codec::{
    record_crc, seal_record, set_crc, verify_record, RecordHeader, RECORD_HEADER_LEN,
};
use crate::commit::{Callback, Commit, Syncer};
use crate::error::{Error, Result};
use crate::fs::{DirLock, FileSystem, FsFile};
use crate::index::{EntryLoc, Group, Groups, Range, Run};
use crate::options::{Options, MAX_RECORD_BYTES};
use crate::recovery::{recover, seal_clean_shutdown, write_with_marker, RecoveryReport, SyncPoint};
use crate::segment::{create_segment, prefill_segment, segment_name, SEGMENT_HEADER_LEN};

/// Name of the lock file in the data directory.
pub const LOCK_NAME: &str = "LOCK";

/// A handle on an open engine. Cheap to clone; the engine shuts down (its background threads
/// stop, pending callbacks are completed, the directory lock is released) when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Engine {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.handle.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Handle {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.commit.shutdown();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        let mut log = self.inner.log.lock();
        let prepared = log
            .preparing
            .take()
            .and_then(|h| h.join().ok())
            .and_then(|r| r.ok());
        if self.inner.commit.poisoned().is_some() {
            return;
        }
        // A clean shutdown seals the log: the active segment is cut to its last record and
        // synced (so even unsynced writes are durable), and the prepared, empty segment keeps
        // only its header. The next open then reads no zero tail. Failures only cost that.
        let seal = |file: &dyn FsFile, len: u64| file.set_len(len).and_then(|()| file.sync_data());
        // Sync, final sync marker, SEAL file: recovery then never takes damage here for a tail.
        let (fs, dir) = (self.inner.fs.as_ref(), &self.inner.dir);
        if let Err(e) = seal_clean_shutdown(fs, dir, log.segment, log.file.as_ref(), log.offset) {
            tracing::warn!(error = %e, "sealing the active segment at shutdown");
        }
        if let Some((file, _)) = prepared {
            if let Err(e) = seal(file.as_ref(), SEGMENT_HEADER_LEN) {
                tracing::warn!(error = %e, "trimming the prepared segment at shutdown");
            }
        }
    }
}

/// A segment being prepared in the background: the file, and whether it was zero-filled.
type Prepared = JoinHandle<Result<(Arc<dyn FsFile>, bool)>>;

struct LogWriter {
    segment: u64,
    file: Arc<dyn FsFile>,
    offset: u64,
    written: u64,
    preparing: Option<Prepared>,
    /// Whether the segment being prepared will be zero-filled.
    preparing_prefilled: bool,
    /// Whether the active segment was zero-filled ahead (fdatasync into it is cheaper).
    prefilled: bool,
    /// fsyncs for durable writes into the active segment (a synced workload makes many).
    syncs_in_segment: u32,
    /// A GC round planned at the last rotation, to run once the log lock is released.
    pending_gc: Option<GcPlan>,
}

struct Inner {
    dir: PathBuf,
    opts: Options,
    fs: Arc<dyn FileSystem>,
    groups: Groups,
    segments: RwLock<BTreeMap<u64, Arc<dyn FsFile>>>,
    log: Mutex<LogWriter>,
    commit: Commit,
    /// Writers between entering the write path and having written their record.
    in_flight: AtomicUsize,
    /// The id of the segment receiving writes (a hint read outside the log lock).
    active_segment: AtomicU64,
    /// Up to where fsyncs have made the active segment durable; drives the sync markers.
    sync_point: SyncPoint,
    /// Serializes GC rounds; holds the `covers_below` of the last checkpoint stored.
    gc_lock: Mutex<u64>,
    report: RecoveryReport,
    _lock: Box<dyn DirLock>,
}

/// What one call of [`Engine::gc`] did and found.
#[derive(Debug, Clone, Default)]
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

/// Counters describing the engine's state.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Groups known.
    pub groups: usize,
    /// Entries indexed across all groups.
    pub entries: u64,
    /// Heap bytes of the entry index (positions and runs), excluding the group maps themselves.
    pub index_bytes: u64,
    /// Segment files on disk.
    pub segments: usize,
    /// Id of the segment receiving writes.
    pub active_segment: u64,
    /// Batches written since open.
    pub written_batches: u64,
    /// Batches known durable since open.
    pub synced_batches: u64,
}

/// Counts a writer out of the write path when dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// fsyncs a segment must see before the engine zero-fills segments ahead: a bulk load that
/// syncs once at its end is not a synced workload.
const PREFILL_AFTER_SYNCS: u32 = 16;

/// How long an fsync leader waits for writers already in the write path to finish their write,
/// so that one fdatasync covers them too. Bounded, and skipped when no writer is in flight.
const LINGER: std::time::Duration = std::time::Duration::from_micros(150);

impl Syncer for Inner {
    fn sync_active(&self) -> Result<u64> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            let start = std::time::Instant::now();
            while self.in_flight.load(Ordering::SeqCst) > 0 && start.elapsed() < LINGER {
                std::thread::yield_now();
            }
        }
        let (file, target, point) = {
            let mut log = self.log.lock();
            self.note_sync(&mut log);
            (log.file.clone(), log.written, (log.segment, log.offset))
        };
        self.commit
            .guarded_sync("fdatasync of the active segment", || file.sync_data())?;
        self.sync_point.synced(point.0, point.1);
        Ok(target)
    }
}

fn validate(groups: &Groups, batch: &WriteBatch) -> Result<()> {
    if let Some(e) = &batch.invalid {
        return Err(Error::InvalidArgument(e.clone()));
    }
    let mut overlay: HashMap<u64, Range> = HashMap::new();
    for item in &batch.items {
        let group = item.group();
        let range = overlay.entry(group).or_insert_with(|| {
            groups
                .read(group, |g| g.entries.range())
                .unwrap_or_default()
        });
        match item {
            Item::Append { first, count, .. } => {
                range
                    .check_append(*first, *count as u64)
                    .map_err(|e| Error::InvalidArgument(format!("group {group}: {e}")))?;
                range.append(*first, *count as u64);
            }
            Item::Truncate { index, .. } => range.truncate_from(*index),
            Item::Purge { index, .. } => range.purge_to(*index),
            Item::RemoveGroup { .. } => *range = Range::default(),
            _ => {}
        }
    }
    Ok(())
}

fn apply(groups: &Groups, batch: &WriteBatch, segment: u32, rec_off: u32, rec_len: u32) {
    for item in &batch.items {
        let group = item.group();
        let mut shard = groups.shard(group).write();
        match item {
            Item::Append {
                first,
                lens_at,
                count,
                payload_at,
                ..
            } => {
                let spans = batch.spans(*lens_at, *count, *payload_at);
                let run = Run {
                    first: *first,
                    segment,
                    rec_off,
                    rec_len,
                };
                shard
                    .entry(group)
                    .or_default()
                    .entries
                    .append(*first, run, &spans);
            }
            Item::Truncate { index, .. } => shard
                .entry(group)
                .or_default()
                .entries
                .truncate_from(*index),
            Item::Purge { index, .. } => shard.entry(group).or_default().entries.purge_to(*index),
            Item::Put { key, value, .. } => {
                shard
                    .entry(group)
                    .or_default()
                    .kv
                    .insert(key.clone(), value.clone());
            }
            Item::Delete { key, .. } => {
                shard.entry(group).or_default().kv.remove(key);
            }
            Item::Vote { value, .. } => shard.entry(group).or_default().vote = Some(value.clone()),
            Item::Committed { value, .. } => {
                shard.entry(group).or_default().committed = Some(value.clone())
            }
            Item::RemoveGroup { .. } => {
                shard.remove(&group);
            }
        }
    }
}

impl Inner {
    fn check_poison(&self) -> Result<()> {
        match self.commit.poisoned() {
            Some(reason) => Err(Error::Poisoned { reason }),
            None => Ok(()),
        }
    }

    fn fail(&self, err: Error) -> Error {
        self.commit.poison(err.to_string());
        err
    }

    /// Starts preparing segment `id` in the background, zero-filled or only reserved.
    fn prepare(&self, id: u64, prefill: bool) -> Prepared {
        let fs = self.fs.clone();
        let dir = self.dir.clone();
        let size = self.opts.segment_size;
        std::thread::spawn(move || {
            create_segment(fs.as_ref(), &dir, id, size, prefill).map(|f| (f, prefill))
        })
    }

    /// Called by an fsync leader with the log lock: the active segment serves durable writes.
    /// Zero-filling pays off only for them (cheaper fdatasync), so it is decided here: if the
    /// segment being prepared is not zero-filled, it is zero-filled once ready, and the writer
    /// moves to it as soon as that is done (see `write_locked`).
    fn note_sync(&self, log: &mut LogWriter) {
        log.syncs_in_segment = log.syncs_in_segment.saturating_add(1);
        if !self.opts.prefill_segments
            || log.prefilled
            || log.preparing_prefilled
            || log.syncs_in_segment < PREFILL_AFTER_SYNCS
        {
            return;
        }
        let Some(pending) = log.preparing.take() else {
            return;
        };
        let id = log.segment + 1;
        let size = self.opts.segment_size;
        log.preparing_prefilled = true;
        log.preparing = Some(std::thread::spawn(move || {
            let (file, prefilled) = pending.join().map_err(|_| {
                Error::io(
                    "preparing a segment",
                    std::io::Error::other("preparation thread panicked"),
                )
            })??;
            if !prefilled {
                prefill_segment(file.as_ref(), id, size)?;
            }
            Ok((file, true))
        }));
    }

    /// Seals the active segment (fsync) and switches to the next one. Called with the log lock.
    fn rotate(&self, log: &mut LogWriter) -> Result<()> {
        let next_id = log.segment + 1;
        let next = match log.preparing.take() {
            Some(h) => match h.join() {
                Ok(Ok(prepared)) => Ok(prepared),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::io(
                    "preparing the next segment",
                    std::io::Error::other("segment preparation thread panicked"),
                )),
            },
            None => Err(Error::InvalidArgument(String::new())),
        };
        let (file, prefilled) = match next {
            Ok(prepared) => prepared,
            // Prepare failed (or was never started): try once more inline. A leftover file of
            // that id is garbage from the failed attempt.
            Err(_) => {
                let _ = self.fs.remove(&self.dir.join(segment_name(next_id)));
                let file = create_segment(
                    self.fs.as_ref(),
                    &self.dir,
                    next_id,
                    self.opts.segment_size,
                    false,
                )?;
                (file, false)
            }
        };
        if next_id > u64::from(u32::MAX) {
            return Err(self.fail(Error::InvalidArgument("segment ids exhausted".into())));
        }
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
        self.segments.write().insert(next_id, file.clone());
        log.segment = next_id;
        self.active_segment.store(next_id, Ordering::Relaxed);
        log.file = file;
        log.offset = SEGMENT_HEADER_LEN;
        // Zero-fill the next segment only if this one served durable writes: a bulk, unsynced
        // load gains nothing from it and would write every byte twice.
        let prefill_next =
            self.opts.prefill_segments && log.syncs_in_segment >= PREFILL_AFTER_SYNCS;
        log.prefilled = prefilled;
        log.syncs_in_segment = 0;
        log.preparing_prefilled = prefill_next;
        log.preparing = Some(self.prepare(next_id + 1, prefill_next));
        if self.opts.auto_gc {
            log.pending_gc = self.plan_gc(log);
        }
        Ok(())
    }

    /// Writes a batch and applies it to the index; returns its sequence number. Called with the
    /// log lock held.
    fn write_locked(
        &self,
        log: &mut LogWriter,
        batch: &WriteBatch,
        record: &mut [u8],
        crc: Option<(u64, u32)>,
    ) -> Result<u64> {
        self.check_poison()?;
        validate(&self.groups, batch)?;
        let len = record.len() as u64;
        let full = log.offset > SEGMENT_HEADER_LEN && log.offset + len > self.opts.segment_size;
        // The segment made at open is not prefilled (open stays fast); move to the prefilled
        // one as soon as it is ready.
        let upgrade = !log.prefilled
            && log.preparing_prefilled
            && log.preparing.as_ref().is_some_and(|h| h.is_finished());
        if full || upgrade {
            self.rotate(log)?;
        }
        match crc {
            Some((segment, crc)) if segment == log.segment => set_crc(record, crc),
            _ => seal_record(record, log.segment),
        }
        // A sync marker first if an fsync advanced the durable point.
        let marker = self.sync_point.marker_due(log.segment, log.offset);
        let written = write_with_marker(log.file.as_ref(), marker, record, log.offset);
        let rec_at = match written {
            Ok(rec_at) => rec_at,
            Err(e) => {
                let err = Error::io(format!("writing to segment {}", log.segment), e);
                if matches!(err, Error::NoSpace { .. }) {
                    // Cut whatever prefix reached the file so that no partial record stays behind
                    // the next one; if even that fails, the segment's tail is unknown: poison.
                    if log.file.set_len(log.offset).is_ok() {
                        return Err(err);
                    }
                }
                return Err(self.fail(err));
            }
        };
        log.offset += rec_at;
        apply(
            &self.groups,
            batch,
            log.segment as u32,
            log.offset as u32,
            len as u32,
        );
        log.offset += len;
        log.written += 1;
        Ok(log.written)
    }

    fn submit(&self, batch: &WriteBatch) -> Result<u64> {
        if batch.is_empty() {
            return Ok(self.log.lock().written);
        }
        if let Some(e) = &batch.invalid {
            return Err(Error::InvalidArgument(e.clone()));
        }
        if batch.body.raw_len() as u64 + RECORD_HEADER_LEN as u64 > MAX_RECORD_BYTES {
            return Err(Error::InvalidArgument(format!(
                "batch of {} bytes exceeds the largest record ({MAX_RECORD_BYTES} bytes)",
                batch.body.raw_len()
            )));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _done = InFlight(&self.in_flight);
        let mut record = batch.body.encode(self.opts.compression_threshold);
        // The CRC covers the segment id: compute it outside the lock for the segment that is
        // active now; in the rare case a rotation comes first, it is computed again inside.
        let guess = self.active_segment.load(Ordering::Relaxed);
        let crc = record_crc(guess, &record);
        let mut log = self.log.lock();
        let seq = self.write_locked(&mut log, batch, &mut record, Some((guess, crc)));
        let plan = log.pending_gc.take();
        drop(log);
        if let Some(plan) = plan {
            // Automatic GC after a rotation; a failure poisons the engine, which the caller
            // learns from its next write or its durability wait.
            let mut last = self.gc_lock.lock();
            if let Err(e) = self.execute_gc(&mut last, plan) {
                tracing::error!(error = %e, "automatic GC failed");
            }
        }
        seq
    }

    fn segment_file(&self, id: u32) -> Result<Arc<dyn FsFile>> {
        self.segments
            .read()
            .get(&u64::from(id))
            .cloned()
            .ok_or(Error::MissingSegment {
                segment: u64::from(id),
            })
    }

    /// Reads and checks the record at `run`; returns its raw (decompressed) body.
    fn read_record(&self, file: &dyn FsFile, run: &Run) -> Result<RawBody> {
        let seg = u64::from(run.segment);
        let mut buf = vec![0u8; run.rec_len as usize];
        file.read_exact_at(&mut buf, u64::from(run.rec_off))
            .map_err(|e| Error::io(format!("reading segment {seg} at {}", run.rec_off), e))?;
        let corrupt = |reason: String| Error::corruption(seg, u64::from(run.rec_off), reason);
        let mut hb = [0u8; RECORD_HEADER_LEN];
        hb.copy_from_slice(
            buf.get(..RECORD_HEADER_LEN)
                .ok_or_else(|| corrupt("short record".into()))?,
        );
        let header = RecordHeader::parse(&hb)
            .map_err(|e| corrupt(format!("record header: {e}")))?
            .ok_or_else(|| corrupt("record header is zero".into()))?;
        let raw = verify_record(seg, &header, &buf).map_err(|e| corrupt(format!("record: {e}")))?;
        Ok(match raw {
            std::borrow::Cow::Owned(v) => RawBody { buf: v, start: 0 },
            std::borrow::Cow::Borrowed(_) => RawBody {
                buf,
                start: RECORD_HEADER_LEN,
            },
        })
    }

    fn slice(raw: &RawBody, loc: &EntryLoc) -> Result<Vec<u8>> {
        let start = raw.start + loc.span.off as usize;
        let end = start + loc.span.len as usize;
        raw.buf.get(start..end).map(<[u8]>::to_vec).ok_or_else(|| {
            Error::corruption(
                u64::from(loc.run.segment),
                u64::from(loc.run.rec_off),
                "entry outside its record",
            )
        })
    }
}

/// A record's raw body: `buf[start..]`.
struct RawBody {
    buf: Vec<u8>,
    start: usize,
}

impl Engine {
    /// Opens (creating if needed) the engine in `dir`, recovering whatever it holds.
    ///
    /// Takes an exclusive lock on `dir/LOCK`: a second open of the same directory, from this
    /// process or another, fails with [`Error::Locked`] until this engine is dropped.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Engine> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let fs = options.file_system.clone();
        fs.create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {dir:?}"), e))?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = fs.lock(&lock_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked {
                    path: lock_path.clone(),
                }
            } else {
                Error::io("locking the data directory", e)
            }
        })?;
        let rec = recover(fs.as_ref(), &dir, &options)?;
        let groups = Groups::default();
        for (id, g) in rec.groups {
            groups.shard(id).write().insert(id, g);
        }
        let mut files = rec.files;
        // Reuse the empty segments at the end of the log: the oldest takes writes, the next one
        // (prefilled by the previous run) is the next to rotate to, and any others are removed.
        let mut empty_tail = rec.empty_tail.into_iter();
        let (segment, file, prefilled) = match empty_tail.next() {
            // Whether the previous run zero-filled it is not known: assume not.
            Some((id, file)) => (id, file, false),
            None => {
                // Not prefilled here: opening stays fast; the segments after it are prefilled.
                let id = rec.next_segment;
                if id > u64::from(u32::MAX) {
                    return Err(Error::InvalidArgument("segment ids exhausted".into()));
                }
                let file = create_segment(fs.as_ref(), &dir, id, options.segment_size, false)?;
                (id, file, false)
            }
        };
        let ready_next = empty_tail.next();
        let extra: Vec<u64> = empty_tail.map(|(id, _)| id).collect();
        for id in &extra {
            files.remove(id);
            fs.remove(&dir.join(segment_name(*id)))
                .map_err(|e| Error::io(format!("removing unused segment {id}"), e))?;
        }
        if !extra.is_empty() {
            fs.sync_dir(&dir).map_err(|e| {
                Error::io("syncing the directory after removing unused segments", e)
            })?;
        }
        files.insert(segment, file.clone());
        let inner = Arc::new(Inner {
            dir,
            fs,
            groups,
            segments: RwLock::new(files),
            log: Mutex::new(LogWriter {
                segment,
                file,
                offset: SEGMENT_HEADER_LEN,
                written: 0,
                preparing: None,
                preparing_prefilled: false,
                prefilled,
                syncs_in_segment: 0,
                pending_gc: None,
            }),
            commit: Commit::default(),
            in_flight: AtomicUsize::new(0),
            active_segment: AtomicU64::new(segment),
            sync_point: SyncPoint::after_recovery(rec.last_sealed),
            gc_lock: Mutex::new(0),
            report: rec.report,
            _lock: lock,
            opts: options,
        });
        {
            let mut log = inner.log.lock();
            log.preparing = Some(match ready_next {
                Some((id, file)) if id == segment + 1 => {
                    std::thread::spawn(move || Ok((file, false)))
                }
                _ => inner.prepare(segment + 1, false),
            });
        }
        let flusher_inner = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("mrwal-flusher".into())
            .spawn(move || flusher_inner.commit.run_flusher(flusher_inner.as_ref()))
            .map_err(|e| Error::io("starting the flusher thread", e))?;
        tracing::info!(dir = ?inner.dir, report = ?inner.report, "engine opened");
        Ok(Engine {
            handle: Arc::new(Handle {
                inner,
                flusher: Some(flusher),
            }),
        })
    }

    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// Writes `batch` and returns once it is durable (after the fdatasync that covers it, shared
    /// with every other writer waiting at the same time).
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let inner = self.inner();
        let seq = inner.submit(&batch)?;
        inner.commit.wait_durable(seq, inner)
    }

    /// Writes `batch` without waiting for durability. Its effects are readable on return; it
    /// becomes durable with the next sync (any synced write, [`Engine::sync`], or an
    /// asynchronous write's flush).
    pub fn write_unsynced(&self, batch: WriteBatch) -> Result<()> {
        self.inner().submit(&batch).map(|_| ())
    }

    /// Writes `batch` and returns at once; its effects are readable on return. `on_durable` is
    /// called exactly once, later and possibly from another thread: with `Ok(())` after the
    /// fdatasync that covers the batch has returned, or with the error that stopped it. If this
    /// function returns an error, nothing was written and `on_durable` is dropped uncalled.
    pub fn write_async(
        &self,
        batch: WriteBatch,
        on_durable: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        let inner = self.inner();
        let seq = inner.submit(&batch)?;
        inner
            .commit
            .add_callback(seq, Box::new(on_durable) as Callback);
        Ok(())
    }

    /// Writes `batch` and returns a future that resolves once the batch is durable: the
    /// awaitable form of [`Engine::write_async`], for async code. The batch's effects are
    /// readable when this returns; awaiting the [`DurableWrite`] waits for the fdatasync that
    /// covers it without blocking a thread, so one fdatasync covers the writes of many tasks.
    ///
    /// # Errors
    ///
    /// Fails, with nothing written, as [`Engine::write`] does for an invalid batch or a
    /// poisoned engine; the future resolves to the error of a failed fdatasync.
    pub fn write_durable(&self, batch: WriteBatch) -> Result<crate::DurableWrite> {
        let (fut, done) = crate::durable::DurableWrite::new();
        self.write_async(batch, move |r| done.complete(r))?;
        Ok(fut)
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        let inner = self.inner();
        let seq = inner.log.lock().written;
        inner.check_poison()?;
        inner.commit.wait_durable(seq, inner)
    }

    /// Entry `index` of `group`, or `None` if the group does not hold it.
    pub fn entry(&self, group: u64, index: u64) -> Result<Option<Vec<u8>>> {
        let inner = self.inner();
        let found = inner.groups.read(group, |g| {
            g.entries
                .locate(index)
                .map(|loc| (loc, inner.segment_file(loc.run.segment)))
        });
        let Some(Some((loc, file))) = found else {
            return Ok(None);
        };
        let raw = inner.read_record(file?.as_ref(), &loc.run)?;
        Inner::slice(&raw, &loc).map(Some)
    }

    /// Entries of `group` from `range.start`, contiguous, stopping before `range.end`, at the
    /// first index the group does not hold, or once the payload bytes returned reach
    /// `max_bytes`. At least one entry is returned when the group holds `range.start`.
    pub fn entries(
        &self,
        group: u64,
        range: StdRange<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let inner = self.inner();
        let mut locs: Vec<(EntryLoc, Arc<dyn FsFile>)> = Vec::new();
        inner
            .groups
            .read(group, |g| -> Result<()> {
                let mut bytes = 0usize;
                let mut file: Option<(u32, Arc<dyn FsFile>)> = None;
                for index in range.clone() {
                    if !locs.is_empty() && bytes >= max_bytes {
                        break;
                    }
                    let Some(loc) = g.entries.locate(index) else {
                        break;
                    };
                    let f = match &file {
                        Some((seg, f)) if *seg == loc.run.segment => f.clone(),
                        _ => {
                            let f = inner.segment_file(loc.run.segment)?;
                            file = Some((loc.run.segment, f.clone()));
                            f
                        }
                    };
                    bytes += loc.span.len as usize;
                    locs.push((loc, f));
                }
                Ok(())
            })
            .transpose()?;
        let mut out = Vec::with_capacity(locs.len());
        let mut current: Option<(Run, RawBody)> = None;
        for (loc, file) in &locs {
            if current.as_ref().is_none_or(|(run, _)| *run != loc.run) {
                let raw = inner.read_record(file.as_ref(), &loc.run)?;
                current = Some((loc.run, raw));
            }
            if let Some((_, raw)) = &current {
                out.push(Inner::slice(raw, loc)?);
            }
        }
        Ok(out)
    }

    /// The first index `group` holds, or `None` if it holds no entry.
    pub fn first_index(&self, group: u64) -> Option<u64> {
        self.inner()
            .groups
            .read(group, |g| g.entries.range())
            .filter(|r| !r.is_empty())
            .map(|r| r.first)
    }

    /// The last index `group` holds, or `None` if it holds no entry.
    pub fn last_index(&self, group: u64) -> Option<u64> {
        self.inner()
            .groups
            .read(group, |g| g.entries.range().last())
            .flatten()
    }

    /// The value of `key` in `group`.
    pub fn get(&self, group: u64, key: &[u8]) -> Option<Vec<u8>> {
        self.inner()
            .groups
            .read(group, |g| g.kv.get(key).map(|v| v.to_vec()))
            .flatten()
    }

    /// The vote of `group`.
    pub fn vote(&self, group: u64) -> Option<Vec<u8>> {
        self.inner()
            .groups
            .read(group, |g| g.vote.as_deref().map(<[u8]>::to_vec))
            .flatten()
    }

    /// The committed marker of `group`.
    pub fn committed(&self, group: u64) -> Option<Vec<u8>> {
        self.inner()
            .groups
            .read(group, |g| g.committed.as_deref().map(<[u8]>::to_vec))
            .flatten()
    }

    /// Every group the engine knows, sorted.
    pub fn groups(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for shard in self.inner().groups.shards() {
            out.extend(shard.read().keys());
        }
        out.sort_unstable();
        out
    }

    /// Whether the engine refuses writes after a failed write or fsync.
    pub fn is_poisoned(&self) -> bool {
        self.inner().commit.poisoned().is_some()
    }

    /// What recovery found when the engine was opened.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner().report.clone()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner().dir
    }

    /// Counters describing the engine.
    pub fn stats(&self) -> Stats {
        let inner = self.inner();
        let mut s = Stats::default();
        for shard in inner.groups.shards() {
            let shard = shard.read();
            s.groups += shard.len();
            for g in shard.values() {
                s.entries += g.entries.range().len;
                s.index_bytes += g.entries.heap_bytes() as u64;
            }
        }
        s.segments = inner.segments.read().len();
        let log = inner.log.lock();
        s.active_segment = log.segment;
        s.written_batches = log.written;
        drop(log);
        s.synced_batches = inner.commit.synced();
        s
    }

    /// Garbage collection: deletes every sealed segment no group references any more, after
    /// writing a checkpoint that preserves what recovery needs from them (each group's range,
    /// vote, committed marker and keys). Small groups that alone keep an old segment alive are
    /// rewritten first (see [`Options::gc_rewrite_max_entries`]); the groups that still hold
    /// old segments are returned in [`GcReport::holders`].
    ///
    /// Call it periodically (for example after purging); it blocks writers only while it
    /// rewrites groups and takes the checkpoint snapshot.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = self.inner();
        let mut last_checkpoint = inner.gc_lock.lock();
        inner.check_poison()?;
        let mut report = GcReport::default();
        let mut log = inner.log.lock();
        let active = log.segment;

        // Live entries and bytes per sealed segment, by group.
        let mut refs: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
        let mut group_sizes: HashMap<u64, u64> = HashMap::new();
        for shard in inner.groups.shards() {
            for (&id, g) in shard.read().iter() {
                group_sizes.insert(id, g.entries.range().len);
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
            let mut to_rewrite: Vec<u64> = Vec::new();
            for (live, holders) in refs.values() {
                if *live < sparse
                    && holders
                        .iter()
                        .all(|g| group_sizes.get(g).copied().unwrap_or(0) <= max)
                {
                    to_rewrite.extend(holders.iter().copied());
                }
            }
            to_rewrite.sort_unstable();
            to_rewrite.dedup();
            for group in to_rewrite {
                let Some(first) = self.first_index(group) else {
                    continue;
                };
                let entries = self.entries(group, first..u64::MAX, usize::MAX)?;
                if entries.is_empty() {
                    continue;
                }
                let mut batch = WriteBatch::new();
                batch.append(group, first, &entries);
                let mut record = batch.body.encode(inner.opts.compression_threshold);
                inner.write_locked(&mut log, &batch, &mut record, None)?;
                report.rewritten_groups.push(group);
            }
        }
        // Who still holds old segments.
        let mut holders: Vec<(u64, u64, u64)> = Vec::new();
        for shard in inner.groups.shards() {
            for (&id, g) in shard.read().iter() {
                if let Some(oldest) = g.entries.oldest_segment() {
                    if u64::from(oldest) < log.segment {
                        holders.push((id, u64::from(oldest), g.entries.range().len));
                    }
                }
            }
        }
        holders.sort_unstable_by_key(|&(g, seg, _)| (seg, g));
        holders.truncate(64);
        report.holders = holders;
        let referenced = inner.referenced_segments();
        let any_dead = inner
            .segments
            .read()
            .keys()
            .any(|&s| s < log.segment && !referenced.contains(&s));
        if any_dead || !report.rewritten_groups.is_empty() {
            // Start a fresh segment so the checkpoint covers exactly the segments below it; the
            // rotation also fsyncs any rewrite.
            if log.offset > SEGMENT_HEADER_LEN {
                inner.rotate(&mut log)?;
            }
            log.pending_gc = None;
            let plan = inner.plan_gc(&log);
            drop(log);
            if let Some(plan) = plan {
                let (deleted, freed) = inner.execute_gc(&mut last_checkpoint, plan)?;
                report.deleted_segments = deleted;
                report.freed_bytes = freed;
            }
        } else {
            drop(log);
        }
        report.live_segments = inner.segments.read().len();
        Ok(report)
    }
}

/// What a GC round will do once the log lock is released: store the checkpoint, then delete
/// the segments it made dead.
struct GcPlan {
    checkpoint: Checkpoint,
    dead: Vec<u64>,
}

impl Inner {
    /// Every segment some group's entries live in.
    fn referenced_segments(&self) -> BTreeSet<u64> {
        let mut referenced = BTreeSet::new();
        for shard in self.groups.shards() {
            for g in shard.read().values() {
                referenced.extend(g.entries.segments().map(u64::from));
            }
        }
        referenced
    }

    /// Plans a GC round. Called with the log lock held and an empty active segment, so that the
    /// metadata snapshot is exactly the state after every segment below the active one.
    fn plan_gc(&self, log: &LogWriter) -> Option<GcPlan> {
        debug_assert_eq!(log.offset, SEGMENT_HEADER_LEN);
        let covers_below = log.segment;
        let referenced = self.referenced_segments();
        let (dead, survivors): (Vec<u64>, Vec<u64>) = self
            .segments
            .read()
            .keys()
            .copied()
            .filter(|&s| s < covers_below)
            .partition(|s| !referenced.contains(s));
        if dead.is_empty() {
            return None;
        }
        let mut groups: Vec<(u64, GroupMeta)> = Vec::new();
        for shard in self.groups.shards() {
            for (&id, g) in shard.read().iter() {
                groups.push((id, meta_of(g)));
            }
        }
        groups.sort_unstable_by_key(|(id, _)| *id);
        Some(GcPlan {
            checkpoint: Checkpoint {
                covers_below,
                survivors,
                groups,
            },
            dead,
        })
    }

    /// Carries out a plan: checkpoint made durable first, then the dead segments removed and
    /// the directory synced. `last_checkpoint` (guarded by the GC lock) keeps checkpoints
    /// monotonic: a plan older than the stored checkpoint is dropped (the newer one already
    /// covers its dead segments). Failures poison the engine.
    fn execute_gc(&self, last_checkpoint: &mut u64, plan: GcPlan) -> Result<(Vec<u64>, u64)> {
        if plan.checkpoint.covers_below <= *last_checkpoint {
            return Ok((Vec::new(), 0));
        }
        self.check_poison()?;
        // A full disk only postpones GC (nothing was deleted yet); any other failure poisons.
        plan.checkpoint
            .store(self.fs.as_ref(), &self.dir)
            .map_err(|e| match e {
                Error::NoSpace { .. } => e,
                e => self.fail(e),
            })?;
        *last_checkpoint = plan.checkpoint.covers_below;
        let mut freed = 0;
        for id in &plan.dead {
            if let Some(f) = self.segments.write().remove(id) {
                freed += f.len().unwrap_or(0);
            }
            // A dead segment left behind is harmless: recovery removes it (the checkpoint no
            // longer lists it).
            self.fs
                .remove(&self.dir.join(segment_name(*id)))
                .map_err(|e| Error::io(format!("removing segment {id}"), e))?;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| self.fail(Error::io("syncing the directory after GC", e)))?;
        Ok((plan.dead, freed))
    }
}

fn meta_of(g: &Group) -> GroupMeta {
    GroupMeta {
        range: g.entries.range(),
        vote: g.vote.clone(),
        committed: g.committed.clone(),
        kv: g.kv.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}
