//! Crash explorer: a seeded workload on the simulated file system, cut at every I/O point under
//! four crash variants (and a second crash during a sample of recoveries), checked against a model
//! of what was acknowledged.
//!
//! The check: after a crash the engine must show exactly the state after some prefix of the
//! batches it was given, and that prefix must hold every batch whose durability was reported
//! (`write` returned `Ok`, a `write_async` callback got `Ok`, or a later `sync` returned `Ok`).
//! That one check covers "acknowledged entries survive", "nothing never written appears",
//! "nothing truncated comes back", "logs are contiguous" and "the vote never goes backwards".
//!
//! Environment: `MRWAL_CRASH_ITERS=n` runs n seeds (default 6); `MRWAL_CRASH_SEED=s` sets the
//! first seed (default fixed; `random` picks one); `MRWAL_CRASH_POINT=k` runs only crash point k.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use multiraft_wal::{Engine, Options, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::simfs::{CrashVariant, SimFs};

/// One operation of a batch, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MOp {
    Append {
        group: u64,
        first: u64,
        entries: Vec<Vec<u8>>,
    },
    Truncate {
        group: u64,
        index: u64,
    },
    Purge {
        group: u64,
        index: u64,
    },
    Put {
        group: u64,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        group: u64,
        key: Vec<u8>,
    },
    Vote {
        group: u64,
        value: Vec<u8>,
    },
    Committed {
        group: u64,
        value: Vec<u8>,
    },
    Remove {
        group: u64,
    },
}

/// A group as observed through the public API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupState {
    /// Index of `entries[0]` (0 when there are no entries).
    pub first: u64,
    pub entries: Vec<Vec<u8>>,
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl GroupState {
    fn is_blank(&self) -> bool {
        self.entries.is_empty()
            && self.vote.is_none()
            && self.committed.is_none()
            && self.kv.is_empty()
    }

    fn last(&self) -> Option<u64> {
        (!self.entries.is_empty()).then(|| self.first + self.entries.len() as u64 - 1)
    }
}

/// The state of every group; blank groups are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelState {
    pub groups: BTreeMap<u64, GroupState>,
}

impl ModelState {
    /// Applies one operation with the engine's documented semantics.
    pub fn apply(&mut self, op: &MOp) {
        let group = match op {
            MOp::Append { group, .. }
            | MOp::Truncate { group, .. }
            | MOp::Purge { group, .. }
            | MOp::Put { group, .. }
            | MOp::Delete { group, .. }
            | MOp::Vote { group, .. }
            | MOp::Committed { group, .. }
            | MOp::Remove { group } => *group,
        };
        let g = self.groups.entry(group).or_default();
        match op {
            MOp::Append { first, entries, .. } => {
                let fits = g.entries.is_empty()
                    || (*first >= g.first && *first <= g.first + g.entries.len() as u64);
                if g.entries.is_empty() || !fits {
                    g.first = *first;
                    g.entries = entries.clone();
                } else {
                    g.entries.truncate((*first - g.first) as usize);
                    g.entries.extend(entries.iter().cloned());
                }
            }
            MOp::Truncate { index, .. } => {
                if !g.entries.is_empty() {
                    if *index <= g.first {
                        g.entries.clear();
                    } else {
                        let keep = (*index - g.first).min(g.entries.len() as u64);
                        g.entries.truncate(keep as usize);
                    }
                }
            }
            MOp::Purge { index, .. } => {
                if !g.entries.is_empty() && *index >= g.first {
                    let drop = (*index - g.first + 1).min(g.entries.len() as u64);
                    g.entries.drain(..drop as usize);
                    g.first = *index + 1;
                }
            }
            MOp::Put { key, value, .. } => {
                g.kv.insert(key.clone(), value.clone());
            }
            MOp::Delete { key, .. } => {
                g.kv.remove(key);
            }
            MOp::Vote { value, .. } => g.vote = Some(value.clone()),
            MOp::Committed { value, .. } => g.committed = Some(value.clone()),
            MOp::Remove { .. } => *g = GroupState::default(),
        }
        if g.entries.is_empty() {
            g.first = 0;
        }
        if g.is_blank() {
            self.groups.remove(&group);
        }
    }

