//! The sync stage of group commit: one fdatasync at a time covers every write group written
//! before it started; writers wait on their own [`Signal`] and are woken one by one when their
//! group is durable; asynchronous callbacks fire from whoever completes the fsync.
//!
//! Invariants:
//! - `synced` only grows, and only after a `sync_data` (or a rotation's fsync) covering every
//!   write group with a smaller or equal sequence number has returned `Ok`.
//! - At most one thread leads syncs (`syncing`). A synced writer that finds the stage idle
//!   leads one round itself (no wakeup between its write and its fdatasync); if waiters remain,
//!   it hands the stage to the flusher, which loops while waiters keep coming (no wakeup
//!   between rounds). Handovers go through this module's state, never by spinning; when the
//!   stage goes idle, no waiter is left beyond `synced`.
//! - A waiter completes exactly once: with `Ok` once `synced >= seq`, or with the poison error.
//!   Once poisoned, nothing more is acknowledged, even what an in-flight fsync covered.
//! - No lock of this module is held while a callback runs or while a file is synced. A callback
//!   that panics is contained: the thread that ran it goes on.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Called once a batch is durable, or with the error that stopped it.
pub(crate) type Callback = Box<dyn FnOnce(Result<()>) + Send + 'static>;

/// What one writer thread waits for. Set by other threads; the writer parks on it.
#[derive(Default)]
pub(crate) struct Signal {
    st: Mutex<SigState>,
    cv: Condvar,
}

/// The news a parked writer may get.
#[derive(Default)]
pub(crate) struct SigState {
    /// The write group holding this writer's batch was written (its sequence number), or the
    /// batch was refused.
    pub(crate) written: Option<Result<u64>>,
    /// The batch is durable, or never will be.
    pub(crate) durable: Option<Result<()>>,
    /// This writer now leads the write stage (takes the queue and writes it).
    pub(crate) lead_write: bool,
}

impl Signal {
    pub(crate) fn update(&self, f: impl FnOnce(&mut SigState)) {
        let mut st = self.st.lock();
        f(&mut st);
        self.cv.notify_one();
    }

    /// Parks until `f` returns `Some`.
    pub(crate) fn wait_for<R>(&self, mut f: impl FnMut(&mut SigState) -> Option<R>) -> R {
        let mut st = self.st.lock();
        loop {
            if let Some(r) = f(&mut st) {
                return r;
            }
            self.cv.wait(&mut st);
        }
    }
}

/// Someone waiting for durability.
pub(crate) enum Waiter {
    /// A parked writer thread.
    Signal(Arc<Signal>),
    /// An asynchronous write's callback.
    Callback(Callback),
}

impl Waiter {
    fn complete(self, result: Result<()>) {
        match self {
            Waiter::Signal(s) => s.update(|st| st.durable = Some(result)),
            Waiter::Callback(cb) => {
                if catch_unwind(AssertUnwindSafe(|| cb(result))).is_err() {
                    tracing::error!("a durability callback panicked; the engine goes on");
                }
            }
        }
    }
}

#[derive(Default)]
struct State {
    synced: u64,
    syncing: bool,
    /// Waiters in the order they were registered, which is sequence order (registration happens
    /// under the log lock as each group is written).
    waiters: VecDeque<(u64, Waiter)>,
    /// Callbacks found durable by a rotation's fsync, to be fired by the flusher (the rotating
    /// thread holds the log lock, and a callback may write).
    ready_callbacks: Vec<(Callback, bool)>,
    poisoned: Option<String>,
    shutdown: bool,
    /// Unsynced bytes passed `Options::bytes_per_sync`: the flusher runs a sync round even
    /// though nobody waits, so that the fdatasync at the next rotation (on a writer's thread)
    /// finds little left to write.
    want_sync: bool,
    /// A writer that led a sync round handed the stage to the flusher (`syncing` stays set;
    /// the flusher takes over under this lock, so the handover is never lost).
    flusher_heir: bool,
}

impl State {
    fn pending(&self) -> bool {
        self.waiters.back().is_some_and(|(s, _)| *s > self.synced)
    }

    /// Whether the sync stage has work and nobody leads it: waiters beyond `synced`, or waiters
    /// left to fail after poisoning.
    fn needs_leader(&self) -> bool {
        !self.syncing
            && (self.pending()
                || self.want_sync && self.poisoned.is_none()
                || self.poisoned.is_some() && !self.waiters.is_empty())
    }

    /// Removes the waiters that `synced` covers.
    fn take_ready(&mut self) -> Vec<Waiter> {
        let mut ready = Vec::new();
        while self.waiters.front().is_some_and(|(s, _)| *s <= self.synced) {
            if let Some((_, w)) = self.waiters.pop_front() {
                ready.push(w);
            }
        }
        ready
    }
}

