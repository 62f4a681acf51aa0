//! The adapter never holds a runtime thread while it waits for durability, and never reports
//! durability before the fdatasync covering it has returned:
//! - `save_vote` on a current-thread runtime: while its fdatasync is held at a gate, the vote is
//!   readable, the call has not returned, and other tasks on the same (only) thread run;
//! - concurrent votes of many groups share fdatasyncs (a blocking call would serialize them);
//! - `truncate_after` issues no fdatasync, and a crash (simulated file system) leaves either the
//!   log before the call or the truncated one, never anything else; once a later append is
//!   reported durable, the truncation is durable too;
//! - snapshots: the store's files are complete or absent after a crash, the old file is removed
//!   only after the new one is durable, and a state machine restarts from its newest snapshot.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use multiraft_wal::raft::kv::{KvRequest, KvStateMachine, KvTypeConfig};
use multiraft_wal::raft::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft::storage::{IOFlushed, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;
use openraft::{Entry, EntryPayload, LogId, RaftLogReader};
use tempfile::TempDir;

use crate::probefs::{open_probed, Probe};
use crate::simfs::{CrashVariant, SimFs};

type C = KvTypeConfig;
type Store = GroupLogStore<C>;

const WAIT: Duration = Duration::from_secs(20);

fn log_id(term: u64, index: u64) -> LogIdOf<C> {
    LogId::new(
        <openraft::impls::leader_id_adv::LeaderId<u64, u64>>::new_committed(term, 1),
        index,
    )
}

fn set(term: u64, index: u64, key: String, value: String) -> EntryOf<C> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(KvRequest::Set { key, value }),
    }
}

fn entry(term: u64, index: u64) -> EntryOf<C> {
    set(term, index, format!("k{index}"), format!("t{term}"))
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Opens the gate after [`WAIT`] if the test has not: a call that blocked the runtime's only
/// thread would otherwise hang the test forever. Returns the flag saying it had to.
fn watchdog(probe: &Arc<Probe>) -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let fired = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (probe, f, d) = (probe.clone(), fired.clone(), done.clone());
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if d.load(Ordering::SeqCst) {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        f.store(true, Ordering::SeqCst);
        probe.open_gate();
    });
    (fired, done)
}

#[test]
fn save_vote_waits_for_its_fdatasync_without_holding_the_runtime_thread() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let rt = current_thread()?;
    let (watchdog_fired, watchdog_done) = watchdog(&probe);

    rt.block_on(async {
        let mut store = Store::new(engine.clone(), 1);
        let vote = VoteOf::<C>::new(3, 1);
        let entered = probe.close_gate();
        let synced_before = probe.synced.load(Ordering::SeqCst);
        let voter = tokio::spawn(async move { store.save_vote(&vote).await });

        // Wait (on the blocking pool, not this thread) until an fdatasync is held at the gate.
        tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT)).await??;
        assert!(
            !watchdog_fired.load(Ordering::SeqCst),
            "the runtime thread was blocked until the watchdog opened the gate"
        );

        // The one runtime thread is free: other tasks run to completion meanwhile.
        let worker = tokio::spawn(async {
            let mut n = 0u64;
            for _ in 0..1000 {
                tokio::task::yield_now().await;
                n += 1;
            }
            n
        });
        assert_eq!(worker.await?, 1000);
        // Reads are served too, and already see the vote (written, not yet durable).
        let mut reader = Store::new(engine.clone(), 1);
        assert_eq!(reader.read_vote().await?, Some(VoteOf::<C>::new(3, 1)));
        // But save_vote has not returned: its fdatasync has not.
        assert!(
            !voter.is_finished(),
            "save_vote returned before its fdatasync"
        );
        assert_eq!(probe.synced.load(Ordering::SeqCst), synced_before);

        probe.open_gate();
        tokio::time::timeout(WAIT, voter).await???;
        assert!(
            probe.synced.load(Ordering::SeqCst) > synced_before,
            "save_vote returned but no fdatasync completed"
        );
        anyhow::Ok(())
    })?;
    watchdog_done.store(true, Ordering::SeqCst);
    assert!(!watchdog_fired.load(Ordering::SeqCst), "watchdog fired");
    Ok(())
}

