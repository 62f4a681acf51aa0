//! One integration-test binary. Modules:
//! - `engine`: the engine API against an in-memory model, reopen, GC, torn tails, poisoning.
//! - `simfs`: the simulated file system (durable vs live images, crashes, faults).
//! - `crash_explorer`: crash at every I/O point of a scripted workload on the simulated FS.
//! - `corruption`: truncation, bit flips, deleted, stray and stale files on real segment files.
//! - `ctl`: `mrwal-ctl` and `inspect`: read-only subcommands change nothing, `check` finds every
//!   single fault, `repair` (and its dry run), a mistyped path creates nothing.
//! - `golden`: the checked-in version-1 data directory opens with identical content.
//! - `faults`: EIO and ENOSPC injected at every call site.
//! - `gc`: GC converges (a second gc() makes no mutating call), churn disk usage stays bounded,
//!   the full-disk sequence (simulated FS, real tmpfs when mountable), power cuts during rewrites
//!   and mid-segment checkpoints.
//! - `pipeline`: write groups on a gated file system: no acknowledgement before its fsync.
//! - `metrics`: the metrics reach an installed recorder (fsyncs, groups, GC, recovery, poison).
//! - `kill`: SIGKILL a child writer at random points, then check every acknowledged batch.
//! - `prop_recovery`: seeded proptest of the fuzz inputs: hostile images never panic or lie.
//! - `reads`: the entry cache and the disk path race writers (seeded model), typed checksum
//!   errors on reads, the cache budget, reads after reopen.
//! - `recycle`: dead segments reused as new ones: reuse under churn, Strict reopen after a clean
//!   close, a kill and power cuts with stale bytes after the data, power cuts at every I/O point
//!   of recycling, readers racing GC, a full disk giving the pool back first.
//! - `recovery_items`: one regression test per recovery item of issue 8 (kill then power cut, lz4 density, ...).
//! - `raft_suite`: openraft's log-store suite, fresh engine per sub-test and 64 suites on one engine.
//! - `raft_corruption`: single faults on a cleanly closed directory, read through the adapter.
//! - `raft_durability`: append callbacks vs fdatasync, write errors, restarts, group isolation.
//! - `raft_nonblocking`: save_vote awaits its fdatasync without holding a runtime thread,
//!   votes share fdatasyncs, truncate_after unsynced vs crashes, the snapshot store.
//! - `raft09_suite`: openraft 0.9's storage suite against the 0.9 adapter (fresh engine; 64 at once).
//! - `raft_shared_durability`: durability tests written once, run against both adapters.
//! - `probefs`: a real file system with gated, counted, failable fdatasyncs.
//! - `raft_cluster`: 3 openraft nodes x 4 groups in one process: restart, leader change.

mod corruption;
mod crash_explorer;
#[cfg(feature = "ctl")]
mod ctl;
mod engine;
mod faults;
mod gc;
mod golden;
mod kill;
mod metrics;
mod pipeline;
#[cfg(any(feature = "openraft", feature = "openraft09"))]
mod probefs;
mod prop_recovery;
#[cfg(feature = "openraft09")]
mod raft09_suite;
#[cfg(feature = "openraft")]
mod raft_cluster;
#[cfg(feature = "openraft")]
mod raft_corruption;
#[cfg(feature = "openraft")]
mod raft_durability;
#[cfg(feature = "openraft")]
mod raft_nonblocking;
#[cfg(any(feature = "openraft", feature = "openraft09"))]
mod raft_shared_durability;
#[cfg(feature = "openraft")]
mod raft_suite;
mod reads;
mod recovery_items;
mod recycle;
mod simfs;