    /// The first difference from `other`, for failure messages.
    pub fn diff(&self, other: &ModelState) -> String {
        let ids: BTreeSet<u64> = self
            .groups
            .keys()
            .chain(other.groups.keys())
            .copied()
            .collect();
        for id in ids {
            let blank = GroupState::default();
            let a = self.groups.get(&id).unwrap_or(&blank);
            let b = other.groups.get(&id).unwrap_or(&blank);
            if a == b {
                continue;
            }
            let range = |g: &GroupState| match g.last() {
                Some(l) => format!("{}..={}", g.first, l),
                None => "empty".to_string(),
            };
            let mut out = format!("group {id}: entries {} vs {}", range(a), range(b));
            if let Some(i) = (0..a.entries.len().min(b.entries.len()))
                .find(|&i| a.first != b.first || a.entries[i] != b.entries[i])
            {
                out += &format!(
                    "; first differing position {i}: {:?} vs {:?}",
                    short(&a.entries[i]),
                    short(&b.entries[i])
                );
            }
            if a.vote != b.vote {
                out += &format!(
                    "; vote {:?} vs {:?}",
                    a.vote.as_deref().map(short),
                    b.vote.as_deref().map(short)
                );
            }
            if a.committed != b.committed {
                out += "; committed differs";
            }
            if a.kv != b.kv {
                out += &format!("; keys {:?} vs {:?}", a.kv.len(), b.kv.len());
            }
            return out;
        }
        "no difference".into()
    }
}

fn short(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(24)]).into_owned();
    if b.len() > 24 {
        format!("{s}…({} B)", b.len())
    } else {
        s
    }
}

/// Runs `script` on `e` with no crash, each step expected to succeed; `on_gc` sees every GC
/// report (the tests that prove a workload exercises what their explorer then crashes).
pub fn replay(e: &Engine, script: &Script, mut on_gc: impl FnMut(multiraft_wal::GcReport)) {
    for step in &script.steps {
        match step {
            Step::Write { ops, .. } => e.write(to_batch(ops)).unwrap(),
            Step::Sync => e.sync().unwrap(),
            Step::Gc => on_gc(e.gc().unwrap()),
        }
    }
}

/// Builds the engine batch for a list of model operations.
pub fn to_batch(ops: &[MOp]) -> WriteBatch {
    let mut b = WriteBatch::new();
    for op in ops {
        match op {
            MOp::Append {
                group,
                first,
                entries,
            } => {
                b.append(*group, *first, entries.iter());
            }
            MOp::Truncate { group, index } => {
                b.truncate_from(*group, *index);
            }
            MOp::Purge { group, index } => {
                b.purge_to(*group, *index);
            }
            MOp::Put { group, key, value } => {
                b.put(*group, key, value);
            }
            MOp::Delete { group, key } => {
                b.delete(*group, key);
            }
            MOp::Vote { group, value } => {
                b.set_vote(*group, value);
            }
            MOp::Committed { group, value } => {
                b.set_committed(*group, value);
            }
            MOp::Remove { group } => {
                b.remove_group(*group);
            }
        }
    }
    b
}

/// How a batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Unsynced,
    Async,
}

#[derive(Debug, Clone)]
pub enum Step {
    Write { ops: Vec<MOp>, mode: Mode },
    Sync,
    Gc,
}

/// A scripted workload and the model state after each of its batches.
#[derive(Debug, Clone)]
pub struct Script {
    pub steps: Vec<Step>,
    /// `states[k]` is the state after the first `k` batches.
    pub states: Vec<ModelState>,
    /// Every group and key the script touches.
    pub groups: BTreeMap<u64, BTreeSet<Vec<u8>>>,
}

pub const KEYS: [&[u8]; 3] = [b"applied", b"conf", b"snap"];

