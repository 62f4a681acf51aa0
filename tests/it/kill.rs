//! Process kills on the real file system: a child process (this test binary, re-run in child
//! mode) writes batches and prints each acknowledged one; the parent kills it with SIGKILL at a
//! random point, reopens the directory and checks that every acknowledged batch is there, intact
//! (the state is that after some prefix of the batches holding every acknowledged one).
//!
//! Three workloads: W1 synced appends to 16 groups; W2 multi-group `write_async` batches acked from
//! their callbacks; W3 the crash explorer's mixed script (truncate, purge, gc, votes, keys, group
//! removal, 4 KiB segments). `MRWAL_KILLS=n` sets the kills per workload (default 50).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use multiraft_wal::{Engine, Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash_explorer::{
    generate, observe, payload, to_batch, MOp, Mode, ModelState, Script, Step,
};

const CHILD_ENV: &str = "MRWAL_KILL_CHILD";

fn options(workload: u32) -> Options {
    let o = Options::default().recovery_threads(2);
    match workload {
        3 => o
            .segment_size(4096)
            .compression_threshold(256)
            .gc_rewrite_max_entries(8),
        _ => o.segment_size(64 << 10),
    }
}

/// The deterministic script of a workload; the child skips the model states (`with_states`).
fn workload_script(workload: u32, seed: u64, with_states: bool) -> Script {
    match workload {
        1 | 2 => {
            let mut rng = StdRng::seed_from_u64(seed);
            let groups: Vec<u64> = (0..16).map(|g| g * 7 + 1).collect();
            let mut state = ModelState::default();
            let mut script = Script {
                steps: Vec::new(),
                states: vec![state.clone()],
                groups: groups.iter().map(|&g| (g, Default::default())).collect(),
            };
            for b in 1..=600usize {
                let touched = if workload == 1 { 1 } else { 3 };
                let mut ops = Vec::new();
                for t in 0..touched {
                    let g = groups[(b * 5 + t * 3) % groups.len()];
                    let first = state
                        .groups
                        .get(&g)
                        .map_or(1, |s| s.first + s.entries.len() as u64);
                    let count = rng.gen_range(1..=8u64);
                    let entries = (0..count)
                        .map(|i| payload(&mut rng, g, first + i, b, 256))
                        .collect();
                    let op = MOp::Append {
                        group: g,
                        first,
                        entries,
                    };
                    state.apply(&op);
                    ops.push(op);
                }
                if with_states {
                    script.states.push(state.clone());
                }
                let mode = if workload == 1 {
                    Mode::Sync
                } else {
                    Mode::Async
                };
                script.steps.push(Step::Write { ops, mode });
            }
            script
        }
        _ => generate(seed, 700, &[1, 2, 3, 4, 5, 6, 1 << 33], 200),
    }
}

fn ack(k: usize) {
    let mut out = std::io::stdout().lock();
    // A failed print only loses an acknowledgement: the parent then checks less.
    let _ = writeln!(out, "ACK {k}");
    let _ = out.flush();
}

/// Child mode: run a workload in the given directory, printing `ACK k` once batch k (and so every
/// batch before it) is durable, until killed.
#[test]
#[ignore = "child process of kill::kill_child_processes_at_random_points"]
fn kill_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let workload: u32 = parts.next().unwrap().parse().unwrap();
    let seed: u64 = parts.next().unwrap().parse().unwrap();
    let dir = parts.next().unwrap().to_owned();
    let script = workload_script(workload, seed, false);
    let engine = Engine::open(&dir, options(workload)).expect("child open");
    let mut batch = 0usize;
    for step in &script.steps {
        match step {
            Step::Write { ops, mode } => {
                batch += 1;
                let k = batch;
                let wb = to_batch(ops);
                match mode {
                    Mode::Sync => {
                        engine.write(wb).expect("child write");
                        ack(k);
                    }
                    Mode::Unsynced => engine.write_unsynced(wb).expect("child write"),
                    Mode::Async => engine
                        .write_async(wb, move |r| {
                            if r.is_ok() {
                                ack(k);
                            }
                        })
                        .expect("child write"),
                }
            }
            Step::Sync => {
                engine.sync().expect("child sync");
                ack(batch);
            }
            Step::Gc => {
                engine.gc().expect("child gc");
            }
        }
    }
    engine.sync().expect("child final sync");
    ack(batch);
    println!("DONE");
}

