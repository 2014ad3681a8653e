//! A shard's drain flag: once set (SIGTERM, after `runtime.drain_delay`),
//! HTTP connections answer their next response with `Connection: close`
//! and connections waiting idle between requests close at once
//! (close_notify), as nginx's graceful shutdown does. Tunnels are not
//! interrupted: they get `runtime.drain_timeout` to finish.
//!
//! At the end of `drain_timeout` the shard cuts what is still open
//! ([`DrainSignal::cut`]): each connection's task drops its state, so every
//! request in flight writes its access line (as HAProxy logs the sessions
//! its hard stop kills) before the process exits.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Tasks waiting for one event, in a slot table whose free slots are
/// reused, so a wait allocates nothing once the table has grown to the
/// number of waiters at once. A waiter keeps its slot number (`None`
/// until its first wait) and gives it back when it is done.
#[derive(Debug, Default)]
struct Waiters {
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<u32>>,
}

impl Waiters {
    /// Registers `cx`'s waker in `slot`, taking a slot at the first wait.
    fn register(&self, slot: &mut Option<u32>, cx: &Context<'_>) {
        let i = *slot.get_or_insert_with(|| {
            self.free.borrow_mut().pop().unwrap_or_else(|| {
                let mut slots = self.slots.borrow_mut();
                slots.push(None);
                // A slot per task waiting at once: far below u32's range.
                u32::try_from(slots.len() - 1).unwrap_or(u32::MAX)
            })
        }) as usize;
        let mut slots = self.slots.borrow_mut();
        let Some(entry) = slots.get_mut(i) else {
            return;
        };
        match entry {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *entry = Some(cx.waker().clone()),
        }
    }

    /// Gives `slot` back.
    fn release(&self, slot: Option<u32>) {
        if let Some(i) = slot {
            if let Some(w) = self.slots.borrow_mut().get_mut(i as usize) {
                *w = None;
            }
            self.free.borrow_mut().push(i);
        }
    }

    fn wake_all(&self) {
        // Taken out first: a woken task may run (and register) at once.
        let woken: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        woken.into_iter().for_each(Waker::wake);
    }
}

/// One shard's drain state. Lives on the shard's thread.
#[derive(Debug, Default)]
pub struct DrainSignal {
    on: Cell<bool>,
    waiters: Waiters,
    cut: Cell<bool>,
    /// Every connection task, for the cut (the shard driver's `UntilCut`).
    tasks: Waiters,
}

impl DrainSignal {
    /// Has the drain started?
    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Starts the drain: every waiter wakes.
    pub fn start(&self) {
        self.on.set(true);
        self.waiters.wake_all();
    }

    /// Has the drain timeout cut the shard's connections?
    pub fn is_cut(&self) -> bool {
        self.cut.get()
    }

    /// The drain timeout has passed: every connection task wakes and drops
    /// its connection (see [`DrainSignal::poll_cut`]).
    pub fn cut(&self) {
        self.on.set(true);
        self.cut.set(true);
        self.waiters.wake_all();
        self.tasks.wake_all();
    }

    /// Ready once the shard cuts its connections; otherwise wakes `cx`
    /// then. `slot` is the task's own (`None` at first), given back with
    /// [`DrainSignal::forget_cut`]. For a spawned task's outermost future
    /// only: its waker is registered at its first wait and not looked at
    /// again (a monoio task is always polled with its own waker), so the
    /// polls after it cost one flag read, not a table lookup each.
    pub fn poll_cut(&self, slot: &mut Option<u32>, cx: &Context<'_>) -> Poll<()> {
        if self.cut.get() {
            return Poll::Ready(());
        }
        if slot.is_none() {
            self.tasks.register(slot, cx);
        }
        Poll::Pending
    }

    /// A connection task that waited with [`DrainSignal::poll_cut`] ended.
    pub fn forget_cut(&self, slot: Option<u32>) {
        self.tasks.release(slot);
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
    slot: Option<u32>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.signal.waiters.release(self.slot);
    }
}

impl Watch<'_> {
    /// Ready once the drain has started; otherwise wakes `cx` when it does.
    pub fn poll_on(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.signal;
        if signal.on.get() {
            return Poll::Ready(());
        }
        signal.waiters.register(&mut self.slot, cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn a_waiting_future_ends_when_the_drain_starts() {
        let drain = Rc::new(DrainSignal::default());
        let mut rt = runtime();
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
    fn the_cut_wakes_every_task_waiting_on_it_and_slots_are_reused() {
        let drain = Rc::new(DrainSignal::default());
        let mut rt = runtime();
        rt.block_on(async {
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let d = drain.clone();
                    monoio::spawn(async move {
                        let mut slot = None;
                        std::future::poll_fn(|cx| d.poll_cut(&mut slot, cx)).await;
                        d.forget_cut(slot);
                    })
                })
                .collect();
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(drain.tasks.slots.borrow().len(), 3);
            drain.start();
            assert!(!drain.is_cut(), "the drain alone cuts nothing");
            drain.cut();
            for w in waiters {
                w.await;
            }
        });
        assert!(drain.is_cut() && drain.is_on());
        assert_eq!(drain.tasks.free.borrow().len(), 3, "every slot given back");
    }

    #[test]
    fn finished_waits_give_their_slot_back() {
        let drain = DrainSignal::default();
        let mut rt = runtime();
        rt.block_on(async {
            for _ in 0..1000 {
                // Pending once (a slot taken), then done.
                let wait = drain.or_drain(monoio::time::sleep(std::time::Duration::from_micros(1)));
                assert_eq!(wait.await, Some(()));
            }
        });
        assert_eq!(drain.waiters.slots.borrow().len(), 1, "one slot, reused");
        assert_eq!(drain.waiters.free.borrow().len(), 1);
    }
}
