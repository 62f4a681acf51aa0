//! The public [`Engine`]: a facade that composes the write pipeline (`pipeline`, `commit`),
//! the index (`index`), recovery (`recovery`) and garbage collection (`gc`), and serves reads.
//!
//! Invariants:
//! - Reads never take the log lock: they find a record through the index (one shard read lock),
//!   then read it from the tail buffer if it is not yet in its file, else from the file.
//! - Every clone of [`Engine`] shares one `Inner`; the last one dropped shuts the engine down:
//!   background threads stop, pending callbacks complete, the tail is written out and the log
//!   sealed (active segment cut to its last record and synced), the directory lock released.

use std::collections::BTreeMap;
use std::ops::Range as StdRange;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};

use bytes::Bytes;

use crate::batch::WriteBatch;
use crate::cache::EntryCache;
use crate::codec::{verify_record, RecordHeader, RECORD_HEADER_LEN};
use crate::commit::Commit;
use crate::error::{Error, Result};
use crate::fs::{DirLock, FileSystem, FsFile};
use crate::gc::GcState;
use crate::index::{EntryLoc, Groups, Run, SegmentRefs};
use crate::options::Options;
use crate::pipeline::{
    first_reservation, freeing_reserve, pack_flushed, Durability, LogWriter, Queue, Tail,
};
use crate::pool::Pool;
use crate::recovery::{recover, seal_clean_shutdown, RecoveryReport, SyncPoint};
use crate::segment::{create_segment, recycle_segment, segment_name, SEGMENT_HEADER_LEN};
use crate::verified::VerifiedRecords;

/// Name of the lock file in the data directory.
pub const LOCK_NAME: &str = "LOCK";

/// A handle on an open engine. Cheap to clone; the engine shuts down (its background threads
/// stop, pending callbacks are completed, the directory lock is released) when the last clone is
/// dropped.
///
/// ```
/// use multiraft_wal::{Engine, Options, WriteBatch};
///
/// # fn main() -> multiraft_wal::Result<()> {
/// # let tmp = tempfile::tempdir().unwrap();
/// # let dir = tmp.path();
/// let engine = Engine::open(dir, Options::default())?;
/// let mut batch = WriteBatch::new();
/// batch.append(1, 1, [b"one", b"two"]).set_vote(1, b"term 1");
/// engine.write(batch)?; // returns after the fdatasync that covers it
/// assert_eq!(engine.entry(1, 2)?.as_deref(), Some(&b"two"[..]));
/// drop(engine);
///
/// let engine = Engine::open(dir, Options::default())?;
/// assert_eq!(engine.last_index(1), Some(2));
/// assert!(engine.recovery_report().clean_seal);
/// # Ok(()) }
/// ```
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
    gc_thread: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.gc.shutdown();
        if let Some(h) = self.gc_thread.take() {
            let _ = h.join();
        }
        self.inner.commit.shutdown();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        let mut log = self.inner.log.lock();
        let prepared = self.inner.stop_preparing(&mut log);
        if self.inner.commit.poisoned().is_some() {
            return;
        }
        // A clean shutdown seals the log: the tail is written out, the active segment is cut to
        // its last record and synced (so even unsynced writes are durable), and the prepared,
        // empty segment keeps only its header. The next open then reads no zero tail. Failures
        // only cost that.
        if let Err(e) = self.inner.flush_tail(&mut log, None) {
            tracing::warn!(error = %e, "writing the tail at shutdown");
            return;
        }
        // Sync, final sync marker, SEAL file: recovery then never takes damage here for a tail.
        let (fs, dir) = (self.inner.fs.as_ref(), &self.inner.dir);
        if let Err(e) = seal_clean_shutdown(fs, dir, log.segment, log.file.as_ref(), log.offset) {
            tracing::warn!(error = %e, "sealing the active segment at shutdown");
        }
        // The next open takes writes in an empty segment left here with the freeing reserve
        // (see `pipeline`; the seal just gave back the active segment's reserve), so that a
        // disk that fills up meanwhile neither keeps the engine from opening nor from writing
        // the purges that free space.
        let keep = SEGMENT_HEADER_LEN + freeing_reserve(self.inner.opts.segment_size);
        let trim = |file: &dyn FsFile| {
            if file.len()? > keep {
                file.set_len(keep)?;
            }
            file.sync_data()
        };
        // The recycling pool serves a running workload; an idle directory keeps none of it.
        self.inner.pool.drain(fs, dir);
        let next = log.segment + 1;
        match prepared {
            Some(p) if !p.recycled => {
                if let Err(e) = trim(p.file.as_ref()) {
                    tracing::warn!(error = %e, "trimming the prepared segment at shutdown");
                }
            }
            prepared => {
                // A recycled one holds stale bytes after its header: replaced by a new one, so
                // that a cleanly closed directory holds no byte after the end of any segment's
                // data (a check of it is then as strict as before recycling).
                if prepared.is_some() {
                    let removed = fs.remove(&dir.join(segment_name(next)));
                    if let Err(e) = removed.and_then(|()| fs.sync_dir(dir)) {
                        tracing::warn!(error = %e, "removing the recycled prepared segment");
                    }
                }
                if log.offset > SEGMENT_HEADER_LEN && next <= u64::from(u32::MAX) {
                    let made = create_segment(fs, dir, next, keep)
                        .or_else(|_| create_segment(fs, dir, next, SEGMENT_HEADER_LEN));
                    if let Err(e) = made {
                        tracing::warn!(error = %e, "leaving an empty segment at shutdown");
                    }
                }
            }
        }
    }
}

