//! Group commit: one fdatasync for everything written so far, shared by every waiter, and the
//! callbacks of asynchronous writes fired once the fsync that covers them has returned.
//!
//! Invariants:
//! - `synced` only grows, and only after a `sync_data` (or a rotation's fsync) covering every
//!   write with a smaller or equal sequence number has returned `Ok`.
//! - A callback runs exactly once: with `Ok` once `synced >= seq`, or with the poison error.
//! - No lock of this module is held while a callback runs or while a file is synced.

use std::collections::VecDeque;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Called once a batch is durable, or with the error that stopped it.
pub(crate) type Callback = Box<dyn FnOnce(Result<()>) + Send + 'static>;

#[derive(Default)]
struct State {
    synced: u64,
    leader: bool,
    callbacks: VecDeque<(u64, Callback)>,
    poisoned: Option<String>,
    shutdown: bool,
}

/// The group-commit coordinator.
#[derive(Default)]
pub(crate) struct Commit {
    state: Mutex<State>,
    cv: Condvar,
    /// Serializes every fdatasync of a segment, so that a sync that returns `Ok` after another
    /// failed (the kernel may have dropped the failed sync's dirty pages) is never believed.
    sync_lock: Mutex<()>,
}

/// What a sync leader must do: sync a file covering writes up to `target`.
pub(crate) trait Syncer {
    /// Syncs the active segment; returns the highest sequence number now durable.
    fn sync_active(&self) -> Result<u64>;
}

