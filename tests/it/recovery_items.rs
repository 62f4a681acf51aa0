//! Regression tests for issue 8's review items on recovery, each failing before its fix:
//! unsynced-but-served bytes made durable at open (item 1), lz4-dense checkpointed ranges
//! (item 3), a bad segment header in TolerateAny (item 5), EDQUOT (item 6). Replay's "append
//! that does not fit" and segment ids beyond u32 are unit tests in `src/recovery/mod.rs`.

use std::path::Path;

use multiraft_wal::{Engine, Error, Options, RecoveryMode, WriteBatch};

use crate::crash_explorer::{sim_options, DIR};
use crate::simfs::{CrashVariant, Fault, Op, SimFs};

fn entries(engine: &Engine, group: u64) -> Vec<Vec<u8>> {
    let Some(first) = engine.first_index(group) else {
        return Vec::new();
    };
    engine.entries(group, first..u64::MAX, usize::MAX).unwrap()
}

/// A process kill keeps the page cache: recovery serves the unsynced records it finds. It must
/// make them durable before the engine writes after them, or a later power cut loses them while
/// the later (synced) writes survive. The first record of a segment larger than the segment
/// size fills the file exactly, so no trim hides the missing fsync. The entry is larger than the
/// engine's 64 KiB tail buffer, so the unsynced write reaches the page cache (a smaller one
/// would wait in the process's memory and die with it, which is allowed: it was never
/// acknowledged durable).
#[test]
fn a_kill_then_a_power_cut_keeps_what_recovery_served() {
    let fs = SimFs::new();
    let opts = |fs: &SimFs| sim_options(fs, false).compression_threshold(1 << 20);
    let engine = Engine::open(DIR, opts(&fs)).unwrap();
    let big = vec![7u8; 70_000];
    let mut b = WriteBatch::new();
    b.append(1, 1, [&big]);
    engine.write_unsynced(b).unwrap();
    // SIGKILL: the live image survives, nothing more is synced.
    let killed = fs.kill_image();
    drop(engine);

    let engine = Engine::open(DIR, opts(&killed)).unwrap();
    assert_eq!(
        entries(&engine, 1),
        vec![big.clone()],
        "served after the kill"
    );
    let mut b = WriteBatch::new();
    b.append(2, 1, [b"acknowledged after the kill"]);
    engine.write(b).unwrap();
    drop(engine);

    let cut = killed.crash_image(CrashVariant::DropAll, 1);
    let engine = Engine::open(DIR, opts(&cut)).unwrap();
    assert_eq!(
        entries(&engine, 2),
        vec![b"acknowledged after the kill".to_vec()]
    );
    assert_eq!(
        entries(&engine, 1),
        vec![big],
        "an entry served after the kill was lost by the power cut"
    );
}

/// 100,000 empty entries compress to a few hundred bytes: a checkpointed range may hold more
/// entries than its segments hold bytes.
#[test]
fn a_checkpointed_range_denser_than_one_byte_per_entry_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let opts = || {
        Options::default()
            .segment_size(4096)
            .gc_rewrite_max_entries(0)
            .recovery_threads(2)
    };
    let n = 100_000u64;
    {
        let engine = Engine::open(&dir, opts()).unwrap();
        let mut b = WriteBatch::new();
        b.append(1, 1, std::iter::repeat_n(b"", n as usize));
        engine.write(b).unwrap();
        // Group 2 fills segments, then is purged: they die, and a checkpoint is written.
        for i in 1..=4u64 {
            let mut b = WriteBatch::new();
            b.append(2, i, [vec![i as u8; 3000]]);
            engine.write(b).unwrap();
        }
        let mut b = WriteBatch::new();
        b.purge_to(2, 4);
        engine.write(b).unwrap();
        let gc = engine.gc().unwrap();
        assert!(!gc.deleted_segments.is_empty(), "{gc:?}");
        assert!(dir.join("CHECKPOINT").exists());
    }
    let engine = Engine::open(&dir, opts()).unwrap();
    assert!(engine.recovery_report().checkpoint);
    assert_eq!(engine.first_index(1), Some(1));
    assert_eq!(engine.last_index(1), Some(n));
    assert_eq!(engine.entry(1, n).unwrap(), Some(Vec::new()));
}

fn seg_path(dir: &Path, id: u64) -> std::path::PathBuf {
    dir.join(format!("{id:016x}.wal"))
}

