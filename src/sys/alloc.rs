//! A global allocator that counts what a stretch of code allocates, on
//! its own thread or in every thread of the process: support for tests
//! that bound work which does not jitter with the machine
//! (`tests/handshake_cost.rs`, `tests/request_cost.rs`). A binary opts in with
//! `#[global_allocator] static A: ktern::sys::alloc::Counting =
//! ktern::sys::alloc::Counting;`; ktern itself keeps the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

thread_local! {
    // Const-initialized, of types without destructors: on Linux these are
    // plain `#[thread_local]` statics, which never allocate and are never
    // torn down, so the allocator itself can use them at any time.
    static ON: Cell<bool> = const { Cell::new(false) };
    static SEEN: Cell<Allocations> = const { Cell::new(Allocations { calls: 0, bytes: 0 }) };
}

/// [`count_process`]'s switch and counts: every thread's allocations,
/// shards' included, which a thread-local switch cannot reach.
static EVERY_THREAD: AtomicBool = AtomicBool::new(false);
static PROCESS_CALLS: AtomicU64 = AtomicU64::new(0);
static PROCESS_BYTES: AtomicU64 = AtomicU64::new(0);

/// What a stretch of code asked the allocator for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocations {
    /// Allocations and reallocations.
    pub calls: u64,
    /// Bytes asked for by them (a reallocation counts its new size).
    pub bytes: u64,
}

/// The system allocator, counting for [`count`].
pub struct Counting;

fn note(bytes: usize) {
    if EVERY_THREAD.load(Ordering::Relaxed) {
        PROCESS_CALLS.fetch_add(1, Ordering::Relaxed);
        PROCESS_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    if ON.with(Cell::get) {
        SEEN.with(|seen| {
            let a = seen.get();
            seen.set(Allocations {
                calls: a.calls + 1,
                bytes: a.bytes + bytes as u64,
            });
        });
    }
}

// SAFETY: every method passes its caller's arguments unchanged to
// `System`, so the caller's guarantees are `System`'s; the counting touches
// only this thread's const-initialized cells and process-wide atomics,
// none of which allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's `alloc` contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's `alloc_zeroed` contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`,
        // with `layout` (the caller's `dealloc` contract).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`, and the caller's `realloc` contract
        // for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns what this thread allocated while it ran. Where
/// [`Counting`] is not the binary's global allocator, nothing: a budget
/// test bounds its counts from below too.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, Allocations) {
    /// Puts the counting switch back as it was, also if `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON.with(|on| on.set(self.0));
        }
    }
    let _restore = Restore(ON.with(|on| on.replace(true)));
    let before = SEEN.with(Cell::get);
    let r = f();
    let after = SEEN.with(Cell::get);
    let seen = Allocations {
        calls: after.calls - before.calls,
        bytes: after.bytes - before.bytes,
    };
    (r, seen)
}

/// Runs `f` and returns what every thread of the process allocated while
/// it ran: for work done on threads the caller does not run, such as a
/// server's shards serving a load generator in another process. Whatever
/// else runs meanwhile counts too, so a test keeps its binary to itself
/// and cancels fixed costs by difference. Calls do not nest.
pub fn count_process<R>(f: impl FnOnce() -> R) -> (R, Allocations) {
    /// Turns the switch off again, also if `f` panics.
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            EVERY_THREAD.store(false, Ordering::SeqCst);
        }
    }
    let before = Allocations {
        calls: PROCESS_CALLS.load(Ordering::SeqCst),
        bytes: PROCESS_BYTES.load(Ordering::SeqCst),
    };
    EVERY_THREAD.store(true, Ordering::SeqCst);
    let off = Off;
    let r = f();
    drop(off);
    let seen = Allocations {
        calls: PROCESS_CALLS.load(Ordering::SeqCst) - before.calls,
        bytes: PROCESS_BYTES.load(Ordering::SeqCst) - before.bytes,
    };
    (r, seen)
}
