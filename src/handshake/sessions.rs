//! The TLS 1.2 session-id cache (RFC 5246 §7.4.1.2): rustls' bounded
//! in-memory cache, with a lifetime. rustls keeps a TLS 1.2 session until
//! eviction pushes it out and resumes it whatever its age, so on a quiet
//! listener a session's master secret stayed resumable for days. Here a
//! session resumes for one `tickets.rotation` after its full handshake, as
//! long as the ticket hint says a ticket does (nginx's
//! `ssl_session_timeout` and HAProxy's `tune.ssl.lifetime` bound both
//! kinds by one setting too). A resumption does not extend it: rustls
//! stores a session only after a full handshake. Expired sessions leave
//! memory when asked for or when the next session is stored.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};

/// Where a store reads the time (a test's own clock; `coarse_now` live).
type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// A session-id store whose entries resume for `lifetime` after they are
/// stored. Each value is kept behind the milliseconds from `born` at which
/// it was stored (8 bytes, big-endian).
pub struct SessionIds {
    cache: Arc<ServerSessionMemoryCache>,
    /// The keys in the order they were stored, with their stamps: each
    /// `put` takes the expired ones at the front out of `cache`, so an
    /// expired master secret that nobody asks for again does not stay in
    /// memory until eviction. At most `size` (rustls' cache evicts the
    /// oldest beyond that, in the same order).
    order: Mutex<VecDeque<(u64, Vec<u8>)>>,
    size: usize,
    lifetime: Duration,
    born: Instant,
    clock: Clock,
}

impl std::fmt::Debug for SessionIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionIds")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl SessionIds {
    /// `size` sessions at most (the oldest go first), each for `lifetime`.
    pub fn new(size: usize, lifetime: Duration) -> SessionIds {
        // Timeouts of 50 ms and more run on the coarse clock; a lifetime
        // is at least a second (`tickets.rotation`).
        SessionIds::with_clock(size, lifetime, Box::new(crate::clock::coarse_now))
    }

    fn with_clock(size: usize, lifetime: Duration, clock: Clock) -> SessionIds {
        SessionIds {
            cache: ServerSessionMemoryCache::new(size),
            order: Mutex::new(VecDeque::new()),
            size: size.max(1),
            lifetime,
            born: clock(),
            clock,
        }
    }

    fn millis(&self) -> u64 {
        let age = (self.clock)().saturating_duration_since(self.born);
        u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
    }

    fn expired(&self, now: u64, at: u64) -> bool {
        u128::from(now.saturating_sub(at)) >= self.lifetime.as_millis()
    }

    /// The value stored under `key` if it is still within its lifetime. An
    /// expired entry asked for is taken out at once.
    fn fresh(&self, key: &[u8], stored: Vec<u8>) -> Option<Vec<u8>> {
        let (at, value) = stored.split_first_chunk::<8>()?;
        if self.expired(self.millis(), u64::from_be_bytes(*at)) {
            self.cache.take(key);
            return None;
        }
        Some(value.to_vec())
    }
}

impl StoresServerSessions for SessionIds {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let now = self.millis();
        let mut stamped = Vec::with_capacity(8 + value.len());
        stamped.extend_from_slice(&now.to_be_bytes());
        stamped.extend_from_slice(&value);
        // Once per TLS 1.2 full handshake, beside its key exchange.
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, _)) = order.front() {
            let expired = self.expired(now, *at);
            if !expired && order.len() < self.size {
                break;
            }
            if let Some((_, old)) = order.pop_front() {
                if expired {
                    self.cache.take(&old);
                }
            }
        }
        order.push_back((now, key.clone()));
        self.cache.put(key, stamped)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stored = self.cache.get(key)?;
        self.fresh(key, stored)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stored = self.cache.take(key)?;
        self.fresh(key, stored)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A store on a clock the test moves, in milliseconds.
    fn store(size: usize, lifetime: Duration) -> (SessionIds, Arc<AtomicU64>) {
        let start = Instant::now();
        let offset = Arc::new(AtomicU64::new(0));
        let at = offset.clone();
        let clock = Box::new(move || start + Duration::from_millis(at.load(Ordering::Relaxed)));
        (SessionIds::with_clock(size, lifetime, clock), offset)
    }

    #[test]
    fn a_session_resumes_within_its_lifetime_and_not_after() {
        let (ids, now) = store(4, Duration::from_secs(10));
        assert!(ids.put(b"a".to_vec(), b"secret a".to_vec()));
        now.store(4_000, Ordering::Relaxed);
        assert!(ids.put(b"b".to_vec(), b"secret b".to_vec()));
        now.store(9_999, Ordering::Relaxed);
        assert_eq!(ids.get(b"a").as_deref(), Some(&b"secret a"[..]));
        // Reading it does not renew it.
        now.store(10_000, Ordering::Relaxed);
        assert_eq!(ids.get(b"a"), None);
        // The expired entry was taken out, not left for eviction.
        assert_eq!(ids.cache.get(b"a"), None);
        assert_eq!(ids.take(b"b").as_deref(), Some(&b"secret b"[..]));
        assert_eq!(ids.get(b"b"), None, "taken");
        assert_eq!(ids.get(b"unknown"), None);
    }

    #[test]
    fn an_expired_session_is_not_taken_either() {
        let (ids, now) = store(4, Duration::from_secs(1));
        ids.put(b"a".to_vec(), b"secret".to_vec());
        now.store(1_500, Ordering::Relaxed);
        assert_eq!(ids.take(b"a"), None);
        assert_eq!(ids.cache.get(b"a"), None);
    }

    #[test]
    fn storing_takes_out_the_expired_sessions_nobody_asked_for() {
        let (ids, now) = store(4, Duration::from_secs(10));
        ids.put(b"a".to_vec(), b"secret a".to_vec());
        now.store(4_000, Ordering::Relaxed);
        ids.put(b"b".to_vec(), b"secret b".to_vec());
        now.store(10_500, Ordering::Relaxed);
        ids.put(b"c".to_vec(), b"secret c".to_vec());
        // `a` is gone from rustls' cache itself, not only refused.
        assert_eq!(ids.cache.get(b"a"), None);
        assert!(ids.cache.get(b"b").is_some());
        assert_eq!(ids.get(b"b").as_deref(), Some(&b"secret b"[..]));
        assert_eq!(ids.order.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_oldest_sessions_are_evicted_at_the_size() {
        let (ids, _) = store(2, Duration::from_secs(60));
        for key in [b"a", b"b", b"c"] {
            ids.put(key.to_vec(), key.to_vec());
        }
        assert_eq!(ids.get(b"a"), None);
        assert_eq!(ids.get(b"c").as_deref(), Some(&b"c"[..]));
        // The order of keys stays within the size too.
        assert_eq!(ids.order.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_stored_value_too_short_for_its_stamp_is_no_session() {
        let (ids, _) = store(2, Duration::from_secs(60));
        ids.cache.put(b"a".to_vec(), vec![0; 7]);
        assert_eq!(ids.get(b"a"), None);
    }
}