/// A payload naming its group, index and batch, with a compressible or random filler.
pub fn payload(rng: &mut StdRng, group: u64, index: u64, batch: usize, max_fill: usize) -> Vec<u8> {
    let mut p = format!("g{group}:i{index}:b{batch}:").into_bytes();
    let fill = rng.gen_range(0..=max_fill);
    if rng.gen_bool(0.3) {
        p.extend(std::iter::repeat_n(b'z', fill));
    } else {
        p.extend((0..fill).map(|_| rng.gen::<u8>()));
    }
    p
}

/// Generates a workload: `steps` steps over `groups`, mixing synced, unsynced and async writes,
/// truncations, purges, votes, committed markers, keys, group removal, syncs and GC.
pub fn generate(seed: u64, steps: usize, groups: &[u64], max_fill: usize) -> Script {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut state = ModelState::default();
    let mut out = Vec::new();
    let mut states = vec![state.clone()];
    let mut touched: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut term = 0u64;
    let mut batch_no = 0usize;
    for step in 0..steps {
        let roll = rng.gen_range(0..100);
        if roll < 6 && step > 0 {
            out.push(Step::Gc);
            continue;
        }
        if roll < 10 && step > 0 {
            out.push(Step::Sync);
            continue;
        }
        batch_no += 1;
        let n_groups = rng.gen_range(1..=3.min(groups.len()));
        let mut chosen: Vec<u64> = Vec::new();
        while chosen.len() < n_groups {
            let g = groups[rng.gen_range(0..groups.len())];
            if !chosen.contains(&g) {
                chosen.push(g);
            }
        }
        let mut ops = Vec::new();
        for &g in &chosen {
            let cur = state.groups.get(&g).cloned().unwrap_or_default();
            let keys = touched.entry(g).or_default();
            let kind = rng.gen_range(0..100);
            match (kind, cur.last()) {
                (0..=9, Some(last)) if last > cur.first => {
                    // Cut the tail (never to empty here; truncate to first is rare below).
                    let index = rng.gen_range(cur.first + 1..=last);
                    ops.push(MOp::Truncate { group: g, index });
                }
                (10..=21, Some(last)) if last > cur.first => {
                    let index = rng.gen_range(cur.first..last);
                    ops.push(MOp::Purge { group: g, index });
                }
                (22..=23, Some(_)) => ops.push(MOp::Remove { group: g }),
                (24..=25, Some(_)) => ops.push(MOp::Truncate {
                    group: g,
                    index: cur.first,
                }),
                _ => {
                    let count = rng.gen_range(1..=4u64);
                    let first = match cur.last() {
                        // Now and then overwrite the last entry or two (an overlap replaces the tail).
                        Some(last) if rng.gen_bool(0.15) => last.saturating_sub(1).max(cur.first),
                        Some(last) => last + 1,
                        None => [1, 5, 1000][rng.gen_range(0..3)],
                    };
                    let entries = (0..count)
                        .map(|i| payload(&mut rng, g, first + i, batch_no, max_fill))
                        .collect();
                    ops.push(MOp::Append {
                        group: g,
                        first,
                        entries,
                    });
                }
            }
            if rng.gen_bool(0.15) {
                term += 1;
                ops.push(MOp::Vote {
                    group: g,
                    value: format!("term={term:08};node={}", rng.gen_range(1..4)).into_bytes(),
                });
            }
            if rng.gen_bool(0.15) {
                ops.push(MOp::Committed {
                    group: g,
                    value: format!("c{batch_no}").into_bytes(),
                });
            }
            if rng.gen_bool(0.15) {
                let key = KEYS[rng.gen_range(0..KEYS.len())].to_vec();
                keys.insert(key.clone());
                if rng.gen_bool(0.2) {
                    ops.push(MOp::Delete { group: g, key });
                } else {
                    ops.push(MOp::Put {
                        group: g,
                        key,
                        value: format!("v{batch_no}").into_bytes(),
                    });
                }
            }
        }
        for op in &ops {
            state.apply(op);
        }
        states.push(state.clone());
        let mode = match rng.gen_range(0..10) {
            0..=5 => Mode::Sync,
            6..=7 => Mode::Unsynced,
            _ => Mode::Async,
        };
        out.push(Step::Write { ops, mode });
    }
    Script {
        steps: out,
        states,
        groups: touched,
    }
}

