//! I/O faults on the simulated file system: EIO at every write and every fdatasync must poison the
//! engine (nothing acknowledged after it, acknowledged data intact); EIO on any other mutating call
//! must never break the durability promise; ENOSPC at every write must give `Error::NoSpace`, keep
//! the engine usable, and let writes resume once space is back.

use std::sync::{Arc, Mutex};

use multiraft_wal::{Engine, Error};

use crate::crash_explorer::{
    check_recovery, generate, observe, sim_options, to_batch, Mode, Script, Step, DIR,
};
use crate::simfs::{CrashVariant, Fault, Op, SimFs};

const SEED: u64 = 0xFA17_0000;

fn script(seed: u64) -> Script {
    generate(seed, 40, &[1, 2, 3, 500], 160)
}

/// Result of one step: `Ok(acked_now)` or the error.
struct Runner {
    engine: Engine,
    batch: usize,
    acked: Arc<Mutex<Vec<bool>>>,
}

impl Runner {
    fn new(engine: Engine, script: &Script) -> Self {
        let n = script.states.len() - 1;
        Runner {
            engine,
            batch: 0,
            acked: Arc::new(Mutex::new(vec![false; n])),
        }
    }

    /// Runs one step with `mode` overriding the script's write mode if given.
    fn step(&mut self, step: &Step, mode: Option<Mode>) -> Result<(), Error> {
        match step {
            Step::Write { ops, mode: m } => {
                let i = self.batch;
                let wb = to_batch(ops);
                let r = match mode.unwrap_or(*m) {
                    Mode::Sync => self.engine.write(wb).map(|()| {
                        self.acked.lock().unwrap()[i] = true;
                    }),
                    Mode::Unsynced => self.engine.write_unsynced(wb),
                    Mode::Async => {
                        let acked = self.acked.clone();
                        self.engine.write_async(wb, move |r| {
                            if r.is_ok() {
                                acked.lock().unwrap()[i] = true;
                            }
                        })
                    }
                };
                if r.is_ok() {
                    self.batch += 1;
                }
                r
            }
            Step::Sync => self.engine.sync().map(|()| {
                let done = self.batch;
                for a in self.acked.lock().unwrap()[..done].iter_mut() {
                    *a = true;
                }
            }),
            Step::Gc => self.engine.gc().map(|_| ()),
        }
    }

    fn durable_prefix(&self) -> usize {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .rposition(|&a| a)
            .map_or(0, |i| i + 1)
    }
}

