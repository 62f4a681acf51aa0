//! Reads (issue 11): the entry cache and the disk path never return a purged, truncated or
//! overwritten entry, even while writers race with readers (seeded concurrent model test);
//! checksum failures on reads are typed errors; the cache stays within its budget; reads after
//! a reopen (cache empty) return what was written.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiraft_wal::{Engine, Error, Options, WriteBatch};
use parking_lot::RwLock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The seed: `MRWAL_READS_SEED` if set, else a fresh one; printed so a failure can be rerun.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("MRWAL_READS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{test}: seed {seed} (rerun with MRWAL_READS_SEED={seed})");
    seed
}

/// An entry names its group, index and the writer's epoch, then carries a padding derived from
/// the three (compressible, so large batches take the lz4 path), so a reader can check both
/// where an entry came from and that its bytes are intact.
fn make_entry(group: u64, index: u64, epoch: u64, pad: usize) -> Vec<u8> {
    let mut e = Vec::with_capacity(24 + pad);
    e.extend_from_slice(&group.to_le_bytes());
    e.extend_from_slice(&index.to_le_bytes());
    e.extend_from_slice(&epoch.to_le_bytes());
    let fill = (group ^ index.rotate_left(7) ^ epoch.rotate_left(13)) as u8;
    e.resize(24 + pad, fill);
    e
}

/// (group, index, epoch) of an entry, checking its padding.
fn parse_entry(e: &[u8]) -> (u64, u64, u64) {
    assert!(e.len() >= 24, "entry of {} bytes", e.len());
    let word = |i: usize| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().unwrap());
    let (g, i, ep) = (word(0), word(1), word(2));
    let fill = (g ^ i.rotate_left(7) ^ ep.rotate_left(13)) as u8;
    assert!(
        e[24..].iter().all(|&b| b == fill),
        "entry ({g}, {i}, epoch {ep}) has damaged padding"
    );
    (g, i, ep)
}

/// An invalidation a writer completed (published only after its write returned).
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Entries `..=to` written at an epoch `<= epoch` are gone.
    Purge { to: u64, epoch: u64 },
    /// Entries `from..` written at an epoch `< epoch` are gone (truncate, overwrite, removal).
    Drop { from: u64, epoch: u64 },
}

impl Cut {
    fn kills(&self, index: u64, epoch: u64) -> bool {
        match *self {
            Cut::Purge { to, epoch: e } => index <= to && epoch <= e,
            Cut::Drop { from, epoch: e } => index >= from && epoch < e,
        }
    }
}

/// The writer's model of one group.
#[derive(Debug, Default, Clone)]
struct ModelGroup {
    entries: BTreeMap<u64, Vec<u8>>,
    /// Where the next append goes when the group is empty.
    next: u64,
    epoch: u64,
}

fn check_read(group: u64, index: u64, bytes: &[u8], cuts: &[Cut], ctx: &str) {
    let (g, i, epoch) = parse_entry(bytes);
    assert_eq!((g, i), (group, index), "{ctx}: entry from elsewhere");
    for c in cuts {
        assert!(
            !c.kills(index, epoch),
            "{ctx}: group {group} index {index} epoch {epoch} returned after {c:?} completed"
        );
    }
}

fn model_check(engine: &Engine, model: &BTreeMap<u64, ModelGroup>, ctx: &str) {
    for (&g, m) in model {
        let first = m.entries.keys().next().copied();
        let last = m.entries.keys().next_back().copied();
        assert_eq!(engine.first_index(g), first, "{ctx}: group {g} first");
        assert_eq!(engine.last_index(g), last, "{ctx}: group {g} last");
        for (&i, e) in &m.entries {
            assert_eq!(
                engine.entry(g, i).unwrap().as_deref(),
                Some(&e[..]),
                "{ctx}: {g}/{i}"
            );
        }
        if let (Some(f), Some(l)) = (first, last) {
            let all = engine.entries_bytes(g, f..l + 1, usize::MAX).unwrap();
            assert_eq!(all.len(), m.entries.len(), "{ctx}: group {g} range");
            for (b, e) in all.iter().zip(m.entries.values()) {
                assert_eq!(&b[..], &e[..], "{ctx}: group {g} range content");
            }
            assert!(engine.entry(g, l + 1).unwrap().is_none());
            if f > 0 {
                assert!(engine.entry(g, f - 1).unwrap().is_none());
            }
        }
    }
}

