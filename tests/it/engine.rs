//! Engine API: writes and reads, reopen against an in-memory model, group commit from many
//! threads, torn tails, corruption, locking, poisoning and GC.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use multiraft_wal::fs::{DirLock, FileSystem, FsFile, StdFs};
use multiraft_wal::{Engine, Error, Options, RecoveryMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn small() -> Options {
    Options::default()
        .segment_size(64 << 10)
        .prefill_segments(false)
}

/// What the engine must hold.
#[derive(Default, Debug, Clone, PartialEq)]
struct ModelGroup {
    entries: BTreeMap<u64, Vec<u8>>,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
}

#[derive(Default, Debug)]
struct Model {
    groups: BTreeMap<u64, ModelGroup>,
}

impl Model {
    fn check(&self, engine: &Engine, ctx: &str) {
        for (&id, g) in &self.groups {
            let first = g.entries.keys().next().copied();
            let last = g.entries.keys().next_back().copied();
            assert_eq!(engine.first_index(id), first, "{ctx}: group {id} first");
            assert_eq!(engine.last_index(id), last, "{ctx}: group {id} last");
            for (&ix, data) in &g.entries {
                assert_eq!(
                    engine.entry(id, ix).unwrap().as_ref(),
                    Some(data),
                    "{ctx}: group {id} entry {ix}"
                );
            }
            if let (Some(f), Some(l)) = (first, last) {
                let all = engine.entries(id, f..l + 1, usize::MAX).unwrap();
                assert_eq!(all.len() as u64, l - f + 1, "{ctx}: group {id} range");
                let some = engine.entries(id, f..l + 1, 1).unwrap();
                assert!(
                    !some.is_empty(),
                    "{ctx}: a byte budget still returns an entry"
                );
                let before_last: usize = some[..some.len() - 1].iter().map(Vec::len).sum();
                assert!(before_last < 1, "{ctx}: byte budget overrun");
                assert!(engine.entry(id, l + 1).unwrap().is_none());
            }
            for (k, v) in &g.kv {
                assert_eq!(
                    engine.get(id, k).as_ref(),
                    Some(v),
                    "{ctx}: group {id} key {k:?}"
                );
            }
            assert_eq!(engine.vote(id), g.vote, "{ctx}: group {id} vote");
            assert_eq!(
                engine.committed(id),
                g.committed,
                "{ctx}: group {id} committed"
            );
        }
    }
}

fn random_ops(seed: u64, groups: u64, steps: usize, prefill: bool) {
    let small = || small().prefill_segments(prefill);
    println!("random_ops seed={seed} groups={groups} steps={steps} prefill={prefill}");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let mut engine = Engine::open(dir.path(), small()).unwrap();
    for step in 0..steps {
        let mut batch = WriteBatch::new();
        let mut next = ModelGroupsDelta::default();
        for _ in 0..rng.gen_range(1..4) {
            let gid = rng.gen_range(0..groups);
            let g = next.get(&model, gid);
            match rng.gen_range(0..100) {
                0..=54 => {
                    let last = g.entries.keys().next_back().copied();
                    let first = g.entries.keys().next().copied();
                    let at = match (first, last) {
                        (Some(f), Some(l)) if rng.gen_bool(0.15) => rng.gen_range(f..=l + 1),
                        (_, Some(l)) => l + 1,
                        _ => rng.gen_range(0..50),
                    };
                    let n = rng.gen_range(1..6);
                    let data: Vec<Vec<u8>> = (0..n)
                        .map(|i| {
                            let len = if rng.gen_bool(0.05) {
                                rng.gen_range(5000..20000)
                            } else {
                                rng.gen_range(0..300)
                            };
                            let b = (step as u8).wrapping_add(i as u8);
                            vec![b; len]
                        })
                        .collect();
                    batch.append(gid, at, &data);
                    g.entries.split_off(&at);
                    for (i, d) in data.into_iter().enumerate() {
                        g.entries.insert(at + i as u64, d);
                    }
                }
                55..=64 => {
                    if let Some(&l) = g.entries.keys().next_back() {
                        let at = rng.gen_range(l.saturating_sub(5)..=l + 1);
                        batch.truncate_from(gid, at);
                        g.entries.split_off(&at);
                    }
                }
                65..=74 => {
                    if let Some(&f) = g.entries.keys().next() {
                        let at = rng.gen_range(f..f + 8);
                        batch.purge_to(gid, at);
                        g.entries = g.entries.split_off(&(at + 1));
                    }
                }
                75..=82 => {
                    let k = format!("k{}", rng.gen_range(0..5)).into_bytes();
                    let v = format!("v{step}").into_bytes();
                    batch.put(gid, &k, &v);
                    g.kv.insert(k, v);
                }
                83..=86 => {
                    let k = format!("k{}", rng.gen_range(0..5)).into_bytes();
                    batch.delete(gid, &k);
                    g.kv.remove(&k);
                }
                87..=91 => {
                    let v = format!("vote{step}").into_bytes();
                    batch.set_vote(gid, &v);
                    g.vote = Some(v);
                }
                92..=96 => {
                    let v = format!("c{step}").into_bytes();
                    batch.set_committed(gid, &v);
                    g.committed = Some(v);
                }
                _ => {
                    batch.remove_group(gid);
                    *g = ModelGroup::default();
                }
            }
        }
        engine
            .write(batch)
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
        next.commit(&mut model);
        if rng.gen_bool(0.03) {
            let r = engine.gc().unwrap();
            let _ = r.deleted_segments.len();
        }
        if rng.gen_bool(0.02) || step == steps - 1 {
            model.check(&engine, &format!("seed {seed} step {step} before reopen"));
            drop(engine);
            engine = Engine::open(dir.path(), small()).unwrap();
            model.check(&engine, &format!("seed {seed} step {step} after reopen"));
        }
    }
    // Removed groups must be gone; remaining groups must match exactly.
    let live: Vec<u64> = engine.groups();
    for id in live {
        let want = model.groups.get(&id).cloned().unwrap_or_default();
        assert_eq!(
            engine.first_index(id),
            want.entries.keys().next().copied(),
            "seed {seed}: group {id}"
        );
    }
}

/// Model changes of one batch, applied to the model only once the write succeeded.
#[derive(Default)]
struct ModelGroupsDelta {
    groups: HashMap<u64, ModelGroup>,
}

impl ModelGroupsDelta {
    fn get(&mut self, model: &Model, id: u64) -> &mut ModelGroup {
        self.groups
            .entry(id)
            .or_insert_with(|| model.groups.get(&id).cloned().unwrap_or_default())
    }
    fn commit(self, model: &mut Model) {
        for (id, g) in self.groups {
            model.groups.insert(id, g);
        }
    }
}

fn seed() -> u64 {
    std::env::var("MRWAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

#[test]
fn random_ops_one_group_survive_reopen() {
    random_ops(seed(), 1, 600, false);
}

#[test]
fn random_ops_thousand_groups_survive_reopen() {
    random_ops(seed(), 1000, 1500, false);
}

#[test]
fn random_ops_prefilled_segments_survive_reopen() {
    random_ops(seed(), 20, 800, true);
}

#[test]
fn metadata_survives_reopen_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = Engine::open(dir.path(), small()).unwrap();
        for i in 0..200u64 {
            let mut b = WriteBatch::new();
            b.append(1, i, [vec![i as u8; 1000]])
                .append(2, i + 100, [vec![7u8; 1000]]);
            e.write(b).unwrap();
        }
        let mut b = WriteBatch::new();
        b.truncate_from(1, 150)
            .purge_to(1, 9)
            .purge_to(2, 299)
            .put(2, b"k", b"v")
            .set_vote(2, b"vote")
            .set_committed(1, b"c");
        e.write(b).unwrap();
        let r = e.gc().unwrap();
        assert!(
            !r.deleted_segments.is_empty(),
            "purging group 2 frees segments: {r:?}"
        );
    }
    let e = Engine::open(dir.path(), small()).unwrap();
    assert!(e.recovery_report().checkpoint);
    assert_eq!((e.first_index(1), e.last_index(1)), (Some(10), Some(149)));
    assert_eq!((e.first_index(2), e.last_index(2)), (None, None));
    assert!(e.groups().contains(&2));
    assert_eq!(e.entry(1, 77).unwrap(), Some(vec![77u8; 1000]));
    assert_eq!(e.get(2, b"k"), Some(b"v".to_vec()));
    assert_eq!(e.vote(2), Some(b"vote".to_vec()));
    assert_eq!(e.committed(1), Some(b"c".to_vec()));
    assert_eq!(e.vote(1), None);
}

#[test]
fn gc_rewrites_small_groups_and_reports_big_ones() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), small().gc_rewrite_max_entries(4)).unwrap();
    // Group 1 writes two small entries early, then group 2 fills many segments.
    let mut b = WriteBatch::new();
    b.append(1, 1, [b"a", b"b"]);
    e.write(b).unwrap();
    for i in 0..300u64 {
        let mut b = WriteBatch::new();
        b.append(2, i + 1, [vec![1u8; 1000]]);
        if i == 150 {
            b.append(3, 1, vec![vec![0u8; 100]; 10]);
        }
        e.write(b).unwrap();
    }
    let mut b = WriteBatch::new();
    b.purge_to(2, 300);
    e.write(b).unwrap();
    let r = e.gc().unwrap();
    assert_eq!(r.rewritten_groups, vec![1], "{r:?}");
    assert!(
        r.holders.iter().any(|h| h.group == 3),
        "group 3 (10 entries) holds GC back: {r:?}"
    );
    drop(e);
    let e = Engine::open(dir.path(), small()).unwrap();
    assert_eq!(e.entry(1, 2).unwrap(), Some(b"b".to_vec()));
    assert_eq!(e.entries(3, 1..11, usize::MAX).unwrap().len(), 10);
}

