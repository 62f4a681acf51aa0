//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: the application installs the
//! recorder (Prometheus exporter, statsd, ...) it wants; without one, each call below is a no-op
//! that costs one atomic load.
//!
//! Invariants:
//! - Nothing here runs per entry or per write: counters are updated once per write group, fsync,
//!   rotation, GC job and recovery, so the hot path pays the same with or without a recorder.
//! - Names and units are described once per process ([`describe`]) and listed in
//!   docs/OPERATIONS.md; every engine of a process adds to the same series.

use std::sync::Once;
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// fdatasync calls that returned (ok or not).
pub(crate) const FSYNCS: &str = "mrwal_fsyncs_total";
/// Duration of each fdatasync, in seconds.
pub(crate) const FSYNC_SECONDS: &str = "mrwal_fsync_seconds";
/// Writers (batches) per write group.
pub(crate) const WRITE_GROUP_SIZE: &str = "mrwal_write_group_batches";
/// Records (batches) written.
pub(crate) const RECORDS: &str = "mrwal_records_total";
/// Bytes written to segment files (records, markers; not zero-fill).
pub(crate) const BYTES_WRITTEN: &str = "mrwal_bytes_written_total";
/// Segment rotations.
pub(crate) const ROTATIONS: &str = "mrwal_rotations_total";
/// GC jobs finished (checkpoint stored, dead segments deleted).
pub(crate) const GC_RUNS: &str = "mrwal_gc_runs_total";
/// Bytes of segment files GC deleted.
pub(crate) const GC_FREED_BYTES: &str = "mrwal_gc_freed_bytes_total";
/// Segments made from a recycled (pooled) dead segment file instead of a new file.
pub(crate) const RECYCLED: &str = "mrwal_segments_recycled_total";
/// Dead segment files kept in the recycling pool.
pub(crate) const POOLED: &str = "mrwal_pooled_segments";
/// Duration of the last recovery, in seconds.
pub(crate) const RECOVERY_SECONDS: &str = "mrwal_recovery_seconds";
/// Bytes of segment files recovery scanned.
pub(crate) const RECOVERY_BYTES: &str = "mrwal_recovery_scanned_bytes_total";
/// Bytes recovery cut (a torn tail) or skipped (damaged records, `TolerateAny`).
pub(crate) const RECOVERY_DROPPED_BYTES: &str = "mrwal_recovery_dropped_bytes_total";
/// Times an engine was poisoned (a failed fdatasync or write).
pub(crate) const POISONED: &str = "mrwal_poisoned_total";
/// Segment files on disk.
pub(crate) const SEGMENTS: &str = "mrwal_segments";
/// Groups known.
pub(crate) const GROUPS: &str = "mrwal_groups";
/// Heap bytes of the entry index.
pub(crate) const INDEX_BYTES: &str = "mrwal_index_bytes";
/// Bytes charged to the entry cache.
pub(crate) const CACHE_BYTES: &str = "mrwal_cache_bytes";

/// Describes every metric to the installed recorder, once per process.
pub(crate) fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use ::metrics::Unit;
        describe_counter!(FSYNCS, "fdatasync calls of segment files");
        describe_histogram!(FSYNC_SECONDS, Unit::Seconds, "duration of each fdatasync");
        describe_histogram!(WRITE_GROUP_SIZE, "batches per write group");
        describe_counter!(RECORDS, "records (batches) written");
        describe_counter!(BYTES_WRITTEN, Unit::Bytes, "bytes written to segment files");
        describe_counter!(ROTATIONS, "segment rotations");
        describe_counter!(GC_RUNS, "GC jobs finished");
        describe_counter!(RECYCLED, "segments made from a recycled dead segment file");
        describe_gauge!(POOLED, "dead segment files kept for recycling");
        describe_counter!(GC_FREED_BYTES, Unit::Bytes, "bytes of segments GC deleted");
        describe_gauge!(
            RECOVERY_SECONDS,
            Unit::Seconds,
            "duration of the last recovery"
        );
        describe_counter!(RECOVERY_BYTES, Unit::Bytes, "bytes recovery scanned");
        describe_counter!(
            RECOVERY_DROPPED_BYTES,
            Unit::Bytes,
            "bytes recovery cut or skipped"
        );
        describe_counter!(POISONED, "times an engine was poisoned");
        describe_gauge!(SEGMENTS, "segment files on disk");
        describe_gauge!(GROUPS, "groups known");
        describe_gauge!(INDEX_BYTES, Unit::Bytes, "heap bytes of the entry index");
        describe_gauge!(CACHE_BYTES, Unit::Bytes, "bytes charged to the entry cache");
    });
}

/// One fdatasync returned after `took`.
pub(crate) fn fsync(took: Duration) {
    counter!(FSYNCS).increment(1);
    histogram!(FSYNC_SECONDS).record(took.as_secs_f64());
}

/// A write group of `batches` records was written.
pub(crate) fn write_group(batches: usize) {
    counter!(RECORDS).increment(batches as u64);
    histogram!(WRITE_GROUP_SIZE).record(batches as f64);
}

/// `bytes` reached a segment file.
pub(crate) fn bytes_written(bytes: u64) {
    counter!(BYTES_WRITTEN).increment(bytes);
}

/// The log rotated into a new segment; `segments` are now on disk.
pub(crate) fn rotation(segments: usize) {
    counter!(ROTATIONS).increment(1);
    gauge!(SEGMENTS).set(segments as f64);
}

/// A GC job deleted segments of `freed` bytes; `segments` remain, `pooled` files are kept
/// for recycling.
pub(crate) fn gc_run(freed: u64, segments: usize, pooled: usize) {
    counter!(GC_RUNS).increment(1);
    counter!(GC_FREED_BYTES).increment(freed);
    gauge!(SEGMENTS).set(segments as f64);
    gauge!(POOLED).set(pooled as f64);
}

/// A segment was made from a pool file.
pub(crate) fn recycled() {
    counter!(RECYCLED).increment(1);
}

/// Recovery took `took`, scanned `scanned` bytes and cut or skipped `dropped`.
pub(crate) fn recovery(took: Duration, scanned: u64, dropped: u64) {
    gauge!(RECOVERY_SECONDS).set(took.as_secs_f64());
    counter!(RECOVERY_BYTES).increment(scanned);
    counter!(RECOVERY_DROPPED_BYTES).increment(dropped);
}

/// The engine was poisoned.
pub(crate) fn poisoned() {
    counter!(POISONED).increment(1);
}

/// The gauges that need a walk of the index (taken by [`crate::Engine::stats`], at open and
/// after GC jobs, never on the write path).
pub(crate) fn state(segments: usize, groups: usize, index_bytes: u64, cache_bytes: u64) {
    gauge!(SEGMENTS).set(segments as f64);
    gauge!(GROUPS).set(groups as f64);
    gauge!(INDEX_BYTES).set(index_bytes as f64);
    gauge!(CACHE_BYTES).set(cache_bytes as f64);
}
