//! Choosing and connecting to backends. Each shard owns its own
//! [`Balancer`]s: no state is shared between shards.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

pub mod pool;

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every backend refused or failed the connect; the last error is kept.
    #[error("all {tried} backends failed, last {addr}: {source}")]
    Connect {
        /// Backends tried.
        tried: usize,
        /// The last backend tried.
        addr: SocketAddr,
        /// Its error.
        source: io::Error,
    },
}

/// nginx's defaults: one failure takes a backend out for 10 s.
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// See [`DEFAULT_MAX_FAILS`].
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    /// Consecutive failures.
    fails: Cell<u32>,
    /// Skipped until then (passive health).
    down_until: Cell<Option<Instant>>,
}

/// Round robin over a route's backends with passive health: a backend that
/// failed `max_fails` times in a row is tried last for `fail_timeout`
/// (still tried when every backend is down, rather than failing outright).
/// A failed connect moves to the next backend.
#[derive(Debug)]
pub struct Balancer {
    backends: Vec<Backend>,
    next: Cell<usize>,
    max_fails: u32,
    fail_timeout: Duration,
}

impl Balancer {
    /// A balancer over `backends` with nginx's passive-health defaults.
    pub fn new(backends: Vec<SocketAddr>, start: usize) -> Balancer {
        Balancer::with_health(backends, start, DEFAULT_MAX_FAILS, DEFAULT_FAIL_TIMEOUT)
    }

    /// A balancer with explicit passive-health settings (`max_fails` 0
    /// disables them).
    pub fn with_health(
        backends: Vec<SocketAddr>,
        start: usize,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Balancer {
        let start = if backends.is_empty() {
            0
        } else {
            start % backends.len()
        };
        Balancer {
            backends: backends
                .into_iter()
                .map(|addr| Backend {
                    addr,
                    fails: Cell::new(0),
                    down_until: Cell::new(None),
                })
                .collect(),
            next: Cell::new(start),
            max_fails,
            fail_timeout,
        }
    }

    /// The order to try backends for one connection, at time `now`:
    /// round robin among healthy backends, then those marked down.
    pub fn plan_at(&self, now: Instant) -> Vec<SocketAddr> {
        let n = self.backends.len();
        let first = self.next.get();
        if n > 0 {
            self.next.set((first + 1) % n);
        }
        let rotated = (0..n).map(|i| &self.backends[(first + i) % n]);
        let (up, down): (Vec<&Backend>, Vec<&Backend>) =
            rotated.partition(|b| b.down_until.get().map_or(true, |t| now >= t));
        up.into_iter().chain(down).map(|b| b.addr).collect()
    }

    /// Records a failure (connect refused or timed out, or a broken
    /// response) of `addr`.
    pub fn failed(&self, addr: SocketAddr, now: Instant) {
        if let Some(b) = self.backends.iter().find(|b| b.addr == addr) {
            let fails = b.fails.get().saturating_add(1);
            b.fails.set(fails);
            if self.max_fails > 0 && fails >= self.max_fails {
                b.down_until.set(Some(now + self.fail_timeout));
            }
        }
    }

    /// Records a success: the backend is healthy again.
    pub fn succeeded(&self, addr: SocketAddr) {
        if let Some(b) = self.backends.iter().find(|b| b.addr == addr) {
            b.fails.set(0);
            b.down_until.set(None);
        }
    }

    /// Connects to the next backend, trying each once, healthy ones first.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let mut last = None;
        let mut tried = 0;
        for addr in self.plan_at(Instant::now()) {
            tried += 1;
            let res = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            };
            match res {
                Ok(s) => {
                    // Proxied bytes are already batched by the client; no
                    // Nagle delay on top (nginx sets TCP_NODELAY likewise).
                    let _ = s.set_nodelay(true);
                    self.succeeded(addr);
                    return Ok((s, addr));
                }
                Err(e) => {
                    tracing::debug!(backend = %addr, error = %e, "backend connect failed");
                    self.failed(addr, Instant::now());
                    last = Some((addr, e));
                }
            }
        }
        let (addr, source) = last.unwrap_or_else(|| {
            (
                SocketAddr::from(([0, 0, 0, 0], 0)),
                io::Error::new(io::ErrorKind::NotFound, "no backends configured"),
            )
        });
        Err(UpstreamError::Connect {
            tried,
            addr,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    #[test]
    fn plan_rotates_and_covers_every_backend() {
        let a = addrs(3);
        let b = Balancer::new(a.clone(), 0);
        let now = Instant::now();
        assert_eq!(b.plan_at(now), a);
        assert_eq!(b.plan_at(now), vec![a[1], a[2], a[0]]);
        let empty = Balancer::new(Vec::new(), 5);
        assert!(empty.plan_at(now).is_empty());
    }

    #[test]
    fn failed_backends_go_last_until_their_timeout_then_return() {
        let a = addrs(3);
        let b = Balancer::with_health(a.clone(), 0, 2, Duration::from_secs(10));
        let t0 = Instant::now();
        b.failed(a[0], t0);
        assert_eq!(b.plan_at(t0)[0], a[0], "one failure is under max_fails = 2");
        b.failed(a[0], t0);
        for _ in 0..3 {
            let plan = b.plan_at(t0 + Duration::from_secs(1));
            assert_eq!(plan.len(), 3, "down backends are still tried, last");
            assert_eq!(plan[2], a[0]);
        }
        assert!(b.plan_at(t0 + Duration::from_secs(11)).contains(&a[0]));
        let plan: Vec<_> = (0..3)
            .map(|_| b.plan_at(t0 + Duration::from_secs(11))[0])
            .collect();
        assert!(
            plan.contains(&a[0]),
            "back in rotation after fail_timeout: {plan:?}"
        );
        b.failed(a[1], t0);
        b.failed(a[1], t0);
        b.succeeded(a[1]);
        assert!(
            (0..3).any(|_| b.plan_at(t0)[0] == a[1]),
            "a success clears the mark"
        );
    }
}