/// The engine's shared state.
pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) opts: Options,
    pub(crate) fs: Arc<dyn FileSystem>,
    pub(crate) groups: Groups,
    /// Runs per segment: dead segments in O(segments).
    pub(crate) refs: SegmentRefs,
    pub(crate) segments: RwLock<BTreeMap<u64, Arc<dyn FsFile>>>,
    /// Writers waiting for the write leader.
    pub(crate) queue: Mutex<Queue>,
    /// The log lock: the active segment and write position.
    pub(crate) log: Mutex<LogWriter>,
    /// Records appended but not yet written to the active segment's file.
    pub(crate) tail: RwLock<Tail>,
    /// Where the files end: `pack_flushed(segment, offset)`.
    pub(crate) flushed: AtomicU64,
    pub(crate) commit: Commit,
    pub(crate) gc: GcState,
    /// The entry cache's budget and eviction queue (each group holds its cached payloads).
    pub(crate) cache: EntryCache,
    /// Records of sealed segments already verified by a read (see `verified`).
    pub(crate) verified: VerifiedRecords,
    /// Serializes calls of [`Engine::gc`].
    pub(crate) gc_serial: Mutex<()>,
    /// The id of the segment receiving writes (a hint read outside the log lock).
    pub(crate) active_segment: AtomicU64,
    /// Up to where fsyncs have made the active segment durable; drives the sync markers.
    pub(crate) sync_point: SyncPoint,
    /// Dead segment files kept for reuse as new segments.
    pub(crate) pool: Pool,
    report: RecoveryReport,
    _lock: Box<dyn DirLock>,
}

/// Counters describing the engine's state.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Groups known.
    pub groups: usize,
    /// Entries indexed across all groups.
    pub entries: u64,
    /// Heap bytes of the entry index (positions and runs), excluding the group maps themselves.
    pub index_bytes: u64,
    /// Bytes charged to the entry cache ([`Options::cache_bytes`]): cached payloads, 64 bytes
    /// per cached append and the unused capacity of the payload buffers. At most the budget
    /// after every write; an upper bound of the memory the cache keeps alive.
    pub cache_bytes: u64,
    /// Appends whose payload the entry cache holds, over all groups.
    pub cache_appends: u64,
    /// Segment files on disk.
    pub segments: usize,
    /// Dead segment files kept on disk for reuse ([`Options::recycle_segments`]).
    pub pooled_segments: usize,
    /// Bytes of those files (disk usage beyond the segments).
    pub pooled_bytes: u64,
    /// Segments made from a kept dead segment file since open (no new file, no zero-fill).
    pub recycled_segments: u64,
    /// Id of the segment receiving writes.
    pub active_segment: u64,
    /// Write groups written since open.
    pub written_batches: u64,
    /// Write groups known durable since open.
    pub synced_batches: u64,
}

