//! The reported bug, through the openraft adapter: a cleanly closed directory written by
//! [`GroupLogStore`]s (appends, truncations, purges, votes, committed markers over many
//! groups, every operation acknowledged), then one fault at a time (bit flips, truncations,
//! zeroed sectors, appended garbage, deleted files). Opening must fail with a typed error, or
//! every group must read back exactly what was acknowledged: never an entry a truncation removed,
//! never a wrong term, never a panic.

use std::collections::BTreeMap;
use std::io;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures_util::FutureExt;
use multiraft_wal::raft::kv::{KvRequest, KvTypeConfig};
use multiraft_wal::raft::GroupLogStore;
use multiraft_wal::{Engine, Options, RecoveryMode};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;
use openraft::{Entry, EntryPayload, LogId, RaftLogReader};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::corruption::{read_image, single_faults, write_image, Tally};

type C = KvTypeConfig;
type Store = GroupLogStore<C>;

const SEED: u64 = 0x0AF7_0008;

fn log_id(term: u64, index: u64) -> LogIdOf<C> {
    LogId::new(
        <openraft::impls::leader_id_adv::LeaderId<u64, u64>>::new_committed(term, 1),
        index,
    )
}

fn entry(term: u64, index: u64, value: &str) -> EntryOf<C> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(KvRequest::Set {
            key: format!("k{index}"),
            value: value.to_string(),
        }),
    }
}

/// What one group must read back.
#[derive(Debug, Default, Clone, PartialEq)]
struct Expect {
    entries: Vec<EntryOf<C>>,
    purged: Option<LogIdOf<C>>,
    vote: Option<VoteOf<C>>,
    committed: Option<LogIdOf<C>>,
}

async fn append_acked(store: &mut Store, entries: Vec<EntryOf<C>>) -> anyhow::Result<()> {
    let (tx, rx) = C::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await
        .map_err(|_| anyhow::anyhow!("callback dropped"))??;
    Ok(())
}

/// Appends in chunks, truncations rewriting the tail at a higher term, a purge, a vote and a
/// committed marker; each acknowledged before the next.
async fn history(rng: &mut StdRng, store: &mut Store, group: u64) -> anyhow::Result<Expect> {
    let mut exp = Expect::default();
    let mut term = 1;
    let mut next = 1u64;
    for round in 0..rng.gen_range(2..5) {
        let n = rng.gen_range(1..6u64);
        let batch: Vec<_> = (next..next + n)
            .map(|i| entry(term, i, &format!("g{group}-t{term}-{i}")))
            .collect();
        exp.entries.extend(batch.iter().cloned());
        append_acked(store, batch).await?;
        next += n;
        if round > 0 && rng.gen_bool(0.6) && !exp.entries.is_empty() {
            let keep = rng.gen_range(0..exp.entries.len());
            let after = keep.checked_sub(1).map(|k| exp.entries[k].log_id);
            store.truncate_after(after.or(exp.purged)).await?;
            exp.entries.truncate(keep);
            next = exp
                .entries
                .last()
                .map(|e| e.log_id.index)
                .or(exp.purged.map(|p| p.index))
                .map_or(1, |i| i + 1);
            term += 1;
        }
    }
    if exp.entries.len() > 1 && rng.gen_bool(0.5) {
        let upto = rng.gen_range(0..exp.entries.len() - 1);
        let id = exp.entries[upto].log_id;
        store.purge(id).await?;
        exp.entries.drain(..=upto);
        exp.purged = Some(id);
    }
    let vote = VoteOf::<C>::new_committed(term, 1);
    store.save_vote(&vote).await?;
    exp.vote = Some(vote);
    if let Some(last) = exp.entries.last().map(|e| e.log_id) {
        store.save_committed(Some(last)).await?;
        exp.committed = Some(last);
    }
    Ok(exp)
}

/// What the adapter reads back for `group`.
async fn read_group(engine: &Engine, group: u64) -> io::Result<Expect> {
    let mut store = Store::new(engine.clone(), group);
    let state: LogState<C> = store.get_log_state().await?;
    let entries = store.try_get_log_entries(..).await?;
    Ok(Expect {
        entries,
        purged: state.last_purged_log_id,
        vote: store.read_vote().await?,
        committed: store.read_committed().await?,
    })
}

fn options(mode: RecoveryMode) -> Options {
    Options::default()
        .segment_size(8192)
        .compression_threshold(512)
        .recovery_threads(2)
        .recovery_mode(mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_single_fault_through_the_openraft_adapter() -> anyhow::Result<()> {
    let started = Instant::now();
    let groups: u64 = std::env::var("MRWAL_SWEEP_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let flips = std::env::var("MRWAL_SWEEP_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    println!("raft corruption sweep: seed {SEED:#x}, {groups} groups, {flips} flips");
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("wal");
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut expected = BTreeMap::new();
    {
        let engine = Engine::open(&dir, options(RecoveryMode::TolerateTail))?;
        for group in 1..=groups {
            let mut store = Store::new(engine.clone(), group);
            expected.insert(group, history(&mut rng, &mut store, group).await?);
            // A GC half way (a checkpoint, rewrites); the later histories fill the last
            // segments, where a torn-tail cut would drop acknowledged operations.
            if group == groups / 2 {
                engine.gc()?;
            }
        }
        for (&g, exp) in &expected {
            assert_eq!(&read_group(&engine, g).await?, exp, "group {g} live");
        }
    }
    let img = read_image(&dir);
    assert!(img.contains_key("SEAL"), "{:?}", img.keys());
    let case = tmp.path().join("case");
    let mut t = Tally::default();
    for (ctx, damaged) in single_faults(&img, SEED, flips) {
        t.cases += 1;
        write_image(&case, &damaged);
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Engine::open(&case, options(RecoveryMode::TolerateTail))
        }));
        let engine = match opened {
            Err(_) => {
                t.failures.push(format!("{ctx}: open panicked"));
                continue;
            }
            Ok(Err(e)) => {
                t.error(&e);
                continue;
            }
            Ok(Ok(e)) => e,
        };
        let mut read_error = false;
        let failures_before = t.failures.len();
        for (&g, exp) in &expected {
            let got = AssertUnwindSafe(read_group(&engine, g))
                .catch_unwind()
                .await;
            match got {
                Err(_) => t.failures.push(format!("{ctx}: reading group {g} panicked")),
                Ok(Err(e)) => {
                    // A damaged record found at read time: typed, never wrong data.
                    if !e.to_string().contains("corruption") {
                        t.failures.push(format!("{ctx}: group {g}: {e}"));
                    }
                    read_error = true;
                }
                Ok(Ok(got)) if &got != exp => t.failures.push(format!(
                    "{ctx}: group {g} served {:?} (vote {:?}) but {:?} (vote {:?}) was acknowledged",
                    got.entries.iter().map(|e| e.log_id).collect::<Vec<_>>(),
                    got.vote,
                    exp.entries.iter().map(|e| e.log_id).collect::<Vec<_>>(),
                    exp.vote,
                )),
                Ok(Ok(_)) => {}
            }
        }
        if read_error {
            *t.errors.entry("Corruption (at read)").or_default() += 1;
        } else if t.failures.len() == failures_before {
            t.unchanged += 1;
        }
    }
    t.print(
        "corruption: clean directory, through the openraft adapter",
        started,
    );
    assert!(t.failures.is_empty(), "{} failures", t.failures.len());
    Ok(())
}
