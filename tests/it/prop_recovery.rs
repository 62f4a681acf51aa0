//! Seeded property tests of recovery on hostile directory images: the inputs of the fuzz targets
//! (fuzz/fuzz_targets/), run in CI with a fixed seed. Recovery must never panic, in any recovery
//! mode; and on a mutated real image, whatever it returns must be something that was written
//! (an entry, vote, committed marker or key value ever written at that place), never garbage.
//!
//! `PROPTEST_CASES=n` runs more cases; `MRWAL_PROP_SEED=s` changes the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use multiraft_wal::{Engine, RecoveryMode};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use crate::crash_explorer::{generate, sim_options, to_batch, MOp, Script, Step, DIR};
use crate::simfs::{CrashVariant, SimFs};

const MODES: [RecoveryMode; 3] = [
    RecoveryMode::TolerateTail,
    RecoveryMode::Strict,
    RecoveryMode::TolerateAny,
];

fn config(default_cases: u32) -> Config {
    let seed = std::env::var("MRWAL_PROP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Everything ever written, per place: what a recovered engine may show.
#[derive(Default)]
struct Written {
    entries: BTreeMap<(u64, u64), BTreeSet<Vec<u8>>>,
    votes: BTreeMap<u64, BTreeSet<Vec<u8>>>,
    committed: BTreeMap<u64, BTreeSet<Vec<u8>>>,
    values: BTreeMap<(u64, Vec<u8>), BTreeSet<Vec<u8>>>,
}

/// A real image written by the engine (synced, several segments, a checkpoint after gc), its
/// script, and what was written.
struct Fixture {
    files: Vec<(String, Vec<u8>)>,
    script: Script,
    written: Written,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let script = generate(0x0B5E_55ED, 40, &[1, 2, 3], 120);
        let fs = SimFs::new();
        let engine = Engine::open(DIR, sim_options(&fs, false)).expect("open");
        let mut written = Written::default();
        for step in &script.steps {
            match step {
                Step::Write { ops, .. } => {
                    for op in ops {
                        match op {
                            MOp::Append {
                                group,
                                first,
                                entries,
                            } => {
                                for (i, e) in entries.iter().enumerate() {
                                    written
                                        .entries
                                        .entry((*group, first + i as u64))
                                        .or_default()
                                        .insert(e.clone());
                                }
                            }
                            MOp::Vote { group, value } => {
                                written
                                    .votes
                                    .entry(*group)
                                    .or_default()
                                    .insert(value.clone());
                            }
                            MOp::Committed { group, value } => {
                                written
                                    .committed
                                    .entry(*group)
                                    .or_default()
                                    .insert(value.clone());
                            }
                            MOp::Put { group, key, value } => {
                                written
                                    .values
                                    .entry((*group, key.clone()))
                                    .or_default()
                                    .insert(value.clone());
                            }
                            _ => {}
                        }
                    }
                    engine.write(to_batch(ops)).expect("write");
                }
                Step::Sync => engine.sync().expect("sync"),
                Step::Gc => {
                    engine.gc().expect("gc");
                }
            }
        }
        drop(engine);
        let mut files = Vec::new();
        for name in fs.live_names(Path::new(DIR)) {
            if name == "LOCK" {
                continue;
            }
            let bytes = fs.read_file(&Path::new(DIR).join(&name)).expect("file");
            files.push((name, bytes));
        }
        Fixture {
            files,
            script,
            written,
        }
    })
}

/// A valid segment header for segment 1, taken from an engine-made segment.
fn header() -> Vec<u8> {
    let f = fixture();
    let (_, bytes) = f
        .files
        .iter()
        .find(|(n, _)| n == "0000000000000001.wal")
        .or_else(|| f.files.iter().find(|(n, _)| n.ends_with(".wal")))
        .expect("a segment");
    bytes[..32].to_vec()
}

fn plant(files: &[(String, Vec<u8>)]) -> SimFs {
    let fs = SimFs::new();
    use multiraft_wal::fs::FileSystem;
    fs.create_dir_all(Path::new(DIR)).unwrap();
    for (name, bytes) in files {
        fs.overwrite_file(&PathBuf::from(DIR).join(name), bytes.clone())
            .unwrap();
    }
    fs
}

