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
//! - Only the flusher ever delays a round, and only while every pending waiter is asynchronous:
//!   if fewer waiters are pending than the previous round covered, it holds the round open
//!   until that many are, for at most [`COALESCE_WINDOW`], so that a busy engine's rounds stay
//!   large (fewer fdatasyncs, fewer thread wakeups). A lone writer, or a fixed set of writers
//!   that each wait for their previous write, is never delayed (the count is already there); a
//!   parked synced writer ends the wait at once. The wait only comes before the fdatasync:
//!   nothing is acknowledged any earlier.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The longest the flusher holds a sync round open for more asynchronous waiters (see
/// [`Commit::coalesce_due`]): short against a Raft round trip, long enough for the writers of a
/// busy engine to bring the round back to the previous one's size.
pub(crate) const COALESCE_WINDOW: Duration = Duration::from_millis(1);

#[derive(Default)]
struct State {
    synced: u64,
    syncing: bool,
    /// Waiters in the order they were registered, which is sequence order (registration happens
    /// under the log lock as each group is written).
    waiters: VecDeque<(u64, Waiter)>,
    /// How many of `waiters` are parked writers (`Waiter::Signal`): a round is never held open
    /// for them.
    signal_waiters: usize,
    /// The flusher holds a round open (see `COALESCE_WINDOW`); a parked writer, or the waiter
    /// that brings the count to `last_batch`, wakes it.
    coalescing: bool,
    /// Waiters the last round that covered any covered: the size a held round waits for.
    last_batch: usize,
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
                if matches!(w, Waiter::Signal(_)) {
                    self.signal_waiters = self.signal_waiters.saturating_sub(1);
                }
                ready.push(w);
            }
        }
        ready
    }

    /// Removes every waiter.
    fn take_all(&mut self) -> Vec<Waiter> {
        self.signal_waiters = 0;
        self.waiters.drain(..).map(|(_, w)| w).collect()
    }
}