/// Reads the state of every group the script may have touched; `Err` describes an anomaly (an
/// error while reading, a group nobody wrote, an entry past the ends).
pub fn observe(
    engine: &Engine,
    groups: &BTreeMap<u64, BTreeSet<Vec<u8>>>,
) -> Result<ModelState, String> {
    let mut state = ModelState::default();
    for g in engine.groups() {
        if !groups.contains_key(&g) {
            return Err(format!("group {g} appears but was never written"));
        }
    }
    for (&g, keys) in groups {
        let mut gs = GroupState::default();
        match (engine.first_index(g), engine.last_index(g)) {
            (Some(first), Some(last)) => {
                if last < first {
                    return Err(format!("group {g}: last {last} < first {first}"));
                }
                let got = engine
                    .entries(g, first..last + 1, usize::MAX)
                    .map_err(|e| format!("group {g}: entries({first}..={last}) failed: {e}"))?;
                if got.len() as u64 != last - first + 1 {
                    return Err(format!(
                        "group {g}: log not contiguous: entries({first}..={last}) returned {}",
                        got.len()
                    ));
                }
                for probe in [first, last] {
                    let one = engine
                        .entry(g, probe)
                        .map_err(|e| format!("group {g}: entry({probe}) failed: {e}"))?;
                    if one.as_deref() != Some(&got[(probe - first) as usize][..]) {
                        return Err(format!(
                            "group {g}: entry({probe}) disagrees with entries()"
                        ));
                    }
                }
                let after = engine.entry(g, last + 1).map_err(|e| e.to_string())?;
                if after.is_some() {
                    return Err(format!(
                        "group {g}: entry {} exists past last_index",
                        last + 1
                    ));
                }
                if first > 0
                    && engine
                        .entry(g, first - 1)
                        .map_err(|e| e.to_string())?
                        .is_some()
                {
                    return Err(format!(
                        "group {g}: entry {} exists before first_index",
                        first - 1
                    ));
                }
                gs.first = first;
                gs.entries = got;
            }
            (None, None) => {}
            (f, l) => return Err(format!("group {g}: first_index {f:?} but last_index {l:?}")),
        }
        gs.vote = engine.vote(g);
        gs.committed = engine.committed(g);
        for k in keys {
            if let Some(v) = engine.get(g, k) {
                gs.kv.insert(k.clone(), v);
            }
        }
        if !gs.is_blank() {
            state.groups.insert(g, gs);
        }
    }
    Ok(state)
}

/// Engine options for a simulated file system.
pub fn sim_options(fs: &SimFs, prefill: bool) -> Options {
    Options::default()
        .segment_size(4096)
        .compression_threshold(256)
        .recovery_threads(2)
        .prefill_segments(prefill)
        .gc_rewrite_max_entries(8)
        .file_system(Arc::new(fs.clone()))
}

pub const DIR: &str = "/data/wal";

/// What a (possibly crashed) run established.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Batches handed to the engine (the last may have failed).
    pub attempted: usize,
    /// Every batch below this was acknowledged durable.
    pub durable: usize,
    /// Problems seen while running (unexpected errors, callbacks called twice, live mismatches).
    pub problems: Vec<String>,
}