#[test]
fn eight_threads_hundred_groups_all_synced_writes_survive() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), small()).unwrap();
    let acked: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let e = e.clone();
                s.spawn(move || {
                    let mut acked = Vec::new();
                    // Thread t owns groups t, t+8, ...
                    let mut next: HashMap<u64, u64> = HashMap::new();
                    for i in 0..150u64 {
                        let g = t + 8 * (i % 13);
                        if g >= 100 {
                            continue;
                        }
                        let ix = next.entry(g).or_insert(1);
                        let mut b = WriteBatch::new();
                        b.append(g, *ix, [format!("{g}:{ix}").into_bytes()]);
                        e.write(b).unwrap();
                        acked.push((g, *ix));
                        *ix += 1;
                    }
                    acked
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stats = e.stats();
    assert!(stats.synced_batches >= stats.written_batches);
    drop(e);
    let e = Engine::open(dir.path(), small()).unwrap();
    let mut n = 0;
    for (g, ix) in acked.into_iter().flatten() {
        assert_eq!(
            e.entry(g, ix).unwrap(),
            Some(format!("{g}:{ix}").into_bytes())
        );
        n += 1;
    }
    assert!(n > 1000);
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn cutting_the_last_record_at_every_byte_recovers_the_last_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || {
        Options::default()
            .segment_size(1 << 20)
            .prefill_segments(false)
    };
    {
        let e = Engine::open(dir.path(), opts()).unwrap();
        for i in 1..=20u64 {
            let mut b = WriteBatch::new();
            b.append(1, i, [vec![i as u8; 40]])
                .append(2, i, [vec![i as u8; 10]]);
            e.write(b).unwrap();
        }
    }
    // The data lives in the first segment; the engine also prepared an empty next one.
    let segs = segment_files(dir.path());
    let data = std::fs::read(&segs[0]).unwrap();
    let last_rec_len = 16 + 1 + (1 + 1 + 1 + 1 + 1) * 2 + 50;
    // The clean shutdown cut the segment after its final sync marker (40 bytes), which follows
    // the last record.
    let end = data.len() - 40;
    let start = end - last_rec_len;
    for cut in start..end {
        let copy = tempfile::tempdir().unwrap();
        std::fs::write(copy.path().join(segs[0].file_name().unwrap()), &data[..cut]).unwrap();
        let e = Engine::open(copy.path(), opts()).unwrap();
        assert_eq!(e.last_index(1), Some(19), "cut at {cut}");
        assert_eq!(e.last_index(2), Some(19), "cut at {cut}");
        if cut > start {
            assert!(e.recovery_report().tail_cut.is_some(), "cut at {cut}");
        }
        drop(e);
        // Strict mode refuses a partial record but accepts a clean cut at a record boundary.
        let strict = Engine::open(copy.path(), opts().recovery_mode(RecoveryMode::Strict));
        assert!(strict.is_ok(), "after repair, cut at {cut}: {strict:?}");
    }
    // A torn (not zero) tail in strict mode is an error naming the segment.
    let copy = tempfile::tempdir().unwrap();
    std::fs::write(
        copy.path().join(segs[0].file_name().unwrap()),
        &data[..end - 3],
    )
    .unwrap();
    match Engine::open(copy.path(), opts().recovery_mode(RecoveryMode::Strict)) {
        Err(Error::TornTail { segment: 1, offset }) => assert_eq!(offset as usize, start),
        other => panic!("expected torn tail, got {other:?}"),
    }
}

#[test]
fn flipped_bit_in_a_middle_segment_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = Engine::open(dir.path(), small()).unwrap();
        for i in 1..=200u64 {
            let mut b = WriteBatch::new();
            b.append(1, i, [vec![3u8; 1000]]);
            e.write(b).unwrap();
        }
    }
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 4, "{segs:?}");
    let mut data = std::fs::read(&segs[1]).unwrap();
    data[500] ^= 0x04;
    std::fs::write(&segs[1], &data).unwrap();
    for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTail] {
        match Engine::open(dir.path(), small().recovery_mode(mode)) {
            Err(Error::Corruption {
                segment: 2, offset, ..
            }) => assert!(offset <= 500),
            other => panic!("{mode:?}: expected corruption in segment 2, got {other:?}"),
        }
    }
    let e = Engine::open(dir.path(), small().recovery_mode(RecoveryMode::TolerateAny)).unwrap();
    let rep = e.recovery_report();
    assert_eq!(rep.skipped[0].segment, 2, "{rep:?}");
    assert!(rep.skipped[0].reason.contains("checksum"), "{rep:?}");
    // The appends after the hole do not fit: reported (one range per segment), never applied
    // by starting the group afresh; the entries before the hole stay.
    assert!(rep.skipped.len() <= segs.len(), "{rep:?}");
    assert!(
        rep.skipped[1..]
            .iter()
            .all(|s| s.reason.contains("group 1")),
        "{rep:?}"
    );
    assert_eq!(e.first_index(1), Some(1));
    let last = e.last_index(1).unwrap();
    assert!(last < 200 && e.entry(1, last).unwrap() == Some(vec![3u8; 1000]));
}

