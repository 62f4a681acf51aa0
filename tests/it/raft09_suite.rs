//! openraft 0.9's storage suite (`openraft::testing::Suite`, synchronous: each sub-test runs on
//! its own runtime) against the 0.9 adapter: a fresh engine per sub-test, and 64 suites at once
//! on groups of one engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use multiraft_wal::raft09::kv::{KvStateMachine, KvTypeConfig};
use multiraft_wal::raft09::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft09::testing::{StoreBuilder, Suite};
use openraft09::{AnyError, StorageError, StorageIOError};
use tempfile::TempDir;

type Store = GroupLogStore<KvTypeConfig>;

fn sto_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write(AnyError::new(&e)).into()
}

/// Keeps a sub-test's engine and directory alive.
struct FreshGuard {
    _engine: Engine,
    _dir: TempDir,
}

/// Every `build` opens a new engine in a new temporary directory.
struct FreshEngine;

impl StoreBuilder<KvTypeConfig, Store, KvStateMachine, FreshGuard> for FreshEngine {
    async fn build(&self) -> Result<(FreshGuard, Store, KvStateMachine), StorageError<u64>> {
        let dir = TempDir::new().map_err(sto_err)?;
        let options = Options::default().segment_size(64 << 10);
        let engine = Engine::open(dir.path().join("wal"), options).map_err(sto_err)?;
        let snapshots = SnapshotStore::open(dir.path().join("snapshots")).map_err(sto_err)?;
        let store = GroupLogStore::new(engine.clone(), 7);
        let sm = KvStateMachine::open_async(snapshots, 7)
            .await
            .map_err(sto_err)?;
        Ok((
            FreshGuard {
                _engine: engine,
                _dir: dir,
            },
            store,
            sm,
        ))
    }
}

#[test]
fn suite09_fresh_engine_per_test() -> anyhow::Result<()> {
    Suite::test_all(FreshEngine).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Every `build` hands out a new group id of one shared engine.
#[derive(Clone)]
struct SharedEngine {
    engine: Engine,
    snapshots: SnapshotStore,
    next_group: Arc<AtomicU64>,
}

impl StoreBuilder<KvTypeConfig, Store, KvStateMachine, ()> for SharedEngine {
    async fn build(&self) -> Result<((), Store, KvStateMachine), StorageError<u64>> {
        let group = self.next_group.fetch_add(1, Ordering::Relaxed);
        if self.engine.last_index(group).is_some() || self.engine.vote(group).is_some() {
            return Err(sto_err(std::io::Error::other(format!(
                "group {group} is not fresh"
            ))));
        }
        let store = GroupLogStore::new(self.engine.clone(), group);
        let sm = KvStateMachine::open_async(self.snapshots.clone(), group)
            .await
            .map_err(sto_err)?;
        Ok(((), store, sm))
    }
}

#[test]
fn suite09_64_concurrent_groups_one_engine() -> anyhow::Result<()> {
    const SUITES: usize = 64;
    let dir = TempDir::new()?;
    let engine = Engine::open(
        dir.path().join("wal"),
        Options::default().segment_size(1 << 20),
    )?;
    let builder = SharedEngine {
        engine: engine.clone(),
        snapshots: SnapshotStore::open(dir.path().join("snapshots"))?,
        next_group: Arc::new(AtomicU64::new(1)),
    };
    let threads: Vec<_> = (0..SUITES)
        .map(|_| {
            let builder = builder.clone();
            std::thread::spawn(move || Suite::test_all(builder).map_err(|e| anyhow::anyhow!("{e}")))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        t.join()
            .map_err(|_| anyhow::anyhow!("suite {i} panicked"))?
            .map_err(|e| anyhow::anyhow!("suite {i}: {e}"))?;
    }
    let handed_out = builder.next_group.load(Ordering::Relaxed) - 1;
    assert!(
        handed_out >= SUITES as u64 * 20,
        "only {handed_out} groups were handed out"
    );
    let groups = engine.groups();
    assert!(
        groups.iter().all(|g| (1..=handed_out).contains(g)),
        "unexpected group ids"
    );
    assert!(groups.len() as u64 >= handed_out / 2);
    Ok(())
}