impl Inner {
    /// The counters of [`Engine::stats`]; also publishes the gauges that need this walk of the
    /// index (never called on the write path).
    pub(crate) fn stats(&self) -> Stats {
        let inner = self;
        let mut s = Stats::default();
        for shard in inner.groups.shards() {
            let shard = shard.read();
            s.groups += shard.len();
            for g in shard.values() {
                s.entries += g.entries.range().len;
                s.index_bytes += g.entries.heap_bytes() as u64;
                s.cache_appends += g.cache.len() as u64;
            }
        }
        s.cache_bytes = inner.cache.charged();
        s.segments = inner.segments.read().len();
        (s.pooled_segments, s.pooled_bytes) = inner.pool.usage();
        s.recycled_segments = inner.pool.recycled.load(Ordering::Relaxed);
        let log = inner.log.lock();
        s.active_segment = log.segment;
        s.written_batches = log.written;
        drop(log);
        s.synced_batches = inner.commit.synced();
        crate::telemetry::state(s.segments, s.groups, s.index_bytes, s.cache_bytes);
        s
    }

    /// Poisons the engine with `err` and returns it.
    pub(crate) fn fail(&self, err: Error) -> Error {
        self.commit.poison(err.to_string());
        err
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

    /// Whether `segment` is sealed (below the active one; rotation cut and synced it before
    /// moving on) and read from its memory mapping.
    fn mapped(&self, segment: u32) -> bool {
        self.opts.mmap_reads && u64::from(segment) < self.active_segment.load(Ordering::Acquire)
    }

    /// The bytes of the record at `run`: from the tail buffer while they are not yet in the
    /// file (checked under the tail lock, which the flush takes only after writing), else read
    /// from the file.
    fn read_raw(&self, file: &dyn FsFile, run: &Run) -> Result<Vec<u8>> {
        let seg = u64::from(run.segment);
        let off = u64::from(run.rec_off);
        let end = off + u64::from(run.rec_len);
        if pack_flushed(seg, end) > self.flushed.load(Ordering::Acquire) {
            let tail = self.tail.read();
            if tail.segment == seg && off >= tail.base {
                let from = (off - tail.base) as usize;
                if let Some(bytes) = tail.bytes.get(from..from + run.rec_len as usize) {
                    return Ok(bytes.to_vec());
                }
            }
        }
        // A sealed segment is read from its memory mapping, where the file system has one.
        let read = if self.mapped(run.segment) {
            file.read_sealed_vec_at(run.rec_len as usize, off)
        } else {
            file.read_vec_at(run.rec_len as usize, off)
        };
        read.map_err(|e| Error::io(format!("reading segment {seg} at {off}"), e))
    }

    /// Entry `loc` copied out of its record (read whole and checked). Measured: copying the
    /// record out of a mapping and checking the copy beats checking it in place (the copy
    /// streams the cold lines in; the checksum then runs on warm ones).
    ///
    /// A record of a sealed segment already verified by an earlier read (`verified`) is not
    /// read and checked again: only the entry's bytes are copied out of the mapping.
    fn read_entry(&self, file: &dyn FsFile, loc: &EntryLoc) -> Result<Vec<u8>> {
        let run = &loc.run;
        if self.verified.contains(run.segment, run.rec_off) && self.mapped(run.segment) {
            let body = run.rec_len.checked_sub(RECORD_HEADER_LEN as u32);
            let end = loc.span.off.checked_add(loc.span.len);
            if end.is_none() || end > body {
                return Err(Error::corruption(
                    u64::from(run.segment),
                    u64::from(run.rec_off),
                    "entry outside its record",
                ));
            }
            let at = u64::from(run.rec_off) + RECORD_HEADER_LEN as u64 + u64::from(loc.span.off);
            return file
                .read_sealed_vec_at(loc.span.len as usize, at)
                .map_err(|e| Error::io(format!("reading segment {} at {at}", run.segment), e));
        }
        let raw = self.read_record(file, run)?;
        Self::slice(&raw, loc)
    }

    /// Reads and checks the record at `run`; returns its raw (decompressed) body.
    fn read_record(&self, file: &dyn FsFile, run: &Run) -> Result<RawBody> {
        let seg = u64::from(run.segment);
        let buf = self.read_raw(file, run)?;
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
            std::borrow::Cow::Borrowed(_) => {
                // Intact and stored raw: later gets in it may copy just their entry.
                if self.mapped(run.segment) {
                    self.verified.insert(run.segment, run.rec_off);
                }
                RawBody {
                    buf,
                    start: RECORD_HEADER_LEN,
                }
            }
        })
    }

    fn slice(raw: &RawBody, loc: &EntryLoc) -> Result<Vec<u8>> {
        raw.range(loc).map(|r| raw.buf[r].to_vec())
    }

    /// Where the entries of `group` in `range` are (see [`Engine::entries`]): cached bytes, or
    /// a record to read (its segment's file taken under the group's lock, so a concurrent GC
    /// cannot remove it from under the read).
    fn locate_range(
        &self,
        group: u64,
        range: StdRange<u64>,
        max_bytes: usize,
    ) -> Result<(Vec<Piece>, SegmentFiles)> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut files: SegmentFiles = Vec::new();
        self.groups
            .read(group, |g| -> Result<()> {
                let mut bytes = 0usize;
                let r = g.entries.range();
                let end = r.first + r.len;
                for index in range {
                    if !pieces.is_empty() && bytes >= max_bytes {
                        break;
                    }
                    let Some(loc) = g.entries.locate(index) else {
                        break;
                    };
                    bytes = bytes.saturating_add(loc.span.len as usize);
                    if let Some(b) = g.cache.get(&loc, index, end) {
                        pieces.push(Piece::Cached(b));
                        continue;
                    }
                    if !files.iter().any(|(s, _)| *s == loc.run.segment) {
                        files.push((loc.run.segment, self.segment_file(loc.run.segment)?));
                    }
                    pieces.push(Piece::Disk(loc));
                }
                Ok(())
            })
            .transpose()?;
        Ok((pieces, files))
    }
}

