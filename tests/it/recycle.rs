//! Recycling dead segments (issue 10, item 3): dead segment files are kept in a pool
//! (`<id>.wal.free`) and reused as new segments. Checked here: files are really reused under
//! churn (inode reuse, the recycled counter) and everything reads back in `Strict` mode after a
//! clean close, a process kill and a power cut with a recycled active segment full of stale
//! bytes; power cuts at every I/O point of a workload that rotates through recycled segments
//! (header rewrite, extension, renames); a reader racing purges and GC is never served a
//! recycled file's bytes; a full disk gives the pool back first, and an engine opens on a full
//! disk that holds pool files.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiraft_wal::{Engine, Error, Options, RecoveryMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash_explorer::{sim_options, MOp, Mode, ModelState, Script, Step, DIR};
use crate::simfs::{CrashVariant, SimFs};

/// Entries of group `g` at index `i`: deterministic, incompressible, naming their place.
fn payload(g: u64, i: u64, len: usize) -> Vec<u8> {
    let mut x = (g << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = format!("g{g}i{i}:").into_bytes();
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// The churn of W11 in small: `groups` groups, each write appends `per` entries of `len` bytes
/// to one group (round robin) and purges it to its last `keep` entries; `gc()` every `gc_every`
/// writes. Returns each group's next index. `after_write` runs after every write.
struct Churn {
    groups: u64,
    per: u64,
    len: usize,
    keep: u64,
    gc_every: u64,
}

impl Churn {
    fn run(
        &self,
        e: &Engine,
        writes: u64,
        next: &mut BTreeMap<u64, u64>,
        mut after_write: impl FnMut(&Engine, u64),
    ) {
        // Writes so far (a run may be resumed one write at a time): each wrote `per` entries.
        let done: u64 = next.values().map(|n| (n - 1) / self.per).sum();
        for w in done..done + writes {
            let g = w % self.groups;
            let first = *next.entry(g).or_insert(1);
            let entries: Vec<Vec<u8>> = (0..self.per)
                .map(|k| payload(g, first + k, self.len))
                .collect();
            let last = first + self.per - 1;
            let mut b = WriteBatch::new();
            b.append(g, first, &entries);
            if last >= self.keep {
                b.purge_to(g, last - self.keep);
            }
            e.write(b).unwrap();
            next.insert(g, last + 1);
            if (w + 1) % self.gc_every == 0 {
                e.gc().unwrap();
            }
            after_write(e, w);
        }
    }

    /// Every group holds exactly its last `keep` entries (fewer if it wrote fewer), intact.
    fn check(&self, e: &Engine, next: &BTreeMap<u64, u64>) {
        for (&g, &n) in next {
            let first = n.saturating_sub(self.keep).max(1);
            assert_eq!(e.first_index(g), Some(first), "group {g}");
            assert_eq!(e.last_index(g), Some(n - 1), "group {g}");
            let got = e.entries(g, first..n, usize::MAX).unwrap();
            for (k, entry) in got.iter().enumerate() {
                let i = first + k as u64;
                assert_eq!(entry, &payload(g, i, self.len), "group {g} index {i}");
            }
        }
    }
}

fn segment_inodes(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let name = d.file_name().to_str()?.to_owned();
            name.ends_with(".wal")
                .then(|| (name, d.metadata().map(|m| m.ino()).unwrap_or(0)))
        })
        .collect();
    out.sort();
    out
}

fn pool_files(names: &[String]) -> usize {
    names.iter().filter(|n| n.ends_with(".wal.free")).count()
}

