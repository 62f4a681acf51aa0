//! Golden files: a small data directory written by format version 1 (tests/golden/v1/), with
//! the content it must open to (tests/golden/v1.json). Every later version must open it with
//! identical content, so a refactor cannot change the on-disk format unnoticed.
//!
//! The directory holds several segments (one a survivor below a CHECKPOINT), raw and lz4
//! records, sync markers (after fsyncs, after a rotation, the final one of a clean shutdown)
//! and a SEAL file. To regenerate it (only when the format version changes, with a new
//! directory `v2`, never overwriting `v1`):
//!
//! ```text
//! MRWAL_GOLDEN_WRITE=1 cargo test --test it golden::generate -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use multiraft_wal::{Engine, Options, RecoveryMode, WriteBatch};
use serde_json::{json, Value};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn options() -> Options {
    Options::default()
        .segment_size(4096)
        .compression_threshold(256)
        .recovery_threads(2)
        .prefill_segments(false)
        .gc_rewrite_max_entries(0)
        .auto_gc(false)
}

/// Incompressible bytes (a fixed xorshift stream), so that lz4 leaves a record raw.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn payload(group: u64, index: u64, fill: usize) -> Vec<u8> {
    let mut p = format!("g{group}/i{index}/").into_bytes();
    p.extend(std::iter::repeat_n(b'a' + (index % 26) as u8, fill));
    p
}

/// The workload: appends to 4 groups (one large, compressible batch), an overwrite of a tail,
/// a truncation, purges, votes, committed markers, keys put and deleted, a removed group; a GC
/// that makes segments dead (CHECKPOINT) while one survives.
fn write_workload(engine: &Engine) {
    // Group 1: a long-lived log in the first segment (it survives the GC below).
    let mut b = WriteBatch::new();
    b.append(1, 1, (1..=5).map(|i| payload(1, i, 10)));
    b.set_vote(1, b"term 1, voted for node 1");
    engine.write(b).unwrap();
    // Group 2: big, incompressible batches that fill and rotate segments; then purged whole.
    for k in 0..3u64 {
        let mut b = WriteBatch::new();
        b.append(2, 1 + k * 4, (1 + k * 4..=4 + k * 4).map(|i| noise(i, 700)));
        engine.write(b).unwrap();
    }
    let mut b = WriteBatch::new();
    b.purge_to(2, 12).put(2, b"applied", b"12");
    engine.write(b).unwrap();
    // Group 3: overwrite a tail at a higher term, truncate, purge a prefix, keys.
    let mut b = WriteBatch::new();
    b.append(3, 10, (10..=20).map(|i| payload(3, i, 30)));
    engine.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.append(3, 15, (15..=17).map(|i| payload(3, i + 1000, 30)))
        .put(3, b"k1", b"v1")
        .put(3, b"k2", b"v2");
    engine.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.truncate_from(3, 17).purge_to(3, 11).delete(3, b"k1");
    b.set_committed(3, b"committed 16");
    engine.write(b).unwrap();
    // Group 4: written, then removed.
    let mut b = WriteBatch::new();
    b.append(4, 1, [b"gone"]).set_vote(4, b"gone");
    engine.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.remove_group(4);
    engine.write(b).unwrap();
    let gc = engine.gc().unwrap();
    assert!(!gc.deleted_segments.is_empty(), "{gc:?}");
    // After the GC: more writes to the survivor's group and an unsynced one (sealed at close).
    let mut b = WriteBatch::new();
    b.append(1, 6, (6..=8).map(|i| payload(1, i, 10)));
    engine.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 9, [payload(1, 9, 10)]);
    b.set_vote(1, b"term 2, voted for node 3");
    engine.write_unsynced(b).unwrap();
}

/// What the engine serves, as JSON: per group, its first index, entries, vote, committed and
/// keys (bytes as UTF-8 when they are, hex otherwise).
fn content(engine: &Engine) -> Value {
    fn text(b: &[u8]) -> Value {
        match std::str::from_utf8(b) {
            Ok(s) => json!(s),
            Err(_) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        }
    }
    let mut groups = BTreeMap::new();
    for g in 1..=8u64 {
        let first = engine.first_index(g);
        let entries: Vec<Value> = match first {
            Some(f) => engine
                .entries(g, f..u64::MAX, usize::MAX)
                .unwrap()
                .iter()
                .map(|e| text(e))
                .collect(),
            None => Vec::new(),
        };
        let keys: BTreeMap<String, Value> = [b"applied".as_slice(), b"k1", b"k2"]
            .iter()
            .filter_map(|k| {
                engine
                    .get(g, k)
                    .map(|v| (String::from_utf8_lossy(k).into(), text(&v)))
            })
            .collect();
        let vote = engine.vote(g).map(|v| text(&v));
        let committed = engine.committed(g).map(|v| text(&v));
        if first.is_none() && vote.is_none() && committed.is_none() && keys.is_empty() {
            continue;
        }
        groups.insert(
            g.to_string(),
            json!({ "first": first, "entries": entries, "vote": vote, "committed": committed, "keys": keys }),
        );
    }
    json!({ "format": 1, "groups": groups })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn version_1_directory_opens_with_identical_content() {
    let src = golden_dir().join("v1");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("v1.json")).unwrap())
            .unwrap();
    for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTail] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        copy_dir(&src, &dir);
        let engine = Engine::open(&dir, options().recovery_mode(mode)).unwrap();
        let report = engine.recovery_report();
        assert!(report.checkpoint && report.clean_seal, "{report:?}");
        assert!(
            report.tail_cut.is_none() && report.synced_segments.is_empty(),
            "{report:?}"
        );
        assert_eq!(content(&engine), want, "{mode:?}");
        drop(engine);
        // And again after this version has opened and sealed it.
        let engine = Engine::open(&dir, options().recovery_mode(mode)).unwrap();
        assert_eq!(content(&engine), want, "{mode:?}, second open");
    }
}

/// Writes tests/golden/v1 and v1.json (see the module docs); does nothing unless
/// `MRWAL_GOLDEN_WRITE=1`.
#[test]
fn generate() {
    if std::env::var("MRWAL_GOLDEN_WRITE").as_deref() != Ok("1") {
        return;
    }
    let dir = golden_dir().join("v1");
    assert!(
        !dir.exists(),
        "{dir:?} exists: golden files are never overwritten"
    );
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let engine = Engine::open(&wal, options()).unwrap();
    write_workload(&engine);
    let want = content(&engine);
    drop(engine);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&wal).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name != "LOCK" {
            std::fs::copy(e.path(), dir.join(&name)).unwrap();
        }
    }
    std::fs::write(
        golden_dir().join("v1.json"),
        serde_json::to_string_pretty(&want).unwrap() + "\n",
    )
    .unwrap();
    println!("golden: wrote {dir:?}: {want}");
}