/// TolerateAny skips a segment whose header is damaged (and reports it) instead of failing.
#[test]
fn tolerate_any_skips_a_segment_with_a_bad_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let opts = |mode| {
        Options::default()
            .segment_size(4096)
            .recovery_mode(mode)
            .auto_gc(false)
    };
    {
        let engine = Engine::open(&dir, opts(RecoveryMode::TolerateTail)).unwrap();
        for g in 1..=6u64 {
            let mut b = WriteBatch::new();
            b.append(g, 1, [vec![g as u8; 3000]]);
            engine.write(b).unwrap();
        }
    }
    let victim = seg_path(&dir, 2);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[3] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    assert!(matches!(
        Engine::open(&dir, opts(RecoveryMode::TolerateTail)),
        Err(Error::Corruption {
            segment: 2,
            offset: 0,
            ..
        })
    ));
    let engine = Engine::open(&dir, opts(RecoveryMode::TolerateAny)).unwrap();
    let report = engine.recovery_report();
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.segment == 2 && s.start == 0),
        "{report:?}"
    );
    // Every group but the one whose only record was in segment 2 is intact.
    let lost: Vec<u64> = (1..=6)
        .filter(|&g| engine.last_index(g).is_none())
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    for g in (1..=6u64).filter(|g| !lost.contains(g)) {
        assert_eq!(entries(&engine, g), vec![vec![g as u8; 3000]]);
    }
}

/// A full quota (EDQUOT) is a full disk: `NoSpace`, not poisoning; writes resume after.
#[test]
fn edquot_is_no_space_and_does_not_poison() {
    let fs = SimFs::new();
    let engine = Engine::open(DIR, sim_options(&fs, false)).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 1, [b"one"]);
    engine.write(b).unwrap();
    fs.fail_from(Op::Write, fs.count(Op::Write) + 1, Fault::Edquot);
    let mut b = WriteBatch::new();
    b.append(1, 2, [b"two"]);
    let r = engine.write(b.clone());
    assert!(matches!(r, Err(Error::NoSpace { .. })), "{r:?}");
    assert!(!engine.is_poisoned());
    fs.clear_faults();
    engine.write(b).unwrap();
    assert_eq!(entries(&engine, 1), vec![b"one".to_vec(), b"two".to_vec()]);
}

/// A record larger than the writer copies behind a sync marker is written after it by a second
/// call; the marker still vouches for what was synced before it: damage there, after a kill,
/// is corruption, not a tail to cut.
#[test]
fn a_marker_before_a_large_record_vouches_for_the_synced_bytes() {
    let fs = SimFs::new();
    let opts = |fs: &SimFs| {
        sim_options(fs, false)
            .segment_size(1 << 20)
            .compression_threshold(1 << 30)
    };
    let engine = Engine::open(DIR, opts(&fs)).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 1, [b"small, synced"]);
    engine.write(b).unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut b = WriteBatch::new();
    b.append(1, 2, [&big]);
    engine.write(b).unwrap();
    let killed = fs.kill_image();
    drop(engine);
    let seg = Path::new(DIR).join(format!("{:016x}.wal", 1));
    let engine = Engine::open(DIR, opts(&killed.crash_image(CrashVariant::KeepAll, 0))).unwrap();
    assert_eq!(entries(&engine, 1), vec![b"small, synced".to_vec(), big]);
    drop(engine);
    let mut bytes = killed.read_file(&seg).unwrap();
    bytes[32 + 20] ^= 1;
    killed.overwrite_file(&seg, bytes).unwrap();
    match Engine::open(DIR, opts(&killed)) {
        Err(Error::Corruption {
            segment: 1,
            offset: 32,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// After an unclean stop, the next engine's first marker declares the length recovery left the
/// last segment at: cutting that segment later at a record boundary (no damage to see) is
/// caught, not taken for a shorter log.
#[test]
fn the_first_write_after_recovery_pins_the_last_segment_length() {
    let fs = SimFs::new();
    let opts = |fs: &SimFs| sim_options(fs, false).segment_size(1 << 20);
    let engine = Engine::open(DIR, opts(&fs)).unwrap();
    // Group 2's only entry is in the record the cut removes: nothing later refers to it.
    for g in 1..=2u64 {
        let mut b = WriteBatch::new();
        b.append(g, 1, [format!("group {g} entry 1")]);
        engine.write(b).unwrap();
    }
    let killed = fs.kill_image();
    drop(engine);
    let engine = Engine::open(DIR, opts(&killed)).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 2, [b"group 1 entry 2"]);
    engine.write(b).unwrap();
    drop(engine);
    let img = killed.crash_image(CrashVariant::KeepAll, 0);
    let seg1 = Path::new(DIR).join(format!("{:016x}.wal", 1));
    let bytes = img.read_file(&seg1).unwrap();
    let first_len = 16 + u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize;
    img.overwrite_file(&seg1, bytes[..32 + first_len].to_vec())
        .unwrap();
    match Engine::open(DIR, opts(&img)) {
        Err(Error::Corruption { segment: 1, .. }) => {}
        Err(e) => panic!("{e:?}"),
        Ok(e) => panic!("opened with group 2 = {:?}", entries(&e, 2)),
    }
}
