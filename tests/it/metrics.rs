//! The engine's metrics reach the application's recorder: a debugging recorder installed for
//! this test binary sees fsyncs, write groups, bytes, rotations, GC, recovery and poisoning.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use multiraft_wal::{Engine, Options, WriteBatch};

use crate::simfs::{Fault, Op, SimFs};

/// The process-wide recorder (other tests of this binary add to it too: assertions only ask
/// for at least what this test did).
fn snapshotter() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let s = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this test binary");
        s
    })
}

#[derive(Default, Debug)]
struct Seen {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<String, Vec<f64>>,
}

/// Drains the recorder (counters and histograms restart from zero).
fn take() -> Seen {
    let mut seen = Seen::default();
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let name = key.key().name().to_string();
        match value {
            DebugValue::Counter(n) => *seen.counters.entry(name).or_default() += n,
            DebugValue::Gauge(v) => {
                seen.gauges.insert(name, v.into_inner());
            }
            DebugValue::Histogram(vs) => seen
                .histograms
                .entry(name)
                .or_default()
                .extend(vs.into_iter().map(|v| v.into_inner())),
        }
    }
    seen
}

#[test]
fn metrics_are_emitted() {
    take();
    let dir = tempfile::tempdir().unwrap();
    let opts = || {
        Options::default()
            .segment_size(8 << 10)
            .prefill_segments(false)
    };
    let engine = Engine::open(dir.path(), opts()).unwrap();
    // Enough synced writes to rotate several times; purging makes old segments dead, so the
    // rotations arm GC jobs.
    for i in 1..=64u64 {
        let mut b = WriteBatch::new();
        b.append(1, i, [vec![7u8; 512]]);
        if i > 2 {
            b.purge_to(1, i - 2);
        }
        engine.write(b).unwrap();
    }
    engine.gc().unwrap();
    let stats = engine.stats();
    drop(engine);
    let seen = take();
    let c = |n: &str| seen.counters.get(n).copied().unwrap_or(0);
    assert!(c("mrwal_fsyncs_total") >= 64, "{seen:?}");
    assert!(
        seen.histograms
            .get("mrwal_fsync_seconds")
            .is_some_and(|h| h.len() >= 64 && h.iter().all(|s| *s >= 0.0)),
        "{seen:?}"
    );
    assert!(c("mrwal_records_total") >= 64, "{seen:?}");
    assert!(
        seen.histograms
            .get("mrwal_write_group_batches")
            .is_some_and(|h| h.iter().all(|n| *n >= 1.0)),
        "{seen:?}"
    );
    assert!(c("mrwal_bytes_written_total") >= 64 * 512, "{seen:?}");
    assert!(c("mrwal_rotations_total") >= 3, "{seen:?}");
    assert!(c("mrwal_gc_runs_total") >= 1, "{seen:?}");
    // Dead segments were deleted or kept for recycling (then reused by later rotations).
    assert!(
        c("mrwal_gc_freed_bytes_total") > 0
            || c("mrwal_segments_recycled_total") > 0
            || stats.pooled_segments > 0,
        "{seen:?} {stats:?}"
    );
    // Whether a rotation found a pool file in time depends on the GC thread's pace (the
    // recycling itself is tested in recycle.rs); every reuse counted in the stats is emitted.
    assert!(
        c("mrwal_segments_recycled_total") >= stats.recycled_segments,
        "{seen:?} {stats:?}"
    );
    assert!(
        seen.gauges.contains_key("mrwal_pooled_segments"),
        "{seen:?}"
    );
    assert!(seen.gauges.contains_key("mrwal_segments"), "{seen:?}");
    assert!(stats.groups >= 1);
    assert!(seen.gauges.contains_key("mrwal_groups"), "{seen:?}");
    assert!(seen.gauges.contains_key("mrwal_index_bytes"), "{seen:?}");
    assert!(seen.gauges.contains_key("mrwal_cache_bytes"), "{seen:?}");

    // Recovery reports what it scanned.
    let engine = Engine::open(dir.path(), opts()).unwrap();
    let scanned = engine.recovery_report().bytes;
    drop(engine);
    let seen = take();
    assert!(scanned > 0);
    assert!(
        seen.counters
            .get("mrwal_recovery_scanned_bytes_total")
            .is_some_and(|n| *n >= scanned),
        "{seen:?}"
    );
    assert!(
        seen.gauges.contains_key("mrwal_recovery_seconds"),
        "{seen:?}"
    );

    // A failed fdatasync poisons the engine and is counted.
    let fs = Arc::new(SimFs::new());
    let engine = Engine::open("/m", opts().file_system(fs.clone())).unwrap();
    fs.fail_from(Op::SyncData, fs.count(Op::SyncData) + 1, Fault::Eio);
    let mut b = WriteBatch::new();
    b.append(1, 1, [b"x"]);
    assert!(engine.write(b).is_err());
    assert!(engine.is_poisoned());
    let seen = take();
    assert!(
        seen.counters
            .get("mrwal_poisoned_total")
            .is_some_and(|n| *n >= 1),
        "{seen:?}"
    );
}
