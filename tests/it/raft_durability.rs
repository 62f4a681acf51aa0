//! What openraft's suite does not check: append callbacks wait for the fdatasync and fire once,
//! write errors reach the callback, restarts keep entries, vote, committed, purges and
//! truncations (1 and 1,000 groups), and groups never see each other's data.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use multiraft_wal::raft::kv::{KvRequest, KvTypeConfig};
use multiraft_wal::raft::GroupLogStore;
use multiraft_wal::{Engine, Options};

use crate::probefs::open_probed;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, OneshotReceiverOf, VoteOf};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;
use openraft::{Entry, EntryPayload, LogId, RaftLogReader};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

type C = KvTypeConfig;
type Store = GroupLogStore<C>;
type Done = OneshotReceiverOf<C, Result<(), io::Error>>;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers.

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

/// Appends and returns the receiver of the callback's result.
async fn append(store: &mut Store, entries: Vec<EntryOf<C>>) -> io::Result<Done> {
    let (tx, rx) = C::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    Ok(rx)
}

/// Waits for a callback: it must fire (not be dropped) within [`WAIT`].
async fn completion(rx: Done) -> anyhow::Result<io::Result<()>> {
    match tokio::time::timeout(WAIT, rx).await {
        Err(_) => anyhow::bail!("append callback did not fire within {WAIT:?}"),
        Ok(Err(_)) => anyhow::bail!("append callback was dropped without being called"),
        Ok(Ok(result)) => Ok(result),
    }
}

fn seed() -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed = {seed} (set TEST_SEED to replay)");
    seed
}

fn ids(entries: &[EntryOf<C>]) -> Vec<LogIdOf<C>> {
    entries.iter().map(|e| e.log_id).collect()
}

