//! Durability tests written once and run against both openraft adapters (0.10: `raft`, 0.9:
//! `raft09`): the append callback fires only after the covering fdatasync, `save_vote` waits
//! for its fdatasync without holding the (only) runtime thread, a restart keeps
//! entries, vote, committed, purges and truncations (1 and 1,000 groups), groups are isolated,
//! and a failed fdatasync reaches the callback and poisons later writes.
//!
//! Each adapter is driven through [`Adapter`], a small trait over what the tests need; the
//! bodies are generic over it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use multiraft_wal::{Engine, Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

use crate::probefs::open_probed;

const WAIT: Duration = Duration::from_secs(20);

/// (last purged, last) log ids of an adapter.
pub type LogStateOf<A> = (Option<<A as Adapter>::LogId>, Option<<A as Adapter>::LogId>);

/// What the shared test bodies need from an adapter's log store.
pub trait Adapter: Send + Sized + 'static {
    type LogId: Clone + Debug + PartialEq + Send + Sync;
    type Vote: Clone + Debug + PartialEq + Send + Sync;
    fn name() -> &'static str;
    fn open(engine: &Engine, group: u64) -> Self;
    fn log_id(term: u64, index: u64) -> Self::LogId;
    fn vote(term: u64, node: u64) -> Self::Vote;
    /// Appends and waits for the durability callback (which must fire); the outer error is a
    /// failed call, the inner one the callback's error.
    fn append_durable(
        &mut self,
        entries: Vec<(Self::LogId, String)>,
    ) -> impl Future<Output = anyhow::Result<anyhow::Result<()>>> + Send;
    fn save_vote(&mut self, vote: &Self::Vote) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn read_vote(&mut self) -> impl Future<Output = anyhow::Result<Option<Self::Vote>>> + Send;
    /// Removes every entry after `keep` (`None`: all); `first_removed` is the first entry
    /// removed (0.9's `truncate` names it, 0.10's `truncate_after` names `keep`).
    fn truncate(
        &mut self,
        keep: Option<Self::LogId>,
        first_removed: Self::LogId,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn purge(&mut self, upto: Self::LogId) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn save_committed(
        &mut self,
        committed: Option<Self::LogId>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn read_committed(
        &mut self,
    ) -> impl Future<Output = anyhow::Result<Option<Self::LogId>>> + Send;
    /// Every entry: its log id and the value it sets.
    fn entries(
        &mut self,
    ) -> impl Future<Output = anyhow::Result<Vec<(Self::LogId, String)>>> + Send;
    /// (last purged, last) log ids.
    fn log_state(&mut self) -> impl Future<Output = anyhow::Result<LogStateOf<Self>>> + Send;
}

fn seed() -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed = {seed} (set TEST_SEED to replay)");
    seed
}

// ---------------------------------------------------------------------------------------------
// Bodies.

pub async fn callback_waits_for_fdatasync<A: Adapter>() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let mut store = A::open(&engine, 1);
    let mut reader = A::open(&engine, 1);
    let entered = probe.close_gate();
    let entries: Vec<_> = (1..=3)
        .map(|i| (A::log_id(1, i), format!("v{i}")))
        .collect();
    let appender = tokio::spawn(async move { store.append_durable(entries).await });

    tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT)).await??;
    let synced_before = probe.synced.load(Ordering::SeqCst);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !appender.is_finished(),
        "{}: the append was reported durable while its fdatasync was held",
        A::name()
    );
    // Readable before durable.
    assert_eq!(reader.entries().await?.len(), 3, "{}", A::name());
    probe.open_gate();
    tokio::time::timeout(WAIT, appender).await????;
    assert!(
        probe.synced.load(Ordering::SeqCst) > synced_before,
        "{}: durable without a completed fdatasync",
        A::name()
    );
    Ok(())
}