#[test]
fn second_open_of_a_locked_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), small()).unwrap();
    match Engine::open(dir.path(), small()) {
        Err(Error::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(e);
    Engine::open(dir.path(), small()).unwrap();
}

/// StdFs whose sync_data fails once `fail` is set.
#[derive(Debug, Default)]
struct FailingSync {
    fail: Arc<AtomicBool>,
    syncs: Arc<AtomicUsize>,
    written: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct FailingFile {
    inner: Arc<dyn FsFile>,
    fail: Arc<AtomicBool>,
    syncs: Arc<AtomicUsize>,
    written: Arc<AtomicUsize>,
}

impl FsFile for FailingFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.written.fetch_add(buf.len(), Ordering::SeqCst);
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected EIO"));
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync_data()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl FailingSync {
    fn wrap(&self, f: Arc<dyn FsFile>) -> Arc<dyn FsFile> {
        Arc::new(FailingFile {
            inner: f,
            fail: self.fail.clone(),
            syncs: self.syncs.clone(),
            written: self.written.clone(),
        })
    }
}

impl FileSystem for FailingSync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(self.wrap(StdFs.create(path)?))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(self.wrap(StdFs.open(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        StdFs.lock(path)
    }
}

#[test]
fn failed_fdatasync_poisons_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FailingSync::default());
    let fail = fs.fail.clone();
    let e = Engine::open(dir.path(), small().file_system(fs)).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 1, [b"ok"]);
    e.write(b).unwrap();
    fail.store(true, Ordering::SeqCst);
    let mut b = WriteBatch::new();
    b.append(1, 2, [b"lost"]);
    assert!(matches!(e.write(b), Err(Error::Poisoned { .. })));
    assert!(e.is_poisoned());
    // Even once the disk "recovers", nothing more is acknowledged.
    fail.store(false, Ordering::SeqCst);
    let mut b = WriteBatch::new();
    b.append(1, 3, [b"never"]);
    assert!(matches!(e.write(b), Err(Error::Poisoned { .. })));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut b = WriteBatch::new();
    b.set_vote(1, b"v");
    assert!(e
        .write_async(b, move |r| tx.send(r.is_ok()).unwrap())
        .is_err());
    drop(rx);
    assert!(matches!(e.sync(), Err(Error::Poisoned { .. })));
}

