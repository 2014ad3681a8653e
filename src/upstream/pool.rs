//! Per-shard pools of idle keep-alive connections to HTTP backends (plain
//! or TLS). Never shared between shards; a connection the backend closed
//! while idle is detected before reuse (`sys::idle_socket_usable`) and
//! dropped.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::conn::BackendConn;

struct Idle {
    stream: BackendConn,
    addr: SocketAddr,
    since: Instant,
}

/// Idle connections for each upstream group, newest last.
pub struct Pool {
    groups: RefCell<Vec<Vec<Idle>>>,
    /// Set when a reload replaced this pool's config generation: idle
    /// connections are closed and no more are kept.
    retired: std::cell::Cell<bool>,
    /// The most idle connections kept per group, whatever the group's
    /// `pool_size`: [`PRIVATE_CAP`] for a client connection's own pool.
    cap: usize,
}

/// Idle connections a client connection's own pool keeps per group (a
/// `send_proxy` group: each connection carries that client's header).
/// `pool_size` sizes a shard's pool; here it would let every client
/// connection keep up to that many (an HTTP/2 client's burst of
/// concurrent streams leaves one per stream), outside `max_conns` and
/// aged only when a request comes back to the same backend. Four serve a
/// client's next burst partly warm.
pub const PRIVATE_CAP: usize = 4;

impl Pool {
    /// A pool for `groups` upstream groups.
    pub fn new(groups: usize) -> Pool {
        Pool::capped(groups, usize::MAX)
    }

    /// A pool for `groups` groups that keeps at most `cap` idle
    /// connections in each.
    pub fn capped(groups: usize, cap: usize) -> Pool {
        Pool {
            groups: RefCell::new((0..groups).map(|_| Vec::new()).collect()),
            retired: std::cell::Cell::new(false),
            cap,
        }
    }

    /// A reload removed or changed this pool's upstream group: its idle
    /// connections close now and none is kept from now on (the old
    /// generation's connections still using the group close theirs when
    /// their exchange ends).
    pub fn retire(&self) {
        self.retired.set(true);
        for g in self.groups.borrow_mut().iter_mut() {
            g.clear();
        }
    }

    /// The most recently used idle connection to backend `addr` of `group`
    /// (the balancer picked the backend) that is still open and idle for
    /// less than `max_idle` at `now`; stale ones are closed on the way.
    pub fn take_for(
        &self,
        group: usize,
        addr: SocketAddr,
        max_idle: Duration,
        now: Instant,
    ) -> Option<BackendConn> {
        let mut groups = self.groups.borrow_mut();
        let idle = groups.get_mut(group)?;
        while let Some(i) = idle.iter().rposition(|c| c.addr == addr) {
            let c = idle.remove(i);
            if now.saturating_duration_since(c.since) < max_idle && c.stream.usable_when_idle() {
                return Some(c.stream);
            }
        }
        None
    }

    /// Returns a connection whose last response ended cleanly.
    pub fn put(&self, group: usize, stream: impl Into<BackendConn>, addr: SocketAddr, max: usize) {
        let stream = stream.into();
        let mut groups = self.groups.borrow_mut();
        let Some(idle) = groups.get_mut(group) else {
            return;
        };
        let max = max.min(self.cap);
        if max == 0 || self.retired.get() {
            // `pool_size = 0`, or a retired generation: the connection
            // closes here.
            return;
        }
        while idle.len() >= max {
            // Oldest out: it is the likeliest to be closed by the backend.
            idle.remove(0);
        }
        idle.push(Idle {
            stream,
            addr,
            since: crate::clock::coarse_now(),
        });
    }

    /// Closes the connections idle for `max_idle` or longer at `now`. A
    /// lookup closes stale ones on its way too, but a group no request
    /// reaches would otherwise hold its fds (and the backend's) for ever.
    pub fn evict_stale(&self, max_idle: Duration, now: Instant) -> usize {
        let mut closed = 0;
        for idle in self.groups.borrow_mut().iter_mut() {
            let before = idle.len();
            idle.retain(|c| now.saturating_duration_since(c.since) < max_idle);
            closed += before - idle.len();
        }
        closed
    }

    /// Idle connections held for `group` (for tests and metrics).
    pub fn idle(&self, group: usize) -> usize {
        self.groups.borrow().get(group).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::net::TcpStream;

    fn runtime() -> monoio::Runtime<monoio::LegacyDriver> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
    }