/// Runs the script until the first error (the crash). With `check_live`, compares the engine's
/// live state with the model after every step.
pub fn run_script(fs: &SimFs, script: &Script, prefill: bool, check_live: bool) -> Outcome {
    let mut out = Outcome::default();
    let n_batches = script.states.len() - 1;
    let acked = Arc::new(Mutex::new(vec![false; n_batches]));
    let calls = Arc::new(Mutex::new(vec![0u32; n_batches]));
    let mut async_ok = Vec::new();
    let opened = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(DIR, sim_options(fs, prefill))
    }));
    let engine = match opened {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            if !fs.is_crashed() {
                out.problems
                    .push(format!("open of an empty directory failed: {e}"));
            }
            return out;
        }
        Err(_) => {
            out.problems.push("open panicked".into());
            return out;
        }
    };
    let mut batch = 0usize;
    let result = catch_unwind(AssertUnwindSafe(|| {
        for step in &script.steps {
            let res = match step {
                Step::Write { ops, mode } => {
                    let i = batch;
                    batch += 1;
                    out.attempted = batch;
                    let wb = to_batch(ops);
                    match mode {
                        Mode::Sync => engine.write(wb).map(|()| {
                            acked.lock().unwrap()[i] = true;
                        }),
                        Mode::Unsynced => engine.write_unsynced(wb),
                        Mode::Async => {
                            let acked = acked.clone();
                            let calls = calls.clone();
                            let r = engine.write_async(wb, move |r| {
                                calls.lock().unwrap()[i] += 1;
                                if r.is_ok() {
                                    acked.lock().unwrap()[i] = true;
                                }
                            });
                            if r.is_ok() {
                                async_ok.push(i);
                            }
                            r
                        }
                    }
                }
                Step::Sync => engine.sync().map(|()| {
                    for a in acked.lock().unwrap()[..batch].iter_mut() {
                        *a = true;
                    }
                }),
                Step::Gc => engine.gc().map(|_| ()),
            };
            if let Err(e) = res {
                if !fs.is_crashed() {
                    out.problems.push(format!(
                        "unexpected error before any crash at batch {batch}: {e}"
                    ));
                }
                return;
            }
            if check_live {
                match observe(&engine, &script.groups) {
                    Ok(seen) if seen == script.states[batch] => {}
                    Ok(seen) => out.problems.push(format!(
                        "live state after batch {batch} differs from the model: {}",
                        seen.diff(&script.states[batch])
                    )),
                    Err(e) => out
                        .problems
                        .push(format!("live state after batch {batch}: {e}")),
                }
            }
        }
    }));
    if result.is_err() {
        out.problems
            .push(format!("the engine panicked during batch {batch}"));
    }
    if catch_unwind(AssertUnwindSafe(|| drop(engine))).is_err() {
        out.problems.push("dropping the engine panicked".into());
    }
    let calls = calls.lock().unwrap();
    for &i in &async_ok {
        if calls[i] != 1 {
            out.problems.push(format!(
                "write_async callback of batch {} called {} times (want exactly once)",
                i + 1,
                calls[i]
            ));
        }
    }
    let acked = acked.lock().unwrap();
    out.durable = acked.iter().rposition(|&a| a).map_or(0, |i| i + 1);
    out
}

/// Opens the engine on an image and checks it against the model: the state must be that after
/// some prefix of `lo..=hi` batches. Returns the prefix matched, or a description of the failure.
pub fn check_recovery(
    img: &SimFs,
    script: &Script,
    prefill: bool,
    lo: usize,
    hi: usize,
) -> Result<(Engine, usize), String> {
    let opened = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(DIR, sim_options(img, prefill))
    }));
    let engine = match opened {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return Err(format!("open failed after a power cut: {e}")),
        Err(_) => return Err("open panicked".into()),
    };
    let seen = catch_unwind(AssertUnwindSafe(|| observe(&engine, &script.groups)))
        .map_err(|_| "reading after recovery panicked".to_string())??;
    if let Some(k) = (lo..=hi).rev().find(|&k| script.states[k] == seen) {
        return Ok((engine, k));
    }
    let hint = if let Some(k) = (0..lo).rev().find(|&k| script.states[k] == seen) {
        format!(
            "ACKNOWLEDGED DATA LOST: the state is that after {k} batches but {lo} were acknowledged"
        )
    } else {
        format!(
            "state matches no prefix; vs the acknowledged prefix {lo}: {}; vs all {hi} batches: {}",
            seen.diff(&script.states[lo]),
            seen.diff(&script.states[hi])
        )
    };
    Err(format!(
        "recovered a state outside {lo}..={hi} batches: {hint}"
    ))
}

