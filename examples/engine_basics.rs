//! The engine alone, without openraft: atomic batches across groups, the four ways to write,
//! reads, compaction and GC, and a restart that finds everything again.
//!
//! ```sh
//! cargo run --example engine_basics
//! ```

use anyhow::Context;
use multiraft_wal::{Engine, Options, WriteBatch};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let options = || Options::default().segment_size(1 << 20);
    let engine = Engine::open(dir.path(), options())?;

    // One atomic batch across two groups: entries, a vote and a key. `write` returns once an
    // fdatasync covers it.
    let mut batch = WriteBatch::new();
    batch
        .append(1, 1, [b"set a=1".as_slice(), b"set b=2"])
        .append(2, 1, [b"set x=9".as_slice()])
        .set_vote(1, b"term 3, voted for node 2")
        .put(2, b"applied", b"1");
    engine.write(batch)?;

    // Unsynced: readable at once, durable with a later sync (or the next synced write).
    let mut batch = WriteBatch::new();
    batch.append(1, 3, [b"set c=3".as_slice()]);
    engine.write_unsynced(batch)?;
    engine.sync()?;

    // Asynchronous: returns at once, the callback runs after the covering fdatasync.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut batch = WriteBatch::new();
    batch.append(2, 2, [b"set y=8".as_slice()]);
    engine.write_async(batch, move |result| {
        let _ = tx.send(result.is_ok());
    })?;
    anyhow::ensure!(rx.recv()?, "the asynchronous write failed");

    // From async code: a future completed by the group commit, holding no thread meanwhile.
    let mut batch = WriteBatch::new();
    batch.append(2, 3, [b"set z=7".as_slice()]);
    futures::executor::block_on(engine.write_durable(batch)?)?;

    // Reads come from the index (positions only) and the segment files.
    let entries = engine.entries(1, 1..4, usize::MAX)?;
    println!(
        "group 1: {:?}",
        entries
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect::<Vec<_>>()
    );
    println!(
        "group 2: entries {:?}..={:?}, applied = {:?}",
        engine.first_index(2),
        engine.last_index(2),
        engine.get(2, b"applied").map(String::from_utf8)
    );

    // Compaction: the application purges what its state machine has applied; GC deletes the
    // segments nobody references any more and names the groups that hold old ones.
    let mut batch = WriteBatch::new();
    batch.purge_to(1, 2);
    engine.write(batch)?;
    let report = engine.gc()?;
    println!(
        "gc: {} segments deleted, {} live",
        report.deleted_segments.len(),
        report.live_segments
    );

    // A restart recovers everything that was acknowledged.
    drop(engine);
    let engine = Engine::open(dir.path(), options())?;
    let report = engine.recovery_report();
    println!(
        "reopened: {} records replayed, clean shutdown seen: {}",
        report.records, report.clean_seal
    );
    anyhow::ensure!(engine.first_index(1) == Some(3), "group 1 keeps entry 3 on");
    let last = engine.entry(2, 3)?.context("entry 3 of group 2")?;
    anyhow::ensure!(
        last == b"set z=7",
        "entry 3 of group 2 survived the restart"
    );
    anyhow::ensure!(engine.vote(1).is_some(), "the vote survived the restart");
    println!("ok");
    Ok(())
}
