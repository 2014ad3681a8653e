//! A per-thread (so per-shard) cache of I/O buffers: large ones, and the
//! small ones a small response's records are sealed into.
//!
//! The proxy reads into 16–66 KiB buffers and frees them a moment later,
//! once per request or record batch. glibc's `free` of a chunk of 64 KiB or
//! more runs `malloc_consolidate` every time, which showed as several
//! percent of a keep-alive request's CPU. Reusing a few buffers per shard
//! avoids that, and costs nothing while connections are idle: a buffer is
//! only held between `take` and `give`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use recycle_box::RecycleBox;

/// Buffers kept per thread: enough for the reads in flight on a busy
/// shard, bounded so a burst does not pin memory (32 × 66 KiB ≈ 2 MiB).
const KEEP: usize = 32;

/// Smallest and largest capacities worth keeping.
const MIN: usize = 16 << 10;
const MAX: usize = 128 << 10;

/// One size for every new buffer between `MIN` and `CLASS`: 64 KiB reads,
/// four records of ciphertext read ahead (4 × (2^14 + 256)) and a 64 KiB
/// batch once sealed all fit. With one size a freed buffer always fits the
/// next request, where a 64 KiB hole could not take a 65.6 KiB sealed
/// batch: slow readers, which hold their sealed batch for long, otherwise
/// left such holes behind them (RSS 114 KiB per slow reader for 80 KiB in
/// use, issue 12).
pub const CLASS: usize = 68 << 10;

/// The small class: a connection's sealed records for one small response
/// (a 1 KiB body is about 1.2 KiB of ciphertext), which the connection
/// gives back while it idles between requests. glibc's thread cache stops
/// at 1,032 bytes, so allocating one anew per request went through
/// `_int_malloc` and `_int_free`: about 600 instructions of a keep-alive
/// request's 30 k (`bench/callgrind.sh`).
pub const SMALL: usize = 4 << 10;

/// Small buffers kept per thread (64 × 4 KiB = 256 KiB at most).
const KEEP_SMALL: usize = 64;

/// Heap blocks kept per thread for per-request futures ([`future`]): as
/// many as requests a busy shard has in flight at once, bounded (64 of
/// the HTTP/1.1 exchange's ~2 KiB: 128 KiB at most).
const KEEP_FUTURES: usize = 64;

thread_local! {
    static CACHE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static SMALL_CACHE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static FUTURES: RefCell<Vec<RecycleBox<()>>> = const { RefCell::new(Vec::new()) };
}

/// `f` on the heap, in a block of the shard's cache when it has one that
/// fits (else a new one), and the block back to the cache when `f` is
/// done: for a future made once per request and too big for glibc's
/// thread cache (1,032 bytes), whose fresh box per request cost a
/// `_int_malloc` and an `_int_free`. One dropped before it is done is
/// freed. Refuses an over-aligned future at compile time
/// ([`refuse_over_aligned`]).
pub fn future<F: Future>(f: F) -> Pooled<F> {
    const { refuse_over_aligned::<F>() };
    let b = match FUTURES.with(|c| c.borrow_mut().pop()) {
        Some(spare) => RecycleBox::recycle(spare, f),
        None => RecycleBox::new(f),
    };
    Pooled(Some(RecycleBox::into_pin(b)))
}

/// Fails the build (evaluated in a `const` block) for a per-request
/// future aligned above 16 bytes: a monoio timer held inline is
/// `repr(align(128))`, and an over-aligned heap block is a
/// `posix_memalign` (about 900 instructions, against some 200 for
/// `malloc`). Shared by [`future`] and `forward::boxed`.
pub(crate) const fn refuse_over_aligned<F>() {
    assert!(
        std::mem::align_of::<F>() <= 16,
        "a timer inline in a per-request future"
    )
}

/// A future made by [`future`].
pub struct Pooled<F>(Option<Pin<RecycleBox<F>>>);

impl<F: Future> Future for Pooled<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(f) = self.0.as_mut() else {
            // As a finished `async` block would, but without the panic.
            return Poll::Pending;
        };
        let out = std::task::ready!(f.as_mut().poll(cx));
        if let Some(done) = self.0.take() {
            let spare = RecycleBox::vacate_pinned(done);
            FUTURES.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() < KEEP_FUTURES {
                    c.push(spare);
                }
            });
        }
        Poll::Ready(out)
    }
}

/// An empty buffer with at least `cap` bytes of capacity: of the small
/// class up to [`SMALL`], of the large one above it up to `CLASS`, else
/// exactly `cap`. Between `SMALL` and `MIN` too: a batch of a few small
/// HTTP/2 responses sealed together (about 11 KiB for ten 1 KiB ones) got
/// a buffer of its exact size, which `give` then dropped: a `malloc` and a
/// `free` of it per batch (callgrind: about 1,300 instructions per
/// request). A slow reader holding such a batch holds the large class, as
/// one holding a larger batch already did.
pub fn take(cap: usize) -> Vec<u8> {
    if cap <= SMALL {
        return SMALL_CACHE
            .with(|c| c.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(SMALL));
    }
    let cached = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.iter().rposition(|b| b.capacity() >= cap)?;
        Some(c.swap_remove(i))
    });
    cached.unwrap_or_else(|| {
        Vec::with_capacity(if (SMALL..=CLASS).contains(&cap) {
            CLASS
        } else {
            cap
        })
    })
}

