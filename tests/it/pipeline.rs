//! The write pipeline under a gated file system: every fsync waits at a gate that the test
//! opens one sync at a time, and each file keeps the image its last completed fsync made
//! durable. With more writer threads than cores, synced and asynchronous, every acknowledgement
//! is checked at the moment it happens: the writer's unique payload must already be in a
//! durable image. Write groups keep coming while a sync waits at the gate (pipelining), and a
//! failed fsync fails its waiters and poisons the engine.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use multiraft_wal::fs::{DirLock, FileSystem, FsFile, StdFs};
use multiraft_wal::{Engine, Error, Options, WriteBatch};

#[derive(Default)]
struct GateState {
    permits: u64,
    waiting: u64,
    fail_next: bool,
    open: bool,
}

#[derive(Default)]
struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
    /// Writes that happened while a sync waited at the gate.
    writes_during_sync: AtomicUsize,
}

impl Gate {
    /// Lets one waiting sync through (failing it if asked), waiting for one to arrive unless
    /// `done` is set.
    fn release_one(&self, done: &AtomicBool) -> bool {
        let mut st = self.st.lock().unwrap();
        while st.waiting == 0 {
            if done.load(Ordering::SeqCst) {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(20))
                .unwrap()
                .0;
        }
        // Hold the sync until a write group arrives behind it (bounded: every writer may be
        // parked on this very sync).
        let before = self.writes_during_sync.load(Ordering::SeqCst);
        for _ in 0..5 {
            if self.writes_during_sync.load(Ordering::SeqCst) > before {
                break;
            }
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(1))
                .unwrap()
                .0;
        }
        st.permits += 1;
        self.cv.notify_all();
        true
    }

    fn open_all(&self) {
        self.st.lock().unwrap().open = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct GatedFs {
    inner: StdFs,
    gate: Arc<GateShared>,
}

/// What the test and the files share.
struct GateShared {
    gate: Gate,
    files: Mutex<Vec<Arc<GatedFile>>>,
}

impl std::fmt::Debug for GateShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateShared")
    }
}

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn FsFile>,
    live: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    gate: Arc<GateShared>,
    /// Whether a record was written (beyond the 32-byte segment header).
    records: AtomicBool,
}

impl GatedFile {
    fn wrap(inner: Arc<dyn FsFile>, gate: &Arc<GateShared>) -> io::Result<Arc<GatedFile>> {
        let len = inner.len()? as usize;
        let mut bytes = vec![0u8; len];
        if len > 0 {
            inner.read_exact_at(&mut bytes, 0)?;
        }
        let f = Arc::new(GatedFile {
            inner,
            durable: Mutex::new(bytes.clone()),
            live: Mutex::new(bytes),
            gate: gate.clone(),
            records: AtomicBool::new(false),
        });
        gate.files.lock().unwrap().push(f.clone());
        Ok(f)
    }
}

impl FsFile for GatedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.gate.gate.st.lock().unwrap().waiting > 0 {
            self.gate
                .gate
                .writes_during_sync
                .fetch_add(1, Ordering::SeqCst);
            self.gate.gate.cv.notify_all();
        }
        self.inner.write_all_at(buf, offset)?;
        if offset >= 32 {
            self.records.store(true, Ordering::SeqCst);
        }
        let mut live = self.live.lock().unwrap();
        let end = offset as usize + buf.len();
        if live.len() < end {
            live.resize(end, 0);
        }
        live[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let snapshot = self.live.lock().unwrap().clone();
        let g = &self.gate.gate;
        let mut st = g.st.lock().unwrap();
        st.waiting += 1;
        g.cv.notify_all();
        while st.permits == 0 && !st.open {
            st = g.cv.wait(st).unwrap();
        }
        if !st.open {
            st.permits -= 1;
        }
        st.waiting -= 1;
        // Only a segment holding records fails (not one being prepared).
        let fail = st.fail_next && self.records.load(Ordering::SeqCst);
        if fail {
            st.fail_next = false;
        }
        drop(st);
        if fail {
            return Err(io::Error::other("injected EIO"));
        }
        self.inner.sync_data()?;
        *self.durable.lock().unwrap() = snapshot;
        Ok(())
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)?;
        let mut live = self.live.lock().unwrap();
        if live.len() < len as usize {
            live.resize(len as usize, 0);
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        self.live.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl FileSystem for GatedFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(GatedFile::wrap(self.inner.create(path)?, &self.gate)?)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(GatedFile::wrap(self.inner.open(path)?, &self.gate)?)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        self.inner.lock(path)
    }
}

