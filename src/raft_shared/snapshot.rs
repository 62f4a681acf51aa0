//! [`SnapshotStore`]: state-machine snapshots kept in files of their own, apart from the engine.
//!
//! Snapshots do not belong in the log engine: they are large, rarely written and read whole,
//! and an engine key would sit in the in-memory group metadata and be copied into every
//! checkpoint. The store keeps one file per group and snapshot in a directory of its own:
//!
//! ```text
//! <dir>/<group:016x>-<seq:016x>.snap       a complete, durable snapshot
//! <dir>/<group:016x>-<seq:016x>.snap.tmp   one being written (removed on open)
//! ```
//!
//! File layout (integers little-endian): magic `MRWSNAP1` (8 bytes), group (u64), meta length
//! (u32), data length (u64), CRC32C of the first 28 bytes then meta then data (u32); then the
//! meta bytes and the data bytes. The store treats both as opaque: the openraft adapters put the
//! encoded `SnapshotMeta` in the first and the state machine's bytes in the second, so the store
//! is the same for every openraft version.
//!
//! Invariants:
//! - A snapshot file is written under a temporary name, fsynced, renamed and the directory is
//!   fsynced before [`SnapshotStore::save`] returns: a crash leaves either the old or the new
//!   snapshot complete, never a partial one under a final name.
//! - The previous snapshot of the group is removed only after the new one is durable.
//! - Sequence numbers grow across all groups and restarts, so the newest file of a group is the
//!   one with the highest number; older ones left by a crash are removed on open.
//! - No lock is held during file I/O; the only lock guards the map of each group's newest file.
//!
//! The blocking calls ([`SnapshotStore::save`], [`SnapshotStore::load`]) are for threads that may
//! block; async code uses the `*_async` forms, which run the same work on the store's own worker
//! threads and await the result without occupying a runtime thread.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use parking_lot::Mutex;

use crate::fs::{FileSystem, StdFs};

const MAGIC: &[u8; 8] = b"MRWSNAP1";
const HEADER_LEN: usize = 32;
const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";
/// Worker threads per store running the blocking file work of the `*_async` calls.
const DEFAULT_WORKERS: usize = 2;

/// What can go wrong in the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file-system call failed.
    #[error("snapshot store: I/O error while {context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A snapshot file failed its checks.
    #[error("snapshot store: {path:?} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// The snapshot does not fit the file format (meta over 4 GiB).
    #[error("snapshot store: {0}")]
    TooLarge(String),
    /// The store's worker threads are gone (the store is shutting down).
    #[error("snapshot store: worker threads stopped")]
    Closed,
}

impl SnapshotError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        SnapshotError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<SnapshotError> for io::Error {
    fn from(e: SnapshotError) -> io::Error {
        let kind = match &e {
            SnapshotError::Io { source, .. } => source.kind(),
            SnapshotError::Corrupt { .. } => io::ErrorKind::InvalidData,
            SnapshotError::TooLarge(_) => io::ErrorKind::InvalidInput,
            SnapshotError::Closed => io::ErrorKind::BrokenPipe,
        };
        io::Error::new(kind, e)
    }
}

/// A stored snapshot: the bytes handed to [`SnapshotStore::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The file's sequence number (grows with every save, across groups).
    pub seq: u64,
    /// The meta bytes.
    pub meta: Vec<u8>,
    /// The data bytes.
    pub data: Vec<u8>,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Inner {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    /// The newest durable snapshot of each group: its sequence number.
    latest: Mutex<HashMap<u64, u64>>,
    next_seq: AtomicU64,
    /// Dropped with the last clone: the closed channel ends the (detached) workers once their
    /// queued jobs are done. Queued jobs hold clones, so none is lost.
    jobs: mpsc::Sender<Job>,
}

/// Snapshot files, one per group and snapshot, in a directory apart from the engine's.
///
/// Cheap to clone; clones share the directory and the worker threads (two by default), which
/// stop when the last clone is dropped.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("dir", &self.inner.dir)
            .field("groups", &self.inner.latest.lock().len())
            .finish()
    }
}