fn concurrent_model(budget: u64, seed: u64, ops_per_writer: usize) {
    let dir = tempfile::tempdir().unwrap();
    let opts = || {
        Options::default()
            .segment_size(64 << 10)
            .prefill_segments(false)
            .compression_threshold(4 << 10)
            .cache_bytes(budget)
    };
    let engine = Engine::open(dir.path(), opts()).unwrap();
    const WRITERS: u64 = 2;
    const GROUPS_PER_WRITER: u64 = 4;
    const READERS: u64 = 2;
    let groups = WRITERS * GROUPS_PER_WRITER;
    let cuts: Arc<Vec<RwLock<Vec<Cut>>>> =
        Arc::new((0..=groups).map(|_| RwLock::new(Vec::new())).collect());
    let stop = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (engine, cuts) = (engine.clone(), cuts.clone());
        writers.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9E37_79B9));
            let mine: Vec<u64> = (1..=GROUPS_PER_WRITER)
                .map(|k| w * GROUPS_PER_WRITER + k)
                .collect();
            let mut model: BTreeMap<u64, ModelGroup> = mine
                .iter()
                .map(|&g| {
                    (
                        g,
                        ModelGroup {
                            next: 1,
                            ..ModelGroup::default()
                        },
                    )
                })
                .collect();
            for _ in 0..ops_per_writer {
                let g = mine[rng.gen_range(0..mine.len())];
                let m = model.get_mut(&g).unwrap();
                let first = m.entries.keys().next().copied();
                let last = m.entries.keys().next_back().copied();
                let mut batch = WriteBatch::new();
                let mut cut = None;
                let roll = rng.gen_range(0..100);
                match (roll, first, last) {
                    // Overwrite: append at an earlier index replaces the tail.
                    (0..=9, Some(f), Some(l)) => {
                        let at = rng.gen_range(f..=l);
                        m.epoch += 1;
                        let n = rng.gen_range(1..=20);
                        let pad = rng.gen_range(0..300);
                        let es: Vec<_> = (at..at + n)
                            .map(|i| make_entry(g, i, m.epoch, pad))
                            .collect();
                        batch.append(g, at, &es);
                        m.entries.split_off(&at);
                        m.entries.extend((at..).zip(es));
                        cut = Some(Cut::Drop {
                            from: at,
                            epoch: m.epoch,
                        });
                    }
                    (10..=17, Some(f), Some(l)) => {
                        let at = rng.gen_range(f..=l + 1);
                        m.epoch += 1;
                        batch.truncate_from(g, at);
                        m.entries.split_off(&at);
                        m.next = m.next.max(at);
                        cut = Some(Cut::Drop {
                            from: at,
                            epoch: m.epoch,
                        });
                    }
                    (18..=27, Some(f), Some(l)) => {
                        let to = rng.gen_range(f..=l);
                        batch.purge_to(g, to);
                        m.entries = m.entries.split_off(&(to + 1));
                        m.next = m.next.max(to + 1);
                        cut = Some(Cut::Purge { to, epoch: m.epoch });
                    }
                    (28..=29, _, _) => {
                        m.epoch += 1;
                        batch.remove_group(g);
                        m.entries.clear();
                        m.next = 1;
                        cut = Some(Cut::Drop {
                            from: 0,
                            epoch: m.epoch,
                        });
                    }
                    _ => {
                        let at = last.map_or(m.next, |l| l + 1);
                        let n = rng.gen_range(1..=40);
                        let pad = rng.gen_range(0..300);
                        let es: Vec<_> = (at..at + n)
                            .map(|i| make_entry(g, i, m.epoch, pad))
                            .collect();
                        batch.append(g, at, &es);
                        m.entries.extend((at..).zip(es));
                        m.next = at + n;
                    }
                }
                if let Some(&last) = m.entries.keys().next_back() {
                    m.next = m.next.max(last + 1);
                }
                if rng.gen_bool(0.3) {
                    engine.write(batch).unwrap();
                } else {
                    engine.write_unsynced(batch).unwrap();
                }
                if let Some(c) = cut {
                    cuts[g as usize].write().push(c);
                }
            }
            model
        }));
    }

    let mut readers = Vec::new();
    for r in 0..READERS {
        let (engine, cuts, stop) = (engine.clone(), cuts.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (r + 101).wrapping_mul(0x51_7CC1));
            let mut read = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let g = rng.gen_range(1..=groups);
                let seen: Vec<Cut> = cuts[g as usize].read().clone();
                let (Some(f), Some(l)) = (engine.first_index(g), engine.last_index(g)) else {
                    continue;
                };
                if f > l {
                    continue; // read apart, around a concurrent purge or removal
                }
                // Mostly the recent tail (the cache), sometimes anywhere (the disk path).
                let lo = if rng.gen_bool(0.5) {
                    l.saturating_sub(64).max(f)
                } else {
                    f
                };
                let start = rng.gen_range(lo.saturating_sub(2)..=l + 2);
                match rng.gen_range(0..3) {
                    0 => {
                        if let Some(e) = engine.entry(g, start).unwrap() {
                            check_read(g, start, &e, &seen, "entry");
                            read += 1;
                        }
                    }
                    1 => {
                        if let Some(e) = engine.entry_bytes(g, start).unwrap() {
                            check_read(g, start, &e, &seen, "entry_bytes");
                            read += 1;
                        }
                    }
                    _ => {
                        let n = rng.gen_range(1..100);
                        let max = rng.gen_range(1..20_000);
                        let es = engine.entries_bytes(g, start..start + n, max).unwrap();
                        for (i, e) in (start..).zip(&es) {
                            check_read(g, i, e, &seen, "entries_bytes");
                        }
                        read += es.len() as u64;
                    }
                }
            }
            read
        }));
    }

    let mut model = BTreeMap::new();
    for w in writers {
        model.extend(w.join().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let read: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(read > 0, "the readers read nothing");
    let stats = engine.stats();
    assert!(
        stats.cache_bytes <= budget,
        "cache holds {} bytes, budget {budget}",
        stats.cache_bytes
    );
    if budget == 0 {
        assert_eq!(stats.cache_appends, 0);
    }
    model_check(&engine, &model, "after the race");
    drop(engine);
    let engine = Engine::open(dir.path(), opts()).unwrap();
    assert_eq!(
        engine.stats().cache_bytes,
        0,
        "a reopened cache starts empty"
    );
    model_check(&engine, &model, "after reopen");
    eprintln!(
        "reads model: budget {budget}: {read} entries read, {} segments",
        stats.segments
    );
}

#[test]
fn reads_race_writes_without_returning_dead_entries_cache_off() {
    concurrent_model(0, seed("cache off"), 1500);
}

#[test]
fn reads_race_writes_without_returning_dead_entries_small_cache() {
    concurrent_model(48 << 10, seed("small cache"), 1500);
}

#[test]
fn reads_race_writes_without_returning_dead_entries_large_cache() {
    concurrent_model(64 << 20, seed("large cache"), 1500);
}

/// The only `.wal` file of a fresh engine directory holding one segment of data.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Flips one byte of the payload `needle` wherever it lies in the segment files; returns the
/// segment id and the file offset of the flipped byte.
fn flip(dir: &Path, needle: &[u8]) -> (u64, u64) {
    for path in segment_files(dir) {
        let data = std::fs::read(&path).unwrap();
        if let Some(at) = data.windows(needle.len()).position(|w| w == needle) {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let pos = (at + needle.len() / 2) as u64;
            f.write_all_at(&[data[at + needle.len() / 2] ^ 0x40], pos)
                .unwrap();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .unwrap();
            return (id, pos);
        }
    }
    panic!("payload not found in any segment");
}

fn assert_corruption(r: Result<impl std::fmt::Debug, Error>, segment: u64, flipped: u64) {
    match r {
        Err(Error::Corruption {
            segment: s,
            offset,
            reason,
        }) => {
            assert_eq!(s, segment, "corruption names the segment");
            assert!(
                offset < flipped && flipped - offset < 16 << 10,
                "record offset {offset} does not cover the flipped byte at {flipped}"
            );
            assert!(reason.contains("checksum"), "reason: {reason}");
        }
        other => panic!("expected a typed corruption error, got {other:?}"),
    }
}

#[test]
fn reads_checksum_failure_is_a_typed_error_and_the_cache_serves_recent_entries() {
    let needle = [0xA5u8; 200];
    for budget in [0u64, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(
            dir.path(),
            Options::default()
                .segment_size(1 << 20)
                .compression_threshold(usize::MAX)
                .cache_bytes(budget),
        )
        .unwrap();
        let mut b = WriteBatch::new();
        b.append(7, 1, [&b"first"[..], &needle[..], b"third"]);
        engine.write(b).unwrap();
        let (segment, pos) = flip(dir.path(), &needle);
        if budget == 0 {
            // Every read path checks the record: a typed error naming segment and record.
            let all = |engine: &Engine| {
                assert_corruption(engine.entry(7, 2), segment, pos);
                assert_corruption(engine.entry_bytes(7, 1), segment, pos);
                assert_corruption(engine.entries(7, 1..4, usize::MAX), segment, pos);
                assert_corruption(engine.entries_bytes(7, 1..4, usize::MAX), segment, pos);
            };
            all(&engine);
            // The same once the segment is sealed (read from its memory mapping).
            for i in 0..80u64 {
                let mut b = WriteBatch::new();
                b.append(
                    9,
                    1 + i * 4,
                    (0..4u64).map(|k| make_entry(9, i * 4 + k, 0, 4000)),
                );
                engine.write(b).unwrap();
            }
            assert!(engine.stats().active_segment > segment, "no rotation");
            all(&engine);
        } else {
            // The cache serves what was written, from memory, without touching the file.
            assert_eq!(engine.entry(7, 2).unwrap().unwrap(), needle);
            let all = engine.entries_bytes(7, 1..4, usize::MAX).unwrap();
            assert_eq!(&all[0][..], b"first");
            assert_eq!(&all[1][..], &needle[..]);
            assert_eq!(&all[2][..], b"third");
            assert!(engine.stats().cache_bytes > 0);
            // Push the record out of the cache with newer writes: the disk path sees the flip.
            for i in 0..40u64 {
                let mut b = WriteBatch::new();
                b.append(8, 1 + i * 8, (0..8).map(|_| [0u8; 4096]));
                engine.write(b).unwrap();
            }
            assert!(engine.stats().cache_bytes <= budget);
            assert_corruption(engine.entry(7, 2), segment, pos);
            assert_corruption(engine.entries_bytes(7, 1..4, usize::MAX), segment, pos);
        }
    }
}

#[test]
fn reads_cache_respects_its_budget_and_evicts_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 32 << 10;
    let engine = Engine::open(
        dir.path(),
        Options::default()
            .segment_size(256 << 10)
            .prefill_segments(false)
            .cache_bytes(budget),
    )
    .unwrap();
    let mut max_seen = 0;
    let mut extra = 1;
    for round in 0..200u64 {
        let g = round % 10 + 1;
        let first = round / 10 * 4 + 1;
        let mut b = WriteBatch::new();
        b.append(g, first, (0..4).map(|k| vec![(round + k) as u8; 100]));
        if round % 3 == 0 {
            // A second group in the same record.
            b.append(100, extra, [vec![1u8; 50]]);
            extra += 1;
        }
        engine.write_unsynced(b).unwrap();
        let s = engine.stats();
        assert!(
            s.cache_bytes <= budget,
            "round {round}: {} > {budget}",
            s.cache_bytes
        );
        max_seen = max_seen.max(s.cache_bytes);
    }
    // The budget was used (eviction kicked in near it, not far below).
    assert!(max_seen > budget / 2, "cache peaked at {max_seen} bytes");
    let s = engine.stats();
    assert!(s.cache_appends > 0 && s.cache_appends < 270);
    // Every entry still reads back, cached or not.
    for round in 0..200u64 {
        let g = round % 10 + 1;
        let first = round / 10 * 4 + 1;
        let es = engine.entries(g, first..first + 4, usize::MAX).unwrap();
        assert_eq!(es.len(), 4);
        for (k, e) in es.iter().enumerate() {
            assert_eq!(e, &vec![(round + k as u64) as u8; 100]);
        }
    }
    // Purging and removing every group releases the cached payloads (appends dropped at once;
    // their charge leaves with the eviction queue).
    let mut b = WriteBatch::new();
    for g in 1..=10 {
        b.purge_to(g, 1_000);
    }
    b.remove_group(100);
    engine.write(b).unwrap();
    assert_eq!(engine.stats().cache_appends, 0);
    // A cache of 0 holds nothing.
    drop(engine);
    let engine = Engine::open(dir.path(), Options::default().cache_bytes(0)).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 10_000, [[1u8; 10]]);
    engine.write(b).unwrap();
    let s = engine.stats();
    assert_eq!((s.cache_bytes, s.cache_appends), (0, 0));
    assert_eq!(engine.entry(1, 10_000).unwrap().unwrap(), vec![1u8; 10]);
}