/// Where [`Engine::entry`] finds its entry.
enum Located {
    Copied(Vec<u8>),
    Cached(Bytes),
    Disk(EntryLoc, Arc<dyn FsFile>),
}

/// The segment files a range read needs, by segment id.
type SegmentFiles = Vec<(u32, Arc<dyn FsFile>)>;

/// Where a range read finds one entry.
enum Piece {
    /// In the entry cache.
    Cached(Bytes),
    /// In the record `loc.run` names, to be read.
    Disk(EntryLoc),
}

/// A record's raw body: `buf[start..]`.
struct RawBody {
    buf: Vec<u8>,
    start: usize,
}

impl RawBody {
    /// The range of `buf` holding the entry at `loc`; an entry outside the record is corruption.
    fn range(&self, loc: &EntryLoc) -> Result<StdRange<usize>> {
        let start = self.start + loc.span.off as usize;
        let end = start + loc.span.len as usize;
        if end <= self.buf.len() {
            Ok(start..end)
        } else {
            Err(Error::corruption(
                u64::from(loc.run.segment),
                u64::from(loc.run.rec_off),
                "entry outside its record",
            ))
        }
    }

    /// The body as shared bytes (no copy): every entry of the record is then a slice of it.
    fn into_bytes(self) -> (Bytes, usize) {
        (Bytes::from(self.buf), self.start)
    }
}