/// `save_vote` on a current-thread runtime: while its fdatasync is held at a gate, it has not
/// returned, the vote is readable, and other tasks on the one thread run to completion.
pub fn save_vote_holds_no_thread<A: Adapter>() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // If save_vote blocked the only thread, the test would hang: open the gate after WAIT.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let probe = probe.clone();
        std::thread::spawn(move || {
            let fired = done_rx.recv_timeout(WAIT).is_err();
            if fired {
                probe.open_gate();
            }
            fired
        })
    };
    let result = rt.block_on(async {
        let mut store = A::open(&engine, 1);
        let vote = A::vote(3, 1);
        let entered = probe.close_gate();
        let synced_before = probe.synced.load(Ordering::SeqCst);
        let v = vote.clone();
        let voter = tokio::spawn(async move { store.save_vote(&v).await });
        tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT)).await??;
        let worker = tokio::spawn(async {
            for _ in 0..1000 {
                tokio::task::yield_now().await;
            }
            1000
        });
        assert_eq!(worker.await?, 1000);
        assert_eq!(A::open(&engine, 1).read_vote().await?, Some(vote));
        assert!(
            !voter.is_finished(),
            "{}: save_vote returned before its fdatasync",
            A::name()
        );
        probe.open_gate();
        tokio::time::timeout(WAIT, voter).await???;
        assert!(probe.synced.load(Ordering::SeqCst) > synced_before);
        anyhow::Ok(())
    });
    let _ = done_tx.send(());
    let fired = watchdog
        .join()
        .map_err(|_| anyhow::anyhow!("watchdog panicked"))?;
    assert!(!fired, "{}: the runtime thread was blocked", A::name());
    result
}

pub async fn failed_fdatasync_reaches_the_callback<A: Adapter>() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let mut store = A::open(&engine, 3);
    store
        .append_durable(vec![(A::log_id(1, 1), "ok".into())])
        .await??;
    probe.fail_sync.store(true, Ordering::SeqCst);
    let result = match store
        .append_durable(vec![(A::log_id(1, 2), "lost".into())])
        .await
    {
        Ok(inner) => inner,
        Err(e) => Err(e),
    };
    assert!(
        result.is_err(),
        "{}: a failed fdatasync was reported durable",
        A::name()
    );
    probe.fail_sync.store(false, Ordering::SeqCst);
    assert!(engine.is_poisoned());
    assert!(
        store.save_vote(&A::vote(2, 1)).await.is_err(),
        "{}: a vote was saved after a failed fdatasync",
        A::name()
    );
    Ok(())
}

#[derive(Debug, Clone)]
struct Expect<A: Adapter> {
    entries: Vec<(A::LogId, String)>,
    purged: Option<A::LogId>,
    vote: Option<A::Vote>,
    committed: Option<A::LogId>,
}

impl<A: Adapter> Default for Expect<A> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            purged: None,
            vote: None,
            committed: None,
        }
    }
}

impl<A: Adapter> Expect<A> {
    fn last(&self) -> Option<A::LogId> {
        self.entries
            .last()
            .map(|e| e.0.clone())
            .or(self.purged.clone())
    }
}

/// A random history: appends at rising terms, maybe a truncation and a new tail, maybe a purge,
/// a vote, a committed log id. Returns what the group must hold.
async fn random_history<A: Adapter>(
    rng: &mut StdRng,
    store: &mut A,
    group: u64,
) -> anyhow::Result<Expect<A>> {
    let mut exp = Expect::<A>::default();
    let mut terms = Vec::new(); // term of each index, from 1
    let n = rng.gen_range(1..30u64);
    let mut term = 1;
    let mut index = 1;
    while index <= n {
        let chunk = rng.gen_range(1..6u64).min(n - index + 1);
        let batch: Vec<_> = (index..index + chunk)
            .map(|i| (A::log_id(term, i), format!("g{group}-t{term}-{i}")))
            .collect();
        terms.extend((0..chunk).map(|_| term));
        exp.entries.extend(batch.iter().cloned());
        store.append_durable(batch).await??;
        index += chunk;
        if rng.gen_bool(0.2) {
            term += 1;
        }
    }
    if rng.gen_bool(0.5) {
        let keep = rng.gen_range(0..exp.entries.len());
        let keep_id = keep.checked_sub(1).map(|k| exp.entries[k].0.clone());
        let first_removed = exp.entries[keep].0.clone();
        store.truncate(keep_id, first_removed).await?;
        exp.entries.truncate(keep);
        term += 1;
        let from = keep as u64 + 1;
        let tail: Vec<_> = (from..from + rng.gen_range(0..5u64))
            .map(|i| (A::log_id(term, i), format!("g{group}-new-{i}")))
            .collect();
        if !tail.is_empty() {
            exp.entries.extend(tail.iter().cloned());
            store.append_durable(tail).await??;
        }
    }
    if !exp.entries.is_empty() && rng.gen_bool(0.5) {
        let upto = rng.gen_range(0..exp.entries.len());
        let id = exp.entries[upto].0.clone();
        store.purge(id.clone()).await?;
        exp.entries.drain(..=upto);
        exp.purged = Some(id);
    }
    if rng.gen_bool(0.8) {
        let vote = A::vote(term, rng.gen_range(1..4));
        store.save_vote(&vote).await?;
        exp.vote = Some(vote);
    }
    if let Some(last) = exp.last() {
        if rng.gen_bool(0.7) {
            store.save_committed(Some(last.clone())).await?;
            exp.committed = Some(last);
        }
    }
    let _ = terms;
    Ok(exp)
}