#[test]
fn async_callbacks_fire_once_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FailingSync::default());
    let syncs = fs.syncs.clone();
    let e = Engine::open(dir.path(), small().file_system(fs)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 1..=50u64 {
        let mut b = WriteBatch::new();
        b.append(i % 5, i / 5 + 1, [vec![1u8; 10]]);
        let tx = tx.clone();
        let before = syncs.clone();
        e.write_async(b, move |r| {
            tx.send((i, r.is_ok(), before.load(Ordering::SeqCst)))
                .unwrap()
        })
        .unwrap();
        // Readable before durable.
        assert!(e.entry(i % 5, i / 5 + 1).unwrap().is_some());
    }
    drop(tx);
    let got: Vec<_> = rx.iter().collect();
    assert_eq!(got.len(), 50, "every callback fired exactly once");
    let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    assert!(
        got.iter().all(|g| g.1 && g.2 >= 1),
        "each callback saw a completed sync: {got:?}"
    );
}

#[test]
fn invalid_appends_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), small()).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 5, [b"a", b"b"]);
    e.write(b).unwrap();
    for at in [4u64, 8, 100] {
        let mut b = WriteBatch::new();
        b.put(1, b"k", b"v").append(1, at, [b"x"]);
        let r = e.write(b);
        assert!(
            matches!(
                r,
                Err(Error::NonContiguousAppend { group: 1, index, first: 5, next: 7 }) if index == at
            ),
            "append at {at}: {r:?}"
        );
    }
    assert_eq!(e.get(1, b"k"), None, "a rejected batch applies nothing");
    assert_eq!(e.last_index(1), Some(6));
    // Within one batch, later ops see earlier ones.
    let mut b = WriteBatch::new();
    b.append(1, 7, [b"c"])
        .append(1, 8, [b"d"])
        .truncate_from(1, 8)
        .append(1, 8, [b"e"]);
    e.write(b).unwrap();
    assert_eq!(e.entry(1, 8).unwrap(), Some(b"e".to_vec()));
}

