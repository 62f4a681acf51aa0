//! One integration-test binary (see each module's opening comment).
mod engine; // the engine API against an in-memory model, reopen, GC, torn tails, poisoning