// ---------------------------------------------------------------------------------------------
// Callbacks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_callback_waits_for_fdatasync() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let mut store = Store::new(engine.clone(), 1);
    let mut reader = store.get_log_reader().await;

    let entered = probe.close_gate();
    let (tx, mut rx) = C::oneshot();
    let appender = tokio::spawn(async move {
        let entries = vec![entry(1, 1, "a"), entry(1, 2, "b"), entry(1, 3, "c")];
        store.append(entries, IOFlushed::signal(tx)).await
    });

    // The fdatasync covering the append has started and is held at the gate: no fdatasync can
    // complete until the gate opens, so the callback must not have fired.
    tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT)).await??;
    assert!(
        rx.try_recv().is_err(),
        "callback fired while the fdatasync was still held"
    );

    // If append has returned, its entries must already be readable.
    if appender.is_finished() {
        let got = reader.try_get_log_entries(1..4).await?;
        assert_eq!(ids(&got), vec![log_id(1, 1), log_id(1, 2), log_id(1, 3)]);
    }
    let synced_before = probe.synced.load(Ordering::SeqCst);
    assert!(
        rx.try_recv().is_err(),
        "callback fired while the fdatasync was still held"
    );

    probe.open_gate();
    tokio::time::timeout(WAIT, appender).await???;
    completion(rx).await??;
    assert!(
        probe.synced.load(Ordering::SeqCst) > synced_before,
        "the callback reported durability but no fdatasync completed"
    );
    let got = reader.try_get_log_entries(1..4).await?;
    assert_eq!(got.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_append_completes_once_and_groups_share_fdatasyncs() -> anyhow::Result<()> {
    const GROUPS: u64 = 64;
    const APPENDS: u64 = 8;
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let synced_before = probe.synced.load(Ordering::SeqCst);

    let mut tasks = Vec::new();
    for group in 1..=GROUPS {
        let mut store = Store::new(engine.clone(), group);
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 1..=APPENDS {
                done.push(append(&mut store, vec![entry(1, i, &format!("g{group}-{i}"))]).await?);
            }
            io::Result::Ok(done)
        }));
    }
    let mut callbacks = 0;
    for task in tasks {
        for rx in task.await?? {
            completion(rx).await??;
            callbacks += 1;
        }
    }
    let syncs = probe.synced.load(Ordering::SeqCst) - synced_before;
    println!("{callbacks} appends, {syncs} fdatasyncs");
    assert_eq!(callbacks, GROUPS * APPENDS);
    assert!(
        syncs >= 1,
        "callbacks reported durability without any fdatasync"
    );
    assert!(
        syncs < callbacks,
        "{syncs} fdatasyncs for {callbacks} concurrent appends: no group commit"
    );
    for group in 1..=GROUPS {
        let got = Store::new(engine.clone(), group)
            .try_get_log_entries(..)
            .await?;
        assert_eq!(
            ids(&got),
            (1..=APPENDS).map(|i| log_id(1, i)).collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fdatasync_reaches_the_callback_and_fails_later_writes() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let mut store = Store::new(engine.clone(), 3);
    completion(append(&mut store, vec![entry(1, 1, "ok")]).await?).await??;

    probe.fail_sync.store(true, Ordering::SeqCst);
    let result = match append(&mut store, vec![entry(1, 2, "lost")]).await {
        Ok(rx) => completion(rx).await?,
        Err(e) => Err(e),
    };
    let err = result.expect_err("a failed fdatasync was reported as durable");
    println!("callback error: {err}");

    // The engine is poisoned: later writes fail even once the disk "recovers".
    probe.fail_sync.store(false, Ordering::SeqCst);
    assert!(engine.is_poisoned());
    let vote_err = store
        .save_vote(&VoteOf::<C>::new(2, 1))
        .await
        .expect_err("write after a failed fdatasync");
    let text = vote_err.to_string();
    assert!(
        text.contains("Write") && text.contains("Vote"),
        "error lacks subject/verb: {text}"
    );
    let later = match append(&mut store, vec![entry(1, 3, "after")]).await {
        Ok(rx) => completion(rx).await?,
        Err(e) => Err(e),
    };
    assert!(later.is_err(), "append after a failed fdatasync succeeded");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Restarts.

/// What one group should hold.
#[derive(Debug, Default, Clone)]
struct Expect {
    entries: Vec<EntryOf<C>>,
    purged: Option<LogIdOf<C>>,
    vote: Option<VoteOf<C>>,
    committed: Option<LogIdOf<C>>,
}

impl Expect {
    fn last(&self) -> Option<LogIdOf<C>> {
        self.entries.last().map(|e| e.log_id).or(self.purged)
    }
}

/// Writes a random history into `group`: appends in chunks, maybe a truncation followed by a
/// rewrite at a higher term, maybe a purge, a vote and a committed log id. Returns what the group
/// must hold, and the callbacks to wait for.
async fn random_history(
    rng: &mut StdRng,
    store: &mut Store,
    group: u64,
) -> anyhow::Result<(Expect, Vec<Done>)> {
    let mut exp = Expect::default();
    let mut done = Vec::new();
    let n = rng.gen_range(1..40u64);
    let mut term = 1;
    let mut index = 1;
    while index <= n {
        let chunk = rng.gen_range(1..8u64).min(n - index + 1);
        let batch: Vec<_> = (index..index + chunk)
            .map(|i| entry(term, i, &format!("g{group}-t{term}-{i}")))
            .collect();
        exp.entries.extend(batch.iter().cloned());
        done.push(append(store, batch).await?);
        index += chunk;
        if rng.gen_bool(0.2) {
            term += 1;
        }
    }
    if rng.gen_bool(0.5) {
        // Truncate after a random kept entry (or everything) and write a new tail.
        let keep = rng.gen_range(0..=exp.entries.len());
        let after = keep.checked_sub(1).map(|k| exp.entries[k].log_id);
        store.truncate_after(after).await?;
        exp.entries.truncate(keep);
        term += 1;
        let from = exp.entries.last().map_or(1, |e| e.log_id.index + 1);
        let tail: Vec<_> = (from..from + rng.gen_range(0..6u64))
            .map(|i| entry(term, i, &format!("g{group}-new-{i}")))
            .collect();
        if !tail.is_empty() {
            exp.entries.extend(tail.iter().cloned());
            done.push(append(store, tail).await?);
        }
    }
    if !exp.entries.is_empty() && rng.gen_bool(0.5) {
        let upto = rng.gen_range(0..exp.entries.len());
        let id = exp.entries[upto].log_id;
        store.purge(id).await?;
        exp.entries.drain(..=upto);
        exp.purged = Some(id);
    }
    if rng.gen_bool(0.8) {
        let vote = if rng.gen_bool(0.5) {
            VoteOf::<C>::new_committed(term, 1)
        } else {
            VoteOf::<C>::new(term, 2)
        };
        store.save_vote(&vote).await?;
        exp.vote = Some(vote);
    }
    if let Some(last) = exp.last() {
        if rng.gen_bool(0.7) {
            store.save_committed(Some(last)).await?;
            exp.committed = Some(last);
        }
    }
    Ok((exp, done))
}

async fn check_group(engine: &Engine, group: u64, exp: &Expect) -> anyhow::Result<()> {
    let mut store = Store::new(engine.clone(), group);
    let state = store.get_log_state().await?;
    assert_eq!(
        state,
        LogState {
            last_purged_log_id: exp.purged,
            last_log_id: exp.last()
        },
        "group {group}: log state"
    );
    let got = store.try_get_log_entries(..).await?;
    assert_eq!(got, exp.entries, "group {group}: entries");
    assert_eq!(store.read_vote().await?, exp.vote, "group {group}: vote");
    assert_eq!(
        store.read_committed().await?,
        exp.committed,
        "group {group}: committed"
    );
    if let Some(first) = exp.entries.first() {
        let some = store.limited_get_log_entries(0, u64::MAX).await?;
        assert_eq!(
            some.first(),
            Some(first),
            "group {group}: limited read from the start"
        );
    }
    Ok(())
}

async fn reopen_keeps_everything(groups: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = TempDir::new()?;
    // Small segments, so that the groups' histories span several of them.
    let options = || Options::default().segment_size(256 << 10);
    let mut expected = BTreeMap::new();
    {
        let engine = Engine::open(dir.path(), options())?;
        let mut pending = Vec::new();
        for group in 1..=groups {
            let mut store = Store::new(engine.clone(), group);
            let (exp, done) = random_history(&mut rng, &mut store, group).await?;
            expected.insert(group, exp);
            pending.extend(done);
        }
        for rx in pending {
            completion(rx).await??;
        }
        for (group, exp) in &expected {
            check_group(&engine, *group, exp).await?;
        }
    }
    let engine = Engine::open(dir.path(), options())?;
    assert!(
        engine.stats().segments > 1 || groups == 1,
        "the history fits one segment"
    );
    for (group, exp) in &expected {
        check_group(&engine, *group, exp).await?;
    }
    // A group never written is empty.
    let mut stranger = Store::new(engine.clone(), groups + 1);
    assert_eq!(stranger.get_log_state().await?, LogState::default());
    assert_eq!(stranger.read_vote().await?, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_entries_vote_committed_purge_truncation_1_group() -> anyhow::Result<()> {
    reopen_keeps_everything(1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_entries_vote_committed_purge_truncation_1000_groups() -> anyhow::Result<()> {
    reopen_keeps_everything(1000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_never_see_each_others_data() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (a_exp, b_exp) = {
        let engine = Engine::open(dir.path(), Options::default())?;
        let mut a = Store::new(engine.clone(), 10);
        let mut b = Store::new(engine.clone(), 11);
        // The same indexes in both groups, different contents.
        let a_entries: Vec<_> = (1..=10).map(|i| entry(1, i, "A")).collect();
        let b_entries: Vec<_> = (1..=10).map(|i| entry(2, i, "B")).collect();
        let ra = append(&mut a, a_entries.clone()).await?;
        let rb = append(&mut b, b_entries.clone()).await?;
        completion(ra).await??;
        completion(rb).await??;

        // Everything done to A leaves B alone.
        a.truncate_after(Some(log_id(1, 6))).await?;
        a.purge(log_id(1, 2)).await?;
        a.save_vote(&VoteOf::<C>::new_committed(5, 1)).await?;
        a.save_committed(Some(log_id(1, 4))).await?;
        let a_exp = Expect {
            entries: a_entries[2..6].to_vec(),
            purged: Some(log_id(1, 2)),
            vote: Some(VoteOf::<C>::new_committed(5, 1)),
            committed: Some(log_id(1, 4)),
        };
        let b_exp = Expect {
            entries: b_entries,
            ..Expect::default()
        };
        check_group(&engine, 10, &a_exp).await?;
        check_group(&engine, 11, &b_exp).await?;
        assert_eq!(b.get_log_state().await?.last_log_id, Some(log_id(2, 10)));
        (a_exp, b_exp)
    };
    let engine = Engine::open(dir.path(), Options::default())?;
    check_group(&engine, 10, &a_exp).await?;
    check_group(&engine, 11, &b_exp).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_reads_respect_the_cap_and_are_never_empty() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let engine = Engine::open(dir.path(), Options::default())?;
    let big = "x".repeat(1000);
    let mut store = Store::new(engine.clone(), 5);
    completion(append(&mut store, (1..=100).map(|i| entry(1, i, &big)).collect()).await?).await??;

    let mut tiny = Store::new(engine.clone(), 5).max_read_bytes(1);
    let one = tiny.limited_get_log_entries(1, 101).await?;
    assert_eq!(ids(&one), vec![log_id(1, 1)]);

    let mut capped = Store::new(engine.clone(), 5).max_read_bytes(8 * 1024);
    let some = capped.limited_get_log_entries(1, 101).await?;
    assert!(
        !some.is_empty() && some.len() <= 10,
        "{} entries for an 8 KiB cap",
        some.len()
    );
    assert_eq!(
        ids(&some),
        (1..=some.len() as u64)
            .map(|i| log_id(1, i))
            .collect::<Vec<_>>()
    );

    // Reading every entry in capped steps gives the whole log, in order.
    let mut next = 1;
    while next <= 100 {
        let chunk = capped.limited_get_log_entries(next, 101).await?;
        assert!(!chunk.is_empty(), "empty read at {next}");
        assert_eq!(chunk[0].log_id.index, next);
        next += chunk.len() as u64;
    }

    // A range reaching into the purged prefix returns what follows it.
    store.purge(log_id(1, 10)).await?;
    let after = capped.limited_get_log_entries(5, 20).await?;
    assert_eq!(after.first().map(|e| e.log_id.index), Some(11));
    // An unbounded read is not capped.
    assert_eq!(capped.try_get_log_entries(..).await?.len(), 90);
    Ok(())
}