#[derive(Debug, Default)]
pub struct Tally {
    pub crash_points: u64,
    pub recoveries: u64,
    pub second_crashes: u64,
    pub writes_after_recovery: u64,
    /// Process kills followed by a recovery, a write and a power cut.
    pub kills: u64,
    /// Batches served after a kill that were not acknowledged before it (they must survive the
    /// power cut too).
    pub served_unacked: u64,
    pub failures: Vec<String>,
}

/// The "process kill, then power cut" variant: the process dies at an I/O point (the live
/// image survives, unsynced data still only in the page cache); recovery serves what it finds;
/// one more synced write; then the power goes (only durable data survives; `variant` decides
/// what of the rest). Every batch acknowledged before the kill, every batch recovery served
/// after it, and the write after it must survive both. Returns how many batches recovery served
/// beyond the acknowledged ones.
fn kill_then_power_cut(
    fs: &SimFs,
    script: &Script,
    prefill: bool,
    run: &Outcome,
    variant: CrashVariant,
    seed: u64,
) -> Result<usize, String> {
    let killed = fs.kill_image();
    let (engine, served) = check_recovery(&killed, script, prefill, run.durable, run.attempted)
        .map_err(|e| format!("after the kill: {e}"))?;
    let before = observe(&engine, &script.groups)?;
    let op = append_one_synced(&engine, script, &before, "the kill")?;
    // The power goes while this engine is still running: no clean shutdown.
    let cut = killed.crash_image(variant, seed);
    drop(engine);
    let mut want = before;
    want.apply(&op);
    let engine = Engine::open(DIR, sim_options(&cut, prefill))
        .map_err(|e| format!("open after the kill and the power cut ({variant:?}): {e}"))?;
    let seen = observe(&engine, &script.groups)?;
    if seen != want {
        return Err(format!(
            "after the kill (recovery served {served} batches, {} acknowledged) and a power cut \
             ({variant:?}): {}",
            run.durable,
            seen.diff(&want)
        ));
    }
    Ok(served - run.durable)
}

/// Writes one more batch after a recovery, cuts the power (dropping unsynced data), reopens and
/// checks that it survived: recovery must leave a log that can be appended to.
fn write_after_recovery(
    engine: Engine,
    img: &SimFs,
    script: &Script,
    prefill: bool,
) -> Result<(), String> {
    let before = observe(&engine, &script.groups)?;
    let op = append_one_synced(&engine, script, &before, "recovery")?;
    drop(engine);
    let mut want = before;
    want.apply(&op);
    let img2 = img.crash_image(CrashVariant::DropAll, 0);
    let engine = Engine::open(DIR, sim_options(&img2, prefill))
        .map_err(|e| format!("reopen after a write after recovery failed: {e}"))?;
    let seen = observe(&engine, &script.groups)?;
    if seen != want {
        return Err(format!(
            "a synced write made after recovery was lost or changed: {}",
            seen.diff(&want)
        ));
    }
    Ok(())
}

fn explore_seed(seed: u64, only_point: Option<u64>, tally: &mut Tally) {
    let prefill = seed % 2 == 1;
    let script = generate(seed, 70, &[1, 2, 3, 77, 1 << 40, 9], 160);
    explore_script(seed, &script, prefill, only_point, tally);
}