fn gated() -> (Arc<GateShared>, Options) {
    let shared = Arc::new(GateShared {
        gate: Gate::default(),
        files: Mutex::new(Vec::new()),
    });
    let fs = GatedFs {
        inner: StdFs,
        gate: shared.clone(),
    };
    // Small segments so rotations (and their fsyncs) happen under the gate too.
    let opts = Options::default()
        .segment_size(256 << 10)
        .prefill_segments(false)
        .file_system(Arc::new(fs));
    (shared, opts)
}

/// Whether `needle` is in some file's durable image.
fn durable(shared: &GateShared, needle: &[u8]) -> bool {
    shared.files.lock().unwrap().iter().any(|f| {
        let d = f.durable.lock().unwrap();
        d.windows(needle.len()).any(|w| w == needle)
    })
}

fn payload(thread: u64, i: u64) -> Vec<u8> {
    let mut p = b"mrwal-pipeline-".to_vec();
    p.extend_from_slice(&thread.to_le_bytes());
    p.extend_from_slice(&i.to_le_bytes());
    p.extend_from_slice(&(thread ^ 0x5a5a_5a5a_u64).wrapping_mul(i + 7).to_le_bytes());
    p
}

#[test]
fn no_writer_is_acknowledged_before_the_fsync_covering_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, opts) = gated();
    let done = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let acks = Arc::new(AtomicU64::new(0));
    let controller = {
        let shared = shared.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut released = 0u64;
            while shared.gate.release_one(&done) {
                released += 1;
            }
            released
        })
    };
    let engine = Engine::open(dir.path(), opts).unwrap();
    let threads = 12u64; // more than the cores of CI
    let per_thread = 40u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let engine = engine.clone();
            let shared = shared.clone();
            let violations = violations.clone();
            let acks = acks.clone();
            s.spawn(move || {
                let group = t + 1;
                for i in 0..per_thread {
                    let p = payload(t, i);
                    let mut b = WriteBatch::new();
                    b.append(group, i + 1, [p.as_slice()]);
                    // Odd threads write asynchronously: the callback checks durability.
                    if t % 2 == 1 {
                        let shared = shared.clone();
                        let violations = violations.clone();
                        let acks = acks.clone();
                        let mine = p.clone();
                        engine
                            .write_async(b, move |r| {
                                r.unwrap();
                                if !durable(&shared, &mine) {
                                    violations
                                        .lock()
                                        .unwrap()
                                        .push(format!("async thread {t} entry {i}"));
                                }
                                acks.fetch_add(1, Ordering::SeqCst);
                            })
                            .unwrap();
                        // Readable at once, durable or not.
                        assert_eq!(engine.entry(group, i + 1).unwrap().as_deref(), Some(&p[..]));
                    } else {
                        engine.write(b).unwrap();
                        if !durable(&shared, &p) {
                            violations
                                .lock()
                                .unwrap()
                                .push(format!("sync thread {t} entry {i}"));
                        }
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    // The asynchronous callbacks still pending complete through the flusher.
    engine.sync().unwrap();
    done.store(true, Ordering::SeqCst);
    let released = controller.join().unwrap();
    shared.gate.open_all();
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "acknowledged before durable: {:?}",
        &v[..v.len().min(10)]
    );
    drop(v);
    drop(engine);
    assert_eq!(acks.load(Ordering::SeqCst), threads * per_thread);
    assert!(released >= 2, "syncs went through the gate one by one");
    assert!(
        shared.gate.writes_during_sync.load(Ordering::SeqCst) > 0,
        "write groups were written while an fsync waited (pipelining)"
    );
}

#[test]
fn a_failed_fsync_fails_its_writers_and_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, opts) = gated();
    shared.gate.st.lock().unwrap().fail_next = true;
    let done = Arc::new(AtomicBool::new(false));
    let controller = {
        let shared = shared.clone();
        let done = done.clone();
        std::thread::spawn(move || while shared.gate.release_one(&done) {})
    };
    let engine = Engine::open(dir.path(), opts).unwrap();
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6u64)
            .map(|t| {
                let engine = engine.clone();
                s.spawn(move || {
                    let mut b = WriteBatch::new();
                    b.append(t + 1, 1, [payload(t, 0)]);
                    engine.write(b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    done.store(true, Ordering::SeqCst);
    controller.join().unwrap();
    shared.gate.open_all();
    // The first fsync failed: whoever it covered got an error; nobody got Ok for bytes that
    // only a later (believed) fsync could have covered, because none runs after poisoning.
    assert!(
        results.iter().all(|r| r.is_err()),
        "a writer was acknowledged although the fsync failed and the engine is poisoned: {results:?}"
    );
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(Error::Poisoned { .. }) | Err(Error::Io { .. }))));
    assert!(engine.is_poisoned());
    let mut b = WriteBatch::new();
    b.append(99, 1, [b"after"]);
    assert!(matches!(engine.write(b), Err(Error::Poisoned { .. })));
}

/// Many synced and asynchronous writers, tiny segments (a rotation every few groups, each with
/// its own fsync that completes waiters outside the sync stage): every writer finishes. A lost
/// wakeup or handover shows as a hang, reported here as a failure after a generous bound.
#[test]
fn many_writers_across_rotations_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default()
        .segment_size(16 << 10)
        .prefill_segments(false);
    let engine = Engine::open(dir.path(), opts).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let threads = 64u64;
    let per_thread = 30u64;
    let workers = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            std::thread::scope(|s| {
                for t in 0..threads {
                    let engine = engine.clone();
                    s.spawn(move || {
                        for i in 0..per_thread {
                            let mut b = WriteBatch::new();
                            b.append(t + 1, i + 1, [payload(t, i)]);
                            if t % 4 == 3 {
                                let (dtx, drx) = std::sync::mpsc::channel();
                                engine
                                    .write_async(b, move |r| dtx.send(r.is_ok()).unwrap())
                                    .unwrap();
                                assert!(drx.recv().unwrap());
                            } else {
                                engine.write(b).unwrap();
                            }
                        }
                    });
                }
            });
            tx.send(()).unwrap();
        })
    };
    // Not a sleep: a bound on a hang. The work takes well under a second.
    let finished = rx.recv_timeout(std::time::Duration::from_secs(120));
    assert!(finished.is_ok(), "writers hung: a wakeup was lost");
    workers.join().unwrap();
    for t in 0..threads {
        assert_eq!(engine.last_index(t + 1), Some(per_thread));
        assert_eq!(
            engine.entry(t + 1, per_thread).unwrap(),
            Some(payload(t, per_thread - 1))
        );
    }
    assert!(engine.stats().active_segment > 5, "rotations happened");
}