/// On a real file system: under churn, new segments are made from dead segments' files (the
/// counter, and the same inode showing up under a later segment's name), and everything reads
/// back in `Strict` mode after a clean close. The same run with recycling off is the control:
/// its counter stays 0 (ext4 may still hand a freed inode number to a new file, so inode reuse
/// alone is only printed there).
#[test]
fn recycle_reuses_dead_segment_files_under_churn_and_reads_back_strict() {
    let churn = Churn {
        groups: 20,
        per: 8,
        len: 500,
        keep: 24,
        gc_every: 10,
    };
    for recycle in [2usize, 0] {
        let dir = tempfile::tempdir().unwrap();
        let opts = || {
            Options::default()
                .segment_size(64 << 10)
                .recycle_segments(recycle)
                .recovery_mode(RecoveryMode::Strict)
        };
        let e = Engine::open(dir.path(), opts()).unwrap();
        let mut next = BTreeMap::new();
        // Segment name -> inode, for every segment seen; an inode seen under an earlier name
        // and now under a later one is a reused file.
        let mut seen: HashMap<u64, String> = HashMap::new();
        let mut reused = 0;
        churn.run(&e, 400, &mut next, |_, _| {
            for (name, ino) in segment_inodes(dir.path()) {
                match seen.get(&ino) {
                    Some(old) if *old < name => {
                        reused += 1;
                        seen.insert(ino, name);
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(ino, name);
                    }
                }
            }
        });
        churn.check(&e, &next);
        let stats = e.stats();
        println!(
            "recycle_segments({recycle}): {} segments recycled, {reused} inode reuses, \
             active segment {}, pool {} files",
            stats.recycled_segments, stats.active_segment, stats.pooled_segments
        );
        assert!(stats.active_segment >= 10, "{stats:?}");
        if recycle > 0 {
            assert!(stats.recycled_segments >= 5, "{stats:?}");
            assert!(reused >= 5, "{reused} inode reuses");
            assert!(stats.pooled_segments <= recycle, "{stats:?}");
        } else {
            assert_eq!(stats.recycled_segments, 0);
            assert_eq!(stats.pooled_segments, 0);
        }
        drop(e);
        let e = Engine::open(dir.path(), opts()).expect("a Strict open after a clean close");
        assert!(e.recovery_report().tail_cut.is_none());
        churn.check(&e, &next);
        // And it goes on: more churn after the reopen, then again.
        churn.run(&e, 100, &mut next, |_, _| {});
        drop(e);
        let e = Engine::open(dir.path(), opts()).unwrap();
        churn.check(&e, &next);
    }
}

/// Reads the header flags of a segment image.
fn flags(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[12..16].try_into().unwrap())
}

/// On the simulated file system: churn until the active segment is a recycled file that still
/// holds stale bytes of its previous segment after its data, then a process kill and a power
/// cut (every variant): each image opens in `Strict` mode with every acknowledged write.
#[test]
fn a_recycled_active_segment_recovers_strict_after_a_kill_and_a_power_cut() {
    let churn = Churn {
        groups: 8,
        per: 4,
        len: 300,
        keep: 12,
        gc_every: 5,
    };
    let fs = SimFs::new();
    let opts = |fs: &SimFs| {
        Options::default()
            .segment_size(16 << 10)
            .recovery_threads(2)
            .recovery_mode(RecoveryMode::Strict)
            .file_system(Arc::new(fs.clone()))
    };
    let e = Engine::open(DIR, opts(&fs)).unwrap();
    let mut next = BTreeMap::new();
    churn.run(&e, 200, &mut next, |_, _| {});
    assert!(e.stats().recycled_segments >= 2, "{:?}", e.stats());
    // Write until a rotation lands in a recycled file, then two more writes: its data ends
    // early in the file, stale bytes after it.
    let active = |e: &Engine| e.stats().active_segment;
    let name = |id: u64| Path::new(DIR).join(format!("{id:016x}.wal"));
    let start = active(&e);
    let mut writes = 0;
    let mut rotated_into_recycled = false;
    while writes < 400 && !rotated_into_recycled {
        let before = active(&e);
        churn.run(&e, 1, &mut next, |_, _| {});
        writes += 1;
        let now = active(&e);
        if now != before && now > start {
            let img = fs.read_file(&name(now)).unwrap();
            rotated_into_recycled = flags(&img) == 1;
        }
    }
    assert!(rotated_into_recycled, "no rotation into a recycled segment");
    churn.run(&e, 2, &mut next, |_, _| {});
    let img = fs.read_file(&name(active(&e))).unwrap();
    let stale_after = img.len() / 2;
    assert!(
        img[stale_after..].iter().any(|&b| b != 0),
        "the recycled active segment holds no stale bytes after its data"
    );
    let images = [
        ("kill", fs.kill_image()),
        (
            "power cut, drop all",
            fs.crash_image(CrashVariant::DropAll, 1),
        ),
        (
            "power cut, keep all",
            fs.crash_image(CrashVariant::KeepAll, 2),
        ),
        (
            "power cut, tear last",
            fs.crash_image(CrashVariant::TearLast, 3),
        ),
    ];
    drop(e);
    for (what, img) in images {
        let e = Engine::open(DIR, opts(&img))
            .unwrap_or_else(|err| panic!("{what}: Strict open failed: {err}"));
        churn.check(&e, &next);
        drop(e);
    }
}