/// The sync-stage coordinator.
#[derive(Default)]
pub(crate) struct Commit {
    state: Mutex<State>,
    /// The flusher waits here.
    flusher_cv: Condvar,
    /// Serializes every fdatasync of a segment, so that a sync that returns `Ok` after another
    /// failed (the kernel may have dropped the failed sync's dirty pages) is never believed.
    sync_lock: Mutex<()>,
    /// Set (under the state lock) whenever `State::poisoned` is: lets the write path check for
    /// poison without taking the state lock. Only a shortcut: every acknowledgement is decided
    /// under the state lock.
    poisoned_flag: std::sync::atomic::AtomicBool,
}

/// What a sync leader does: make every write group written so far durable.
pub(crate) trait Syncer {
    /// Writes out buffered bytes and fdatasyncs the active segment; returns the highest
    /// sequence number now durable, and, if the disk was too full to write out everything,
    /// the error for the waiters beyond it (the engine is not poisoned by that).
    /// `for_waiters` is false for a background round that nobody waits for.
    fn sync_active(&self, for_waiters: bool) -> Result<(u64, Option<Error>)>;
}

/// Resets the `syncing` flag if a sync leader unwinds, so waiters are not stranded.
struct SyncingGuard<'a>(&'a Commit, bool);

impl Drop for SyncingGuard<'_> {
    fn drop(&mut self) {
        if self.1 {
            let mut st = self.0.state.lock();
            st.syncing = false;
            let reason = "a sync leader panicked".to_string();
            st.poisoned.get_or_insert(reason);
            self.0.poisoned_flag.store(true, Ordering::Release);
            self.0.flusher_cv.notify_all();
        }
    }
}

