//! The wall clock, in the one unit ktern compares certificate dates,
//! OCSP freshness and ticket epochs in: seconds since the Unix epoch; and
//! a coarse monotonic clock for timeouts.

use std::time::{Duration, Instant};

/// Now, to within one timer tick (4 ms here), on `Instant::now()`'s
/// timeline: for bounds of 50 ms and more (idle and keep-alive timeouts,
/// head and response deadlines, a pooled connection's idle age), never
/// for a latency that is measured or logged. A keep-alive HTTP/1.1
/// request read the clock 13.4 times (`bench/callgrind.sh`), 2% of the
/// server's CPU per request (`perf`). The coarse clock's own read is 5.7
/// ns against 19.6 ns for `CLOCK_MONOTONIC` (a C loop on this project's
/// host); this function adds a thread-local lookup and an addition.
pub fn coarse_now() -> Instant {
    thread_local! {
        // One precise reading and the coarse clock at the same moment:
        // later coarse readings are offsets from it.
        static BASE: Option<(Instant, Duration)> =
            crate::sys::monotonic_coarse().map(|c| (Instant::now(), c));
    }
    let since = BASE.with(|base| {
        let (at, base) = (*base)?;
        let now = crate::sys::monotonic_coarse()?;
        at.checked_add(now.saturating_sub(base))
    });
    since.unwrap_or_else(Instant::now)
}

/// A log line at most once per [`LogEvery::INTERVAL`] for a recurring
/// event (a flood of failed accepts, or of requests refused at
/// `max_conns`, must not become a flood of log lines), with how many
/// happened since the last line. Metrics count every one. Per shard.
#[derive(Debug, Default)]
pub struct LogEvery {
    last: std::cell::Cell<Option<Instant>>,
    since: std::cell::Cell<u64>,
}

impl LogEvery {
    /// At most one line per this long.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// Notes one event; `Some(events since the last line)` when a line is
    /// due now.
    pub fn due(&self) -> Option<u64> {
        let now = coarse_now();
        self.since.set(self.since.get() + 1);
        if self
            .last
            .get()
            .is_some_and(|t| now.saturating_duration_since(t) < Self::INTERVAL)
        {
            return None;
        }
        self.last.set(Some(now));
        Some(self.since.replace(0))
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_every_says_the_first_then_holds_the_rest_within_its_interval() {
        let log = LogEvery::default();
        assert_eq!(log.due(), Some(1));
        for _ in 0..5 {
            assert_eq!(log.due(), None);
        }
        // The next line, when due, carries the five held back and itself.
        log.last.set(coarse_now().checked_sub(LogEvery::INTERVAL));
        assert_eq!(log.due(), Some(6));
    }

    #[test]
    fn coarse_now_follows_the_precise_clock_within_a_tick() {
        // Ticks are 1-10 ms (CONFIG_HZ 1000 to 100); 50 ms leaves room for
        // a loaded machine without letting a wrong timeline through.
        let slack = Duration::from_millis(50);
        for _ in 0..1000 {
            let before = Instant::now();
            let c = coarse_now();
            let after = Instant::now();
            assert!(c + slack >= before && c <= after + slack);
        }
        let start = coarse_now();
        std::thread::sleep(Duration::from_millis(120));
        let moved = coarse_now().saturating_duration_since(start);
        assert!(moved >= Duration::from_millis(100), "moved {moved:?}");
    }
}
