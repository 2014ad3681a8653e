//! Idle timeouts without a timer per connection.
//!
//! monoio's `Sleep` is 640 bytes, more than the rest of an idle kTLS
//! connection's task. Instead each connection registers a small [`Idle`]
//! entry and one sweeper task per shard checks all entries a few times per
//! timeout period, waking the connections whose timeout has passed (the
//! coarse timer nginx and HAProxy also use for idle timeouts).
//!
//! Whatever waits for one thing at a time (an HTTP/1.1 connection, one
//! HTTP/2 stream) bounds its other waits on an entry of its own
//! ([`IdleSweeper::arm`], [`bounded`]): most of a request's reads and
//! writes (ARCHITECTURE.md lists which).
//! A monoio timer per wait cost an aligned allocation (its entry is
//! `repr(align(128))`, and so is every future that holds one inline) and
//! two timer-wheel operations: three per keep-alive request, 7% of
//! ktern's own instructions per request under callgrind.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// One connection's idle state.
#[derive(Debug)]
pub struct Idle {
    last: Cell<Instant>,
    /// The current wait's bound (the keep-alive timeout between requests).
    timeout: Cell<Duration>,
    expired: Cell<bool>,
    /// A second, shorter bound of the current wait, zero when none: once
    /// the connection has been idle this long the sweeper wakes it once,
    /// without expiring it, so it can give back what it keeps only for
    /// work (an HTTP/2 connection's buffers, [`Idle::nudge_after`]).
    nudge: Cell<Duration>,
    nudged: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Idle {
    /// Records that bytes moved now.
    pub fn touch(&self) {
        self.last.set(crate::clock::coarse_now());
    }

    /// Ready once the sweeper found the connection idle for its timeout.
    pub fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.expired.get() {
            return Poll::Ready(());
        }
        let mut slot = self.waker.borrow_mut();
        match &*slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The current wait's timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    /// Asks the sweeper to wake the connection once it has been idle for
    /// `after` (rounded up to its next pass) during the current wait, for
    /// [`Idle::take_nudged`]. The next [`IdleSweeper::arm`] cancels it.
    pub fn nudge_after(&self, after: Duration) {
        self.nudge.set(after.max(Duration::from_nanos(1)));
        self.nudged.set(false);
    }

    /// Whether a nudge is set and not yet due.
    pub fn nudge_pending(&self) -> bool {
        !self.nudge.get().is_zero()
    }

    /// Whether the sweeper found the connection idle past
    /// [`Idle::nudge_after`]'s bound since this was last asked.
    pub fn take_nudged(&self) -> bool {
        self.nudged.replace(false)
    }
}

/// A wait bounded by [`bounded`] outlived its entry's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` until it completes or the sweeper finds `idle`'s current
/// wait (armed by [`IdleSweeper::arm`]) past its timeout. A result that
/// is ready wins over an expiry found in the same poll.
pub fn bounded<F: Future>(idle: &Idle, fut: F) -> Bounded<'_, F> {
    Bounded { idle, fut }
}

pin_project_lite::pin_project! {
    /// [`bounded`]'s future. A struct, not an `async fn`: one of those
    /// holds its argument and, once started, the pinned copy it awaits,
    /// side by side in its state, so each wrapper doubled the size of the
    /// write or read it bounded (a 360-byte record write became 760
    /// bytes here and 1,152 in `forward::Ctx::within`), and a request's
    /// boxed state grew with every such layer.
    #[must_use = "a bounded wait does nothing unless awaited"]
    pub struct Bounded<'a, F> {
        idle: &'a Idle,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        this.idle.poll_expired(cx).map(|()| Err(Elapsed))
    }
}

/// A shard's idle entries.
#[derive(Debug)]
pub struct IdleSweeper {
    entries: RefCell<Vec<Weak<Idle>>>,
    /// Time between passes; a reload may change the timeouts and so this.
    period: Cell<Duration>,
    /// When the last pass ran (its timer fired).
    swept: Cell<Instant>,
}

impl Default for IdleSweeper {
    fn default() -> Self {
        IdleSweeper {
            entries: RefCell::default(),
            period: Cell::new(Duration::from_secs(1)),
            swept: Cell::new(crate::clock::coarse_now()),
        }
    }
}

