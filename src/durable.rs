//! [`DurableWrite`]: a future completed by the group commit once a write is durable.
//!
//! Invariants:
//! - The future resolves `Ok(())` only from the engine's durability callback, which runs after
//!   the fdatasync covering the write has returned; it resolves with the error otherwise.
//! - Awaiting never blocks a thread: the waker is stored and woken by whichever thread completes
//!   the fsync. If the engine drops the callback uncalled (it never does once `write_durable`
//!   returned `Ok`), the future resolves to [`Error::Closed`] rather than hanging.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::error::{Error, Result};

#[derive(Default)]
struct Slot {
    result: Option<Result<()>>,
    waker: Option<Waker>,
}

/// The completion side, handed to the engine as a durability callback.
pub(crate) struct Completer {
    slot: Arc<Mutex<Slot>>,
    done: bool,
}

impl Completer {
    pub(crate) fn complete(mut self, result: Result<()>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<()>) {
        if self.done {
            return;
        }
        self.done = true;
        let waker = {
            let mut slot = self.slot.lock();
            slot.result = Some(result);
            slot.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.finish(Err(Error::Closed));
    }
}

/// A write's durability, as a future: resolves once the fdatasync that covers the write has
/// returned (`Ok(())`), or with the error that stopped it (for example [`Error::Poisoned`]).
///
/// Returned by [`Engine::write_durable`](crate::Engine::write_durable). The write itself has
/// already happened when the future is created: its effects are readable at once; awaiting only
/// waits for durability, without occupying a thread.
#[must_use = "the write is durable only once this future resolves"]
pub struct DurableWrite {
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for DurableWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let done = self.slot.lock().result.is_some();
        f.debug_struct("DurableWrite").field("done", &done).finish()
    }
}

impl DurableWrite {
    pub(crate) fn new() -> (DurableWrite, Completer) {
        let slot = Arc::new(Mutex::new(Slot::default()));
        (
            DurableWrite { slot: slot.clone() },
            Completer { slot, done: false },
        )
    }

    /// Whether the write is already known durable (or failed), without waiting.
    pub fn is_done(&self) -> bool {
        self.slot.lock().result.is_some()
    }
}

impl Future for DurableWrite {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut slot = self.slot.lock();
        match slot.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn resolves_only_after_completion_and_wakes_once() {
        let (mut fut, done) = DurableWrite::new();
        let counter = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        done.complete(Ok(()));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Ok(()))
        ));
    }

    #[test]
    fn a_dropped_completer_resolves_closed() {
        let (mut fut, done) = DurableWrite::new();
        drop(done);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Err(Error::Closed))
        ));
    }
}