/// Runs `script` cleanly, then with a power cut at every I/O point (or `only_point`), checking
/// every recovery (see the module's doc); failures go to `tally`.
pub fn explore_script(
    seed: u64,
    script: &Script,
    prefill: bool,
    only_point: Option<u64>,
    tally: &mut Tally,
) {
    let n_batches = script.states.len() - 1;

    // A clean run: counts the I/O points and checks the model against the live engine.
    let fs = SimFs::new();
    let clean = run_script(&fs, script, prefill, true);
    for p in &clean.problems {
        tally
            .failures
            .push(format!("seed {seed:#x}, no crash: {p}"));
    }
    let points = fs.io_points();
    let img = fs.crash_image(CrashVariant::DropAll, 0);
    if let Err(e) = check_recovery(&img, script, prefill, clean.durable, n_batches) {
        tally
            .failures
            .push(format!("seed {seed:#x}, clean shutdown then reopen: {e}"));
    }
    let segments = fs
        .live_names(Path::new(DIR))
        .iter()
        .filter(|n| n.ends_with(".wal"))
        .count();
    println!(
        "crash explorer: seed {seed:#x}: {} steps, {n_batches} batches, {points} I/O points, \
         {segments} live segments at the end, prefill {prefill}",
        script.steps.len()
    );

    let mut rng = StdRng::seed_from_u64(seed ^ 0xC0FFEE);
    let range = match only_point {
        Some(k) => k..k + 1,
        None => 0..points,
    };
    for k in range {
        let fs = SimFs::new();
        fs.crash_at(k);
        let run = run_script(&fs, script, prefill, false);
        tally.crash_points += 1;
        for p in &run.problems {
            tally
                .failures
                .push(format!("seed {seed:#x}, crash point {k}: {p}"));
        }
        // The same point as a process kill, then a power cut (every other point: a random
        // subset of the unsynced operations survives it, else none).
        let variant = if k % 2 == 0 {
            CrashVariant::DropAll
        } else {
            CrashVariant::Random
        };
        tally.kills += 1;
        tally.recoveries += 2;
        match kill_then_power_cut(&fs, script, prefill, &run, variant, seed ^ k) {
            Ok(extra) => tally.served_unacked += extra as u64,
            Err(e) => tally.failures.push(format!(
                "seed {seed:#x}, kill at point {k} then power cut (MRWAL_CRASH_SEED={seed} \
                 MRWAL_CRASH_POINT={k}): {e}"
            )),
        }
        for variant in CrashVariant::ALL {
            let img_seed = seed ^ (k << 8) ^ variant as u64;
            let img = fs.crash_image(variant, img_seed);
            // Recovery writes into `img`; the second crash starts from the image as it was.
            let pristine = img.crash_image(CrashVariant::KeepAll, 0);
            let repro = format!(
                "seed {seed:#x}, crash point {k}, variant {variant:?}, image seed {img_seed:#x} \
                 (MRWAL_CRASH_SEED={seed} MRWAL_CRASH_POINT={k})"
            );
            tally.recoveries += 1;
            let (engine, _) =
                match check_recovery(&img, script, prefill, run.durable, run.attempted) {
                    Ok(x) => x,
                    Err(e) => {
                        tally.failures.push(format!("{repro}: {e}"));
                        continue;
                    }
                };
            if k % 3 == 0 {
                tally.writes_after_recovery += 1;
                if let Err(e) = write_after_recovery(engine, &img, script, prefill) {
                    tally.failures.push(format!("{repro}: {e}"));
                }
            } else {
                drop(engine);
            }
            // A second crash, during recovery itself, on a sample of the images.
            if rng.gen_ratio(1, 6) {
                let probe = pristine.crash_image(CrashVariant::KeepAll, 0);
                let _ = Engine::open(DIR, sim_options(&probe, prefill));
                let recovery_points = probe.io_points();
                if recovery_points == 0 {
                    continue;
                }
                let r = rng.gen_range(0..recovery_points);
                let second = pristine.crash_image(CrashVariant::KeepAll, 0);
                second.crash_at(r);
                let res = catch_unwind(AssertUnwindSafe(|| {
                    Engine::open(DIR, sim_options(&second, prefill))
                }));
                if res.is_err() {
                    tally.failures.push(format!(
                        "{repro}, second crash at recovery point {r}: open panicked"
                    ));
                    continue;
                }
                drop(res);
                let v2 = CrashVariant::ALL[rng.gen_range(0..4)];
                let img2 = second.crash_image(v2, img_seed ^ r);
                tally.second_crashes += 1;
                tally.recoveries += 1;
                if let Err(e) = check_recovery(&img2, script, prefill, run.durable, run.attempted) {
                    tally.failures.push(format!(
                        "{repro}, second crash at recovery point {r} of {recovery_points} ({v2:?}): {e}"
                    ));
                }
            }
        }
    }
}