/// A workload that kills segments steadily (purges and GC) so that later segments are made
/// from pool files: the crash explorer's check at every I/O point, including the header
/// rewrite, extension, fdatasync and renames of recycling.
fn recycle_script() -> Script {
    let mut steps = Vec::new();
    let mut state = ModelState::default();
    let mut states = vec![state.clone()];
    let mut groups = BTreeMap::new();
    let mut push = |ops: Vec<MOp>, mode: Mode, steps: &mut Vec<Step>| {
        for op in &ops {
            state.apply(op);
            if let MOp::Append { group, .. } = op {
                groups
                    .entry(*group)
                    .or_insert_with(std::collections::BTreeSet::new);
            }
        }
        states.push(state.clone());
        steps.push(Step::Write { ops, mode });
    };
    let modes = [Mode::Sync, Mode::Unsynced, Mode::Async, Mode::Sync];
    let mut next = [1u64; 2];
    for k in 0..36u64 {
        let g = k % 2;
        let first = next[g as usize];
        let mut ops = vec![MOp::Append {
            group: g + 1,
            first,
            entries: (0..3).map(|j| payload(g + 1, first + j, 330)).collect(),
        }];
        next[g as usize] += 3;
        if first > 6 {
            ops.push(MOp::Purge {
                group: g + 1,
                index: first - 4,
            });
        }
        push(ops, modes[(k % 4) as usize], &mut steps);
        if k % 6 == 5 {
            steps.push(Step::Gc);
        }
    }
    Script {
        steps,
        states,
        groups,
    }
}

#[test]
fn recycle_crash_at_every_io_point_of_a_workload_through_recycled_segments() {
    let script = recycle_script();
    // A clean run proves that the workload rotates into recycled segments.
    for prefill in [false, true] {
        let fs = SimFs::new();
        let e = Engine::open(DIR, sim_options(&fs, prefill)).unwrap();
        crate::crash_explorer::replay(&e, &script, drop);
        let stats = e.stats();
        drop(e);
        println!("prefill {prefill}: {stats:?}");
        assert!(stats.recycled_segments >= 3, "{stats:?}");
    }
    crate::crash_explorer::explore_both_prefills("recycle", 0x7ec0, &script, 200);
}

/// Readers race purges and GC that recycle the segments they read: every read returns the
/// exact entry or an error (the entry was purged meanwhile), never bytes of another segment.
#[test]
fn recycle_a_reader_racing_gc_is_never_served_a_recycled_files_bytes() {
    let seed: u64 = std::env::var("MRWAL_RECYCLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("recycle reader race: seed {seed} (MRWAL_RECYCLE_SEED)");
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(
        dir.path(),
        Options::default()
            .segment_size(32 << 10)
            .cache_bytes(0)
            .prefill_segments(false),
    )
    .unwrap();
    let churn = Churn {
        groups: 4,
        per: 4,
        len: 400,
        keep: 40,
        gc_every: 4,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let e = e.clone();
            let stop = stop.clone();
            let len = churn.len;
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ r);
                let (mut ok, mut gone) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let g = rng.gen_range(0..4u64);
                    let (Some(first), Some(last)) = (e.first_index(g), e.last_index(g)) else {
                        continue;
                    };
                    let i = rng.gen_range(first..=last);
                    match e.entry(g, i) {
                        Ok(Some(bytes)) => {
                            assert_eq!(bytes, payload(g, i, len), "group {g} index {i}");
                            ok += 1;
                        }
                        // Purged between the range read and the entry read, or its segment
                        // gone meanwhile: an error or nothing, never other bytes.
                        Ok(None) | Err(_) => gone += 1,
                    }
                }
                (ok, gone)
            })
        })
        .collect();
    let mut next = BTreeMap::new();
    churn.run(&e, 600, &mut next, |_, _| {});
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (ok, gone) = r.join().expect("a reader saw wrong bytes");
        println!("reader: {ok} reads served, {gone} gone meanwhile");
        assert!(ok > 0);
    }
    assert!(e.stats().recycled_segments >= 3, "{:?}", e.stats());
    churn.check(&e, &next);
}