impl IdleSweeper {
    /// Starts another wait of `timeout` on `idle` (the keep-alive wait
    /// between two requests, or one of a request's own, see [`bounded`]):
    /// its clock restarts, and an entry the sweeper dropped (it expired
    /// during an earlier wait) is put back. The entry keeps that timeout
    /// until the next `arm`. One entry per connection, not one per wait:
    /// a new entry per request stayed allocated, with its slot in
    /// `entries`, until the next sweep (40,000 of them a second on a busy
    /// shard).
    pub fn arm(&self, idle: &Rc<Idle>, timeout: Duration) {
        idle.timeout.set(timeout);
        idle.nudge.set(Duration::ZERO);
        idle.nudged.set(false);
        idle.touch();
        if idle.expired.replace(false) {
            self.entries.borrow_mut().push(Rc::downgrade(idle));
        }
    }

    /// Registers a connection; dropping the returned `Rc` unregisters it
    /// (the sweeper drops dead entries on its next pass).
    pub fn register(&self, timeout: Duration) -> Rc<Idle> {
        let idle = Rc::new(Idle {
            last: Cell::new(crate::clock::coarse_now()),
            timeout: Cell::new(timeout),
            expired: Cell::new(false),
            nudge: Cell::new(Duration::ZERO),
            nudged: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.entries.borrow_mut().push(Rc::downgrade(&idle));
        idle
    }

    /// One pass at time `now`: marks and wakes expired entries, wakes
    /// those idle past their nudge (once, unexpired), forgets finished
    /// connections. Returns how many were woken.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut woken = 0;
        self.entries.borrow_mut().retain(|weak| {
            let Some(idle) = weak.upgrade() else {
                return false;
            };
            let quiet = now.saturating_duration_since(idle.last.get());
            if quiet >= idle.timeout.get() {
                idle.expired.set(true);
                if let Some(w) = idle.waker.borrow_mut().take() {
                    w.wake();
                }
                woken += 1;
                return false;
            }
            let nudge = idle.nudge.get();
            if !nudge.is_zero() && quiet >= nudge {
                idle.nudge.set(Duration::ZERO);
                idle.nudged.set(true);
                if let Some(w) = &*idle.waker.borrow() {
                    w.wake_by_ref();
                }
                woken += 1;
            }
            true
        });
        woken
    }

    /// Sets the time between passes (see [`sweep_period`]).
    pub fn set_period(&self, period: Duration) {
        self.period.set(period);
    }

    /// Runs forever on the shard: sweeps every period.
    pub async fn run(self: Rc<Self>) {
        loop {
            monoio::time::sleep(self.period.get()).await;
            let now = crate::clock::coarse_now();
            self.swept.set(now);
            self.sweep(now);
        }
    }

    /// Whether the shard's timers are starved: the last pass is two
    /// periods (and 50 ms) old. monoio (0.2.4, `TimeDriver::park_internal`)
    /// fires timers only when its run queue is empty and it parks; a
    /// connection that always has more to do and yields through a spawned
    /// task keeps the queue full, and then no timer on the shard fires
    /// (measured: a 1 s handshake timeout still open after 8 s under one
    /// client's flood). Such a connection yields through a timer instead,
    /// which lets the queue drain and the runtime park.
    pub fn overdue(&self) -> bool {
        let late = crate::clock::coarse_now().saturating_duration_since(self.swept.get());
        late > self.period.get() * 2 + Duration::from_millis(50)
    }
}

/// Sweep period for a set of idle timeouts: a quarter of the shortest, kept
/// between 50 ms and 1 s, so a timeout fires at most 25% (or 1 s) late.
pub fn sweep_period(timeouts: impl Iterator<Item = Duration>) -> Duration {
    let shortest = timeouts.min().unwrap_or(Duration::from_secs(4));
    (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn expires_only_after_the_timeout_and_wakes_the_connection() {
        let sweeper = IdleSweeper::default();
        let idle = sweeper.register(Duration::from_secs(10));
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let t0 = Instant::now();
        assert!(idle.poll_expired(&mut cx).is_pending());
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(9)), 0);
        idle.touch();
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(9)), 0);
        assert!(!flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(11)), 1);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(idle.poll_expired(&mut cx).is_ready());
    }

    #[test]
    fn a_nudge_wakes_once_past_its_bound_without_expiring_and_arm_cancels_it() {
        let sweeper = IdleSweeper::default();
        let idle = sweeper.register(Duration::from_secs(75));
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let woke = || flag.0.swap(false, std::sync::atomic::Ordering::SeqCst);
        assert!(!idle.nudge_pending());
        idle.nudge_after(Duration::from_secs(1));
        assert!(idle.poll_expired(&mut cx).is_pending());
        assert_eq!(sweeper.sweep(Instant::now()), 0);
        assert!(!woke() && !idle.take_nudged() && idle.nudge_pending());
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(2)), 1);
        assert!(woke() && !idle.nudge_pending());
        assert!(idle.take_nudged());
        assert!(!idle.take_nudged(), "a nudge is taken once");
        // Once: later passes neither wake it again nor expire it.
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(3)), 0);
        assert!(!woke() && !idle.take_nudged());
        assert!(idle.poll_expired(&mut cx).is_pending());
        // The next wait (arm) cancels a nudge not yet due, and one
        // already found but not taken.
        idle.nudge_after(Duration::from_secs(1));
        sweeper.arm(&idle, Duration::from_secs(75));
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(2)), 0);
        idle.nudge_after(Duration::from_secs(1));
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(2)), 1);
        sweeper.arm(&idle, Duration::from_secs(75));
        assert!(!idle.take_nudged());
        // The timeout still expires the entry.
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(76)), 1);
        assert!(idle.poll_expired(&mut cx).is_ready());
    }

    #[test]
    fn a_rearmed_entry_is_swept_again_even_after_it_expired_mid_request() {
        let sweeper = IdleSweeper::default();
        let idle = sweeper.register(Duration::from_secs(10));
        let mut cx = Context::from_waker(Waker::noop());
        // Waits re-armed one after another keep one entry.
        for _ in 0..3 {
            sweeper.arm(&idle, Duration::from_secs(10));
        }
        assert_eq!(sweeper.entries.borrow().len(), 1);
        // A request longer than the timeout: the sweeper marks and drops it.
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(11)), 1);
        assert!(sweeper.entries.borrow().is_empty());
        // The next wait starts a fresh clock and is swept again.
        sweeper.arm(&idle, Duration::from_secs(10));
        assert!(idle.poll_expired(&mut cx).is_pending());
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(9)), 0);
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(11)), 1);
        assert!(idle.poll_expired(&mut cx).is_ready());
    }

    #[test]
    fn a_bounded_wait_ends_at_its_own_timeout_and_a_ready_result_wins() {
        let sweeper = IdleSweeper::default();
        let idle = sweeper.register(Duration::from_secs(75));
        let mut cx = Context::from_waker(Waker::noop());
        // A wait of 2 s on the entry that keeps 75 s between requests.
        sweeper.arm(&idle, Duration::from_secs(2));
        let mut pending = Box::pin(bounded(&idle, std::future::pending::<()>()));
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(1)), 0);
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(3)), 1);
        assert_eq!(pending.as_mut().poll(&mut cx), Poll::Ready(Err(Elapsed)));
        drop(pending);
        // The next wait is armed afresh, with a timeout of its own: the
        // expiry above does not leak into it, and a ready future is
        // answered even with its entry expired.
        sweeper.arm(&idle, Duration::from_secs(60));
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(30)), 0);
        let mut ready = Box::pin(bounded(&idle, std::future::ready(7)));
        assert_eq!(ready.as_mut().poll(&mut cx), Poll::Ready(Ok(7)));
        assert_eq!(sweeper.sweep(Instant::now() + Duration::from_secs(61)), 1);
        let mut ready = Box::pin(bounded(&idle, std::future::ready(8)));
        assert_eq!(ready.as_mut().poll(&mut cx), Poll::Ready(Ok(8)));
    }

    #[test]
    fn a_bounded_wait_stores_its_future_once() {
        let sweeper = IdleSweeper::default();
        let idle = sweeper.register(Duration::from_secs(1));
        let fut = std::future::ready([7u8; 512]);
        let waited = std::mem::size_of_val(&fut);
        let mut wait = Box::pin(bounded(&idle, fut));
        // The future and the entry's reference, and padding to 8 bytes: an
        // `async fn` kept the argument and its pinned copy both.
        let size = std::mem::size_of_val(&*wait);
        assert!(
            size <= waited + 16,
            "{size} bytes for a {waited}-byte future"
        );
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(Ok([7u8; 512])));
    }

    #[test]
    fn finished_connections_are_forgotten() {
        let sweeper = IdleSweeper::default();
        drop(sweeper.register(Duration::from_secs(1)));
        let _live = sweeper.register(Duration::from_secs(100));
        sweeper.sweep(Instant::now());
        assert_eq!(sweeper.entries.borrow().len(), 1);
    }

    #[test]
    fn period_is_a_quarter_of_the_shortest_timeout_within_bounds() {
        let d = Duration::from_secs;
        assert_eq!(sweep_period([d(300), d(8)].into_iter()), d(1));
        assert_eq!(sweep_period([d(2)].into_iter()), Duration::from_millis(500));
        assert_eq!(
            sweep_period([Duration::from_millis(10)].into_iter()),
            Duration::from_millis(50)
        );
        assert_eq!(sweep_period(std::iter::empty()), d(1));
    }
}