/// `Options::bytes_per_sync`: unsynced writes past the threshold get an fdatasync that nobody
/// asked for, on the flusher's thread: it arrives at the gate while no synced write, `sync()`
/// or rotation is pending, unsynced writers go on while it waits there, and once it returns the
/// bytes written before it are in the durable image.
#[test]
fn unsynced_bytes_past_the_threshold_are_synced_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, opts) = gated();
    // Segments far larger than what is written: no rotation, so no rotation fsync.
    let opts = opts.segment_size(64 << 20).bytes_per_sync(256 << 10);
    // Open with the gate open (creating the first segment syncs), then close it.
    shared.gate.open_all();
    let engine = Engine::open(dir.path(), opts).unwrap();
    shared.gate.st.lock().unwrap().open = false;
    let first = payload(1, 0);
    let mut i = 0u64;
    let mut write = |engine: &Engine, p: &[u8]| {
        i += 1;
        let mut b = WriteBatch::new();
        b.append(1, i, [p, &[0x5a; 1024][..]]);
        engine.write_unsynced(b).unwrap();
        i += 1;
    };
    write(&engine, &first);
    // Past the threshold (the tail buffer goes to the file every 64 KiB).
    for k in 1..400u64 {
        write(&engine, &payload(1, k));
    }
    assert!(!durable(&shared, &first), "nothing was synced yet");
    // A sync arrives at the gate by itself. (`release_one` waits on the gate's condition
    // variable for it; `done` bounds that wait if none ever comes.)
    let done = AtomicBool::new(false);
    let arrived = {
        let st = shared.gate.st.lock().unwrap();
        let (st, _) = shared
            .gate
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(60), |st| st.waiting == 0)
            .unwrap();
        st.waiting > 0
    };
    assert!(arrived, "no background fdatasync came");
    // Writers are not held up by it.
    let during = payload(2, 0);
    write(&engine, &during);
    assert!(shared.gate.release_one(&done));
    // `sync()` then covers the rest (and would hang here if the background round had left
    // the sync stage stuck).
    shared.gate.open_all();
    engine.sync().unwrap();
    assert!(durable(&shared, &first));
    assert!(durable(&shared, &during));
}