/// Opens and reads everything; `Err` only for a panic or an impossible answer.
fn open_and_check(fs: &SimFs, mode: RecoveryMode, written: Option<&Written>) -> Result<(), String> {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let engine = match Engine::open(DIR, sim_options(fs, false).recovery_mode(mode)) {
            Ok(e) => e,
            Err(_) => return Ok(()),
        };
        for g in engine.groups() {
            let (first, last) = match (engine.first_index(g), engine.last_index(g)) {
                (Some(f), Some(l)) if f <= l => (f, l),
                (None, None) => continue,
                (f, l) => return Err(format!("group {g}: first {f:?} last {l:?}")),
            };
            // Bounded reads: a hostile image may claim a huge range.
            let end = last.min(first.saturating_add(10_000)).saturating_add(1);
            let got = match engine.entries(g, first..end, 1 << 24) {
                Ok(got) => got,
                Err(_) => continue,
            };
            if let Some(w) = written {
                for (i, e) in got.iter().enumerate() {
                    let idx = first + i as u64;
                    if !w.entries.get(&(g, idx)).is_some_and(|s| s.contains(e)) {
                        return Err(format!(
                            "group {g} entry {idx}: {} bytes never written there",
                            e.len()
                        ));
                    }
                }
                if let Some(v) = engine.vote(g) {
                    if !w.votes.get(&g).is_some_and(|s| s.contains(&v)) {
                        return Err(format!("group {g}: a vote never written"));
                    }
                }
                if let Some(c) = engine.committed(g) {
                    if !w.committed.get(&g).is_some_and(|s| s.contains(&c)) {
                        return Err(format!("group {g}: a committed marker never written"));
                    }
                }
                for ((wg, key), values) in &w.values {
                    if *wg == g {
                        if let Some(v) = engine.get(g, key) {
                            if !values.contains(&v) {
                                return Err(format!("group {g}: a key value never written"));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }));
    match r {
        Ok(r) => r,
        Err(_) => Err("recovery or a read panicked".into()),
    }
}

const NAMES: [&str; 7] = [
    "0000000000000001.wal",
    "0000000000000002.wal",
    "0000000000000003.wal",
    "CHECKPOINT",
    "CHECKPOINT.tmp",
    "0000000000000002.wal.tmp",
    "SEAL",
];

proptest! {
    #![proptest_config(config(1024))]

    /// The record decoder, through recovery: a valid header followed by arbitrary bytes.
    #[test]
    fn arbitrary_records_after_a_valid_header(body in proptest::collection::vec(any::<u8>(), 0..3000), mode in 0..3usize) {
        let mut seg = header();
        seg.extend_from_slice(&body);
        let fs = plant(&[(NAMES[0].to_string(), seg)]);
        prop_assert_eq!(open_and_check(&fs, MODES[mode], None), Ok(()));
    }

    /// Recovery from an arbitrary directory image: any files under the engine's names, each a
    /// valid header plus garbage or pure garbage.
    #[test]
    fn arbitrary_directory_images(
        files in proptest::collection::vec((0..NAMES.len(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..800)), 0..5),
        mode in 0..3usize,
    ) {
        let planted: Vec<(String, Vec<u8>)> = files
            .into_iter()
            .map(|(n, with_header, bytes)| {
                let mut b = if with_header && NAMES[n].ends_with(".wal") { header() } else { Vec::new() };
                b.extend(bytes);
                (NAMES[n].to_string(), b)
            })
            .collect();
        let fs = plant(&planted);
        prop_assert_eq!(open_and_check(&fs, MODES[mode], None), Ok(()));
    }

    /// A real image with a few bytes changed, maybe a file cut short: no panic, and nothing
    /// returned that was never written there.
    #[test]
    fn mutated_real_images_never_show_unwritten_data(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<proptest::sample::Index>(), 1..=255u8), 1..6),
        cut in proptest::option::of((any::<proptest::sample::Index>(), any::<proptest::sample::Index>())),
        mode in 0..3usize,
    ) {
        let f = fixture();
        let mut files = f.files.clone();
        for (file, at, x) in flips {
            let (_, bytes) = &mut files[file.index(f.files.len())];
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        if let Some((file, at)) = cut {
            let (_, bytes) = &mut files[file.index(f.files.len())];
            let len = at.index(bytes.len() + 1);
            bytes.truncate(len);
        }
        let fs = plant(&files);
        prop_assert_eq!(open_and_check(&fs, MODES[mode], Some(&f.written)), Ok(()));
    }
}

#[test]
fn the_fixture_recovers_whole() {
    let f = fixture();
    let fs = plant(&f.files);
    let n = f.script.states.len() - 1;
    let engine = Engine::open(DIR, sim_options(&fs, false)).expect("open");
    let seen = crate::crash_explorer::observe(&engine, &f.script.groups).expect("observe");
    assert_eq!(
        seen,
        f.script.states[n],
        "{}",
        seen.diff(&f.script.states[n])
    );
    assert!(f.files.iter().filter(|(n, _)| n.ends_with(".wal")).count() >= 2);
    drop(engine);
    // Each planted image is independent of the crash model: the durable image is the whole file.
    let img = fs.crash_image(CrashVariant::DropAll, 0);
    assert!(Engine::open(DIR, sim_options(&img, false)).is_ok());
}