    fn listen() -> (std::net::TcpListener, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[test]
    fn only_fresh_open_connections_to_the_picked_backend_are_reused() {
        runtime().block_on(async {
            let (listener, addr) = listen();
            let other = SocketAddr::from(([127, 0, 0, 2], addr.port()));
            let pool = Pool::new(1);
            let max_idle = Duration::from_secs(1);

            let a = TcpStream::connect_addr(addr).await.unwrap();
            let (_peer_a, _) = listener.accept().unwrap();
            pool.put(0, a, addr, 4);
            let now = Instant::now();
            assert!(pool.take_for(0, other, max_idle, now).is_none());
            assert_eq!(pool.idle(0), 1, "another backend's lookup leaves it");
            let a = pool
                .take_for(0, addr, max_idle, now)
                .expect("fresh: reused");
            pool.put(0, a, addr, 4);
            // Idle longer than max_idle at the caller's `now`: closed.
            assert!(pool
                .take_for(0, addr, max_idle, now + 2 * max_idle)
                .is_none());
            assert_eq!(pool.idle(0), 0);

            // Closed by the backend while idle: seen by the peek, closed.
            let b = TcpStream::connect_addr(addr).await.unwrap();
            let (peer_b, _) = listener.accept().unwrap();
            pool.put(0, b, addr, 4);
            drop(peer_b);
            let mut seen_closed = false;
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(10));
                let b = pool.take_for(0, addr, max_idle, Instant::now());
                match b {
                    Some(b) => pool.put(0, b, addr, 4),
                    None => {
                        seen_closed = true;
                        break;
                    }
                }
            }
            assert!(seen_closed, "a closed idle connection was handed out");
            assert_eq!(pool.idle(0), 0);
        });
    }

    /// A client connection's own pool keeps `PRIVATE_CAP` whatever the
    /// group's `pool_size`.
    #[test]
    fn a_private_pool_keeps_its_cap() {
        runtime().block_on(async {
            let (listener, addr) = listen();
            let pool = Pool::capped(1, PRIVATE_CAP);
            let mut peers = Vec::new();
            for _ in 0..PRIVATE_CAP + 3 {
                let s = TcpStream::connect_addr(addr).await.unwrap();
                peers.push(listener.accept().unwrap());
                pool.put(0, s, addr, 32);
            }
            assert_eq!(pool.idle(0), PRIVATE_CAP);
        });
    }

    #[test]
    fn the_oldest_idle_connection_makes_room() {
        runtime().block_on(async {
            let (listener, addr) = listen();
            let pool = Pool::new(1);
            let mut peers = Vec::new();
            let mut ports = Vec::new();
            for _ in 0..3 {
                let s = TcpStream::connect_addr(addr).await.unwrap();
                ports.push(s.local_addr().unwrap().port());
                peers.push(listener.accept().unwrap());
                pool.put(0, s, addr, 2);
            }
            assert_eq!(pool.idle(0), 2);
            // Newest first; the first connection was dropped for room.
            let now = Instant::now();
            let max_idle = Duration::from_secs(60);
            let port = |s: BackendConn| match s {
                BackendConn::Plain(s) => s.local_addr().unwrap().port(),
                BackendConn::Tls(_) => unreachable!("plain connections only"),
            };
            assert_eq!(
                pool.take_for(0, addr, max_idle, now).map(port),
                Some(ports[2])
            );
            assert_eq!(
                pool.take_for(0, addr, max_idle, now).map(port),
                Some(ports[1])
            );
            assert!(pool.take_for(0, addr, max_idle, now).is_none());
            // Stale ones are closed without a lookup too.
            let s = TcpStream::connect_addr(addr).await.unwrap();
            peers.push(listener.accept().unwrap());
            pool.put(0, s, addr, 2);
            assert_eq!(pool.evict_stale(max_idle, Instant::now()), 0);
            // The pool's clock (`clock::coarse_now`) is within a tick of
            // `Instant::now()`, either side: a tick's slack (50 ms, as
            // `clock`'s own test allows). Without it this failed when the
            // put landed up to a tick ahead.
            let slack = Duration::from_millis(50);
            assert_eq!(
                pool.evict_stale(max_idle, Instant::now() + max_idle + slack),
                1
            );
            assert_eq!(pool.idle(0), 0);
            // pool_size = 0: nothing is kept (and nothing breaks).
            let s = TcpStream::connect_addr(addr).await.unwrap();
            peers.push(listener.accept().unwrap());
            pool.put(0, s, addr, 0);
            assert_eq!(pool.idle(0), 0);
        });
    }
}