/// Injects EIO at the `nth` call of `op` and runs the script. When the fault hits a live segment
/// (a record write or its fdatasync), the engine must poison itself: that call and every later
/// write or sync fail (with `Error::Poisoned` once poisoned) and nothing is acknowledged after it.
/// Elsewhere (a segment being prepared, the checkpoint's temp file, a directory) it may retry or
/// fail the call. In every case what was acknowledged survives a power cut. Returns the failures.
fn eio_case(script: &Script, op: Op, nth: u64) -> Vec<String> {
    let mut failures = Vec::new();
    let fs = SimFs::new();
    fs.fail_nth(op, nth, Fault::Eio);
    let ctx = format!("EIO on {op:?} #{nth}");
    let engine = match Engine::open(DIR, sim_options(&fs, false)) {
        Ok(e) => e,
        Err(e) => {
            // Failing to open an empty directory is fine: nothing was acknowledged.
            if fs.fired().is_empty() {
                failures.push(format!("{ctx}: open failed without the fault: {e}"));
            }
            return failures;
        }
    };
    let hit_log = |fs: &SimFs| fs.fired().iter().any(|(_, name)| name.ends_with(".wal"));
    let mut run = Runner::new(engine, script);
    let mut first_error: Option<Error> = None;
    for step in &script.steps {
        let writes = matches!(step, Step::Write { .. } | Step::Sync);
        let poisoned_before = run.engine.is_poisoned();
        let r = run.step(step, None);
        match (&first_error, r) {
            (None, Ok(())) => {
                if poisoned_before && writes {
                    failures.push(format!(
                        "{ctx} (hit {:?}): a write or sync succeeded on an engine already poisoned",
                        fs.fired()
                    ));
                }
            }
            (None, Err(e)) => {
                if fs.fired().is_empty() {
                    failures.push(format!("{ctx}: error before the fault fired: {e}"));
                }
                let poisoned = run.engine.is_poisoned();
                if hit_log(&fs) && !poisoned {
                    failures.push(format!(
                        "{ctx} (hit {:?}): the engine is not poisoned after {e}",
                        fs.fired()
                    ));
                }
                first_error = Some(e);
                if !poisoned {
                    // Not poisoned: the failed batch is not applied; stop where the model ends.
                    break;
                }
            }
            (Some(_), Ok(())) => {
                if writes {
                    failures.push(format!(
                        "{ctx}: a write or sync succeeded on a poisoned engine"
                    ));
                }
            }
            (Some(_), Err(e)) => {
                if writes && !matches!(e, Error::Poisoned { .. }) {
                    failures.push(format!(
                        "{ctx}: a write on a poisoned engine failed with {e:?}, want Error::Poisoned"
                    ));
                }
            }
        }
    }
    if hit_log(&fs) && !run.engine.is_poisoned() {
        failures.push(format!(
            "{ctx} (hit {:?}): a segment write or fdatasync failed but the engine is not poisoned",
            fs.fired()
        ));
    }
    let Runner {
        engine,
        acked,
        batch,
        ..
    } = run;
    drop(engine);
    let durable = acked
        .lock()
        .unwrap()
        .iter()
        .rposition(|&a| a)
        .map_or(0, |i| i + 1);
    // A callback still pending when the error was reported may yet get Ok, from an fdatasync
    // that began before the failure: legitimate only if that batch really is durable, which the
    // power cut below checks (no write after the error can succeed: checked above).
    // The batch whose write failed may or may not have reached the log.
    let n = script.states.len() - 1;
    let hi = if first_error.is_some() {
        (batch + 1).min(n)
    } else {
        batch
    };
    let img = fs.crash_image(CrashVariant::DropAll, nth);
    if let Err(e) = check_recovery(&img, script, false, durable.min(hi), hi) {
        failures.push(format!("{ctx} (first error: {first_error:?}): {e}"));
    }
    failures
}

fn clean_counts(script: &Script) -> SimFs {
    let fs = SimFs::new();
    let engine = Engine::open(DIR, sim_options(&fs, false)).expect("open");
    let mut run = Runner::new(engine, script);
    for step in &script.steps {
        run.step(step, None).expect("clean run");
    }
    run.engine.sync().expect("final sync");
    let n = run.batch;
    for a in run.acked.lock().unwrap()[..n].iter_mut() {
        *a = true;
    }
    assert_eq!(
        run.durable_prefix(),
        script.states.len() - 1,
        "a clean run acknowledges all"
    );
    fs
}

