//! openraft's own conformance suite for the log store: (a) on a fresh engine per sub-test and
//! (b) 64 suites at once, each on its own groups of one shared engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use multiraft_wal::raft::kv::{KvStateMachine, KvTypeConfig};
use multiraft_wal::raft::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;
use tempfile::TempDir;

type Store = GroupLogStore<KvTypeConfig>;

fn sto_err(e: impl std::error::Error + 'static) -> StorageError<KvTypeConfig> {
    StorageError::read(KvTypeConfig::err_from_error(&e))
}

/// Keeps a sub-test's engine and directory alive; the engine handle is dropped before the
/// directory is removed.
struct FreshGuard {
    _engine: Engine,
    _dir: TempDir,
}

/// Every `build` opens a new engine in a new temporary directory.
struct FreshEngine;

impl StoreBuilder<KvTypeConfig, Store, KvStateMachine, FreshGuard> for FreshEngine {
    async fn build(
        &self,
    ) -> Result<(FreshGuard, Store, KvStateMachine), StorageError<KvTypeConfig>> {
        let dir = TempDir::new().map_err(sto_err)?;
        // Small segments: cheap to create 46 times, and rotation happens within a sub-test.
        let options = Options::default().segment_size(64 << 10);
        let engine = Engine::open(dir.path(), options).map_err(sto_err)?;
        let store = GroupLogStore::new(engine.clone(), 7);
        let snapshots = SnapshotStore::open(dir.path().join("snapshots")).map_err(sto_err)?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_fresh_engine_per_test() -> Result<(), StorageError<KvTypeConfig>> {
    Suite::test_all(FreshEngine).await
}

/// Every `build` hands out a new group id of one shared engine.
#[derive(Clone)]
struct SharedEngine {
    engine: Engine,
    snapshots: SnapshotStore,
    next_group: Arc<AtomicU64>,
}

impl StoreBuilder<KvTypeConfig, Store, KvStateMachine, ()> for SharedEngine {
    async fn build(&self) -> Result<((), Store, KvStateMachine), StorageError<KvTypeConfig>> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_64_concurrent_groups_one_engine() -> anyhow::Result<()> {
    const SUITES: usize = 64;
    let dir = TempDir::new()?;
    let engine = Engine::open(dir.path(), Options::default().segment_size(1 << 20))?;
    let builder = SharedEngine {
        engine: engine.clone(),
        snapshots: SnapshotStore::open(dir.path().join("snapshots"))?,
        next_group: Arc::new(AtomicU64::new(1)),
    };

    let mut tasks = Vec::new();
    for _ in 0..SUITES {
        let builder = builder.clone();
        tasks.push(tokio::spawn(async move { Suite::test_all(builder).await }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        task.await?.map_err(|e| anyhow::anyhow!("suite {i}: {e}"))?;
    }

    // Every sub-test of every suite got its own group, and they all wrote to the one engine.
    let handed_out = builder.next_group.load(Ordering::Relaxed) - 1;
    assert!(
        handed_out >= SUITES as u64 * 40,
        "only {handed_out} groups were handed out"
    );
    let groups = engine.groups();
    assert!(
        groups.len() as u64 >= handed_out / 2,
        "{} groups hold data out of {handed_out} handed out",
        groups.len()
    );
    assert!(
        groups.iter().all(|g| (1..=handed_out).contains(g)),
        "unexpected group ids: {groups:?}"
    );
    Ok(())
}