#[test]
fn votes_of_many_groups_share_fdatasyncs_on_one_thread() -> anyhow::Result<()> {
    const GROUPS: u64 = 256;
    let dir = TempDir::new()?;
    let (engine, probe) = open_probed(dir.path())?;
    let rt = current_thread()?;
    let (watchdog_fired, watchdog_done) = watchdog(&probe);
    let returned = Arc::new(AtomicU64::new(0));

    let syncs = rt.block_on(async {
        let entered = probe.close_gate();
        let synced_before = probe.synced.load(Ordering::SeqCst);
        let mut tasks = Vec::new();
        for group in 1..=GROUPS {
            let mut store = Store::new(engine.clone(), group);
            let returned = returned.clone();
            tasks.push(tokio::spawn(async move {
                store.save_vote(&VoteOf::<C>::new(group, 1)).await?;
                returned.fetch_add(1, Ordering::SeqCst);
                io::Result::Ok(())
            }));
        }
        tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT)).await??;
        // Let every voter run up to its durability wait.
        for _ in 0..(4 * GROUPS) {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            returned.load(Ordering::SeqCst),
            0,
            "a vote returned while every fdatasync was held"
        );
        // Every vote is written (readable) while the first fdatasync is still held.
        for group in 1..=GROUPS {
            assert_eq!(
                Store::new(engine.clone(), group).read_vote().await?,
                Some(VoteOf::<C>::new(group, 1)),
                "group {group}"
            );
        }
        probe.open_gate();
        for t in tasks {
            tokio::time::timeout(WAIT, t).await???;
        }
        anyhow::Ok(probe.synced.load(Ordering::SeqCst) - synced_before)
    })?;
    watchdog_done.store(true, Ordering::SeqCst);
    assert!(!watchdog_fired.load(Ordering::SeqCst), "watchdog fired");
    println!("{GROUPS} votes, {syncs} fdatasyncs");
    assert_eq!(returned.load(Ordering::SeqCst), GROUPS);
    assert!(syncs >= 1);
    assert!(
        syncs <= GROUPS / 16,
        "{syncs} fdatasyncs for {GROUPS} concurrent votes: they did not share them"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// truncate_after: unsynced, safe because the log is ordered.

const SIM_DIR: &str = "/data/wal";

fn sim_engine(fs: &SimFs) -> anyhow::Result<Engine> {
    let options = Options::default()
        .segment_size(64 << 10)
        .file_system(Arc::new(fs.clone()));
    Ok(Engine::open(SIM_DIR, options)?)
}

async fn append_durable(store: &mut Store, entries: Vec<EntryOf<C>>) -> anyhow::Result<()> {
    let (tx, rx) = C::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    tokio::time::timeout(WAIT, rx).await???;
    Ok(())
}

async fn log_of(engine: &Engine, group: u64) -> anyhow::Result<Vec<LogIdOf<C>>> {
    let got = Store::new(engine.clone(), group)
        .try_get_log_entries(..)
        .await?;
    Ok(got.iter().map(|e| e.log_id).collect())
}

fn ids(term_of: impl Fn(u64) -> u64, range: std::ops::RangeInclusive<u64>) -> Vec<LogIdOf<C>> {
    range.map(|i| log_id(term_of(i), i)).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn truncate_after_needs_no_fdatasync_and_a_crash_keeps_a_state_the_log_had(
) -> anyhow::Result<()> {
    let fs = SimFs::new();
    let engine = sim_engine(&fs)?;
    let mut store = Store::new(engine.clone(), 1);
    append_durable(&mut store, (1..=10).map(|i| entry(1, i)).collect()).await?;
    let old = ids(|_| 1, 1..=10);
    assert_eq!(log_of(&engine, 1).await?, old);

    let syncs = fs.count(crate::simfs::Op::SyncData);
    store.truncate_after(Some(log_id(1, 5))).await?;
    assert_eq!(
        fs.count(crate::simfs::Op::SyncData),
        syncs,
        "truncate_after ran an fdatasync"
    );
    assert_eq!(log_of(&engine, 1).await?, ids(|_| 1, 1..=5));

    // A crash now: the truncation is either lost (the log as it was before the call) or kept.
    // (Even KeepAll may lose it: an unsynced write can still wait in the engine's tail buffer,
    // in the process's memory, when the crash comes.)
    let img = fs.crash_image(CrashVariant::DropAll, 0);
    let reopened = sim_engine(&img)?;
    assert_eq!(log_of(&reopened, 1).await?, old, "DropAll");
    let img = fs.crash_image(CrashVariant::KeepAll, 0);
    let reopened = sim_engine(&img)?;
    let got = log_of(&reopened, 1).await?;
    assert!(
        got == old || got == ids(|_| 1, 1..=5),
        "KeepAll: recovered {got:?}, neither before nor after the truncation"
    );
    for seed in 0..16 {
        let img = fs.crash_image(CrashVariant::Random, seed);
        let reopened = sim_engine(&img)?;
        let got = log_of(&reopened, 1).await?;
        assert!(
            got == old || got == ids(|_| 1, 1..=5),
            "seed {seed}: recovered {got:?}, neither before nor after the truncation"
        );
    }

    // The new tail: its callback reports durable only after an fdatasync that also covers the
    // truncation (one ordered stream).
    append_durable(&mut store, vec![entry(2, 6), entry(2, 7)]).await?;
    let want = ids(|i| if i <= 5 { 1 } else { 2 }, 1..=7);
    for seed in 0..8 {
        for variant in CrashVariant::ALL {
            let img = fs.crash_image(variant, seed);
            let reopened = sim_engine(&img)?;
            assert_eq!(log_of(&reopened, 1).await?, want, "{variant:?} seed {seed}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Snapshots apart from the engine.

fn names(fs: &SimFs, dir: &Path) -> Vec<String> {
    let mut n = fs.live_names(dir);
    n.sort();
    n
}

#[test]
fn snapshot_store_files_are_whole_or_absent_after_a_crash() -> anyhow::Result<()> {
    let dir = Path::new("/data/snapshots");
    let fs = SimFs::new();
    let store = SnapshotStore::open_with_fs(dir, Arc::new(fs.clone()))?;
    assert_eq!(store.load(5)?, None);
    let first = store.save(5, b"meta-1", &vec![1u8; 10_000])?;
    let other = store.save(6, b"meta-x", b"other group")?;
    assert!(other > first);

    // A crash during the second save of group 5, at every I/O point it makes: the group
    // recovers with the first or the second snapshot, complete, and never with none.
    let clean = {
        let probe = fs.crash_image(CrashVariant::KeepAll, 0);
        let s = SnapshotStore::open_with_fs(dir, Arc::new(probe.clone()))?;
        let before = probe.io_points();
        s.save(5, b"meta-2", &vec![2u8; 20_000])?;
        probe.io_points() - before
    };
    assert!(clean >= 5, "save made only {clean} I/O calls");
    for k in 0..=clean {
        for variant in CrashVariant::ALL {
            let live = fs.crash_image(CrashVariant::KeepAll, 0);
            let s = SnapshotStore::open_with_fs(dir, Arc::new(live.clone()))?;
            live.crash_at(live.io_points() + k);
            let saved = s.save(5, b"meta-2", &vec![2u8; 20_000]).is_ok();
            let img = live.crash_image(variant, k);
            let reopened = SnapshotStore::open_with_fs(dir, Arc::new(img.clone()))?;
            let got = reopened
                .load(5)?
                .unwrap_or_else(|| panic!("k={k} {variant:?}: group 5 lost its snapshot"));
            let second = got.meta == b"meta-2" && got.data == vec![2u8; 20_000];
            let first = got.meta == b"meta-1" && got.data == vec![1u8; 10_000];
            assert!(second || first, "k={k} {variant:?}: {:?}", got.meta);
            if saved && k == clean {
                assert!(second, "k={k} {variant:?}: a returned save was lost");
            }
            // Exactly one file per group survives the reopen, and no temporary file.
            let files = names(&img, dir);
            assert_eq!(files.len(), 2, "k={k} {variant:?}: {files:?}");
            assert_eq!(
                reopened.load(6)?.map(|s| s.data),
                Some(b"other group".to_vec())
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn state_machine_restarts_from_its_snapshot_file() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let store = SnapshotStore::open(dir.path().join("snapshots"))?;
    let mut sm = KvStateMachine::open_async(store.clone(), 9).await?;

    let big = "v".repeat(1000);
    let entries: Vec<_> = (1..=200)
        .map(|i| Ok((set(1, i, format!("k{i}"), big.clone()), None)))
        .collect();
    sm.apply(futures_util::stream::iter(entries)).await?;
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await?;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 200)));
    // Durable when build_snapshot returned: the file is there, whole.
    let path = store.path_of(9).expect("a snapshot file");
    let file_len = std::fs::metadata(&path)?.len();
    assert!(file_len > 200 * 1000, "snapshot file of {file_len} bytes");
    drop(builder);
    drop(sm);
    drop(store);

    // Restart: the state machine resumes from the newest snapshot file.
    let store = SnapshotStore::open(dir.path().join("snapshots"))?;
    let mut sm = KvStateMachine::open_async(store.clone(), 9).await?;
    assert_eq!(sm.last_applied(), Some(log_id(1, 200)));
    assert_eq!(sm.len(), 200);
    assert_eq!(sm.get("k7").as_deref(), Some(big.as_str()));
    let current = sm.get_current_snapshot().await?.expect("current snapshot");
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot, snap.snapshot);

    // Installing a newer snapshot replaces the file; the old one is gone.
    let mut other = KvStateMachine::new();
    let entries: Vec<_> = (1..=3)
        .map(|i| Ok((set(2, 300 + i, format!("n{i}"), "x".into()), None)))
        .collect();
    other.apply(futures_util::stream::iter(entries)).await?;
    let newer = other.get_snapshot_builder().await.build_snapshot().await?;
    sm.install_snapshot(&newer.meta, newer.snapshot.clone())
        .await?;
    assert_eq!(sm.len(), 3);
    assert!(!path.exists(), "the old snapshot file was not removed");
    assert_eq!(std::fs::read_dir(dir.path().join("snapshots"))?.count(), 1);
    let reopened = KvStateMachine::open(SnapshotStore::open(dir.path().join("snapshots"))?, 9)?;
    assert_eq!(reopened.last_applied(), Some(log_id(2, 303)));
    assert_eq!(reopened.get("n2").as_deref(), Some("x"));

    // A snapshot that does not decode is refused before anything is replaced or stored.
    let err = sm
        .install_snapshot(&snap.meta, b"not a map".to_vec())
        .await
        .expect_err("garbage snapshot installed");
    println!("refused: {err}");
    assert_eq!(sm.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn snapshot_encoding_holds_no_lock_against_apply() -> anyhow::Result<()> {
    // build_snapshot encodes a copy-on-write reference: entries applied while it runs change
    // the live map, not the snapshot being built.
    let dir = TempDir::new()?;
    let store = SnapshotStore::open(dir.path())?;
    let mut sm = KvStateMachine::open_async(store, 1).await?;
    let entries: Vec<_> = (1..=50_000)
        .map(|i| Ok((set(1, i, format!("k{i:06}"), "v".into()), None)))
        .collect();
    sm.apply(futures_util::stream::iter(entries)).await?;
    let mut builder = sm.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    // Let the build take its reference and hand the encoding to the store's threads.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // Runs while the snapshot is encoded and written on the store's threads.
    let more: Vec<_> = (50_001..=50_010)
        .map(|i| Ok((set(1, i, format!("k{i:06}"), "w".into()), None)))
        .collect();
    sm.apply(futures_util::stream::iter(more)).await?;
    assert_eq!(sm.len(), 50_010);
    let snap = build.await??;
    let last = snap.meta.last_log_id.expect("last log id").index;
    let map: std::collections::BTreeMap<String, String> =
        bincode::serde::decode_from_slice(&snap.snapshot, bincode::config::standard())?.0;
    assert_eq!(
        map.len() as u64,
        last,
        "snapshot content disagrees with its meta"
    );
    Ok(())
}