impl Commit {
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.state.lock().poisoned.clone()
    }

    pub(crate) fn check_poison(&self) -> Result<()> {
        if !self.poisoned_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.poisoned() {
            Some(reason) => Err(Error::Poisoned { reason }),
            None => Ok(()),
        }
    }

    /// Poisons the engine. Waiters are failed by the next sync leader or the flusher, never
    /// here: this may be called with the log lock held, and a callback may write.
    pub(crate) fn poison(&self, reason: String) {
        let mut st = self.state.lock();
        if st.poisoned.is_none() {
            tracing::error!(%reason, "engine poisoned");
            crate::telemetry::poisoned();
            st.poisoned = Some(reason);
            self.poisoned_flag.store(true, Ordering::Release);
        }
        self.flusher_cv.notify_all();
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
        self.check_poison()?;
        let started = std::time::Instant::now();
        let result = sync();
        crate::telemetry::fsync(started.elapsed());
        result.map_err(|e| {
            let err = Error::io(what, e);
            self.poison(format!("{err}"));
            err
        })
    }

    /// Records that everything up to `seq` is durable (a rotation fsynced the old segment).
    /// Parked writers it covers are woken; callbacks go to the flusher.
    pub(crate) fn mark_synced(&self, seq: u64) {
        let mut st = self.state.lock();
        if st.poisoned.is_some() || seq <= st.synced {
            return;
        }
        st.synced = seq;
        let mut wake = Vec::new();
        for w in st.take_ready() {
            match w {
                Waiter::Signal(s) => wake.push(s),
                Waiter::Callback(cb) => st.ready_callbacks.push((cb, true)),
            }
        }
        if !st.ready_callbacks.is_empty() {
            self.flusher_cv.notify_all();
        }
        drop(st);
        for s in wake {
            s.update(|st| st.durable = Some(Ok(())));
        }
    }

    /// Asks the flusher for a sync round nobody waits for (see `State::want_sync`).
    pub(crate) fn request_background_sync(&self) {
        let mut st = self.state.lock();
        if st.poisoned.is_none() && !st.want_sync {
            st.want_sync = true;
            if !st.syncing {
                self.flusher_cv.notify_all();
            }
        }
    }

    pub(crate) fn synced(&self) -> u64 {
        self.state.lock().synced
    }

    /// Registers a waiter for write group `seq`. Called under the log lock, in sequence order.
    /// A waiter already covered, or arriving after poisoning, completes at once (a callback
    /// through the flusher).
    pub(crate) fn register(&self, seq: u64, waiter: Waiter) {
        let mut st = self.state.lock();
        if let Some(reason) = st.poisoned.clone() {
            match waiter {
                Waiter::Signal(s) => {
                    drop(st);
                    s.update(|x| x.durable = Some(Err(Error::Poisoned { reason })));
                }
                Waiter::Callback(cb) => {
                    st.ready_callbacks.push((cb, false));
                    self.flusher_cv.notify_all();
                }
            }
            return;
        }
        if seq <= st.synced {
            match waiter {
                Waiter::Signal(s) => {
                    drop(st);
                    s.update(|x| x.durable = Some(Ok(())));
                }
                Waiter::Callback(cb) => {
                    st.ready_callbacks.push((cb, true));
                    self.flusher_cv.notify_all();
                }
            }
            return;
        }
        st.waiters.push_back((seq, waiter));
    }

    /// Starts the sync stage if waiters are pending and nobody leads it. Returns `true` if the
    /// caller must now lead it (call [`Commit::lead_syncs`]); if `can_lead` is false the flusher
    /// is asked instead.
    pub(crate) fn kick(&self, can_lead: bool) -> bool {
        let mut st = self.state.lock();
        if !st.needs_leader() {
            return false;
        }
        if can_lead {
            st.syncing = true;
            true
        } else {
            self.flusher_cv.notify_all();
            false
        }
    }

    /// Leads the sync stage (the caller set `syncing` through [`Commit::kick`] or was handed
    /// leadership): fsyncs until no waiter is left beyond `synced`, or, if `hand_over`, hands
    /// leadership to the flusher after the first round so the caller (a writer) can return.
    /// Only the flusher passes `background`: it also runs the rounds nobody waits for
    /// (`State::want_sync`); a writer leaving them undone wakes the flusher for them.
    pub(crate) fn lead_syncs(&self, syncer: &dyn Syncer, hand_over: bool, background: bool) {
        let mut guard = SyncingGuard(self, true);
        loop {
            let mut st = self.state.lock();
            if let Some(reason) = st.poisoned.clone() {
                let all: Vec<Waiter> = st.waiters.drain(..).map(|(_, w)| w).collect();
                st.syncing = false;
                st.want_sync = false;
                guard.1 = false;
                drop(st);
                for w in all {
                    w.complete(Err(Error::Poisoned {
                        reason: reason.clone(),
                    }));
                }
                return;
            }
            let round_for_nobody = background && std::mem::take(&mut st.want_sync);
            let for_waiters = st.pending();
            if !for_waiters && !round_for_nobody {
                let ready = st.take_ready();
                st.syncing = false;
                guard.1 = false;
                if st.want_sync {
                    self.flusher_cv.notify_all();
                }
                drop(st);
                for w in ready {
                    w.complete(Ok(()));
                }
                return;
            }
            drop(st);
            let result = syncer.sync_active(for_waiters);
            let mut st = self.state.lock();
            let mut short_of = Vec::new();
            let ready = match result {
                Ok((durable, short)) if st.poisoned.is_none() => {
                    if durable > st.synced {
                        st.synced = durable;
                    }
                    let ready = st.take_ready();
                    if let Some(e) = short {
                        // Not written (disk full): these waiters fail; their writes stay
                        // buffered and become durable with a later sync.
                        short_of = st
                            .waiters
                            .drain(..)
                            .map(|(_, w)| (w, e.to_string()))
                            .collect();
                    }
                    ready
                }
                // Poisoned (by this sync or another path): the loop head fails everyone.
                Ok(_) => Vec::new(),
                Err(e) => {
                    if st.poisoned.is_none() {
                        tracing::error!(error = %e, "engine poisoned");
                        st.poisoned = Some(format!("fdatasync failed: {e}"));
                        self.poisoned_flag.store(true, Ordering::Release);
                    }
                    Vec::new()
                }
            };
            // Hand the stage to the flusher, so this writer can return: the flusher then loops
            // for as long as waiters keep coming, with no wakeup between rounds.
            let heir = hand_over && st.poisoned.is_none() && st.pending();
            if heir {
                guard.1 = false;
                st.flusher_heir = true;
                self.flusher_cv.notify_all();
            }
            drop(st);
            for w in ready {
                w.complete(Ok(()));
            }
            for (w, context) in short_of {
                w.complete(Err(Error::NoSpace { context }));
            }
            if heir {
                return;
            }
        }
    }

    /// Waits (parked on `signal`) until the write group `signal` was registered for is
    /// durable. If nobody leads the sync stage, this writer leads one round (no wakeup between
    /// its write and the fdatasync when the engine is idle) and hands the stage to the flusher.
    pub(crate) fn wait_durable(&self, signal: &Signal, syncer: &dyn Syncer) -> Result<()> {
        if self.kick(true) {
            self.lead_syncs(syncer, true, false);
        }
        signal.wait_for(|st| st.durable.take())
    }

    /// The flusher's loop: fires callbacks found durable elsewhere, and leads the sync stage
    /// whenever waiters are pending and nobody leads it. Returns once shut down with nothing
    /// left.
    pub(crate) fn run_flusher(&self, syncer: &dyn Syncer) {
        loop {
            let mut st = self.state.lock();
            loop {
                if !st.ready_callbacks.is_empty() || st.flusher_heir {
                    break;
                }
                if st.needs_leader() {
                    break;
                }
                if st.shutdown && st.waiters.is_empty() && !st.syncing {
                    return;
                }
                self.flusher_cv.wait(&mut st);
            }
            let callbacks = std::mem::take(&mut st.ready_callbacks);
            let poisoned = st.poisoned.clone();
            // Handed the stage (still `syncing`), or taking it up.
            let lead = std::mem::take(&mut st.flusher_heir) || st.needs_leader();
            if lead {
                st.syncing = true;
            }
            drop(st);
            for (cb, ok) in callbacks {
                let result = match (&poisoned, ok) {
                    (_, true) => Ok(()),
                    (Some(reason), false) => Err(Error::Poisoned {
                        reason: reason.clone(),
                    }),
                    (None, false) => Err(Error::Poisoned {
                        reason: String::new(),
                    }),
                };
                Waiter::Callback(cb).complete(result);
            }
            if lead {
                self.lead_syncs(syncer, false, true);
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        let mut st = self.state.lock();
        st.shutdown = true;
        self.flusher_cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    struct FakeSync {
        written: AtomicU64,
        syncs: AtomicUsize,
        fail: bool,
    }

    impl Syncer for FakeSync {
        fn sync_active(&self, _for_waiters: bool) -> Result<(u64, Option<Error>)> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(Error::Io {
                    context: "test".into(),
                    source: std::io::Error::other("EIO"),
                });
            }
            Ok((self.written.load(Ordering::SeqCst), None))
        }
    }

    fn fake(written: u64, fail: bool) -> FakeSync {
        FakeSync {
            written: AtomicU64::new(written),
            syncs: AtomicUsize::new(0),
            fail,
        }
    }

    #[test]
    fn one_sync_covers_every_earlier_write_and_callbacks_fire_once() {
        let c = Commit::default();
        let s = fake(3, false);
        let fired = Arc::new(AtomicUsize::new(0));
        for seq in 1..=3 {
            let f = fired.clone();
            c.register(
                seq,
                Waiter::Callback(Box::new(move |r| {
                    assert!(r.is_ok());
                    f.fetch_add(1, Ordering::SeqCst);
                })),
            );
        }
        let sig = Arc::new(Signal::default());
        c.register(2, Waiter::Signal(sig.clone()));
        c.wait_durable(&sig, &s).unwrap();
        assert_eq!(s.syncs.load(Ordering::SeqCst), 1);
        assert_eq!(
            fired.load(Ordering::SeqCst),
            3,
            "the sync covered seq 3 too"
        );
        let sig = Arc::new(Signal::default());
        c.register(3, Waiter::Signal(sig.clone()));
        c.wait_durable(&sig, &s).unwrap();
        assert_eq!(
            s.syncs.load(Ordering::SeqCst),
            1,
            "already durable: no second sync"
        );
    }

    #[test]
    fn a_failed_sync_poisons_and_is_never_retried() {
        let c = Commit::default();
        let s = fake(1, true);
        let sig = Arc::new(Signal::default());
        c.register(1, Waiter::Signal(sig.clone()));
        assert!(matches!(
            c.wait_durable(&sig, &s),
            Err(Error::Poisoned { .. })
        ));
        let sig = Arc::new(Signal::default());
        c.register(1, Waiter::Signal(sig.clone()));
        assert!(matches!(
            c.wait_durable(&sig, &s),
            Err(Error::Poisoned { .. })
        ));
        assert_eq!(s.syncs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_sync_leader() {
        let c = Commit::default();
        let s = fake(2, false);
        c.register(1, Waiter::Callback(Box::new(|_| panic!("user callback"))));
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        c.register(
            2,
            Waiter::Callback(Box::new(move |r| {
                assert!(r.is_ok());
                f.fetch_add(1, Ordering::SeqCst);
            })),
        );
        let sig = Arc::new(Signal::default());
        c.register(2, Waiter::Signal(sig.clone()));
        c.wait_durable(&sig, &s).unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert!(c.poisoned().is_none());
    }

    #[test]
    fn a_panicking_syncer_poisons_instead_of_stranding_waiters() {
        struct Panics;
        impl Syncer for Panics {
            fn sync_active(&self, _for_waiters: bool) -> Result<(u64, Option<Error>)> {
                panic!("syncer bug")
            }
        }
        let c = Commit::default();
        let sig = Arc::new(Signal::default());
        c.register(1, Waiter::Signal(sig.clone()));
        assert!(c.kick(true));
        let r = catch_unwind(AssertUnwindSafe(|| c.lead_syncs(&Panics, true, false)));
        assert!(r.is_err());
        assert!(c.poisoned().is_some(), "the unwinding leader poisoned");
        // The next leader fails the stranded waiter instead of leaving it parked.
        assert!(c.kick(true));
        c.lead_syncs(&fake(1, false), true, false);
        let got = sig.wait_for(|st| st.durable.take());
        assert!(matches!(got, Err(Error::Poisoned { .. })));
    }
}