/// A full disk gives the recycling pool back before anything fails: an engine killed with pool
/// files on disk opens on a disk full to the byte, and writes go on (the pool is deleted to
/// grow the segment) until the pool is gone; a clean shutdown leaves no pool file.
#[test]
fn recycle_a_full_disk_frees_pool_files_first() {
    let fs = SimFs::new();
    let opts = |fs: &SimFs| {
        Options::default()
            .segment_size(16 << 10)
            .recycle_segments(4)
            .prefill_segments(false)
            .recovery_threads(2)
            .file_system(Arc::new(fs.clone()))
    };
    // Many segments, then one purge of everything old and a GC: the pool fills up (steady
    // churn would take each pooled file right away for the next segment).
    let churn = Churn {
        groups: 4,
        per: 4,
        len: 300,
        keep: u64::MAX,
        gc_every: u64::MAX,
    };
    let e = Engine::open(DIR, opts(&fs)).unwrap();
    let mut next = BTreeMap::new();
    let writes = 120;
    churn.run(&e, writes, &mut next, |_, _| {});
    let mut b = WriteBatch::new();
    for (&g, &n) in &next {
        b.purge_to(g, n - 3);
    }
    e.write(b).unwrap();
    let r = e.gc().unwrap();
    assert!(r.recycled_segments.len() >= 2, "{r:?}");
    assert_eq!(e.stats().pooled_segments, 4, "{:?}", e.stats());
    println!("after {writes} writes: {:?}", e.stats());
    // A kill: the pool files stay.
    let fs = {
        let img = fs.kill_image();
        drop(e);
        img
    };
    let names = fs.live_names(Path::new(DIR));
    assert_eq!(pool_files(&names), 4, "{names:?}");
    // A disk full to the byte: open works, and so do writes, until the pool is gone.
    fs.set_capacity(Some(fs.used_bytes()));
    let e = Engine::open(DIR, opts(&fs)).expect("open on a full disk holding pool files");
    let pooled = e.stats().pooled_segments;
    assert!(pooled > 0);
    let mut g = 0;
    let mut refused = 0;
    for _ in 0..200 {
        let first = next.get(&g).copied().unwrap_or(1);
        let mut b = WriteBatch::new();
        b.append(g, first, [payload(g, first, 300)]);
        match e.write(b) {
            Ok(()) => {
                next.insert(g, first + 1);
            }
            Err(Error::NoSpace { .. }) => {
                refused += 1;
                // Refused only once the pool is gone: it is given back first.
                assert_eq!(
                    e.stats().pooled_segments,
                    0,
                    "NoSpace with pool files on disk"
                );
                break;
            }
            Err(err) => panic!("{err}"),
        }
        g = (g + 1) % 4;
    }
    let names = fs.live_names(Path::new(DIR));
    assert_eq!(pool_files(&names), 0, "{names:?}");
    assert_eq!(e.stats().pooled_segments, 0);
    println!("full disk: {pooled} pool files given back, refused {refused}");
    assert!(!e.is_poisoned());
    drop(e);
    fs.set_capacity(None);
    let e = Engine::open(DIR, opts(&fs).recovery_mode(RecoveryMode::Strict)).unwrap();
    for (&g, &n) in &next {
        assert_eq!(e.last_index(g), Some(n - 1));
    }
    // Churn that fills the pool, then a clean shutdown: no pool file is left.
    let churn = Churn {
        keep: 8,
        gc_every: 3,
        ..churn
    };
    churn.run(&e, 60, &mut next, |_, _| {});
    assert!(e.stats().recycled_segments > 0, "{:?}", e.stats());
    drop(e);
    let names = fs.live_names(Path::new(DIR));
    assert_eq!(pool_files(&names), 0, "{names:?}");
}