impl Engine {
    /// Opens (creating if needed) the engine in `dir`, recovering whatever it holds.
    ///
    /// Takes an exclusive lock on `dir/LOCK`: a second open of the same directory, from this
    /// process or another, fails with [`Error::Locked`] (after retrying for up to 50 ms) until
    /// this engine is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] for options out of range; [`Error::NotADirectory`] if `dir` names
    /// a file; [`Error::Locked`] if another engine has the directory; recovery's errors
    /// ([`Error::Corruption`], [`Error::TornTail`] in strict mode, [`Error::Checkpoint`],
    /// [`Error::MissingSegment`], [`Error::Inconsistent`]); [`Error::NoSpace`] naming what it
    /// wanted on a full disk; other I/O errors.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Engine> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::info_span!("open", dir = ?dir).entered();
        crate::telemetry::describe();
        let fs = options.file_system.clone();
        fs.create_dir_all(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
                Error::NotADirectory { path: dir.clone() }
            }
            _ => Error::io(format!("creating the data directory {dir:?}"), e),
        })?;
        let lock_path = dir.join(LOCK_NAME);
        // A process forking in this one (to exec a child) briefly shares the lock file's
        // descriptor, and with it the lock, until the child's exec closes it: a reopen right
        // after a drop could see `Locked` for that moment. So a held lock is retried for up to
        // 50 ms before it is reported.
        let mut tries = 0;
        let lock = loop {
            match fs.lock(&lock_path) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other => break other,
            }
        };
        let lock = lock.map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked {
                    path: lock_path.clone(),
                }
            } else {
                Error::io(format!("locking {lock_path:?}"), e)
            }
        })?;
        let rec = {
            let _span = tracing::info_span!("recovery", mode = ?options.recovery_mode).entered();
            recover(fs.as_ref(), &dir, &options)?
        };
        let mut dropped = 0;
        if let Some(cut) = &rec.report.tail_cut {
            dropped += cut.bytes;
            tracing::warn!(
                segment = cut.segment,
                offset = cut.offset,
                bytes = cut.bytes,
                "recovery cut a torn tail (bytes past the last proven-durable point)"
            );
        }
        for s in &rec.report.skipped {
            dropped += s.end.saturating_sub(s.start);
            tracing::warn!(
                segment = s.segment,
                start = s.start,
                end = s.end,
                reason = %s.reason,
                "recovery skipped damaged bytes (TolerateAny)"
            );
        }
        crate::telemetry::recovery(rec.report.duration, rec.report.bytes, dropped);
        let groups = Groups::default();
        for (id, g) in rec.groups {
            groups.shard(id).write().insert(id, g);
        }
        let mut files = rec.files;
        // Pool files (dead segments kept for reuse) are never read as segments: the newest
        // `recycle_segments` are kept, the others deleted.
        let names = fs
            .list(&dir)
            .map_err(|e| Error::io("listing the data directory", e))?;
        let pool = Pool::load(fs.as_ref(), &dir, &names, options.recycle_segments)?;
        // Reuse the empty segments at the end of the log: the oldest takes writes, the next one
        // (prefilled by the previous run) is the next to rotate to, and any others are removed.
        let mut empty_tail = rec.empty_tail.into_iter();
        let (segment, file, prefilled) = match empty_tail.next() {
            // Whether the previous run zero-filled it is not known: assume not.
            Some((id, file)) => (id, file, false),
            None => {
                // Not prefilled here: opening stays fast; the segments after it are prefilled.
                // Only the first reservation is taken, and on a full disk not even that: the
                // header alone lets the engine open (reads, purges and GC need no more).
                let id = rec.next_segment;
                if id > u64::from(u32::MAX) {
                    return Err(Error::SegmentIdsExhausted);
                }
                let size = first_reservation(options.segment_size);
                // A pool file first: it needs no new space (the one way to open on a full disk
                // that holds one), then a new file.
                let recycled = pool.take().and_then(|pool_id| {
                    let no_cancel = std::sync::atomic::AtomicBool::new(false);
                    match recycle_segment(fs.as_ref(), &dir, pool_id, id, size, false, &no_cancel) {
                        Ok((file, _)) => {
                            Pool::count_recycled(&pool.recycled);
                            Some(file)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "recycling a pool file at open failed");
                            None
                        }
                    }
                });
                let created = match recycled {
                    Some(file) => Ok(file),
                    None => create_segment(fs.as_ref(), &dir, id, size),
                };
                let file = match created {
                    Err(Error::NoSpace { context }) => {
                        tracing::warn!(%context, "full disk at open: a segment without reserve");
                        create_segment(fs.as_ref(), &dir, id, SEGMENT_HEADER_LEN).map_err(|e| {
                            match e {
                                Error::NoSpace { context } => Error::NoSpace {
                                    context: format!(
                                        "{context}; opening wants {SEGMENT_HEADER_LEN} bytes \
                                         (a segment header) and {size} bytes to take writes"
                                    ),
                                },
                                e => e,
                            }
                        })?
                    }
                    other => other?,
                };
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
        let reserved = file
            .len()
            .map_err(|e| Error::io(format!("reading the size of segment {segment}"), e))?;
        let inner = Arc::new(Inner {
            dir,
            fs,
            groups,
            refs: SegmentRefs::default(),
            segments: RwLock::new(files),
            queue: Mutex::new(Queue::default()),
            log: Mutex::new(LogWriter {
                segment,
                file,
                offset: SEGMENT_HEADER_LEN,
                written: 0,
                flushed_seq: 0,
                next: None,
                prefilled,
                limit: options.segment_size,
                syncs_in_segment: 0,
                reserved,
                scratch: Default::default(),
                unsynced_bytes: 0,
                await_pool: false,
            }),
            tail: RwLock::new(Tail {
                segment,
                base: SEGMENT_HEADER_LEN,
                bytes: Vec::new(),
            }),
            flushed: AtomicU64::new(pack_flushed(segment, SEGMENT_HEADER_LEN)),
            commit: Commit::default(),
            gc: GcState::default(),
            cache: EntryCache::new(options.cache_bytes),
            verified: VerifiedRecords::default(),
            gc_serial: Mutex::new(()),
            active_segment: AtomicU64::new(segment),
            sync_point: SyncPoint::after_recovery(rec.last_sealed),
            pool,
            report: rec.report,
            _lock: lock,
            opts: options,
        });
        inner.refs.rebuild(&inner.groups);
        inner.stats();
        // The next segment is prepared only once the active one is half full (see `pipeline`),
        // unless an empty one was left by the previous run.
        if let Some((id, file)) = ready_next.filter(|(id, _)| *id == segment + 1) {
            let mut log = inner.log.lock();
            log.next = Some(inner.prepared(id, file));
        }
        let flusher_inner = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("mrwal-flusher".into())
            .spawn(move || flusher_inner.commit.run_flusher(flusher_inner.as_ref()))
            .map_err(|e| Error::io("starting the flusher thread", e))?;
        let gc_thread = crate::gc::spawn(inner.clone())?;
        tracing::info!(dir = ?inner.dir, report = ?inner.report, "engine opened");
        Ok(Engine {
            handle: Arc::new(Handle {
                inner,
                flusher: Some(flusher),
                gc_thread: Some(gc_thread),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// Writes `batch` and returns once it is durable (after the fdatasync that covers it, shared
    /// with every other writer waiting at the same time).
    ///
    /// # Errors
    ///
    /// [`Error::NonContiguousAppend`], [`Error::IndexOverflow`], [`Error::EntryTooLarge`] or
    /// [`Error::BatchTooLarge`] for a batch that does not fit (nothing is written);
    /// [`Error::NoSpace`] on a full disk (nothing is written); [`Error::Poisoned`] once a write
    /// or fdatasync failed.
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        self.inner().submit(batch, Durability::Sync)
    }

    /// Writes `batch` without waiting for durability. Its effects are readable on return; it
    /// becomes durable with the next sync (any synced write, [`Engine::sync`], or an
    /// asynchronous write's flush). It usually makes no system call: the bytes wait in the
    /// engine's tail buffer (64 KiB) until a sync, a rotation or the buffer's filling writes
    /// them out.
    ///
    /// # Errors
    ///
    /// As [`Engine::write`].
    pub fn write_unsynced(&self, batch: WriteBatch) -> Result<()> {
        self.inner().submit(batch, Durability::Unsynced)
    }

    /// Writes `batch` and returns at once; its effects are readable on return. `on_durable` is
    /// called exactly once, later and possibly from another thread: with `Ok(())` after the
    /// fdatasync that covers the batch has returned, or with the error that stopped it. If this
    /// function returns an error, nothing was written and `on_durable` is dropped uncalled.
    ///
    /// Like [`Engine::write_unsynced`], it copies the batch into the engine's tail buffer and
    /// makes no system call of its own (beyond waking the flusher, which writes the buffer out
    /// and fdatasyncs it), so it may be called from an async runtime's thread. Two exceptions,
    /// both rare: the write that fills a segment seals it (write out, trim, fdatasync of what
    /// is left unsynced, at most [`Options::bytes_per_sync`](crate::Options::bytes_per_sync)
    /// plus the tail), and the write that reaches the end of the segment's reserved space
    /// reserves the next step (one `fallocate`, every 1 to 16 MiB).
    ///
    /// # Errors
    ///
    /// As [`Engine::write`].
    pub fn write_async(
        &self,
        batch: WriteBatch,
        on_durable: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.inner()
            .submit(batch, Durability::Async(Box::new(on_durable)))
    }

    /// Writes `batch` and returns a future that resolves once the batch is durable: the
    /// awaitable form of [`Engine::write_async`], for async code. The batch's effects are
    /// readable when this returns; awaiting the [`DurableWrite`](crate::DurableWrite) waits for the fdatasync that
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
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`] once a write or fdatasync failed.
    pub fn sync(&self) -> Result<()> {
        self.inner().sync_all()
    }

    /// Entry `index` of `group`, or `None` if the group does not hold it.
    ///
    /// Served from the entry cache when the entry is recent (no system call); otherwise its
    /// record is read, its checksum verified, and the entry copied out.
    ///
    /// # Errors
    ///
    /// [`Error::Corruption`] naming the segment and record offset when the record fails its
    /// checks; [`Error::Io`] when reading fails.
    pub fn entry(&self, group: u64, index: u64) -> Result<Option<Vec<u8>>> {
        match self.locate_one(group, index, true)? {
            None => Ok(None),
            Some(Located::Copied(v)) => Ok(Some(v)),
            Some(Located::Cached(b)) => Ok(Some(b.to_vec())),
            Some(Located::Disk(loc, file)) => {
                self.inner().read_entry(file.as_ref(), &loc).map(Some)
            }
        }
    }

    /// [`Engine::entry`] as shared bytes: a slice of the cached payload (no copy at all), or the
    /// entry copied out of its record.
    ///
    /// # Errors
    ///
    /// As [`Engine::entry`].
    pub fn entry_bytes(&self, group: u64, index: u64) -> Result<Option<Bytes>> {
        match self.locate_one(group, index, false)? {
            None => Ok(None),
            Some(Located::Copied(v)) => Ok(Some(Bytes::from(v))),
            Some(Located::Cached(b)) => Ok(Some(b)),
            // One entry: copied out of its record, so the record's buffer is not kept alive.
            Some(Located::Disk(loc, file)) => self
                .inner()
                .read_entry(file.as_ref(), &loc)
                .map(|v| Some(Bytes::from(v))),
        }
    }

    /// Finds entry `index` of `group`: cached bytes (copied out under the group's lock if
    /// `copy`), or its location and segment file.
    fn locate_one(&self, group: u64, index: u64, copy: bool) -> Result<Option<Located>> {
        let inner = self.inner();
        inner
            .groups
            .read(group, |g| {
                let loc = g.entries.locate(index)?;
                let r = g.entries.range();
                let end = r.first + r.len;
                let cached = if copy {
                    g.cache.copy(&loc, index, end).map(Located::Copied)
                } else {
                    g.cache.get(&loc, index, end).map(Located::Cached)
                };
                Some(match cached {
                    Some(found) => Ok(found),
                    None => inner
                        .segment_file(loc.run.segment)
                        .map(|f| Located::Disk(loc, f)),
                })
            })
            .flatten()
            .transpose()
    }

    /// Entries of `group` from `range.start`, contiguous, stopping before `range.end`, at the
    /// first index the group does not hold, or once the payload bytes returned reach
    /// `max_bytes`. At least one entry is returned when the group holds `range.start`.
    ///
    /// Copies every entry out; [`Engine::entries_bytes`] returns the same without copying.
    ///
    /// # Errors
    ///
    /// As [`Engine::entry`].
    pub fn entries(
        &self,
        group: u64,
        range: StdRange<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .entries_bytes(group, range, max_bytes)?
            .iter()
            .map(|b| b.to_vec())
            .collect())
    }

    /// [`Engine::entries`] as shared bytes, without a per-entry allocation or copy: cached
    /// entries are slices of the cached payloads; the others are slices of their record, read
    /// and verified once per record for the whole range.
    ///
    /// # Errors
    ///
    /// As [`Engine::entry`].
    pub fn entries_bytes(
        &self,
        group: u64,
        range: StdRange<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Bytes>> {
        let inner = self.inner();
        let (pieces, files) = inner.locate_range(group, range, max_bytes)?;
        let mut out = Vec::with_capacity(pieces.len());
        let mut current: Option<(Run, Bytes, usize)> = None;
        for piece in pieces {
            let loc = match piece {
                Piece::Cached(b) => {
                    out.push(b);
                    continue;
                }
                Piece::Disk(loc) => loc,
            };
            let (bytes, start) = match &current {
                Some((run, bytes, start)) if *run == loc.run => (bytes, *start),
                _ => {
                    let file = files
                        .iter()
                        .find(|(s, _)| *s == loc.run.segment)
                        .map(|(_, f)| f.clone())
                        .ok_or(Error::MissingSegment {
                            segment: u64::from(loc.run.segment),
                        })?;
                    let (bytes, start) = inner.read_record(file.as_ref(), &loc.run)?.into_bytes();
                    let (_, bytes, start) = current.insert((loc.run, bytes, start));
                    (&*bytes, *start)
                }
            };
            let from = start + loc.span.off as usize;
            let to = from + loc.span.len as usize;
            if to > bytes.len() {
                return Err(Error::corruption(
                    u64::from(loc.run.segment),
                    u64::from(loc.run.rec_off),
                    "entry outside its record",
                ));
            }
            out.push(bytes.slice(from..to));
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
        self.inner().stats()
    }
}