#[test]
fn reopening_does_not_pile_up_empty_segments_and_sealed_segments_are_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options::default().segment_size(64 << 10);
    for round in 0..6u64 {
        let e = Engine::open(dir.path(), opts()).unwrap();
        let mut b = WriteBatch::new();
        b.append(1, round + 1, [vec![round as u8; 100]]);
        e.write(b).unwrap();
    }
    for round in 0..6u64 {
        let _e = Engine::open(dir.path(), opts()).unwrap();
        let _ = round;
    }
    let e = Engine::open(dir.path(), opts()).unwrap();
    assert_eq!((e.first_index(1), e.last_index(1)), (Some(1), Some(6)));
    drop(e);
    let segs = segment_files(dir.path());
    // Six segments with one record each (each open after a write starts a new one) plus at most
    // two empty ones (the active and the prepared next).
    assert!(segs.len() <= 8, "{segs:?}");
    for s in &segs[..segs.len() - 2] {
        let len = std::fs::metadata(s).unwrap().len();
        assert!(
            len < 1024,
            "sealed segment {s:?} keeps {len} bytes (not trimmed)"
        );
    }
}

#[test]
fn rotation_deletes_dead_segments_without_an_explicit_gc() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || small().auto_gc(true);
    let e = Engine::open(dir.path(), opts()).unwrap();
    for i in 1..=400u64 {
        let mut b = WriteBatch::new();
        b.append(1, i, [vec![i as u8; 1000]]);
        if i > 10 {
            // Keep only the last ten entries, as a Raft log compacted behind its snapshot.
            b.purge_to(1, i - 10);
        }
        b.set_vote(1, &i.to_le_bytes());
        e.write(b).unwrap();
    }
    let segs = segment_files(dir.path());
    assert!(
        segs.len() <= 4,
        "dead segments were not collected: {segs:?}"
    );
    drop(e);
    let e = Engine::open(dir.path(), opts()).unwrap();
    assert!(e.recovery_report().checkpoint);
    assert_eq!((e.first_index(1), e.last_index(1)), (Some(391), Some(400)));
    assert_eq!(e.vote(1), Some(400u64.to_le_bytes().to_vec()));
    assert_eq!(e.entry(1, 395).unwrap(), Some(vec![395u64 as u8; 1000]));
}

/// An engine on real files, zero-fill on, with `segment_size` (or the default), and the count
/// of bytes written to its files.
fn counting_engine(dir: &Path, segment_size: Option<u64>) -> (Engine, Arc<AtomicUsize>) {
    let fs = Arc::new(FailingSync::default());
    let written = fs.written.clone();
    let mut opts = Options::default().prefill_segments(true).file_system(fs);
    if let Some(size) = segment_size {
        opts = opts.segment_size(size);
    }
    (Engine::open(dir, opts).unwrap(), written)
}

