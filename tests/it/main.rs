//! One integration-test binary (see each module's opening comment).
mod corruption; // truncation, bit flips, deleted, stray and stale files on real segment files
mod crash_explorer; // crash at every I/O point of a scripted workload on the simulated FS
mod engine; // the engine API against an in-memory model, reopen, GC, torn tails, poisoning
mod faults; // EIO and ENOSPC injected at every call site
mod kill; // SIGKILL a child writer at random points, then check every acknowledged batch
mod prop_recovery; // seeded proptest of the fuzz inputs: hostile directory images never panic or lie
mod raft_cluster; // 3 openraft nodes x 4 groups in one process: restart from disk, leader change, all writes everywhere
mod raft_durability; // append callbacks vs fdatasync, write errors, restarts with 1 and 1,000 groups, isolation
mod raft_suite; // openraft's log-store suite: fresh engine per sub-test, and 64 suites on one engine
mod simfs; // the simulated file system (durable vs live images, crashes, faults)
