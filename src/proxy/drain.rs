//! A shard's drain flag: once set (SIGTERM, after `runtime.drain_delay`),
//! HTTP connections answer their next response with `Connection: close`
//! and connections waiting idle between requests close at once
//! (close_notify), as nginx's graceful shutdown does. Tunnels are not
//! interrupted: they get `runtime.drain_timeout` to finish.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// One shard's drain state. Lives on the shard's thread.
///
/// Waiters sit in a slot table whose free slots are reused, so a wait
/// (one per keep-alive request) allocates nothing once the table has grown
/// to the number of connections waiting at once.
#[derive(Debug, Default)]
pub struct DrainSignal {
    on: Cell<bool>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl DrainSignal {
    /// Has the drain started?
    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Starts the drain: every waiter wakes.
    pub fn start(&self) {
        self.on.set(true);
        for w in self.slots.borrow_mut().iter_mut() {
            if let Some(waker) = w.take() {
                waker.wake();
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
        let mut watch = self.watch();
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if let Poll::Ready(v) = Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(v));
            }
            watch.poll_on(cx).map(|()| None)
        })
        .await
    }

    /// A registration to poll alongside other work (an HTTP/2 connection
    /// keeps serving its streams and only starts its GOAWAY when the drain
    /// starts). Its slot is given back when it is dropped.
    pub fn watch(&self) -> Watch<'_> {
        Watch {
            signal: self,
            slot: None,
        }
    }
}

/// See [`DrainSignal::watch`].
pub struct Watch<'a> {
    signal: &'a DrainSignal,
    slot: Option<usize>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if let Some(w) = self.signal.slots.borrow_mut().get_mut(i) {
                *w = None;
            }
            self.signal.free.borrow_mut().push(i);
        }
    }
}

impl Watch<'_> {
    /// Ready once the drain has started; otherwise wakes `cx` when it does.
    pub fn poll_on(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.signal;
        if signal.on.get() {
            return Poll::Ready(());
        }
        let i = *self.slot.get_or_insert_with(|| {
            signal.free.borrow_mut().pop().unwrap_or_else(|| {
                let mut slots = signal.slots.borrow_mut();
                slots.push(None);
                slots.len() - 1
            })
        });
        let mut slots = signal.slots.borrow_mut();
        match &slots[i] {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => slots[i] = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

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
    fn finished_waits_give_their_slot_back() {
        let drain = DrainSignal::default();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..1000 {
                // Pending once (a slot taken), then done.
                let wait = drain.or_drain(monoio::time::sleep(std::time::Duration::from_micros(1)));
                assert_eq!(wait.await, Some(()));
            }
        });
        assert_eq!(drain.slots.borrow().len(), 1, "one slot, reused");
        assert_eq!(drain.free.borrow().len(), 1);
    }
}
