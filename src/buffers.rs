//! A per-thread (so per-shard) cache of I/O buffers, in two sizes.
//!
//! The proxy reads into 16–66 KiB buffers and frees them a moment later,
//! once per request or record batch. glibc's `free` of a chunk of 64 KiB or
//! more runs `malloc_consolidate` every time, which showed as several
//! percent of a keep-alive request's CPU. Reusing a few buffers per shard
//! avoids that, and costs nothing while connections are idle: a buffer is
//! only held between `take` and `give`.
//!
//! Small buffers (a response head with a small body, its sealed records,
//! the head sent upstream) come from a second list of one size, `SMALL`:
//! glibc's thread cache takes chunks up to 1,032 bytes only, and every
//! allocation above that goes through its bins, consolidating the fast
//! bins first (`malloc_consolidate` was 1.8% of a 1 KiB keep-alive
//! request's samples, malloc and free 15% in all).

use std::cell::RefCell;

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

/// The one size of small buffers: a head and a body of a few KiB.
pub const SMALL: usize = 4 << 10;

/// Small buffers kept per thread (64 × 4 KiB = 256 KiB).
const KEEP_SMALL: usize = 64;

thread_local! {
    static CACHE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static SMALLS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least `cap` bytes of capacity.
pub fn take(cap: usize) -> Vec<u8> {
    if cap <= SMALL {
        return SMALLS
            .with(|c| c.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(SMALL));
    }
    let cached = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.iter().rposition(|b| b.capacity() >= cap)?;
        Some(c.swap_remove(i))
    });
    cached.unwrap_or_else(|| {
        Vec::with_capacity(if (MIN..=CLASS).contains(&cap) {
            CLASS
        } else {
            cap
        })
    })
}

/// Returns a buffer for reuse (dropped if of neither size, or the cache
/// is full).
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() == SMALL {
        buf.clear();
        SMALLS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < KEEP_SMALL {
                c.push(buf);
            }
        });
        return;
    }
    if !(MIN..=MAX).contains(&buf.capacity()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_have_one_size_and_their_own_list() {
        let mut b = take(1200);
        assert_eq!(b.capacity(), SMALL);
        b.extend_from_slice(b"head");
        let ptr = b.as_ptr();
        give(b);
        let again = take(100);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0), "reused, empty");
        // A small request never takes a large buffer (a slow reader would
        // hold 68 KiB for a few bytes), nor a large one a small buffer.
        give(take(64 << 10));
        assert_eq!(take(10).capacity(), SMALL);
        assert!(take(SMALL + 1).capacity() > SMALL);
    }

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
}
