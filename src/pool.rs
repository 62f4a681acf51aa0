//! The recycling pool: dead segment files kept under a pool name (`<old id>.wal.free`) so that
//! later segments reuse them instead of creating and zero-filling new files (issue 10, item 3;
//! docs/FORMAT.md, "Recycled segments").
//!
//! Invariants:
//! - A file enters the pool where GC would otherwise delete it: only after the checkpoint that
//!   made its segment dead is durable, and only if the engine's handle was the last one (no
//!   reader holds it, through a memory mapping or a read that raced with a purge); otherwise, or
//!   when the pool is full, it is deleted as before. A reader that looked a dead segment up by
//!   id after GC took it out of the segment map gets `MissingSegment`, never the bytes of a
//!   recycled file.
//! - The pool holds at most [`crate::Options::recycle_segments`] files; at open, pool files
//!   beyond that are deleted. Pool files are never read as segments: recovery does not parse
//!   their names, and reuse rewrites their header first (`segment::recycle_segment`).
//! - Pool files count as disk usage, and they are the first thing given back on a full disk:
//!   before a checkpoint is retried, when a segment's reservation cannot grow, and at open.
//! - A file entering the pool is told to drop its cached pages (`FsFile::drop_cache`): nobody
//!   reads them again, and rewriting a file whose large cached folios survive counts every
//!   small append as a whole folio written (W11 in docs/BENCHMARKS.md: 1.12 against 1.05
//!   bytes written per payload byte).
//! - Bookkeeping only here, under one mutex; the file operations run outside it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};
use crate::segment::{parse_pool_name, pool_name, segment_name};

/// The pool's bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    /// Pool files (by the id of the segment they were), oldest first, with their sizes.
    files: Mutex<VecDeque<(u64, u64)>>,
    /// Segments made from pool files since open.
    pub(crate) recycled: Arc<AtomicU64>,
}