/// `bytes` pseudo-random bytes from `seed`: compression would shrink repeated ones.
fn random_entry(seed: u64, bytes: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..bytes).map(|_| rng.gen::<u8>()).collect()
}

#[test]
fn segments_are_zero_filled_only_for_synced_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let seg = 64 << 10;
    let (e, written) = counting_engine(dir.path(), Some(seg));
    // A bulk, unsynced load of 1 MiB over ~16 segments: nothing is zero-filled.
    let payload = 1usize << 20;
    for i in 0..256u64 {
        let mut b = WriteBatch::new();
        b.append(1, i + 1, [vec![7u8; 4096]]);
        e.write_unsynced(b).unwrap();
    }
    let bulk = written.load(Ordering::SeqCst);
    assert!(
        bulk < payload + payload / 8,
        "bulk load wrote {bulk} bytes for {payload}"
    );
    // Synced writes: the segments prepared from now on are zero-filled.
    let before = written.load(Ordering::SeqCst);
    for i in 0..100u64 {
        let mut b = WriteBatch::new();
        b.append(2, i + 1, [vec![1u8; 2048]]);
        e.write(b).unwrap();
    }
    let synced = written.load(Ordering::SeqCst) - before;
    assert!(
        synced > 200 * 1024 + seg as usize,
        "synced phase wrote {synced} bytes: no zero-fill?"
    );
    drop(e);
    let e = Engine::open(dir.path(), small()).unwrap();
    assert_eq!(e.last_index(1), Some(256));
    assert_eq!(e.last_index(2), Some(100));
}

#[test]
fn zero_filling_starts_small_and_doubles_with_the_synced_workload() {
    // Default segment size (128 MiB): a synced workload that writes a few MiB zero-fills a few
    // MiB, not whole segments. Before, the first zero-filled segment was a whole 128 MiB one
    // (and the writer moved to it only once it was done), and so was the one after it.
    let dir = tempfile::tempdir().unwrap();
    let (e, written) = counting_engine(dir.path(), None);
    let mut payload = 0usize;
    let mut index = 0u64;
    let mut write = |bytes: usize| {
        index += 1;
        let mut b = WriteBatch::new();
        b.append(1, index, [random_entry(index, bytes)]);
        e.write(b).unwrap();
        payload += bytes;
    };
    // Small synced writes: after 16 fdatasyncs the next segment is zero-filled for 8 MiB of
    // records, and the writer moves to it once it is ready.
    let mut n = 0;
    while e.stats().active_segment < 2 {
        write(4096);
        n += 1;
        assert!(
            n < 100_000,
            "no move to a zero-filled segment after {n} synced writes"
        );
    }
    // That segment takes 8 MiB of records, then the next one (zero-filled for 16 MiB) follows.
    let mut moved_after = 0usize;
    while e.stats().active_segment < 3 {
        write(32 << 10);
        moved_after += 32 << 10;
        assert!(
            moved_after <= (8 << 20) + (64 << 10),
            "the first zero-filled segment took more than 8 MiB of records"
        );
    }
    assert!(
        moved_after > 7 << 20,
        "left after {moved_after} bytes: not an 8 MiB segment"
    );
    drop(e);
    // Zeros: 8 MiB and 16 MiB, each with a freeing reserve (1 MiB), and part of the 32 MiB
    // one started at the last rotation (cancelled by the drop); then headers, sync markers and
    // terminators (well under 1 MiB for these ~2,000 writes). Whole 128 MiB segments before.
    let total = written.load(Ordering::SeqCst);
    let bound = payload + (60 << 20);
    assert!(
        total <= bound,
        "wrote {total} bytes for {payload} of payload (bound {bound})"
    );
}

#[test]
fn segments_are_not_zero_filled_when_fdatasyncs_cover_many_bytes() {
    // Each fdatasync covers 256 KiB: zero-filling would write every byte twice to save one
    // journal commit per 256 KiB, which does not pay (`PREFILL_MAX_BYTES_PER_SYNC`).
    let dir = tempfile::tempdir().unwrap();
    // 64 writes per segment: the previous rule (zero-fill after 16 fsyncs in a segment)
    // zero-filled from the first segment on.
    let (e, written) = counting_engine(dir.path(), Some(16 << 20));
    let payload = 64usize << 20;
    for i in 0..(payload >> 18) as u64 {
        let mut b = WriteBatch::new();
        b.append(1, i + 1, [random_entry(i, 256 << 10)]);
        e.write(b).unwrap();
    }
    assert!(e.stats().active_segment >= 4);
    drop(e);
    let total = written.load(Ordering::SeqCst);
    assert!(
        total < payload + payload / 20,
        "wrote {total} bytes for {payload} of payload: zero-filled?"
    );
}