/// A file system that records which thread makes each mutating call: (thread, call, file name
/// as it was opened or created).
#[derive(Debug, Default)]
struct ThreadLog {
    calls: Mutex<Vec<(String, &'static str, String)>>,
}

#[derive(Debug)]
struct ThreadLogFs {
    inner: StdFs,
    log: Arc<ThreadLog>,
}

#[derive(Debug)]
struct ThreadLogFile {
    inner: Arc<dyn FsFile>,
    log: Arc<ThreadLog>,
    name: String,
}

impl ThreadLog {
    fn note(&self, what: &'static str, file: &str) {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.calls
            .lock()
            .unwrap()
            .push((thread, what, file.to_string()));
    }
}

impl FsFile for ThreadLogFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.note("write", &self.name);
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.log.note("fdatasync", &self.name);
        self.inner.sync_data()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.log.note("allocate", &self.name);
        self.inner.allocate(len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.log.note("set_len", &self.name);
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl FileSystem for ThreadLogFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(Arc::new(ThreadLogFile {
            inner: self.inner.create(path)?,
            log: self.log.clone(),
            name: file_name(path),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(Arc::new(ThreadLogFile {
            inner: self.inner.open(path)?,
            log: self.log.clone(),
            name: file_name(path),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.log.note("rename", &file_name(from));
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.log.note("remove", &file_name(path));
        self.inner.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.log.note("sync_dir", &file_name(dir));
        self.inner.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        self.inner.lock(path)
    }
}

/// `write_async` and `write_unsynced` make no file system call on the caller's thread (short of
/// a rotation or a reservation step, which these small writes never reach): an async runtime
/// thread can call them. The writes still become durable: every callback reports `Ok`, after
/// fdatasyncs made by other threads.
#[test]
fn asynchronous_writes_make_no_file_system_call_on_the_callers_thread() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(ThreadLog::default());
    let opts = Options::default()
        .segment_size(64 << 20)
        .file_system(Arc::new(ThreadLogFs {
            inner: StdFs,
            log: log.clone(),
        }));
    let engine = Engine::open(dir.path(), opts).unwrap();
    log.calls.lock().unwrap().clear();
    let (tx, rx) = std::sync::mpsc::channel();
    let n = 200u64;
    std::thread::Builder::new()
        .name("async-caller".into())
        .spawn({
            let engine = engine.clone();
            move || {
                for i in 0..n {
                    let mut b = WriteBatch::new();
                    b.append(1 + i % 7, 1 + i / 7, [payload(0, i)]);
                    let tx = tx.clone();
                    if i % 2 == 0 {
                        engine.write_async(b, move |r| tx.send(r).unwrap()).unwrap();
                    } else {
                        engine.write_unsynced(b).unwrap();
                    }
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
    for _ in 0..n / 2 {
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every callback is called");
        assert!(r.is_ok(), "{r:?}");
    }
    let calls = log.calls.lock().unwrap().clone();
    let on_caller: Vec<_> = calls
        .iter()
        .filter(|(t, _, _)| t == "async-caller")
        .collect();
    assert!(
        on_caller.is_empty(),
        "file system calls on the caller's thread: {on_caller:?}"
    );
    assert!(
        calls.iter().any(|(_, w, _)| *w == "fdatasync"),
        "the callbacks were completed by an fdatasync on another thread"
    );
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The GC thread never fdatasyncs the log for writers: waiting for the durability of the
/// position its checkpoint covers (here an unsynced write just before `gc()`), it leaves that
/// fdatasync to the flusher. (As a parked writer it could be made sync leader, and a busy writer
/// then kept it syncing instead of collecting.) Its own fsyncs are of the checkpoint only.
#[test]
fn the_gc_thread_never_fdatasyncs_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(ThreadLog::default());
    let opts = Options::default()
        .segment_size(16 << 10)
        .prefill_segments(false)
        .recycle_segments(0)
        .auto_gc(false)
        .file_system(Arc::new(ThreadLogFs {
            inner: StdFs,
            log: log.clone(),
        }));
    let engine = Engine::open(dir.path(), opts).unwrap();
    for round in 0..3u64 {
        // Several segments of group 1, all but the last entry purged: dead segments.
        let first = round * 100 + 1;
        for i in 0..100u64 {
            let mut b = WriteBatch::new();
            b.append(1, first + i, [vec![round as u8; 1000]]);
            engine.write_unsynced(b).unwrap();
        }
        let mut b = WriteBatch::new();
        b.purge_to(1, first + 98);
        engine.write_unsynced(b).unwrap();
        // Unsynced when GC arms its job: the checkpoint's position waits for an fdatasync.
        let r = engine.gc().unwrap();
        assert!(!r.deleted_segments.is_empty(), "{r:?}");
    }
    let calls = log.calls.lock().unwrap().clone();
    // Segment files are named `<id>.wal` (`.wal.tmp` when they were created).
    let segment_syncs = |thread: &str| {
        calls
            .iter()
            .filter(|(t, w, f)| t == thread && *w == "fdatasync" && f.contains(".wal"))
            .count()
    };
    assert_eq!(
        segment_syncs("mrwal-gc"),
        0,
        "segment fdatasyncs on the GC thread: {calls:?}"
    );
    assert!(
        segment_syncs("mrwal-flusher") > 0,
        "the flusher synced the log for GC: {calls:?}"
    );
}
