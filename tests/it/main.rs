//! One integration-test binary (see each module's opening comment).
mod engine; // the engine API against an in-memory model, reopen, GC, torn tails, poisoning
mod raft_suite; // openraft's log-store suite: fresh engine per sub-test, and 64 suites on one engine
mod raft_durability; // append callbacks vs fdatasync, write errors, restarts with 1 and 1,000 groups, isolation