#[test]
fn eio_on_every_write_and_fdatasync_poisons() {
    let script = script(SEED);
    let clean = clean_counts(&script);
    let mut failures = Vec::new();
    let mut cases = 0;
    // Three rounds: the flusher thread races with writers, so each round interleaves differently.
    for _round in 0..3 {
        for op in [Op::Write, Op::SyncData] {
            for nth in 1..=clean.count(op) {
                cases += 1;
                failures.extend(eio_case(&script, op, nth));
            }
        }
    }
    println!(
        "faults: EIO at each of {} writes and {} fdatasyncs, 3 rounds: {cases} cases, {} failures (seed {SEED:#x})",
        clean.count(Op::Write),
        clean.count(Op::SyncData),
        failures.len()
    );
    for f in failures.iter().take(30) {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} EIO cases failed; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn eio_on_every_other_call_keeps_acknowledged_data() {
    let script = script(SEED + 1);
    let clean = clean_counts(&script);
    let mut failures = Vec::new();
    let mut cases = 0;
    for op in [
        Op::Create,
        Op::Rename,
        Op::Remove,
        Op::SyncDir,
        Op::Allocate,
        Op::SetLen,
        Op::Open,
        Op::Read,
        Op::List,
    ] {
        for nth in 1..=clean.count(op) {
            cases += 1;
            failures.extend(eio_case(&script, op, nth));
        }
    }
    println!(
        "faults: EIO once on every other call: {cases} cases, {} failures (seed {:#x})",
        failures.len(),
        SEED + 1
    );
    for f in failures.iter().take(30) {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} EIO cases failed; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn enospc_is_clear_and_writes_resume() {
    let script = script(SEED + 2);
    let clean = clean_counts(&script);
    let mut failures = Vec::new();
    let mut hit = 0;
    let total = clean.count(Op::Write);
    for nth in 1..=total {
        let ctx = format!("seed {:#x}, disk full from write #{nth}", SEED + 2);
        let fs = SimFs::new();
        fs.fill_at(Op::Write, nth);
        let engine = match Engine::open(DIR, sim_options(&fs, false)) {
            Ok(e) => e,
            Err(e) => {
                if !matches!(e, Error::NoSpace { .. }) {
                    failures.push(format!(
                        "{ctx}: open failed with {e:?}, want Error::NoSpace"
                    ));
                }
                continue;
            }
        };
        let mut run = Runner::new(engine, &script);
        let mut full = true;
        for step in &script.steps {
            match run.step(step, Some(Mode::Sync)) {
                Ok(()) => {}
                Err(e) if full => {
                    hit += 1;
                    if !matches!(e, Error::NoSpace { .. }) {
                        failures.push(format!("{ctx}: got {e:?}, want Error::NoSpace"));
                    }
                    if run.engine.is_poisoned() {
                        failures.push(format!("{ctx}: ENOSPC poisoned the engine"));
                    }
                    // The failed batch is not visible; what came before is.
                    match observe(&run.engine, &script.groups) {
                        Ok(seen) if seen == script.states[run.batch] => {}
                        Ok(seen) => failures.push(format!(
                            "{ctx}: after ENOSPC the state is not that of {} batches: {}",
                            run.batch,
                            seen.diff(&script.states[run.batch])
                        )),
                        Err(e) => failures.push(format!("{ctx}: reading after ENOSPC: {e}")),
                    }
                    // Still full: fails again, cleanly.
                    if let Err(e) = run.step(step, Some(Mode::Sync)) {
                        if !matches!(e, Error::NoSpace { .. }) {
                            failures
                                .push(format!("{ctx}: retry while full got {e:?}, want NoSpace"));
                        }
                    } else {
                        failures.push(format!("{ctx}: a write succeeded while the disk was full"));
                        break;
                    }
                    fs.set_full(false);
                    full = false;
                    if let Err(e) = run.step(step, Some(Mode::Sync)) {
                        failures.push(format!(
                            "{ctx}: the write did not resume once space was back: {e}"
                        ));
                        break;
                    }
                }
                Err(e) => {
                    failures.push(format!("{ctx}: error after space came back: {e}"));
                    break;
                }
            }
        }
        let n = script.states.len() - 1;
        if failures.is_empty() {
            if run.batch != n {
                failures.push(format!("{ctx}: only {} of {n} batches written", run.batch));
            }
            let durable = run.durable_prefix();
            drop(run);
            let img = fs.crash_image(CrashVariant::DropAll, nth);
            if let Err(e) = check_recovery(&img, &script, false, durable, n) {
                failures.push(format!("{ctx}: {e}"));
            }
        }
        if !failures.is_empty() {
            break;
        }
    }
    println!(
        "faults: ENOSPC from each of {total} writes: {hit} writes refused, {} failures",
        failures.len()
    );
    for f in failures.iter().take(30) {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} ENOSPC cases failed; first: {}",
        failures.len(),
        failures[0]
    );
    assert!(hit > 0, "no write ever hit ENOSPC");
}