impl Pool {
    /// The pool files found at open (`names` is the directory listing): the newest `keep` stay
    /// in the pool, the others are deleted (and the directory fsynced if any was).
    pub(crate) fn load(
        fs: &dyn FileSystem,
        dir: &Path,
        names: &[String],
        keep: usize,
    ) -> Result<Pool> {
        let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_pool_name(n)).collect();
        ids.sort_unstable();
        let extra = ids.len().saturating_sub(keep);
        let mut files = VecDeque::new();
        for (i, id) in ids.into_iter().enumerate() {
            let path = dir.join(pool_name(id));
            if i < extra {
                fs.remove(&path)
                    .map_err(|e| Error::io(format!("removing pool file {}", pool_name(id)), e))?;
                continue;
            }
            let len = fs.open(&path).and_then(|f| f.len()).map_err(|e| {
                Error::io(
                    format!("reading the size of pool file {}", pool_name(id)),
                    e,
                )
            })?;
            files.push_back((id, len));
        }
        if extra > 0 {
            fs.sync_dir(dir)
                .map_err(|e| Error::io("syncing the directory after trimming the pool", e))?;
        }
        Ok(Pool {
            files: Mutex::new(files),
            recycled: Arc::default(),
        })
    }

    /// Takes the oldest pool file for reuse, if any.
    pub(crate) fn take(&self) -> Option<u64> {
        self.files.lock().pop_front().map(|(id, _)| id)
    }

    /// Pool files and their bytes.
    pub(crate) fn usage(&self) -> (usize, u64) {
        let files = self.files.lock();
        (files.len(), files.iter().map(|(_, len)| len).sum())
    }

    /// Disposes of dead segment `id` (its checkpoint is durable; GC has taken it out of the
    /// segment map and hands over `file`, the engine's handle, if it had one): renamed into the
    /// pool if the handle is the last one and the pool (with `pending` files renamed in this GC
    /// run) has room below `max`, else deleted. Returns whether it went to the pool; the caller
    /// fsyncs the directory, then calls [`Pool::add`] with what went to the pool.
    pub(crate) fn retire(
        &self,
        fs: &dyn FileSystem,
        dir: &Path,
        id: u64,
        file: Option<Arc<dyn FsFile>>,
        pending: usize,
        max: usize,
    ) -> std::io::Result<Option<u64>> {
        let path = dir.join(segment_name(id));
        // The engine's handle is the only one left: no reader holds the file (a reader clones
        // the handle out of the segment map, from which GC removed it before this call).
        let unreferenced = file
            .as_ref()
            .is_some_and(|f| Arc::strong_count(f) == 1 && f.len().is_ok());
        let len = file.as_ref().and_then(|f| f.len().ok()).unwrap_or(0);
        let room = self.files.lock().len() + pending < max;
        if unreferenced && room && fs.rename(&path, &dir.join(pool_name(id))).is_ok() {
            // Its cached pages are dead weight (it was sealed and synced at its rotation, so
            // they are clean), and a reuse rewrites it from small pages.
            if let Some(f) = &file {
                f.drop_cache();
            }
            return Ok(Some(len));
        }
        drop(file);
        fs.remove(&path).map(|()| None)
    }

    /// Adds files renamed into the pool (their rename is durable).
    pub(crate) fn add(&self, retired: impl IntoIterator<Item = (u64, u64)>) {
        self.files.lock().extend(retired);
    }

    /// Deletes every pool file (a full disk, or a clean shutdown: an idle directory holds no
    /// dead weight), then fsyncs the directory. Returns the bytes given back; failures are
    /// logged (this only makes room).
    pub(crate) fn drain(&self, fs: &dyn FileSystem, dir: &Path) -> u64 {
        let files: Vec<(u64, u64)> = self.files.lock().drain(..).collect();
        if files.is_empty() {
            return 0;
        }
        let mut freed = 0;
        for (id, len) in files {
            match fs.remove(&dir.join(pool_name(id))) {
                Ok(()) => freed += len,
                Err(e) => tracing::warn!(pool_file = id, error = %e, "removing a pool file"),
            }
        }
        if let Err(e) = fs.sync_dir(dir) {
            tracing::warn!(error = %e, "syncing the directory after emptying the pool");
        }
        tracing::debug!(freed, "the recycling pool was given back");
        freed
    }

    /// Counts one segment made from a pool file.
    pub(crate) fn count_recycled(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::recycled();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;

    fn dead_segment(dir: &Path, id: u64) -> Arc<dyn FsFile> {
        let path = dir.join(segment_name(id));
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        StdFs.open(&path).unwrap()
    }

    /// A file a reader still holds (its handle cloned out of the segment map before GC took
    /// it out) is deleted, never recycled; an unreferenced one goes to the pool while it has
    /// room; a full pool deletes.
    #[test]
    fn only_unreferenced_files_enter_the_pool_and_only_while_it_has_room() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pool = Pool::default();
        let exists = |name: String| dir.join(name).exists();

        let held = dead_segment(dir, 1);
        let reader = held.clone();
        assert_eq!(pool.retire(&StdFs, dir, 1, Some(held), 0, 2).unwrap(), None);
        assert!(!exists(segment_name(1)) && !exists(pool_name(1)));
        // The reader's handle still reads the old bytes (unlinked, not rewritten).
        assert_eq!(reader.read_vec_at(4, 0).unwrap(), [7; 4]);

        let free = dead_segment(dir, 2);
        assert_eq!(
            pool.retire(&StdFs, dir, 2, Some(free), 0, 2).unwrap(),
            Some(100)
        );
        assert!(!exists(segment_name(2)) && exists(pool_name(2)));
        pool.add([(2, 100)]);
        // No handle at all (not in the segment map): deleted.
        dead_segment(dir, 3);
        assert_eq!(pool.retire(&StdFs, dir, 3, None, 0, 2).unwrap(), None);
        // Room for one more: with one pending in this GC run, the pool is full.
        let f4 = dead_segment(dir, 4);
        assert_eq!(pool.retire(&StdFs, dir, 4, Some(f4), 1, 2).unwrap(), None);
        assert!(!exists(pool_name(4)));
        let f5 = dead_segment(dir, 5);
        assert_eq!(pool.retire(&StdFs, dir, 5, Some(f5), 0, 0).unwrap(), None);
        assert_eq!(pool.usage(), (1, 100));
        // Open keeps the newest `keep` pool files and deletes the others.
        std::fs::write(dir.join(pool_name(9)), [0u8; 10]).unwrap();
        let names = StdFs.list(dir).unwrap();
        let loaded = Pool::load(&StdFs, dir, &names, 1).unwrap();
        assert_eq!(loaded.usage(), (1, 10));
        assert!(!exists(pool_name(2)) && exists(pool_name(9)));
        assert_eq!(loaded.take(), Some(9));
        // A full disk drains it.
        assert_eq!(
            pool.drain(&StdFs, dir),
            0,
            "pool 2 was already deleted by load"
        );
        assert_eq!(pool.usage(), (0, 0));
    }

    /// Records `drop_cache` calls on a real file.
    #[derive(Debug)]
    struct Hinted {
        inner: Arc<dyn FsFile>,
        dropped: Arc<AtomicU64>,
    }

    impl FsFile for Hinted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_all_at(buf, offset)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.inner.sync_data()
        }
        fn allocate(&self, len: u64) -> std::io::Result<()> {
            self.inner.allocate(len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn drop_cache(&self) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.inner.drop_cache();
        }
    }

    /// A file entering the pool has its cached pages dropped (W11's written bytes depend on
    /// it, see `FsFile::drop_cache`); a deleted one needs no hint.
    #[test]
    fn a_file_entering_the_pool_drops_its_cached_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pool = Pool::default();
        let dropped = Arc::new(AtomicU64::new(0));
        let hinted = |id| -> Arc<dyn FsFile> {
            Arc::new(Hinted {
                inner: dead_segment(dir, id),
                dropped: dropped.clone(),
            })
        };
        assert_eq!(
            pool.retire(&StdFs, dir, 1, Some(hinted(1)), 0, 1).unwrap(),
            Some(100)
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        // No room: deleted, no hint.
        assert_eq!(
            pool.retire(&StdFs, dir, 2, Some(hinted(2)), 1, 1).unwrap(),
            None
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
    }
}