impl Commit {
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.state.lock().poisoned.clone()
    }

    /// Poisons the engine. Pending callbacks are failed by the flusher, never here: this may be
    /// called with the log lock held, and a callback may write.
    pub(crate) fn poison(&self, reason: String) {
        let mut st = self.state.lock();
        if st.poisoned.is_none() {
            tracing::error!(%reason, "engine poisoned");
            st.poisoned = Some(reason);
        }
        self.cv.notify_all();
    }

    /// Runs one fdatasync of a segment. Syncs are serialized; none runs once the engine is
    /// poisoned, and a failure poisons the engine before the next sync can start. So an `Ok`
    /// here means no sync failed before this one: its durability is real.
    pub(crate) fn guarded_sync(
        &self,
        what: &str,
        sync: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<()> {
        let _serial = self.sync_lock.lock();
        if let Some(reason) = self.poisoned() {
            return Err(Error::Poisoned { reason });
        }
        sync().map_err(|e| {
            let err = Error::io(what, e);
            self.poison(format!("{err}"));
            err
        })
    }

    /// Records that everything up to `seq` is durable (a rotation fsynced the old segment).
    pub(crate) fn mark_synced(&self, seq: u64) {
        let mut st = self.state.lock();
        if st.poisoned.is_none() && seq > st.synced {
            st.synced = seq;
            self.cv.notify_all();
        }
    }

    pub(crate) fn synced(&self) -> u64 {
        self.state.lock().synced
    }

    pub(crate) fn add_callback(&self, seq: u64, cb: Callback) {
        let mut st = self.state.lock();
        if let Some(reason) = st.poisoned.clone() {
            drop(st);
            cb(Err(Error::Poisoned { reason }));
            return;
        }
        st.callbacks.push_back((seq, cb));
        self.cv.notify_all();
    }

    fn take_ready(st: &mut State) -> Vec<Callback> {
        let mut ready = Vec::new();
        // Sequence numbers are registered in write order, but a callback may be registered a
        // little after a later write's: scan while the front is ready, then sweep the rest.
        if st.callbacks.iter().any(|(s, _)| *s <= st.synced) {
            let synced = st.synced;
            let mut rest = VecDeque::with_capacity(st.callbacks.len());
            for (s, cb) in st.callbacks.drain(..) {
                if s <= synced {
                    ready.push(cb);
                } else {
                    rest.push_back((s, cb));
                }
            }
            st.callbacks = rest;
        }
        ready
    }

    /// Blocks until every write up to `seq` is durable, leading an fsync if nobody else is.
    pub(crate) fn wait_durable(&self, seq: u64, syncer: &dyn Syncer) -> Result<()> {
        let mut st = self.state.lock();
        loop {
            if st.synced >= seq {
                let ready = Self::take_ready(&mut st);
                drop(st);
                ready.into_iter().for_each(|cb| cb(Ok(())));
                return Ok(());
            }
            if let Some(reason) = &st.poisoned {
                return Err(Error::Poisoned {
                    reason: reason.clone(),
                });
            }
            if st.leader {
                self.cv.wait(&mut st);
                continue;
            }
            st.leader = true;
            drop(st);
            let result = syncer.sync_active();
            st = self.state.lock();
            st.leader = false;
            match result {
                // Once poisoned, nothing more is acknowledged, even what this sync covered.
                Ok(_) if st.poisoned.is_some() => {
                    self.cv.notify_all();
                    let reason = st.poisoned.clone().unwrap_or_default();
                    return Err(Error::Poisoned { reason });
                }
                Ok(durable) => {
                    if durable > st.synced {
                        st.synced = durable;
                    }
                    self.cv.notify_all();
                }
                Err(e) => {
                    self.cv.notify_all();
                    drop(st);
                    self.poison(format!("fdatasync failed: {e}"));
                    return Err(Error::Poisoned {
                        reason: self.poisoned().unwrap_or_default(),
                    });
                }
            }
        }
    }

    /// The flusher's loop: whenever callbacks wait, sync until they are durable. Returns once
    /// shut down with no callback left.
    pub(crate) fn run_flusher(&self, syncer: &dyn Syncer) {
        loop {
            let target = {
                let mut st = self.state.lock();
                loop {
                    if st.poisoned.is_some() {
                        let cbs = std::mem::take(&mut st.callbacks);
                        let reason = st.poisoned.clone().unwrap_or_default();
                        drop(st);
                        for (_, cb) in cbs {
                            cb(Err(Error::Poisoned {
                                reason: reason.clone(),
                            }));
                        }
                        st = self.state.lock();
                        if st.shutdown && st.callbacks.is_empty() {
                            return;
                        }
                        if st.callbacks.is_empty() {
                            self.cv.wait(&mut st);
                        }
                        continue;
                    }
                    if let Some(max) = st.callbacks.iter().map(|(s, _)| *s).max() {
                        break max;
                    }
                    if st.shutdown {
                        return;
                    }
                    self.cv.wait(&mut st);
                }
            };
            // Errors poison the engine inside; the loop above then fails the callbacks.
            let _ = self.wait_durable(target, syncer);
        }
    }

    pub(crate) fn shutdown(&self) {
        let mut st = self.state.lock();
        st.shutdown = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    struct FakeSync {
        written: AtomicU64,
        syncs: AtomicUsize,
        fail: bool,
    }

    impl Syncer for FakeSync {
        fn sync_active(&self) -> Result<u64> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(Error::Io {
                    context: "test".into(),
                    source: std::io::Error::other("EIO"),
                });
            }
            Ok(self.written.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn one_sync_covers_every_earlier_write_and_callbacks_fire_once() {
        let c = Commit::default();
        let s = FakeSync {
            written: AtomicU64::new(3),
            syncs: AtomicUsize::new(0),
            fail: false,
        };
        let fired = Arc::new(AtomicUsize::new(0));
        for seq in 1..=3 {
            let f = fired.clone();
            c.add_callback(
                seq,
                Box::new(move |r| {
                    assert!(r.is_ok());
                    f.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
        c.wait_durable(2, &s).unwrap();
        assert_eq!(s.syncs.load(Ordering::SeqCst), 1);
        assert_eq!(
            fired.load(Ordering::SeqCst),
            3,
            "the sync covered seq 3 too"
        );
        c.wait_durable(3, &s).unwrap();
        assert_eq!(
            s.syncs.load(Ordering::SeqCst),
            1,
            "already durable: no second sync"
        );
    }

    #[test]
    fn a_failed_sync_poisons_and_is_never_retried() {
        let c = Commit::default();
        let s = FakeSync {
            written: AtomicU64::new(1),
            syncs: AtomicUsize::new(0),
            fail: true,
        };
        assert!(matches!(c.wait_durable(1, &s), Err(Error::Poisoned { .. })));
        assert!(matches!(c.wait_durable(1, &s), Err(Error::Poisoned { .. })));
        assert_eq!(s.syncs.load(Ordering::SeqCst), 1);
        let got = Arc::new(AtomicUsize::new(0));
        let g = got.clone();
        c.add_callback(
            2,
            Box::new(move |r| {
                assert!(r.is_err());
                g.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(got.load(Ordering::SeqCst), 1);
    }
}