/// A record of a sealed segment is verified by its first read; later gets of entries in it copy
/// just the entry out of the mapping (they are not checked again), while range reads and an
/// engine without the mapping check every record they read. Shown by breaking the stored
/// checksum of a record after its first read: with the mapping, single gets in it keep
/// answering (with the right bytes); the other paths report the damage.
#[test]
fn reads_verify_a_sealed_record_once_per_engine_with_the_mapping() {
    let (a, b) = ([0xA1u8; 200], [0xB2u8; 200]);
    for mmap in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(
            dir.path(),
            Options::default()
                .segment_size(1 << 20)
                .compression_threshold(usize::MAX)
                .cache_bytes(0)
                .mmap_reads(mmap),
        )
        .unwrap();
        let mut batch = WriteBatch::new();
        batch.append(7, 1, [&a[..], &b[..], b"third"]);
        engine.write(batch).unwrap();
        // Seal the segment holding it (rotate past it).
        for i in 0..80u64 {
            let mut batch = WriteBatch::new();
            batch.append(
                9,
                1 + i * 4,
                (0..4u64).map(|k| make_entry(9, i * 4 + k, 0, 4000)),
            );
            engine.write(batch).unwrap();
        }
        let first = segment_files(dir.path())[0].clone();
        assert!(engine.stats().active_segment > 1, "no rotation");
        // The record of group 7 is the first one of the first segment: its header is at 32
        // (body length, then the CRC at 36), and the first payload lies inside its body.
        let data = std::fs::read(&first).unwrap();
        let body_len = u32::from_le_bytes(data[32..36].try_into().unwrap()) as usize;
        let at = data.windows(a.len()).position(|w| w == a).unwrap();
        assert!(at > 48 && at < 48 + body_len, "record layout");
        // First read: the whole record is checked.
        assert_eq!(engine.entry(7, 1).unwrap().unwrap(), a);
        // Break the stored checksum.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap();
        f.write_all_at(&[data[36] ^ 0x5A], 36).unwrap();
        drop(f);
        if mmap {
            assert_eq!(engine.entry(7, 2).unwrap().unwrap(), b);
            assert_eq!(&engine.entry_bytes(7, 3).unwrap().unwrap()[..], b"third");
        } else {
            assert_corruption(engine.entry(7, 2), 1, 37);
            assert_corruption(engine.entry_bytes(7, 3), 1, 37);
        }
        // Range reads check every record they read.
        assert_corruption(engine.entries_bytes(7, 1..4, usize::MAX), 1, 37);
        drop(engine);
    }
}