fn file_name(group: u64, seq: u64) -> String {
    format!("{group:016x}-{seq:016x}{SUFFIX}")
}

/// `(group, seq)` of a final snapshot file name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (g, s) = stem.split_once('-')?;
    if g.len() != 16 || s.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(g, 16).ok()?,
        u64::from_str_radix(s, 16).ok()?,
    ))
}

impl SnapshotStore {
    /// Opens (creating if needed) the store in `dir` on the real file system.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] if the directory cannot be created, listed or synced, or a stale file removed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        Self::open_with_fs(dir, Arc::new(StdFs))
    }

    /// Opens the store in `dir` through `fs` (tests use a simulated file system).
    ///
    /// Removes temporary files and every snapshot file older than its group's newest one (left
    /// by a crash between a new snapshot's rename and the old one's removal), then fsyncs the
    /// directory if anything was removed.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] if the directory cannot be created, listed or synced, or a stale file removed.
    pub fn open_with_fs(
        dir: impl AsRef<Path>,
        fs: Arc<dyn FileSystem>,
    ) -> Result<Self, SnapshotError> {
        let dir = dir.as_ref().to_path_buf();
        fs.create_dir_all(&dir)
            .map_err(|e| SnapshotError::io(format!("creating {dir:?}"), e))?;
        let names = fs
            .list(&dir)
            .map_err(|e| SnapshotError::io(format!("listing {dir:?}"), e))?;
        let mut latest: HashMap<u64, u64> = HashMap::new();
        let mut stale = Vec::new();
        let mut max_seq = 0;
        for name in names {
            if name.ends_with(TMP_SUFFIX) {
                stale.push(name);
                continue;
            }
            let Some((group, seq)) = parse_name(&name) else {
                continue;
            };
            max_seq = max_seq.max(seq);
            match latest.get(&group).copied() {
                Some(old) if old > seq => stale.push(name),
                Some(old) => {
                    stale.push(file_name(group, old));
                    latest.insert(group, seq);
                }
                None => {
                    latest.insert(group, seq);
                }
            }
        }
        for name in &stale {
            fs.remove(&dir.join(name))
                .map_err(|e| SnapshotError::io(format!("removing stale {name}"), e))?;
        }
        if !stale.is_empty() {
            fs.sync_dir(&dir)
                .map_err(|e| SnapshotError::io(format!("fsync of {dir:?}"), e))?;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..DEFAULT_WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mrwal-snap-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .map_err(|e| SnapshotError::io("starting a snapshot worker", e))?;
        }
        Ok(SnapshotStore {
            inner: Arc::new(Inner {
                dir,
                fs,
                latest: Mutex::new(latest),
                next_seq: AtomicU64::new(max_seq + 1),
                jobs: tx,
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The groups that have a snapshot.
    pub fn groups(&self) -> Vec<u64> {
        let mut groups: Vec<u64> = self.inner.latest.lock().keys().copied().collect();
        groups.sort_unstable();
        groups
    }

    /// The path of `group`'s newest snapshot file, if it has one.
    pub fn path_of(&self, group: u64) -> Option<PathBuf> {
        let seq = self.inner.latest.lock().get(&group).copied()?;
        Some(self.inner.dir.join(file_name(group, seq)))
    }

    /// Stores a snapshot of `group` durably and returns its sequence number. Blocks for two
    /// fsyncs (the file, then the directory) and one more after removing the group's previous
    /// snapshot.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] for any failed write, fsync, rename or removal; the snapshot is durable only if this returns `Ok`.
    pub fn save(&self, group: u64, meta: &[u8], data: &[u8]) -> Result<u64, SnapshotError> {
        let inner = &self.inner;
        let meta_len = u32::try_from(meta.len()).map_err(|_| {
            SnapshotError::TooLarge(format!("meta of {} bytes exceeds 4 GiB", meta.len()))
        })?;
        let seq = inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let name = file_name(group, seq);
        let tmp = inner
            .dir
            .join(format!("{group:016x}-{seq:016x}{TMP_SUFFIX}"));
        let path = inner.dir.join(&name);

        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&group.to_le_bytes());
        header[16..20].copy_from_slice(&meta_len.to_le_bytes());
        header[20..28].copy_from_slice(&(data.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&header[..28]), meta),
            data,
        );
        header[28..32].copy_from_slice(&crc.to_le_bytes());

        let write = || -> io::Result<()> {
            let file = inner.fs.create(&tmp)?;
            file.write_all_at(&header, 0)?;
            file.write_all_at(meta, HEADER_LEN as u64)?;
            file.write_all_at(data, (HEADER_LEN + meta.len()) as u64)?;
            file.sync_data()?;
            inner.fs.rename(&tmp, &path)?;
            inner.fs.sync_dir(&inner.dir)
        };
        if let Err(e) = write() {
            // Best effort: open() removes temporary files anyway.
            let _ = inner.fs.remove(&tmp);
            return Err(SnapshotError::io(format!("writing snapshot {name}"), e));
        }

        // The new snapshot is durable: retire the older one (or this one, if a concurrent save
        // of the same group already stored a newer snapshot).
        let retired = {
            let mut latest = inner.latest.lock();
            match latest.get(&group).copied() {
                Some(old) if old > seq => Some(seq),
                old => {
                    latest.insert(group, seq);
                    old
                }
            }
        };
        if let Some(old) = retired {
            let old_name = file_name(group, old);
            inner
                .fs
                .remove(&inner.dir.join(&old_name))
                .and_then(|()| inner.fs.sync_dir(&inner.dir))
                .map_err(|e| SnapshotError::io(format!("removing old snapshot {old_name}"), e))?;
        }
        Ok(seq)
    }

    /// Reads `group`'s newest snapshot, checking its CRC; `None` if the group has none.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] for an I/O error or a file that fails its CRC or framing checks.
    pub fn load(&self, group: u64) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let Some(seq) = self.inner.latest.lock().get(&group).copied() else {
            return Ok(None);
        };
        self.read_file(group, seq).map(Some)
    }

    fn read_file(&self, group: u64, seq: u64) -> Result<StoredSnapshot, SnapshotError> {
        let path = self.inner.dir.join(file_name(group, seq));
        let ctx = |what: &str| format!("{what} {path:?}");
        let corrupt = |reason: String| SnapshotError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file = self
            .inner
            .fs
            .open(&path)
            .map_err(|e| SnapshotError::io(ctx("opening"), e))?;
        let len = file
            .len()
            .map_err(|e| SnapshotError::io(ctx("reading the length of"), e))?;
        if len < HEADER_LEN as u64 {
            return Err(corrupt(format!("{len} bytes, shorter than the header")));
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| SnapshotError::io(ctx("reading"), e))?;
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let le64 = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        };
        let le32 = |b: &[u8]| {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            u32::from_le_bytes(a)
        };
        let file_group = le64(&header[8..16]);
        let meta_len = u64::from(le32(&header[16..20]));
        let data_len = le64(&header[20..28]);
        let crc = le32(&header[28..32]);
        if file_group != group {
            return Err(corrupt(format!("holds group {file_group}, not {group}")));
        }
        let expected = (HEADER_LEN as u64)
            .checked_add(meta_len)
            .and_then(|n| n.checked_add(data_len));
        if expected != Some(len) {
            return Err(corrupt(format!(
                "{len} bytes, header says {meta_len} of meta and {data_len} of data"
            )));
        }
        // Lengths checked against the file's size: safe to allocate.
        let mut meta = vec![0u8; meta_len as usize];
        let mut data = vec![0u8; data_len as usize];
        file.read_exact_at(&mut meta, HEADER_LEN as u64)
            .and_then(|()| file.read_exact_at(&mut data, HEADER_LEN as u64 + meta_len))
            .map_err(|e| SnapshotError::io(ctx("reading"), e))?;
        let actual = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&header[..28]), &meta),
            &data,
        );
        if actual != crc {
            return Err(corrupt(format!(
                "CRC mismatch (stored {crc:08x}, computed {actual:08x})"
            )));
        }
        Ok(StoredSnapshot { seq, meta, data })
    }

    /// Removes every snapshot of `group` (when the group itself is dropped).
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] if a file cannot be removed or the directory synced.
    pub fn remove_group(&self, group: u64) -> Result<(), SnapshotError> {
        let Some(seq) = self.inner.latest.lock().remove(&group) else {
            return Ok(());
        };
        let name = file_name(group, seq);
        self.inner
            .fs
            .remove(&self.inner.dir.join(&name))
            .and_then(|()| self.inner.fs.sync_dir(&self.inner.dir))
            .map_err(|e| SnapshotError::io(format!("removing snapshot {name}"), e))
    }

    /// Runs `job` on one of the store's worker threads and awaits its result: how the async
    /// calls do blocking file work without occupying a runtime thread. The job may also encode
    /// or decode (CPU work that should not hold a runtime thread either).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Closed`] if the worker threads are gone; otherwise `job`'s own error.
    pub async fn run<T, F>(&self, job: F) -> Result<T, SnapshotError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, SnapshotError> + Send + 'static,
    {
        let (tx, rx) = futures_channel::oneshot::channel();
        let boxed: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        self.inner
            .jobs
            .send(boxed)
            .map_err(|_| SnapshotError::Closed)?;
        rx.await.map_err(|_| SnapshotError::Closed)?
    }

    /// [`SnapshotStore::save`] on a worker thread.
    ///
    /// # Errors
    ///
    /// As [`SnapshotStore::save`], and [`SnapshotError::Closed`] if the worker threads are gone.
    pub async fn save_async(
        &self,
        group: u64,
        meta: Vec<u8>,
        data: Vec<u8>,
    ) -> Result<u64, SnapshotError> {
        let store = self.clone();
        self.run(move || store.save(group, &meta, &data)).await
    }

    /// [`SnapshotStore::load`] on a worker thread.
    ///
    /// # Errors
    ///
    /// As [`SnapshotStore::load`], and [`SnapshotError::Closed`] if the worker threads are gone.
    ///
    /// A group with no snapshot is answered at once, from memory (no file to read, no worker
    /// thread woken): what every group of a new node asks when it starts.
    pub async fn load_async(&self, group: u64) -> Result<Option<StoredSnapshot>, SnapshotError> {
        if !self.inner.latest.lock().contains_key(&group) {
            return Ok(None);
        }
        let store = self.clone();
        self.run(move || store.load(group)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn loading_a_group_without_snapshot_needs_no_worker() -> Result<(), SnapshotError> {
        let dir = tempfile::tempdir().map_err(|e| SnapshotError::io("tempdir", e))?;
        let store = SnapshotStore::open(dir.path())?;
        store.save(1, b"meta", b"data")?;
        // Occupy every worker thread until released.
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let (started_tx, started) = mpsc::channel::<()>();
        let mut blockers = Vec::new();
        for _ in 0..DEFAULT_WORKERS {
            let (gate, started_tx) = (gate.clone(), started_tx.clone());
            let mut job = Box::pin(store.run(move || {
                let _ = started_tx.send(());
                if let Ok(g) = gate.lock() {
                    let _ = g.recv();
                }
                Ok(())
            }));
            // Polled once: the job is queued.
            assert!((&mut job).now_or_never().is_none());
            blockers.push(job);
        }
        for _ in 0..DEFAULT_WORKERS {
            started
                .recv_timeout(std::time::Duration::from_secs(20))
                .map_err(|_| SnapshotError::Closed)?;
        }
        // Every worker is busy: a group without snapshot is still answered at once...
        let none = store.load_async(2).now_or_never();
        assert!(matches!(none, Some(Ok(None))), "answered without a worker");
        // ...while one with a snapshot goes to a worker.
        let mut some = Box::pin(store.load_async(1));
        assert!(
            (&mut some).now_or_never().is_none(),
            "a file read waits for a worker"
        );
        for _ in 0..DEFAULT_WORKERS {
            let _ = release.send(());
        }
        let loaded = block_on(some)?.map(|s| s.data);
        assert_eq!(loaded.as_deref(), Some(&b"data"[..]));
        for job in blockers {
            block_on(job)?;
        }
        Ok(())
    }

    /// Polls `fut` to completion on this thread (parks between polls).
    fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}
