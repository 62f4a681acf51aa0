//! Garbage collection that converges, bounded disk usage under churn, and a disk that fills up
//! (issue 10): a second `gc()` in a steady state makes no mutating call at all; the churn
//! workload's disk usage stays within a bound over several segment sizes; on a full disk
//! (simulated, and on a real 1 MiB tmpfs where the test may mount one) open, reads, purge and
//! `gc()` work and writes resume once space is freed; power cuts at every I/O point of a
//! workload of GC rewrites and mid-segment checkpoints.

use std::path::Path;
use std::sync::Arc;

use multiraft_wal::{Engine, Error, Options, WriteBatch};

use crate::crash_explorer::{sim_options, MOp, Mode, ModelState, Script, Step, DIR};
use crate::simfs::SimFs;

fn sim(fs: &SimFs, segment: u64) -> Options {
    Options::default()
        .segment_size(segment)
        .prefill_segments(false)
        .recovery_threads(2)
        .file_system(Arc::new(fs.clone()))
}

fn append(e: &Engine, group: u64, index: u64, bytes: usize) -> Result<(), Error> {
    let mut b = WriteBatch::new();
    b.append(group, index, [vec![(index % 251) as u8; bytes]]);
    e.write(b)
}

/// Appends 1000-byte entries round-robin to groups 0..4 (at most `writes` of them) until the
/// disk is full; returns each group's next index and whether `NoSpace` was seen.
fn fill_until_full(e: &Engine, writes: u64) -> ([u64; 4], bool) {
    let mut next = [1u64; 4];
    for i in 0..writes {
        let g = i % 4;
        match append(e, g, next[g as usize], 1000) {
            Ok(()) => next[g as usize] += 1,
            Err(Error::NoSpace { .. }) => return (next, true),
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    (next, false)
}

fn tmp_names(fs: &SimFs) -> Vec<String> {
    fs.live_names(Path::new(DIR))
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// A group written early, then a bulk group filling segments and purged: the first GC deletes
/// and rewrites; every later GC (the engine idle) makes no mutating call and rotates nothing.
#[test]
fn gc_repeated_on_a_steady_state_writes_nothing() {
    let fs = SimFs::new();
    let e = Engine::open(DIR, sim(&fs, 16 << 10).gc_rewrite_max_entries(64)).unwrap();
    append(&e, 1, 1, 20).unwrap();
    for i in 1..=100 {
        append(&e, 2, i, 600).unwrap();
    }
    let mut b = WriteBatch::new();
    b.purge_to(2, 99);
    e.write(b).unwrap();
    let first = e.gc().unwrap();
    assert!(!first.deleted_segments.is_empty(), "{first:?}");
    assert!(first.rewritten_groups.contains(&1), "{first:?}");
    assert!(first.holders.is_empty(), "{first:?}");
    let active = e.stats().active_segment;
    let written = e.stats().written_batches;
    let points = fs.io_points();
    let names = fs.live_names(Path::new(DIR));
    for round in 0..3 {
        let r = e.gc().unwrap();
        assert!(
            r.deleted_segments.is_empty() && r.rewritten_groups.is_empty(),
            "round {round}: {r:?}"
        );
        assert_eq!(
            fs.io_points(),
            points,
            "round {round}: gc() made a mutating call"
        );
        assert_eq!(
            e.stats().active_segment,
            active,
            "round {round}: gc() rotated"
        );
        assert_eq!(
            e.stats().written_batches,
            written,
            "round {round}: gc() wrote"
        );
        assert_eq!(fs.live_names(Path::new(DIR)), names);
    }
    assert_eq!(e.entry(1, 1).unwrap(), Some(vec![1u8; 20]));
    drop(e);
    let e = Engine::open(DIR, sim(&fs, 16 << 10)).unwrap();
    assert_eq!(e.entry(1, 1).unwrap(), Some(vec![1u8; 20]));
    assert_eq!(e.entry(2, 100).unwrap(), Some(vec![100u8; 600]));
    assert_eq!(e.first_index(2), Some(100));
}

/// On an idle, freshly opened engine (nothing dead), gc() writes nothing, and a new engine with
/// the default 128 MiB segments holds little disk.
#[test]
fn gc_on_an_idle_engine_is_a_no_op_and_an_idle_engine_is_small() {
    let fs = SimFs::new();
    let e = Engine::open(DIR, sim(&fs, 128 << 20)).unwrap();
    for i in 1..=10 {
        append(&e, 7, i, 100).unwrap();
    }
    let points = fs.io_points();
    for _ in 0..3 {
        let r = e.gc().unwrap();
        assert!(r.deleted_segments.is_empty() && r.rewritten_groups.is_empty());
    }
    assert_eq!(fs.io_points(), points);
    let used = fs.used_bytes();
    assert!(
        used <= 2 << 20,
        "an idle engine with 128 MiB segments holds {used} bytes"
    );
    // The same on a real file system, counted in allocated blocks.
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), Options::default()).unwrap();
    append(&e, 1, 1, 100).unwrap();
    let blocks = dir_blocks(dir.path());
    println!("idle engine, default options: {blocks} bytes allocated");
    assert!(blocks <= 2 << 20, "{blocks} bytes allocated");
}

fn dir_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// 100 groups each keeping their last 50 entries of 100 bytes, appending for 12 times the live
/// data, at three segment sizes: the disk (simulated, every file's length) never holds more
/// than twice the live data plus four segments, and GC rewrites little.
#[test]
fn gc_churn_disk_usage_stays_bounded() {
    const GROUPS: u64 = 100;
    const KEEP: u64 = 50;
    const ENTRY: usize = 100;
    let live = GROUPS * KEEP * ENTRY as u64;
    for segment in [8u64 << 10, 32 << 10, 128 << 10] {
        let fs = SimFs::new();
        let e = Engine::open(DIR, sim(&fs, segment)).unwrap();
        let mut peak = 0;
        let mut rewritten = 0;
        let steps = 12 * live / ENTRY as u64;
        for step in 0..steps {
            let g = step % GROUPS;
            let index = step / GROUPS + 1;
            let mut b = WriteBatch::new();
            b.append(g, index, [vec![g as u8; ENTRY]]);
            if index > KEEP {
                b.purge_to(g, index - KEEP);
            }
            e.write_unsynced(b).unwrap();
            if step % 64 == 0 {
                e.sync().unwrap();
            }
            if step % (segment / ENTRY as u64) == 0 {
                rewritten += e.gc().unwrap().rewritten_bytes;
            }
            peak = peak.max(fs.used_bytes());
        }
        let bound = 2 * live + 4 * segment;
        println!(
            "churn, {segment}-byte segments: live {live} bytes, peak disk {peak} bytes \
             ({:.2}x live), rewritten {rewritten} bytes",
            peak as f64 / live as f64
        );
        assert!(peak <= bound, "segment {segment}: peak {peak} > {bound}");
        assert!(
            rewritten <= steps * ENTRY as u64 / 10,
            "segment {segment}: GC rewrote {rewritten} bytes"
        );
        let g = 5;
        let last = e.last_index(g).unwrap();
        assert_eq!(e.first_index(g), Some(last - KEEP + 1));
    }
}

/// The full-disk sequence on the simulated file system: writes fail with `NoSpace` (engine not
/// poisoned), reads work, a purge is written into the freeing reserve, gc() stores its
/// checkpoint and deletes, writes resume; a clean shutdown, then an open on a disk full to the
/// byte works and serves reads, purge and gc; no temporary file is ever left behind.
#[test]
fn gc_full_disk_sequence_on_the_simulated_fs() {
    let fs = SimFs::new();
    let opts = || sim(&fs, 16 << 10);
    let e = Engine::open(DIR, opts()).unwrap();
    fs.set_capacity(Some(fs.used_bytes() + (96 << 10)));
    let (mut next, full) = fill_until_full(&e, 1000);
    assert!(full, "the disk never filled up");
    assert!(!e.is_poisoned());
    for g in 0..4u64 {
        let last = next[g as usize] - 1;
        assert_eq!(
            e.entries(g, 1..last + 1, usize::MAX).unwrap().len() as u64,
            last
        );
    }
    let mut b = WriteBatch::new();
    for g in 0..4u64 {
        b.purge_to(g, next[g as usize] - 2);
    }
    e.write(b).expect("a purge on a full disk");
    let r = e.gc().expect("gc on a full disk");
    assert!(!r.deleted_segments.is_empty(), "{r:?}");
    for g in 0..4u64 {
        append(&e, g, next[g as usize], 1000).expect("writes resume after GC");
        next[g as usize] += 1;
    }
    // Full again, then a clean shutdown and an open on a disk full to the byte.
    loop {
        match append(&e, 0, next[0], 1000) {
            Ok(()) => next[0] += 1,
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    drop(e);
    // Checked once the engine is closed: a segment being prepared in the background goes
    // through a temporary name, so only a closed engine has none in flight.
    assert!(tmp_names(&fs).is_empty(), "{:?}", tmp_names(&fs));
    fs.set_capacity(Some(fs.used_bytes()));
    let e = Engine::open(DIR, opts()).expect("open on a full disk");
    assert_eq!(e.last_index(0), Some(next[0] - 1));
    assert_eq!(
        e.entry(0, next[0] - 1).unwrap(),
        Some(vec![((next[0] - 1) % 251) as u8; 1000])
    );
    let mut b = WriteBatch::new();
    b.purge_to(0, next[0] - 2);
    e.write(b).expect("a purge after an open on a full disk");
    let r = e.gc().expect("gc after an open on a full disk");
    assert!(!r.deleted_segments.is_empty(), "{r:?}");
    append(&e, 0, next[0], 1000).expect("writes resume");
    drop(e);
    assert!(tmp_names(&fs).is_empty(), "{:?}", tmp_names(&fs));
    let e = Engine::open(DIR, opts()).unwrap();
    assert_eq!(e.last_index(0), Some(next[0]));
}

/// A disk with no room even for a segment: open fails with `NoSpace` naming the bytes wanted and
/// leaves no temporary file.
#[test]
fn gc_open_on_a_full_disk_names_the_space_wanted() {
    let fs = SimFs::new();
    fs.set_capacity(Some(0));
    match Engine::open(DIR, sim(&fs, 128 << 20)) {
        Err(Error::NoSpace { context }) => {
            assert!(context.contains("32 bytes"), "{context}");
            assert!(context.contains("bytes to take writes"), "{context}");
        }
        other => panic!("{other:?}"),
    }
    assert!(tmp_names(&fs).is_empty(), "{:?}", tmp_names(&fs));
}

/// A 1 MiB tmpfs, 64 KiB segments (the scenario), when the test may mount one.
#[test]
fn gc_full_disk_sequence_on_a_small_tmpfs() {
    let base = tempfile::tempdir().unwrap();
    let Some(mnt) = Tmpfs::mount(base.path(), "size=1m") else {
        println!("SKIP: cannot mount a tmpfs here");
        return;
    };
    let dir = mnt.path.join("wal");
    let opts = || {
        Options::default()
            .segment_size(64 << 10)
            .prefill_segments(false)
    };
    let e = Engine::open(&dir, opts()).unwrap();
    let (mut next, full) = fill_until_full(&e, 10_000);
    assert!(full && !e.is_poisoned());
    assert_eq!(e.entry(1, 1).unwrap(), Some(vec![1u8; 1000]));
    let mut b = WriteBatch::new();
    for g in 0..4u64 {
        b.purge_to(g, next[g as usize] - 2);
    }
    e.write(b).expect("a purge on a full tmpfs");
    let r = e.gc().expect("gc on a full tmpfs");
    assert!(!r.deleted_segments.is_empty(), "{r:?}");
    println!("gc on a full tmpfs: {r:?}");
    append(&e, 0, next[0], 1000).expect("writes resume");
    next[0] += 1;
    loop {
        match append(&e, 0, next[0], 1000) {
            Ok(()) => next[0] += 1,
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    drop(e);
    let e = Engine::open(&dir, opts()).expect("open on a full tmpfs");
    assert_eq!(e.last_index(0), Some(next[0] - 1));
    let mut b = WriteBatch::new();
    b.purge_to(0, next[0] - 2);
    e.write(b).unwrap();
    e.gc().unwrap();
    append(&e, 0, next[0], 1000).expect("writes resume after reopen");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Option<Tmpfs> {
        use std::ffi::CString;
        let path = at.join("mnt");
        std::fs::create_dir_all(&path).ok()?;
        let c_path = CString::new(path.to_str()?).ok()?;
        let c_opts = CString::new(options).ok()?;
        let tmpfs = CString::new("tmpfs").ok()?;
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                tmpfs.as_ptr(),
                c_path.as_ptr(),
                tmpfs.as_ptr(),
                0,
                c_opts.as_ptr().cast(),
            )
        };
        (rc == 0).then_some(Tmpfs { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.path.to_string_lossy().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A workload whose GCs rewrite groups and store checkpoints in the middle of the active
/// segment, with removals and metadata around them.
fn rewrite_script() -> Script {
    let mut steps = Vec::new();
    let mut state = ModelState::default();
    let mut states = vec![state.clone()];
    let mut groups = std::collections::BTreeMap::new();
    let mut push = |ops: Vec<MOp>, mode: Mode, steps: &mut Vec<Step>| {
        for op in &ops {
            state.apply(op);
            match op {
                MOp::Append { group, .. } => {
                    groups
                        .entry(*group)
                        .or_insert_with(std::collections::BTreeSet::new);
                }
                MOp::Put { group, key, .. } => {
                    groups
                        .entry(*group)
                        .or_insert_with(std::collections::BTreeSet::new)
                        .insert(key.clone());
                }
                _ => {}
            }
        }
        states.push(state.clone());
        steps.push(Step::Write { ops, mode });
    };
    // Incompressible: the script's records must fill segments (lz4 is on above 256 bytes).
    let entry = |g: u64, i: u64, n: usize| {
        let mut x = g.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut out = format!("g{g}i{i}:").into_bytes();
        for _ in 0..n * 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
        out
    };
    let modes = [Mode::Sync, Mode::Unsynced, Mode::Async];
    push(
        vec![
            MOp::Append {
                group: 1,
                first: 1,
                entries: vec![entry(1, 1, 2), entry(1, 2, 2)],
            },
            MOp::Vote {
                group: 1,
                value: b"term=1".to_vec(),
            },
        ],
        Mode::Sync,
        &mut steps,
    );
    push(
        vec![MOp::Append {
            group: 3,
            first: 1,
            entries: vec![entry(3, 1, 3)],
        }],
        Mode::Sync,
        &mut steps,
    );
    let mut next2 = 1;
    for round in 0..2u64 {
        for k in 0..10u64 {
            push(
                vec![MOp::Append {
                    group: 2,
                    first: next2,
                    entries: (0..3).map(|j| entry(2, next2 + j, 40)).collect(),
                }],
                modes[(k % 3) as usize],
                &mut steps,
            );
            next2 += 3;
        }
        push(
            vec![MOp::Purge {
                group: 2,
                index: next2 - 2,
            }],
            Mode::Unsynced,
            &mut steps,
        );
        steps.push(Step::Gc);
        push(
            vec![
                MOp::Append {
                    group: 1,
                    first: 3 + round,
                    entries: vec![entry(1, 3 + round, 2)],
                },
                MOp::Put {
                    group: 1,
                    key: b"applied".to_vec(),
                    value: format!("a{round}").into_bytes(),
                },
            ],
            Mode::Async,
            &mut steps,
        );
        if round == 0 {
            push(vec![MOp::Remove { group: 3 }], Mode::Unsynced, &mut steps);
        }
        steps.push(Step::Gc);
        steps.push(Step::Gc);
    }
    Script {
        steps,
        states,
        groups,
    }
}

/// Power cut at every I/O point of a workload of GC rewrites and mid-segment checkpoints (and a
/// kill, recoveries after a second crash, writes after recovery, as the crash explorer does);
/// a clean run first proves the workload rewrites and checkpoints inside a segment.
#[test]
fn gc_crash_at_every_io_point_of_rewrites_and_mid_segment_checkpoints() {
    let script = rewrite_script();
    // What the GCs of a clean run did.
    let fs = SimFs::new();
    let e = Engine::open(DIR, sim_options(&fs, false)).unwrap();
    let (mut rewrites, mut mid_segment) = (0, 0);
    crate::crash_explorer::replay(&e, &script, |r| {
        rewrites += r.rewritten_groups.len();
        if !r.deleted_segments.is_empty() {
            let c = fs
                .read_file(&Path::new(DIR).join("CHECKPOINT"))
                .expect("a checkpoint");
            let offset = u64::from_le_bytes(c[24..32].try_into().unwrap());
            assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 2);
            mid_segment += usize::from(offset > 32);
        }
    });
    drop(e);
    assert!(rewrites >= 2, "the workload rewrote {rewrites} groups");
    assert!(mid_segment >= 2, "{mid_segment} mid-segment checkpoints");
    crate::crash_explorer::explore_both_prefills("gc", 0x6c00, &script, 100);
}