const LOCK_CHILD_ENV: &str = "MRWAL_LOCK_CHILD_DIR";

/// Child mode of `another_process_cannot_open_a_locked_directory`: try to open the directory
/// and print what happened.
#[test]
#[ignore = "child process of engine::another_process_cannot_open_a_locked_directory"]
fn lock_child() {
    let Ok(dir) = std::env::var(LOCK_CHILD_ENV) else {
        return;
    };
    match Engine::open(&dir, small()) {
        Err(Error::Locked { .. }) => println!("CHILD: LOCKED"),
        Ok(_) => println!("CHILD: OPENED"),
        Err(e) => println!("CHILD: ERROR {e}"),
    }
}

#[test]
fn another_process_cannot_open_a_locked_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run_child = || {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "engine::lock_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LOCK_CHILD_ENV, dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let e = Engine::open(dir.path(), small()).unwrap();
    let held = run_child();
    assert!(held.contains("CHILD: LOCKED"), "child output: {held}");
    drop(e);
    let free = run_child();
    assert!(free.contains("CHILD: OPENED"), "child output: {free}");
}

/// Issue 8, item 7: a batch whose only operation appends one entry larger than the record limit
/// used to return `Ok(())` and store nothing (the empty-batch shortcut came before the stored
/// error); through the adapter, openraft would have been told the entry was durable.
#[test]
fn a_batch_of_one_oversized_entry_is_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), Options::default()).unwrap();
    // Zeroed and never written: the allocator maps it lazily, so this costs no real memory.
    let big = vec![0u8; (1usize << 30) + 1];
    for synced in [true, false] {
        let mut b = WriteBatch::new();
        b.append(1, 1, [&big]);
        let r = if synced {
            e.write(b)
        } else {
            e.write_unsynced(b)
        };
        assert!(
            matches!(
                r,
                Err(multiraft_wal::Error::EntryTooLarge { group: 1, index: 1, bytes, .. })
                    if bytes == (1 << 30) + 1
            ),
            "an entry over the record limit must be refused, got {r:?}"
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut b = WriteBatch::new();
    b.append(1, 1, [&big]);
    let r = e.write_async(b, move |r| tx.send(r.is_ok()).unwrap());
    assert!(matches!(r, Err(multiraft_wal::Error::EntryTooLarge { .. })));
    assert!(
        rx.recv().is_err(),
        "the callback of a refused batch is dropped uncalled"
    );
    assert_eq!(e.last_index(1), None);
}

/// Each misuse is its own typed error, with the values that explain it.
#[test]
fn misuse_returns_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A data directory path that is a regular file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let r = Engine::open(&file, small());
    assert!(
        matches!(&r, Err(Error::NotADirectory { path }) if path == &file),
        "{r:?}"
    );
    // An option out of range names the option.
    let r = Engine::open(dir.path().join("d"), Options::default().segment_size(10));
    assert!(
        matches!(
            &r,
            Err(Error::InvalidOption {
                option: "segment_size",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        !dir.path().join("d").exists(),
        "a refused open creates nothing"
    );
    // An append whose indexes pass u64::MAX.
    let e = Engine::open(dir.path().join("e"), small()).unwrap();
    let mut b = WriteBatch::new();
    b.append(3, u64::MAX, [b"a", b"b"]);
    let r = e.write(b);
    assert!(
        matches!(
            r,
            Err(Error::IndexOverflow {
                group: 3,
                index: u64::MAX,
                count: 2
            })
        ),
        "{r:?}"
    );
    // An append before the group's first entry.
    let mut b = WriteBatch::new();
    b.append(3, 10, [b"a"]);
    e.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.append(3, 9, [b"z"]);
    let r = e.write(b);
    assert!(
        matches!(
            r,
            Err(Error::NonContiguousAppend {
                group: 3,
                index: 9,
                first: 10,
                next: 11
            })
        ),
        "{r:?}"
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("group 3") && msg.contains("10..11"), "{msg}");
}