async fn check<A: Adapter>(engine: &Engine, group: u64, exp: &Expect<A>) -> anyhow::Result<()> {
    let mut store = A::open(engine, group);
    let name = A::name();
    assert_eq!(
        store.log_state().await?,
        (exp.purged.clone(), exp.last()),
        "{name} group {group}: log state"
    );
    assert_eq!(
        store.entries().await?,
        exp.entries,
        "{name} group {group}: entries"
    );
    assert_eq!(
        store.read_vote().await?,
        exp.vote,
        "{name} group {group}: vote"
    );
    assert_eq!(
        store.read_committed().await?,
        exp.committed,
        "{name} group {group}: committed"
    );
    Ok(())
}

pub async fn reopen_keeps_everything<A: Adapter>(groups: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = TempDir::new()?;
    let options = || Options::default().segment_size(256 << 10);
    let mut expected = BTreeMap::new();
    {
        let engine = Engine::open(dir.path(), options())?;
        for group in 1..=groups {
            let mut store = A::open(&engine, group);
            expected.insert(group, random_history(&mut rng, &mut store, group).await?);
        }
        for (group, exp) in &expected {
            check(&engine, *group, exp).await?;
        }
    }
    let engine = Engine::open(dir.path(), options())?;
    for (group, exp) in &expected {
        check(&engine, *group, exp).await?;
    }
    let mut stranger = A::open(&engine, groups + 1);
    assert_eq!(stranger.log_state().await?, (None, None));
    assert_eq!(stranger.read_vote().await?, None);
    Ok(())
}

pub async fn groups_are_isolated<A: Adapter>() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path: &Path = dir.path();
    let a_entries: Vec<_> = (1..=10)
        .map(|i| (A::log_id(1, i), "A".to_string()))
        .collect();
    let b_entries: Vec<_> = (1..=10)
        .map(|i| (A::log_id(2, i), "B".to_string()))
        .collect();
    let (a_exp, b_exp) = {
        let engine = Engine::open(path, Options::default())?;
        let mut a = A::open(&engine, 10);
        let mut b = A::open(&engine, 11);
        a.append_durable(a_entries.clone()).await??;
        b.append_durable(b_entries.clone()).await??;
        a.truncate(Some(A::log_id(1, 6)), A::log_id(1, 7)).await?;
        a.purge(A::log_id(1, 2)).await?;
        a.save_vote(&A::vote(5, 1)).await?;
        a.save_committed(Some(A::log_id(1, 4))).await?;
        let a_exp = Expect::<A> {
            entries: a_entries[2..6].to_vec(),
            purged: Some(A::log_id(1, 2)),
            vote: Some(A::vote(5, 1)),
            committed: Some(A::log_id(1, 4)),
        };
        let b_exp = Expect::<A> {
            entries: b_entries.clone(),
            ..Expect::default()
        };
        check(&engine, 10, &a_exp).await?;
        check(&engine, 11, &b_exp).await?;
        (a_exp, b_exp)
    };
    let engine = Engine::open(path, Options::default())?;
    check(&engine, 10, &a_exp).await?;
    check(&engine, 11, &b_exp).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The 0.10 adapter.