struct KillRun {
    killed: bool,
    acked: usize,
    recovered_prefix: usize,
}

fn one_kill(
    workload: u32,
    seed: u64,
    kill_after: usize,
    dir: &Path,
    script: &Script,
) -> Result<KillRun, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "kill::kill_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{workload}:{seed}:{}", dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = 0usize;
    let mut acks_seen = 0usize;
    let mut done = false;
    let mut killed = false;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(k) = line.strip_prefix("ACK ") {
            acked = acked.max(k.trim().parse().map_err(|_| format!("bad line {line:?}"))?);
            acks_seen += 1;
            if acks_seen >= kill_after {
                child.kill().map_err(|e| format!("kill: {e}"))?;
                killed = true;
                break;
            }
        } else if line == "DONE" {
            done = true;
        }
    }
    // Lines printed before the kill are still in the pipe: they were acknowledged too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(k) = line.strip_prefix("ACK ") {
            if let Ok(k) = k.trim().parse::<usize>() {
                acked = acked.max(k);
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !killed && !done {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!(
            "the child died on its own ({status}): {}",
            err.lines().rev().take(15).collect::<Vec<_>>().join(" | ")
        ));
    }
    // Reopen in this process and compare with the model.
    let engine = Engine::open(dir, options(workload))
        .map_err(|e| format!("open after SIGKILL failed: {e}"))?;
    let seen = observe(&engine, &script.groups)?;
    let n = script.states.len() - 1;
    match (acked..=n).find(|&k| script.states[k] == seen) {
        Some(k) => Ok(KillRun {
            killed,
            acked,
            recovered_prefix: k,
        }),
        None => {
            let lost = (0..acked).rev().find(|&k| script.states[k] == seen);
            Err(match lost {
                Some(k) => format!(
                    "ACKNOWLEDGED DATA LOST: {acked} batches acknowledged, state is that after {k}"
                ),
                None => format!(
                    "state matches no prefix >= {acked}: {}",
                    seen.diff(&script.states[acked])
                ),
            })
        }
    }
}

#[test]
fn kill_child_processes_at_random_points() {
    let started = Instant::now();
    let kills: usize = std::env::var("MRWAL_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let base: u64 = std::env::var("MRWAL_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1c11_0000);
    let mut rng = StdRng::seed_from_u64(base);
    let mut failures = Vec::new();
    let mut total_kills = 0;
    for workload in 1..=3u32 {
        let t = Instant::now();
        let script = workload_script(workload, base + u64::from(workload), true);
        let (mut w_kills, mut acked_sum, mut extra) = (0, 0, 0);
        for i in 0..kills {
            let seed = base + u64::from(workload);
            // Mostly early kills (cheap), now and then a long run.
            let kill_after = if rng.gen_ratio(1, 5) {
                rng.gen_range(1..=150)
            } else {
                rng.gen_range(1..=25)
            };
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("wal");
            match one_kill(workload, seed, kill_after, &dir, &script) {
                Ok(run) => {
                    if run.killed {
                        w_kills += 1;
                    }
                    acked_sum += run.acked;
                    extra += run.recovered_prefix - run.acked;
                }
                Err(e) => failures.push(format!(
                    "workload W{workload}, seed {seed:#x}, kill #{i} after {kill_after} acks \
                     (MRWAL_KILL_SEED={base}): {e}"
                )),
            }
        }
        total_kills += w_kills;
        println!(
            "kill: W{workload}: {w_kills} SIGKILLs, {acked_sum} acknowledged batches all recovered \
             (+{extra} unacknowledged batches also found), {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "kill: {total_kills} kills across 3 workloads, {} failures, {:.1}s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} kill runs failed; first: {}",
        failures.len(),
        failures[0]
    );
    assert!(
        total_kills >= 3 * kills * 9 / 10,
        "only {total_kills} runs were killed before finishing"
    );
}