/// The sync-stage coordinator.
pub(crate) struct Commit {
    state: Mutex<State>,
    /// How long the flusher may hold a round open for more waiters ([`COALESCE_WINDOW`]; zero
    /// turns coalescing off).
    coalesce_window: Duration,
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

impl Default for Commit {
    fn default() -> Self {
        Commit::with_coalesce_window(COALESCE_WINDOW)
    }
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
    pub(crate) fn with_coalesce_window(window: Duration) -> Self {
        Commit {
            state: Mutex::default(),
            coalesce_window: window,
            flusher_cv: Condvar::new(),
            sync_lock: Mutex::new(()),
            poisoned_flag: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a round should wait for more waiters: some are pending, all asynchronous (a
    /// parked writer is never delayed), and fewer than the previous round covered. A lone
    /// writer, or N writers that each wait for their last write before the next, find their
    /// count already there.
    fn coalesce_due(&self, st: &State) -> bool {
        !self.coalesce_window.is_zero()
            && st.signal_waiters == 0
            && !st.shutdown
            && st.poisoned.is_none()
            && st.pending()
            && st.waiters.len() < st.last_batch
    }

    /// Whether a held round should end now.
    fn coalesce_done(st: &State) -> bool {
        st.signal_waiters > 0
            || st.waiters.len() >= st.last_batch
            || st.poisoned.is_some()
            || st.shutdown
    }

    /// Holds the round open (the flusher, `syncing` set) until as many waiters are pending as
    /// the previous round covered, a parked writer registers, the engine is poisoned or shut
    /// down, or [`COALESCE_WINDOW`] has passed. Writers that register meanwhile join the round
    /// (their `kick` does not wake the flusher: `syncing` is set; `register` wakes it when the
    /// wait is over).
    fn coalesce(&self, st: &mut parking_lot::MutexGuard<'_, State>) {
        let deadline = Instant::now() + self.coalesce_window;
        st.coalescing = true;
        // Wakes a test parked in `wait_until_coalescing` (the flusher is this thread, and no
        // other thread waits on this condition variable).
        #[cfg(test)]
        self.flusher_cv.notify_all();
        while !Self::coalesce_done(st) {
            if self.flusher_cv.wait_until(st, deadline).timed_out() {
                break;
            }
        }
        st.coalescing = false;
    }

    /// Parks until the flusher holds a round open, at most `timeout`; returns whether it does
    /// (tests).
    #[cfg(test)]
    fn wait_until_coalescing(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.coalescing {
            if self.flusher_cv.wait_until(&mut st, deadline).timed_out() {
                return st.coalescing;
            }
        }
        true
    }

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
        if matches!(waiter, Waiter::Signal(_)) {
            st.signal_waiters += 1;
        }
        st.waiters.push_back((seq, waiter));
        // Exactly the registration that ends a held round wakes the flusher.
        if st.coalescing && Self::coalesce_done(&st) {
            self.flusher_cv.notify_all();
        }
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
            // Only the flusher holds a round open (a writer leading one returns to its caller).
            if background && self.coalesce_due(&st) {
                self.coalesce(&mut st);
            }
            if let Some(reason) = st.poisoned.clone() {
                let all = st.take_all();
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
                    if !ready.is_empty() {
                        st.last_batch = ready.len();
                    }
                    if let Some(e) = short {
                        // Not written (disk full): these waiters fail; their writes stay
                        // buffered and become durable with a later sync.
                        short_of = st
                            .take_all()
                            .into_iter()
                            .map(|w| (w, e.to_string()))
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

    /// A flusher running on its own thread over a fake syncer, with a long coalescing window
    /// (never reached by these tests: a held round must end for another reason).
    struct Flusher {
        commit: Arc<Commit>,
        sync: Arc<FakeSync>,
        thread: Option<std::thread::JoinHandle<()>>,
        fired: std::sync::mpsc::Receiver<(u64, bool)>,
        tx: std::sync::mpsc::Sender<(u64, bool)>,
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(600);
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

    impl Flusher {
        /// A flusher, not yet running: waiters registered before [`Flusher::spawn`] make one
        /// first round.
        fn new() -> Flusher {
            let (tx, fired) = std::sync::mpsc::channel();
            Flusher {
                commit: Arc::new(Commit::with_coalesce_window(LONG)),
                sync: Arc::new(fake(0, false)),
                thread: None,
                fired,
                tx,
            }
        }

        fn spawn(&mut self) {
            let (c, s) = (self.commit.clone(), self.sync.clone());
            self.thread = Some(std::thread::spawn(move || c.run_flusher(&*s)));
        }

        /// A running flusher whose first round covered `n` waiters.
        fn after_a_round_of(n: u64) -> Flusher {
            let mut f = Flusher::new();
            for seq in 1..=n {
                f.write_async(seq);
            }
            f.spawn();
            let mut first = f.fired(n as usize);
            first.sort_unstable();
            assert_eq!(first, (1..=n).collect::<Vec<_>>());
            assert_eq!(f.syncs(), 1, "one fdatasync for the first round");
            f
        }

        /// Registers a callback for write group `seq` (now written) and kicks the flusher.
        fn write_async(&self, seq: u64) {
            self.sync.written.store(seq, Ordering::SeqCst);
            let tx = self.tx.clone();
            let cb: Callback = Box::new(move |r| {
                let _ = tx.send((seq, r.is_ok()));
            });
            self.commit.register(seq, Waiter::Callback(cb));
            self.commit.kick(false);
        }

        /// The next `n` callbacks (sequence numbers, in order), each of which must report Ok.
        fn fired(&self, n: usize) -> Vec<u64> {
            (0..n)
                .map(|_| {
                    let (seq, ok) = self.fired.recv_timeout(PATIENCE).expect("a callback fired");
                    assert!(ok, "callback {seq} reported an error");
                    seq
                })
                .collect()
        }

        /// Waits (parked) until the flusher holds a round open; fails if it never does.
        fn until_holding(&self) {
            assert!(
                self.commit.wait_until_coalescing(PATIENCE),
                "the flusher never held the round open"
            );
        }

        fn syncs(&self) -> usize {
            self.sync.syncs.load(Ordering::SeqCst)
        }

        fn stop(mut self) {
            self.commit.shutdown();
            if let Some(t) = self.thread.take() {
                t.join().expect("the flusher thread ended");
            }
        }
    }

    #[test]
    fn a_busy_flusher_holds_a_round_until_it_is_as_large_as_the_last() {
        let f = Flusher::after_a_round_of(3);
        let after_first = f.syncs();
        // One waiter: fewer than the last round covered, so the round is held open...
        f.write_async(4);
        f.until_holding();
        assert_eq!(
            f.syncs(),
            after_first,
            "no fdatasync while the round is held"
        );
        assert!(
            f.fired.try_recv().is_err(),
            "nothing acknowledged before its fdatasync"
        );
        // ...until the count the last round had is back: then one fdatasync covers them all.
        f.write_async(5);
        f.write_async(6);
        assert_eq!(f.fired(3), vec![4, 5, 6]);
        assert_eq!(
            f.syncs(),
            after_first + 1,
            "one fdatasync for the held round"
        );
        f.stop();
    }

    #[test]
    fn a_lone_writer_is_never_held() {
        let mut f = Flusher::new();
        f.spawn();
        // Each waits for the previous one: every round has exactly the size of the last.
        for seq in 1..=5 {
            f.write_async(seq);
            assert_eq!(
                f.fired(1),
                vec![seq],
                "synced without waiting for the window"
            );
        }
        assert_eq!(f.syncs(), 5);
        f.stop();
    }

    #[test]
    fn a_parked_writer_ends_a_held_round_at_once() {
        let f = Flusher::after_a_round_of(3);
        f.write_async(4);
        f.until_holding();
        // A synced writer (parked thread) is never delayed by the window.
        f.sync.written.store(5, Ordering::SeqCst);
        let sig = Arc::new(Signal::default());
        f.commit.register(5, Waiter::Signal(sig.clone()));
        let (c, s) = (f.commit.clone(), f.sync.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(c.wait_durable(&sig, &*s).is_ok());
        });
        assert_eq!(rx.recv_timeout(PATIENCE), Ok(true));
        assert_eq!(f.fired(1), vec![4]);
        f.stop();
    }

    #[test]
    fn shutdown_ends_a_held_round_and_acknowledges_after_the_sync() {
        let f = Flusher::after_a_round_of(3);
        let before = f.syncs();
        f.write_async(4);
        f.until_holding();
        f.commit.shutdown();
        assert_eq!(f.fired(1), vec![4]);
        assert_eq!(f.syncs(), before + 1);
        f.stop();
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