#[cfg(feature = "openraft")]
mod v10 {
    use super::*;
    use multiraft_wal::raft::kv::{KvRequest, KvTypeConfig};
    use multiraft_wal::raft::GroupLogStore;
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::alias::{LogIdOf, VoteOf};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{Entry, EntryPayload, LogId, RaftLogReader};

    type C = KvTypeConfig;
    pub struct V10(GroupLogStore<C>);

    impl Adapter for V10 {
        type LogId = LogIdOf<C>;
        type Vote = VoteOf<C>;
        fn name() -> &'static str {
            "openraft 0.10"
        }
        fn open(engine: &Engine, group: u64) -> Self {
            V10(GroupLogStore::new(engine.clone(), group))
        }
        fn log_id(term: u64, index: u64) -> Self::LogId {
            LogId::new(
                <openraft::impls::leader_id_adv::LeaderId<u64, u64>>::new_committed(term, 1),
                index,
            )
        }
        fn vote(term: u64, node: u64) -> Self::Vote {
            VoteOf::<C>::new(term, node)
        }
        async fn append_durable(
            &mut self,
            entries: Vec<(Self::LogId, String)>,
        ) -> anyhow::Result<anyhow::Result<()>> {
            let entries: Vec<_> = entries
                .into_iter()
                .map(|(log_id, value)| Entry {
                    log_id,
                    payload: EntryPayload::Normal(KvRequest::Set {
                        key: format!("k{}", log_id.index),
                        value,
                    }),
                })
                .collect();
            let (tx, rx) = C::oneshot();
            self.0.append(entries, IOFlushed::signal(tx)).await?;
            match tokio::time::timeout(WAIT, rx).await {
                Err(_) => anyhow::bail!("callback did not fire within {WAIT:?}"),
                Ok(Err(_)) => anyhow::bail!("callback dropped uncalled"),
                Ok(Ok(r)) => Ok(r.map_err(anyhow::Error::from)),
            }
        }
        async fn save_vote(&mut self, vote: &Self::Vote) -> anyhow::Result<()> {
            Ok(self.0.save_vote(vote).await?)
        }
        async fn read_vote(&mut self) -> anyhow::Result<Option<Self::Vote>> {
            Ok(self.0.read_vote().await?)
        }
        async fn truncate(
            &mut self,
            keep: Option<Self::LogId>,
            _first_removed: Self::LogId,
        ) -> anyhow::Result<()> {
            Ok(self.0.truncate_after(keep).await?)
        }
        async fn purge(&mut self, upto: Self::LogId) -> anyhow::Result<()> {
            Ok(self.0.purge(upto).await?)
        }
        async fn save_committed(&mut self, c: Option<Self::LogId>) -> anyhow::Result<()> {
            Ok(self.0.save_committed(c).await?)
        }
        async fn read_committed(&mut self) -> anyhow::Result<Option<Self::LogId>> {
            Ok(self.0.read_committed().await?)
        }
        async fn entries(&mut self) -> anyhow::Result<Vec<(Self::LogId, String)>> {
            let got = self.0.try_get_log_entries(..).await?;
            Ok(got
                .into_iter()
                .map(|e| match e.payload {
                    EntryPayload::Normal(KvRequest::Set { value, .. }) => (e.log_id, value),
                    _ => (e.log_id, String::new()),
                })
                .collect())
        }
        async fn log_state(&mut self) -> anyhow::Result<LogStateOf<Self>> {
            let s = self.0.get_log_state().await?;
            Ok((s.last_purged_log_id, s.last_log_id))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v10_callback_waits_for_fdatasync() -> anyhow::Result<()> {
        callback_waits_for_fdatasync::<V10>().await
    }

    #[test]
    fn v10_save_vote_holds_no_thread() -> anyhow::Result<()> {
        save_vote_holds_no_thread::<V10>()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v10_failed_fdatasync_reaches_the_callback() -> anyhow::Result<()> {
        failed_fdatasync_reaches_the_callback::<V10>().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v10_reopen_1_group() -> anyhow::Result<()> {
        reopen_keeps_everything::<V10>(1).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v10_reopen_1000_groups() -> anyhow::Result<()> {
        reopen_keeps_everything::<V10>(1000).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v10_groups_are_isolated() -> anyhow::Result<()> {
        groups_are_isolated::<V10>().await
    }
}

// ---------------------------------------------------------------------------------------------
// The 0.9 adapter.

#[cfg(feature = "openraft09")]
mod v09 {
    use super::*;
    use multiraft_wal::raft09::kv::{KvRequest, KvTypeConfig};
    use multiraft_wal::raft09::GroupLogStore;
    use openraft09::storage::{RaftLogStorage, RaftLogStorageExt};
    use openraft09::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, Vote};

    type C = KvTypeConfig;
    pub struct V09(GroupLogStore<C>);

    impl Adapter for V09 {
        type LogId = LogId<u64>;
        type Vote = Vote<u64>;
        fn name() -> &'static str {
            "openraft 0.9"
        }
        fn open(engine: &Engine, group: u64) -> Self {
            V09(GroupLogStore::new(engine.clone(), group))
        }
        fn log_id(term: u64, index: u64) -> Self::LogId {
            LogId::new(CommittedLeaderId::new(term, 1), index)
        }
        fn vote(term: u64, node: u64) -> Self::Vote {
            Vote::new(term, node)
        }
        async fn append_durable(
            &mut self,
            entries: Vec<(Self::LogId, String)>,
        ) -> anyhow::Result<anyhow::Result<()>> {
            let entries: Vec<Entry<C>> = entries
                .into_iter()
                .map(|(log_id, value)| Entry {
                    log_id,
                    payload: EntryPayload::Normal(KvRequest::Set {
                        key: format!("k{}", log_id.index),
                        value,
                    }),
                })
                .collect();
            // `blocking_append` (0.9's own helper) returns once the LogFlushed callback fired;
            // a call error and a callback error are both StorageErrors there.
            match tokio::time::timeout(WAIT, self.0.blocking_append(entries)).await {
                Err(_) => anyhow::bail!("callback did not fire within {WAIT:?}"),
                Ok(r) => Ok(r.map_err(anyhow::Error::from)),
            }
        }
        async fn save_vote(&mut self, vote: &Self::Vote) -> anyhow::Result<()> {
            Ok(self.0.save_vote(vote).await?)
        }
        async fn read_vote(&mut self) -> anyhow::Result<Option<Self::Vote>> {
            Ok(self.0.read_vote().await?)
        }
        async fn truncate(
            &mut self,
            _keep: Option<Self::LogId>,
            first_removed: Self::LogId,
        ) -> anyhow::Result<()> {
            Ok(self.0.truncate(first_removed).await?)
        }
        async fn purge(&mut self, upto: Self::LogId) -> anyhow::Result<()> {
            Ok(self.0.purge(upto).await?)
        }
        async fn save_committed(&mut self, c: Option<Self::LogId>) -> anyhow::Result<()> {
            Ok(self.0.save_committed(c).await?)
        }
        async fn read_committed(&mut self) -> anyhow::Result<Option<Self::LogId>> {
            Ok(self.0.read_committed().await?)
        }
        async fn entries(&mut self) -> anyhow::Result<Vec<(Self::LogId, String)>> {
            let got = self.0.try_get_log_entries(..).await?;
            Ok(got
                .into_iter()
                .map(|e| match e.payload {
                    EntryPayload::Normal(KvRequest::Set { value, .. }) => (e.log_id, value),
                    _ => (e.log_id, String::new()),
                })
                .collect())
        }
        async fn log_state(&mut self) -> anyhow::Result<LogStateOf<Self>> {
            let s = self.0.get_log_state().await?;
            Ok((s.last_purged_log_id, s.last_log_id))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v09_callback_waits_for_fdatasync() -> anyhow::Result<()> {
        callback_waits_for_fdatasync::<V09>().await
    }

    #[test]
    fn v09_save_vote_holds_no_thread() -> anyhow::Result<()> {
        save_vote_holds_no_thread::<V09>()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v09_failed_fdatasync_reaches_the_callback() -> anyhow::Result<()> {
        failed_fdatasync_reaches_the_callback::<V09>().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v09_reopen_1_group() -> anyhow::Result<()> {
        reopen_keeps_everything::<V09>(1).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v09_reopen_1000_groups() -> anyhow::Result<()> {
        reopen_keeps_everything::<V09>(1000).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v09_groups_are_isolated() -> anyhow::Result<()> {
        groups_are_isolated::<V09>().await
    }
}