/// Explores `script` with and without zero-fill (seeds `seed` and `seed + 1`), prints the tally
/// under `label`, and asserts no failure and more than `min_points` crash points.
pub fn explore_both_prefills(label: &str, seed: u64, script: &Script, min_points: u64) {
    let mut tally = Tally::default();
    for prefill in [false, true] {
        explore_script(seed + u64::from(prefill), script, prefill, None, &mut tally);
    }
    println!(
        "{label} crash explorer: {} crash points, {} recoveries, {} failures",
        tally.crash_points,
        tally.recoveries,
        tally.failures.len()
    );
    print_failures(&tally.failures);
    assert!(tally.failures.is_empty(), "{}", tally.failures[0]);
    assert!(
        tally.crash_points > min_points,
        "{} crash points",
        tally.crash_points
    );
}

/// Prints failures grouped by kind (digits masked), with the first reproducer of each kind.
pub fn print_failures(failures: &[String]) {
    let mut kinds: BTreeMap<String, (usize, &String)> = BTreeMap::new();
    for f in failures {
        let what = f.rsplit_once("): ").map_or(f.as_str(), |(_, w)| w);
        let key: String = what
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(160)
            .collect();
        kinds.entry(key).or_insert((0, f)).0 += 1;
    }
    for (kind, (count, first)) in &kinds {
        println!("FAIL x{count}: {kind}\n    first: {first}");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    if v == "random" {
        return Some(rand::random());
    }
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn crash_at_every_io_point() {
    let started = Instant::now();
    let seeds = env_u64("MRWAL_CRASH_ITERS").unwrap_or(6);
    let base = env_u64("MRWAL_CRASH_SEED").unwrap_or(0x5eed_0000);
    let only_point = env_u64("MRWAL_CRASH_POINT");
    println!("crash explorer: seeds {base:#x}..+{seeds} (MRWAL_CRASH_SEED / MRWAL_CRASH_ITERS)");
    let mut tally = Tally::default();
    for s in 0..seeds {
        explore_seed(base + s, only_point, &mut tally);
    }
    println!(
        "crash explorer: {} crash points x 4 variants + a kill, {} recoveries ({} after a second \
         crash during recovery, {} followed by a write and another crash, {} after a kill then \
         a write and a power cut, {} batches served after a kill beyond those acknowledged), \
         {} failures, {:.1}s",
        tally.crash_points,
        tally.recoveries,
        tally.second_crashes,
        tally.writes_after_recovery,
        tally.kills,
        tally.served_unacked,
        tally.failures.len(),
        started.elapsed().as_secs_f64()
    );
    print_failures(&tally.failures);
    assert!(
        tally.failures.is_empty(),
        "{} crash cases failed; first: {}",
        tally.failures.len(),
        tally.failures[0]
    );
    if only_point.is_none() && seeds >= 3 {
        assert!(
            tally.recoveries >= 2000,
            "only {} recoveries ran",
            tally.recoveries
        );
    }
}

/// Appends one entry (synced) to the first group of the script, after what `before` shows it
/// holds; returns the op for the model. `after` names the moment, for messages and payload.
fn append_one_synced(
    engine: &Engine,
    script: &Script,
    before: &ModelState,
    after: &str,
) -> Result<MOp, String> {
    let g = *script.groups.keys().next().ok_or("no groups")?;
    let first = before
        .groups
        .get(&g)
        .and_then(GroupState::last)
        .map_or(1, |l| l + 1);
    let op = MOp::Append {
        group: g,
        first,
        entries: vec![format!("written after {after}").into_bytes()],
    };
    engine
        .write(to_batch(std::slice::from_ref(&op)))
        .map_err(|e| format!("write after {after} failed: {e}"))?;
    Ok(op)
}