/// Whether a large buffer is cached, so that [`take`] of one up to
/// `CLASS` allocates nothing.
pub fn large_cached() -> bool {
    CACHE.with(|c| !c.borrow().is_empty())
}

/// Whether [`give`] keeps a buffer of this capacity (the small class, or a
/// large one from `MIN` to `MAX`): a holder that would otherwise keep such
/// a buffer between uses can give it back and take one again, at no cost.
pub fn pooled(capacity: usize) -> bool {
    capacity == SMALL || (MIN..=MAX).contains(&capacity)
}

/// Returns a buffer for reuse (dropped if huge, of no class, or its cache
/// is full).
pub fn give(mut buf: Vec<u8>) {
    if !pooled(buf.capacity()) {
        return;
    }
    if buf.capacity() == SMALL {
        buf.clear();
        SMALL_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < KEEP_SMALL {
                c.push(buf);
            }
        });
        return;
    }
    buf.clear();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < KEEP {
            c.push(buf);
        }
    });
}

/// Appends `bytes` to `buf`, growing it by doubling as `extend` does, but
/// never past `cap`, the most it may ever hold: a buffer that fills slowly
/// up to its limit (a ClientHello read by a hostile client a few bytes at a
/// time) ends at the limit, not at the next power of two, which can be
/// nearly twice it. The caller checks the limit.
pub fn extend_capped(buf: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    let need = buf.len() + bytes.len();
    if need > buf.capacity() {
        let room = need.max(2 * buf.capacity()).min(cap.max(need));
        buf.reserve_exact(room - buf.len());
    }
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_big_enough() {
        let mut b = take(64 << 10);
        b.extend_from_slice(b"old bytes");
        let ptr = b.as_ptr();
        give(b);
        let again = take(32 << 10);
        assert_eq!(again.as_ptr(), ptr, "reused");
        assert!(again.is_empty() && again.capacity() >= 64 << 10);
        // Too small to keep, or bigger than asked for is fine, smaller is not.
        give(Vec::with_capacity(100));
        assert!(take(1 << 20).capacity() >= 1 << 20);
        for _ in 0..KEEP + 5 {
            give(Vec::with_capacity(MIN));
        }
        CACHE.with(|c| assert_eq!(c.borrow().len(), KEEP));
    }

    #[test]
    fn future_blocks_are_reused_and_a_bounded_number_kept() {
        use futures_util::FutureExt;
        // Over glibc's thread cache, as the HTTP/1.1 exchange is.
        async fn big(x: u8) -> u8 {
            let a = [x; 1500];
            std::future::ready(()).await;
            a[1499]
        }
        FUTURES.with(|c| c.borrow_mut().clear());
        let f = future(big(7));
        let block = |f: &Pooled<_>| &**f.0.as_ref().unwrap() as *const _ as usize;
        let first = block(&f);
        let mut f = f;
        assert_eq!((&mut f).now_or_never(), Some(7));
        assert_eq!((&mut f).now_or_never(), None, "done: pending, no panic");
        FUTURES.with(|c| assert_eq!(c.borrow().len(), 1, "given back when done"));
        let g = future(big(8));
        assert_eq!(block(&g), first, "reused");
        drop(g);
        FUTURES.with(|c| assert!(c.borrow().is_empty(), "one dropped undone is freed"));
        // As many in flight at once as a busy shard has, then all done.
        let mut many: Vec<_> = (0..KEEP_FUTURES + 5).map(|_| future(big(1))).collect();
        for f in &mut many {
            assert_eq!(f.now_or_never(), Some(1));
        }
        FUTURES.with(|c| assert_eq!(c.borrow().len(), KEEP_FUTURES));
    }

    #[test]
    fn small_buffers_come_back_and_only_their_class_is_kept() {
        let mut b = take(1200);
        assert_eq!(b.capacity(), SMALL);
        b.extend_from_slice(b"sealed");
        let ptr = b.as_ptr();
        give(b);
        let again = take(SMALL);
        assert_eq!(again.as_ptr(), ptr, "reused");
        assert!(again.is_empty());
        // Grown past the class, or of another size: not kept as small.
        let mut grown = again;
        grown.reserve_exact(SMALL + 1);
        give(grown);
        give(Vec::with_capacity(SMALL - 1));
        SMALL_CACHE.with(|c| assert!(c.borrow().is_empty()));
        for _ in 0..KEEP_SMALL + 5 {
            give(Vec::with_capacity(SMALL));
        }
        SMALL_CACHE.with(|c| assert_eq!(c.borrow().len(), KEEP_SMALL));
    }

    #[test]
    fn pooled_says_which_sizes_give_keeps() {
        for cap in [SMALL, MIN, CLASS, MAX] {
            assert!(pooled(cap), "{cap}");
        }
        for cap in [0, 100, SMALL - 1, SMALL + 1, MIN - 1, MAX + 1] {
            assert!(!pooled(cap), "{cap}");
            give(Vec::with_capacity(cap));
            let kept = CACHE.with(|c| c.borrow().iter().any(|b| b.capacity() == cap))
                || SMALL_CACHE.with(|c| c.borrow().iter().any(|b| b.capacity() == cap));
            assert!(!kept, "{cap} was kept");
        }
    }
}
