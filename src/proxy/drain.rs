//! A shard's drain flag: once set (SIGTERM, after `runtime.drain_delay`),
//! HTTP connections answer their next response with `Connection: close`
//! and connections waiting idle between requests close at once
//! (close_notify), as nginx's graceful shutdown does. Tunnels are not
//! interrupted: they get `runtime.drain_timeout` to finish.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

/// One shard's drain state. Lives on the shard's thread.
#[derive(Debug, Default)]
pub struct DrainSignal {
    on: Cell<bool>,
    waiters: RefCell<Vec<Weak<Slot>>>,
    /// Live waiters after the last prune, so pruning stays amortised O(1).
    pruned_at: Cell<usize>,
}

#[derive(Debug, Default)]
struct Slot {
    waker: RefCell<Option<Waker>>,
}

impl DrainSignal {
    /// Has the drain started?
    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Starts the drain: every waiter wakes.
    pub fn start(&self) {
        self.on.set(true);
        for w in self.waiters.borrow_mut().drain(..) {
            if let Some(slot) = w.upgrade() {
                if let Some(waker) = slot.waker.borrow_mut().take() {
                    waker.wake();
                }
            }
        }
    }

    /// Runs `fut` until it finishes (`Some`) or the drain starts (`None`;
    /// `fut` is dropped). Used only where dropping `fut` loses nothing: a
    /// wait for readiness between requests.
    pub async fn or_drain<F: Future>(&self, fut: F) -> Option<F::Output> {
        if self.on.get() {
            return None;
        }
        let slot = Rc::new(Slot::default());
        {
            let mut waiters = self.waiters.borrow_mut();
            if waiters.len() >= 2 * self.pruned_at.get().max(64) {
                waiters.retain(|w| w.strong_count() > 0);
                self.pruned_at.set(waiters.len());
            }
            waiters.push(Rc::downgrade(&slot));
        }
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if let Poll::Ready(v) = Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(v));
            }
            if self.on.get() {
                return Poll::Ready(None);
            }
            let mut w = slot.waker.borrow_mut();
            match &*w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_future_ends_when_the_drain_starts() {
        let drain = Rc::new(DrainSignal::default());
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let d = drain.clone();
            let waiter =
                monoio::spawn(async move { d.or_drain(std::future::pending::<()>()).await });
            let d = drain.clone();
            let done = monoio::spawn(async move { d.or_drain(async { 7 }).await });
            assert_eq!(done.await, Some(7));
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            drain.start();
            assert_eq!(waiter.await, None);
            // Once on, nothing waits.
            assert_eq!(drain.or_drain(async { 1 }).await, None);
        });
    }

    #[test]
    fn finished_waiters_are_pruned() {
        let drain = DrainSignal::default();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..1000 {
                assert_eq!(drain.or_drain(async { 1 }).await, Some(1));
            }
        });
        assert!(
            drain.waiters.borrow().len() <= 128,
            "{}",
            drain.waiters.borrow().len()
        );
    }
}
